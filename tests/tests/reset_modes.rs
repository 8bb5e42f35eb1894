//! `osctl reset` modes in host mode, with real etcd and etcdctl as the
//! independent checker: the last etcd member is wiped only with `--force`
//! (the node refuses, not osctl), `--wipe ephemeral` keeps the config and
//! brings etcd back empty and healthy, and a graceful reset of one member of
//! three leaves a healthy two-member cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use machine_api::osconfig::OsConfig;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::ResetRequest;
use node_tests::{
    bootstrapped_node, require, state_record, stored_config, wait_until, ClusterFiles, Machined,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Calls Reset directly (osctl only sends the modes it knows).
fn raw_reset(files: &ClusterFiles, ip: &str, req: ResetRequest) -> Result<(), tonic::Status> {
    let cfg = OsConfig::parse(&std::fs::read_to_string(files.path("osconfig")).unwrap()).unwrap();
    let ctx = &cfg.contexts[&cfg.context];
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ctx.ca))
        .identity(Identity::from_pem(&ctx.crt, &ctx.key))
        .domain_name(ip);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = Endpoint::from_shared(format!("https://{ip}:50000"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .unwrap();
        MachineServiceClient::new(ch).reset(req).await.map(drop)
    })
}

/// Calls `f` every second until it says done, for at most `limit`; the
/// text of its last call (shown when time runs out).
fn retry(limit: Duration, what: &str, mut f: impl FnMut() -> (bool, String)) -> String {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (done, text) = f();
        if done {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; the last try said:\n{text}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn maintenance_banners(node: &Machined) -> usize {
    node.log_text().matches("state:       maintenance").count()
}

#[test]
fn the_last_etcd_member_needs_force_and_an_ephemeral_reset_keeps_the_config() {
    require!("etcd", "containerd", "runc", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.13.1";
    let (files, node) = bootstrapped_node(tmp.path(), ip);
    node.etcdctl(&["put", "before", "1"]).expect_ok();

    // The only member: every mode destroys etcd's data, so every mode is
    // refused without --force, in one line that says what would be lost.
    for args in [
        &["reset"][..],
        &["reset", "--wipe", "ephemeral"],
        &["reset", "--graceful", "--wipe", "state"],
    ] {
        let r = files.osctl(&[ip], args).expect_err("pass --force");
        let line: Vec<&str> = r.stderr.lines().filter(|l| l.contains("--force")).collect();
        assert_eq!(line.len(), 1, "{}", r.text());
        assert!(
            line[0].contains("last member of its etcd cluster") && line[0].contains("only copy"),
            "{}",
            r.text()
        );
    }
    // An upgrade that would wipe the data first is refused the same way,
    // before anything is sent.
    let b = tmp.path().join("bundle.tar");
    std::fs::write(&b, node_tests::test_bundle::bundle(None, false)).unwrap();
    let r = files
        .osctl(
            &[ip],
            &[
                "upgrade",
                "--image",
                b.to_str().unwrap(),
                "--preserve=false",
            ],
        )
        .expect_err("pass --force");
    assert!(r.stderr.contains("--preserve=false"), "{}", r.text());
    // Refused by the node itself, and nothing changed.
    let e = raw_reset(&files, ip, ResetRequest::default()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("--force"), "{e:?}");
    let e = raw_reset(
        &files,
        ip,
        ResetRequest {
            wipe: "everything".into(),
            force: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("wipe") && e.message().contains("ephemeral"),
        "{e:?}"
    );
    assert_eq!(
        node.etcdctl(&["get", "before", "--print-value-only"])
            .expect_ok()
            .stdout
            .trim(),
        "1"
    );

    // --wipe ephemeral --force: the config stays, etcd starts a new, empty
    // cluster here, and the API keeps its identity (no maintenance mode).
    let r = files
        .osctl(&[ip], &["reset", "--wipe", "ephemeral", "--force"])
        .expect_ok();
    assert!(r.stdout.contains("config kept"), "{}", r.text());
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();
    let c = files.osctl(&[ip], &["get", "config"]).expect_ok();
    assert!(c.stdout.contains("hostname: n1"), "{}", c.text());
    node.etcdctl(&["endpoint", "health"]).expect_ok();
    assert_eq!(
        node.etcdctl(&["get", "before", "--print-value-only"])
            .expect_ok()
            .stdout
            .trim(),
        ""
    );
    let m = files.osctl(&[ip], &["etcd", "members"]).expect_ok();
    assert_eq!(m.stdout.lines().count(), 2, "{}", m.text());
    assert_eq!(maintenance_banners(&node), 1, "{}", node.log_text());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state_record(&node.root)).unwrap()).unwrap();
    assert_eq!(record["resetting"], false, "{record}");
    assert!(record.get("wipe").is_none(), "{record}");
    assert!(stored_config(&node.root).is_some());
    node.etcdctl(&["put", "after", "2"]).expect_ok();

    // The new cluster's only member is as precious: --force again.
    files.osctl(&[ip], &["reset"]).expect_err("pass --force");
    let r = files.osctl(&[ip], &["reset", "--force"]).expect_ok();
    assert!(r.stdout.contains("maintenance mode"), "{}", r.text());
    wait_until(Duration::from_secs(20), "maintenance banner", || {
        maintenance_banners(&node) >= 2
    });
    assert!(stored_config(&node.root).is_none());
    assert!(!node.root.join("var/lib/etcd/member").exists());
}

#[test]
fn a_graceful_reset_of_one_member_of_three_leaves_a_healthy_pair() {
    require!("etcd", "containerd", "runc", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let ips = ["127.0.13.11", "127.0.13.12", "127.0.13.13"];
    let files = ClusterFiles::generate(&tmp.path().join("cluster"), ips[0]);
    let nodes: Vec<Machined> = ips
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
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let cfg = files.node_config(&format!("n{i}.yaml"), &format!("n{i}"), &join);
        node.apply_insecure(&cfg).expect_ok();
    }
    for (node, ip) in nodes.iter().zip(ips).skip(1) {
        node.wait_configured();
        files.osctl(&[ip], &["health", "--wait", "120"]).expect_ok();
    }
    let m = files.osctl(&[ips[0]], &["etcd", "members"]).expect_ok();
    assert_eq!(m.stdout.lines().count(), 4, "{}", m.text());

    // `upgrade --preserve=false` of n1: it leaves etcd, wipes its data and
    // joins again as a new member, healthy, before the bundle goes out (a
    // host-mode node then refuses it: no slot to write). etcd refuses to
    // remove a member right after a join, so this is retried until it
    // agrees (nothing is wiped before it does).
    let b = tmp.path().join("bundle.tar");
    std::fs::write(&b, node_tests::test_bundle::bundle(None, false)).unwrap();
    let id_of = |name: &str| -> String {
        let m = files.osctl(&[ips[0]], &["etcd", "members"]).expect_ok();
        m.stdout
            .lines()
            .find(|l| l.contains(name))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_default()
            .to_owned()
    };
    let n1_before = id_of("n1");
    let last = retry(Duration::from_secs(60), "n1 wiped for its upgrade", || {
        let r = files.osctl(
            &[ips[1]],
            &[
                "upgrade",
                "--image",
                b.to_str().unwrap(),
                "--preserve=false",
            ],
        );
        let text = r.text();
        (text.contains("wiped its data"), text)
    });
    assert!(last.contains("host mode"), "{last}");
    let n1_after = id_of("n1");
    assert!(
        !n1_after.is_empty() && n1_after != n1_before,
        "n1 should be a new member: {n1_before} then {n1_after}"
    );
    files.osctl(&[ips[1]], &["health"]).expect_ok();

    // Other members remain: no --force needed. etcd refuses to remove a
    // member that could cost quorum right after a join ("unhealthy
    // cluster"), so the reset is retried until etcd agrees.
    let last = retry(Duration::from_secs(60), "graceful reset of n2", || {
        let r = files.osctl(&[ips[2]], &["reset", "--graceful"]);
        let text = r.text();
        assert!(!text.contains("--force"), "{text}");
        (r.ok, text)
    });
    assert!(last.contains("maintenance mode"), "{last}");
    wait_until(Duration::from_secs(20), "n2 in maintenance", || {
        maintenance_banners(&nodes[2]) >= 2
    });

    // Two members, both healthy, and the pair still takes writes.
    let m = files.osctl(&[ips[0]], &["etcd", "members"]).expect_ok();
    assert_eq!(m.stdout.lines().count(), 3, "{}", m.text());
    assert!(!m.stdout.contains("n2"), "{}", m.text());
    for n in &nodes[..2] {
        n.etcdctl(&["endpoint", "health"]).expect_ok();
    }
    let pair = format!("{},{}", ips[0], ips[1]);
    files.osctl(&[&pair], &["health"]).expect_ok();
    nodes[0].etcdctl(&["put", "k", "after-reset"]).expect_ok();
    assert_eq!(
        nodes[1]
            .etcdctl(&["get", "k", "--print-value-only"])
            .expect_ok()
            .stdout
            .trim(),
        "after-reset"
    );
    assert!(stored_config(&nodes[2].root).is_none());
}
