//! Certificate renewal on running nodes, in host mode with real machined,
//! etcd and containerd. Leaf certificates live a year; machined replaces
//! its own `--renew-before` ahead of expiry without restarting anything.
//! Here `MACHINED_RENEW_BEFORE` is a year minus 8 seconds, so every
//! certificate is due 8 s after it was minted:
//! - the control-plane node serves a freshly minted OS API certificate;
//! - the worker gets a new one from the trust endpoint while it keeps
//!   serving the old one, keeps it on STATE, then serves it;
//! - etcd's server, peer and client certificates are minted again in place
//!   and the running etcd (same process) presents the new server
//!   certificate at the next handshake, checked with openssl;
//! - a worker restarted with a certificate that is due (not expired)
//!   serves it at once, even while no trust endpoint answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use node_tests::{require, wait_until, ClusterFiles, Machined};

const RENEW_BEFORE: &str = "31535992"; // 365 days - 8 s

fn fingerprints(m: &Machined) -> BTreeSet<String> {
    m.log_text()
        .lines()
        .filter(|l| l.starts_with("fingerprint:"))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

fn etcd_pid(root: &Path) -> i64 {
    let text = std::fs::read_to_string(root.join("run/machined/services/etcd.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["pid"].as_i64().unwrap()
}

/// The certificate etcd presents on `ip:2379` (DER), fetched with openssl
/// using the node's own client certificate.
fn served_etcd_cert(ip: &str, certs: &Path) -> Option<Vec<u8>> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("{ip}:2379")])
        .arg("-cert")
        .arg(certs.join("client.crt"))
        .arg("-key")
        .arg(certs.join("client.key"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    machine_api::pki::pem::first_cert_der(&out.stdout)
        .ok()
        .map(|d| d.to_vec())
}

/// The certificate (DER) in a PEM file.
fn cert_file_der(path: &Path) -> Option<Vec<u8>> {
    let text = std::fs::read(path).ok()?;
    machine_api::pki::pem::first_cert_der(text)
        .ok()
        .map(|d| d.to_vec())
}

#[test]
fn running_nodes_renew_their_certificates_without_restarts() {
    require!("etcd", "containerd", "runc", "openssl");
    let tmp = tempfile::tempdir().unwrap();
    let env = [("MACHINED_RENEW_BEFORE", RENEW_BEFORE)];
    let cp = "127.0.9.1";
    let files = ClusterFiles::generate(&tmp.path().join("cluster"), cp);
    let node = Machined::start_with_env(&tmp.path().join("cp"), cp, &env);
    node.apply_insecure(&files.node_config("n.yaml", "n1", ""))
        .expect_ok();
    node.wait_configured();
    files.osctl(&[cp], &["bootstrap"]).expect_ok();
    files.osctl(&[cp], &["health", "--wait", "60"]).expect_ok();

    let w = "127.0.9.2";
    let worker = Machined::start_with_env(&tmp.path().join("worker"), w, &env);
    worker
        .apply_insecure(&files.path("worker.yaml"))
        .expect_ok();
    worker.wait_configured();
    let kept = worker.root.join("system/state/os-api.crt");
    let first_kept = std::fs::read_to_string(&kept).unwrap();

    let etcd_certs = node.root.join("system/secrets/etcd");
    let first_etcd = std::fs::read_to_string(etcd_certs.join("server.crt")).unwrap();
    let first_etcd_der = cert_file_der(&etcd_certs.join("server.crt"));
    let pid = etcd_pid(&node.root);
    // Maintenance and the first configured identity so far.
    let cp_before = fingerprints(&node).len();
    let worker_before = fingerprints(&worker).len();

    // The log line comes after the files are written: wait for both (the
    // files alone can be seen half-way through a renewal).
    wait_until(Duration::from_secs(90), "renewed certificates", || {
        fingerprints(&node).len() > cp_before
            && fingerprints(&worker).len() > worker_before
            && std::fs::read_to_string(&kept).unwrap() != first_kept
            && std::fs::read_to_string(etcd_certs.join("server.crt")).unwrap() != first_etcd
            && worker
                .log_text()
                .contains("OS API certificate due for renewal")
            && node.log_text().contains("etcd certificates renewed")
    });

    // etcd took the new certificate without a restart: the same process
    // presents what is in the file now (it may be renewed again meanwhile,
    // so compare with the file read around the handshake).
    wait_until(
        Duration::from_secs(30),
        "etcd to present the current server certificate",
        || {
            let before = cert_file_der(&etcd_certs.join("server.crt"));
            let served = served_etcd_cert(cp, &etcd_certs);
            served.is_some() && served == before && served != first_etcd_der
        },
    );
    assert_eq!(etcd_pid(&node.root), pid, "etcd was restarted");

    // Both nodes still answer over mutual TLS, and etcd is healthy through
    // the renewed client certificates.
    wait_until(Duration::from_secs(30), "both nodes healthy", || {
        files.osctl(&[cp], &["health"]).ok && files.osctl(&[w], &["version"]).ok
    });
    wait_until(
        Duration::from_secs(30),
        "etcdctl with renewed certificates",
        || node.etcdctl(&["put", "renewed", "yes"]).ok,
    );

    // A worker restarted with a certificate that is due but not expired
    // serves it at once, even with no trust endpoint to renew it (the
    // control plane's machined is down), and keeps asking meanwhile.
    let mut node = node;
    node.kill();
    let mut worker = worker;
    worker.restart();
    worker.wait_configured();
    wait_until(
        Duration::from_secs(30),
        "the restarted worker answering without its trust endpoint",
        || files.osctl(&[w], &["version"]).ok,
    );
    wait_until(Duration::from_secs(30), "the renewal attempts", || {
        worker
            .log_text()
            .contains("renewing the OS API certificate")
    });
}
