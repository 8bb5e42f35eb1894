//! Three machined processes on 127.0.3.1-3 form a 3-member etcd cluster:
//! the first is bootstrapped, the others join through MemberAdd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use node_tests::{require, wait_until, ClusterFiles, Machined};

#[test]
fn three_nodes_form_an_etcd_cluster_and_survive_losing_one() {
    require!("etcd", "containerd", "runc", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let ips = ["127.0.3.1", "127.0.3.2", "127.0.3.3"];
    let files = ClusterFiles::generate(&tmp.path().join("cluster"), ips[0]);
    let mut nodes: Vec<Machined> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| Machined::start(&tmp.path().join(format!("n{i}")), ip))
        .collect();

    let first = files.node_config("n0.yaml", "n0", "");
    nodes[0].apply_insecure(&first).expect_ok();
    nodes[0].wait_configured();
    files.osctl(&[ips[0]], &["bootstrap"]).expect_ok();
    files
        .osctl(&[ips[0]], &["health", "--wait", "60"])
        .expect_ok();

    let join = format!(
        "{{cluster: {{etcd: {{endpoints: [\"https://{}:2379\"]}}}}}}",
        ips[0]
    );
    // Both joiners at once, as `osctl cluster create` does: etcd checks a
    // MemberAdd only against members already applied, so two adds at the
    // same moment used to leave two unstarted members and no quorum. The
    // joiners take turns through a lock in etcd (`join_lock`).
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let cfg = files.node_config(&format!("n{i}.yaml"), &format!("n{i}"), &join);
        node.apply_insecure(&cfg).expect_ok();
    }
    for (node, ip) in nodes.iter().zip(ips).skip(1) {
        node.wait_configured();
        files.osctl(&[ip], &["health", "--wait", "120"]).expect_ok();
    }

    // Fan-out: one command, three nodes, per-node results.
    let all = ips.join(",");
    files.osctl(&[&all], &["health"]).expect_ok();
    let m = files.osctl(&[ips[0]], &["etcd", "members"]).expect_ok();
    for n in ["n0", "n1", "n2"] {
        assert!(m.stdout.contains(n), "{n} missing:\n{}", m.text());
    }
    let st = files.osctl(&[&all], &["etcd", "status"]).expect_ok();
    assert_eq!(st.stdout.lines().count(), 4, "{}", st.text());

    // Independent check through every member.
    nodes[0].etcdctl(&["put", "k", "v1"]).expect_ok();
    for n in &nodes {
        assert_eq!(
            n.etcdctl(&["get", "k", "--print-value-only"])
                .expect_ok()
                .stdout
                .trim(),
            "v1"
        );
    }

    // Lose a node (machined and its services): writes still succeed.
    nodes[2].kill();
    node_tests::kill_all_under(&nodes[2].root);
    nodes[0].etcdctl(&["put", "k", "v2"]).expect_ok();
    let res = files.osctl(&[&all], &["version"]);
    assert!(
        !res.ok && res.stderr.contains(ips[2]),
        "a dead node must be named:\n{}",
        res.text()
    );
    assert!(
        res.stdout.contains("n0") && res.stdout.contains("n1"),
        "{}",
        res.text()
    );

    // Bring it back: machined restarts etcd from its data and it catches up.
    nodes[2].restart();
    files
        .osctl(&[ips[2]], &["health", "--wait", "60"])
        .expect_ok();
    wait_until(Duration::from_secs(30), "n2 caught up", || {
        nodes[2]
            .etcdctl(&["get", "k", "--print-value-only"])
            .stdout
            .trim()
            == "v2"
    });

    // A member that lost its data (reset without --graceful) rejoins: its
    // stale member entry is replaced instead of crash-looping etcd.
    files.osctl(&[ips[1]], &["reset"]).expect_ok();
    wait_until(Duration::from_secs(20), "n1 back in maintenance", || {
        nodes[1]
            .log_text()
            .matches("state:       maintenance")
            .count()
            >= 2
    });
    let cfg = files.path("n1.yaml");
    nodes[1].apply_insecure(&cfg).expect_ok();
    files
        .osctl(&[ips[1]], &["health", "--wait", "90"])
        .expect_ok();
    let m = files.osctl(&[ips[0]], &["etcd", "members"]).expect_ok();
    assert_eq!(m.stdout.lines().count(), 4, "{}", m.text());
    assert_eq!(
        nodes[1]
            .etcdctl(&["get", "k", "--print-value-only"])
            .expect_ok()
            .stdout
            .trim(),
        "v2"
    );
}
