//! Workers and the trust endpoint, in host mode with real machined,
//! containerd and etcd: a worker config carries the OS CA certificate but
//! not its key; the worker gets its OS API server certificate signed by the
//! control-plane node's trust endpoint (port 50001) with the machine token,
//! keeps it on STATE across restarts, and a worker whose token is wrong is
//! refused and returns to maintenance mode instead of becoming unreachable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use node_tests::{bootstrapped_node, require, wait_until, Machined};

#[test]
fn worker_gets_its_certificate_from_the_trust_endpoint() {
    require!("etcd", "containerd", "runc");
    let tmp = tempfile::tempdir().unwrap();
    let cp = "127.0.7.1";
    let (files, _cp_node) = bootstrapped_node(tmp.path(), cp);
    let worker_yaml = files.path("worker.yaml");
    assert!(
        !std::fs::read_to_string(&worker_yaml)
            .unwrap()
            .contains("PRIVATE KEY"),
        "a worker config must not carry CA keys"
    );

    let w = "127.0.7.2";
    let mut worker = Machined::start(&tmp.path().join("worker"), w);
    worker.apply_insecure(&worker_yaml).expect_ok();
    worker.wait_configured();
    // mutual TLS against the OS CA: the worker's certificate chains to it.
    let v = files.osctl(&[w], &["version"]).expect_ok();
    assert!(v.stdout.contains("worker"), "{}", v.text());
    files.osctl(&[w], &["health", "--wait", "60"]).expect_ok();
    let svc = files.osctl(&[w], &["services"]).expect_ok();
    assert!(
        svc.stdout.contains("containerd") && !svc.stdout.contains("etcd"),
        "{}",
        svc.text()
    );
    let kept = worker.root.join("system/state/os-api.crt");
    let key = worker.root.join("system/state/os-api.key");
    assert!(kept.exists() && key.exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Independent check: openssl verifies the kept certificate against the
    // cluster's OS CA, for TLS server use.
    let bundle: machine_api::pki::bundle::SecretsBundle =
        serde_norway::from_str(&std::fs::read_to_string(files.path("secrets.yaml")).unwrap())
            .unwrap();
    let ca = tmp.path().join("os-ca.crt");
    std::fs::write(&ca, &bundle.os_ca.crt).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(&ca)
        .arg(&kept)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A restart reuses the kept certificate: same fingerprint, no new request.
    let before = std::fs::read_to_string(&kept).unwrap();
    worker.restart();
    worker.wait_configured();
    files.osctl(&[w], &["version"]).expect_ok();
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), before);

    // A worker with the wrong machine token: refused by the trust endpoint,
    // back to maintenance mode (reachable, fixable), with the reason.
    let bad = tmp.path().join("bad-worker.yaml");
    let text = std::fs::read_to_string(&worker_yaml).unwrap();
    let token = bundle.machine_token.clone();
    assert!(text.contains(&token));
    std::fs::write(&bad, text.replace(&token, &"x".repeat(token.len()))).unwrap();
    let w3 = "127.0.7.3";
    let third = Machined::start(&tmp.path().join("third"), w3);
    third.apply_insecure(&bad).expect_ok();
    wait_until(
        Duration::from_secs(30),
        "the refused worker back in maintenance",
        || {
            third.log_text().contains("wrong machine token")
                && third
                    .log_text()
                    .matches("maintenance: no config yet")
                    .count()
                    >= 2
        },
    );
    assert!(node_tests::stored_config(&third.root).is_none());
    // Still configurable: the right config now works.
    third.apply_insecure(&worker_yaml).expect_ok();
    wait_until(
        Duration::from_secs(30),
        "the fixed worker configured",
        || files.osctl(&[w3], &["version"]).ok,
    );

    // A worker whose config names an endpoint nobody answers on: it retries,
    // then gives the config up (MACHINED_TRUST_TIMEOUT=8 in the harness) and
    // returns to maintenance mode, reachable and fixable, with the reason.
    let lost = tmp.path().join("lost-worker.yaml");
    let text = std::fs::read_to_string(&worker_yaml).unwrap();
    assert!(text.contains("https://127.0.7.1:6443"));
    std::fs::write(
        &lost,
        text.replace("https://127.0.7.1:6443", "https://127.0.7.9:6443"),
    )
    .unwrap();
    let w4 = "127.0.7.4";
    let fourth = Machined::start(&tmp.path().join("fourth"), w4);
    fourth.apply_insecure(&lost).expect_ok();
    wait_until(
        Duration::from_secs(60),
        "the worker without a trust endpoint back in maintenance",
        || {
            let log = fourth.log_text();
            log.contains("the trust endpoint gave no answer within 8s")
                && log.matches("maintenance: no config yet").count() >= 2
        },
    );
    assert!(node_tests::stored_config(&fourth.root).is_none());
    assert!(!fourth.root.join("system/state/os-api.crt").exists());
    fourth.apply_insecure(&worker_yaml).expect_ok();
    wait_until(
        Duration::from_secs(30),
        "the fixed fourth worker configured",
        || files.osctl(&[w4], &["version"]).ok,
    );
}
