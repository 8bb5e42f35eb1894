//! Apply modes: dry-run, no-reboot, staged (+ reboot), try with rollback
//! on failure and on timeout, try + confirm; and crash safety of the
//! config file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use machine_api::config::MachineConfig;
use node_tests::{bootstrapped_node, require, wait_until};

fn running_config(files: &node_tests::ClusterFiles, ip: &str) -> String {
    files.osctl(&[ip], &["get", "config"]).expect_ok().stdout
}

#[test]
fn dry_run_no_reboot_staged_and_reboot() {
    require!("etcd", "containerd", "runc");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.5.1";
    let (files, node) = bootstrapped_node(tmp.path(), ip);

    // dry-run: a diff, nothing applied.
    let quota = files.node_config(
        "quota.yaml",
        "n1",
        "{cluster: {etcd: {extraArgs: {quota-backend-bytes: 4294967296}}}}",
    );
    let q = quota.to_str().unwrap();
    let d = files
        .osctl(&[ip], &["apply-config", "-f", q, "--dry-run"])
        .expect_ok();
    assert!(
        d.stdout.contains("+      quota-backend-bytes"),
        "{}",
        d.text()
    );
    assert!(!running_config(&files, ip).contains("quota-backend-bytes"));

    // no-reboot: a live change; etcd restarts with it.
    files
        .osctl(&[ip], &["apply-config", "-f", q, "--mode", "no-reboot"])
        .expect_ok();
    assert!(running_config(&files, ip).contains("quota-backend-bytes"));
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();
    let etcd_conf =
        std::fs::read_to_string(node.root.join("system/secrets/etcd/etcd.conf.yaml")).unwrap();
    assert!(
        etcd_conf.contains("quota-backend-bytes: 4294967296"),
        "{etcd_conf}"
    );

    // A change that needs a reboot (the network) is refused by no-reboot …
    let net = files.node_config(
        "net.yaml",
        "n1",
        "{machine: {network: {nameservers: [192.0.2.53]}}}",
    );
    let n = net.to_str().unwrap();
    files
        .osctl(&[ip], &["apply-config", "-f", n, "--mode", "no-reboot"])
        .expect_err("machine.network");
    // … staged for the next boot …
    let s = files
        .osctl(&[ip], &["apply-config", "-f", n, "--mode", "staged"])
        .expect_ok();
    assert!(s.stdout.contains("staged"), "{}", s.text());
    let c = running_config(&files, ip);
    assert!(
        !c.contains("192.0.2.53") && c.contains("a staged config waits"),
        "{c}"
    );
    // … and applied by a reboot (host mode: machined re-executes itself).
    files.osctl(&[ip], &["reboot"]).expect_ok();
    wait_until(Duration::from_secs(60), "config after reboot", || {
        files
            .osctl(&[ip], &["get", "config"])
            .stdout
            .contains("192.0.2.53")
    });
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();

    // A live apply after a staged one wins: the stale staged config must
    // not come back at the next reboot.
    let staged = files.node_config(
        "staged2.yaml",
        "n1",
        "{machine: {network: {nameservers: [192.0.2.54]}}}",
    );
    files
        .osctl(
            &[ip],
            &[
                "apply-config",
                "-f",
                staged.to_str().unwrap(),
                "--mode",
                "staged",
            ],
        )
        .expect_ok();
    // Dropping the nameservers is a network change: auto reboots for it
    // (and a reboot asked for meanwhile would be refused, not dropped).
    let r = files
        .osctl(&[ip], &["apply-config", "-f", q, "--mode", "auto"])
        .expect_ok();
    assert!(r.stdout.contains("rebooting"), "{}", r.text());
    std::thread::sleep(Duration::from_secs(2));
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();
    let c = running_config(&files, ip);
    assert!(
        !c.contains("192.0.2.54"),
        "the superseded staged config came back:\n{c}"
    );
}

#[test]
fn try_rolls_back_a_config_that_breaks_etcd_and_keeps_a_confirmed_one() {
    require!("etcd", "containerd", "runc", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.5.2";
    let (files, node) = bootstrapped_node(tmp.path(), ip);
    node.etcdctl(&["put", "before", "1"]).expect_ok();

    // etcd refuses to start with a non-numeric heartbeat: the try must roll
    // back by itself well before its 120 s timeout.
    let broken = files.node_config(
        "broken.yaml",
        "n1",
        "{cluster: {etcd: {extraArgs: {heartbeat-interval: soon}}}}",
    );
    let t = files
        .osctl(
            &[ip],
            &[
                "apply-config",
                "-f",
                broken.to_str().unwrap(),
                "--mode",
                "try",
                "--try-timeout",
                "120",
            ],
        )
        .expect_ok();
    assert!(t.stdout.contains("trying"), "{}", t.text());
    wait_until(
        Duration::from_secs(60),
        "rollback of the broken try",
        || !running_config(&files, ip).contains("heartbeat-interval"),
    );
    assert!(
        node.log_text()
            .contains("try config rolled back: service etcd failed"),
        "{}",
        node.log_text()
    );
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();
    assert_eq!(
        node.etcdctl(&["get", "before", "--print-value-only"])
            .expect_ok()
            .stdout
            .trim(),
        "1"
    );

    // A try that is not confirmed rolls back at its timeout.
    let ok = files.node_config(
        "ok.yaml",
        "n1",
        "{cluster: {etcd: {extraArgs: {heartbeat-interval: 150}}}}",
    );
    let ok_s = ok.to_str().unwrap();
    files
        .osctl(
            &[ip],
            &[
                "apply-config",
                "-f",
                ok_s,
                "--mode",
                "try",
                "--try-timeout",
                "5",
            ],
        )
        .expect_ok();
    assert!(running_config(&files, ip).contains("heartbeat-interval"));
    wait_until(Duration::from_secs(40), "rollback at timeout", || {
        !running_config(&files, ip).contains("heartbeat-interval")
    });
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();

    // Confirmed in time: kept.
    files
        .osctl(
            &[ip],
            &[
                "apply-config",
                "-f",
                ok_s,
                "--mode",
                "try",
                "--try-timeout",
                "60",
            ],
        )
        .expect_ok();
    files
        .osctl(&[ip], &["apply-config", "-f", ok_s])
        .expect_err("a try config is pending");
    files.osctl(&[ip], &["confirm"]).expect_ok();
    files
        .osctl(&[ip], &["confirm"])
        .expect_err("no try config is pending");
    std::thread::sleep(Duration::from_secs(2));
    assert!(running_config(&files, ip).contains("heartbeat-interval"));
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();
}

#[test]
fn killing_machined_during_apply_never_leaves_a_torn_config() {
    require!("etcd", "containerd", "runc");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.5.3";
    let (files, mut node) = bootstrapped_node(tmp.path(), ip);
    let a = files.node_config(
        "a.yaml",
        "n1",
        "{cluster: {etcd: {extraArgs: {snapshot-count: 1000}}}}",
    );
    let b = files.node_config(
        "b.yaml",
        "n1",
        "{cluster: {etcd: {extraArgs: {snapshot-count: 2000}}}}",
    );
    let cfg_path = node_tests::state_record(&node.root);
    for i in 0..8u64 {
        let file = if i % 2 == 0 { &a } else { &b };
        let osconfig = files.osconfig();
        let f = file.to_str().unwrap().to_owned();
        let ip_s = ip.to_owned();
        let apply = std::thread::spawn(move || {
            node_tests::osctl(&[
                "apply-config",
                "-f",
                &f,
                "--osconfig",
                &osconfig,
                "-n",
                &ip_s,
            ])
        });
        std::thread::sleep(Duration::from_millis(5 + i * 7));
        node.kill();
        let _ = apply.join();
        let text = node_tests::stored_config(&node.root).unwrap();
        MachineConfig::parse(&text).unwrap_or_else(|p| panic!("torn config after kill {i}: {p}"));
        node.restart();
        // Staged temp files of a killed write are cleaned at start.
        let leftovers: Vec<String> = std::fs::read_dir(cfg_path.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();
}
