//! One node from maintenance mode to a healthy etcd member, and what must
//! survive: SIGKILL of etcd, SIGKILL of machined, restart of machined.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use node_tests::{bootstrapped_node, osctl, require, wait_until, ClusterFiles, Machined};

#[test]
fn maintenance_apply_bootstrap_and_etcd_healthy_over_mtls() {
    require!("etcd", "containerd", "runc", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.1.1";
    let files = ClusterFiles::generate(&tmp.path().join("cluster"), ip);
    let node = Machined::start(&tmp.path().join("node"), ip);
    let fp = node.banner("fingerprint:").unwrap();
    let token = node.banner("token:").unwrap();

    // Maintenance mode: version with the pinned fingerprint; nothing else.
    let v = osctl(&["version", "--insecure", "--cert-fingerprint", &fp, "-n", ip]).expect_ok();
    assert!(v.stdout.contains("maintenance"), "{}", v.text());
    osctl(&[
        "version",
        "--insecure",
        "--cert-fingerprint",
        &"0".repeat(64),
        "-n",
        ip,
    ])
    .expect_err("does not match --cert-fingerprint");
    let cfg = files.node_config("n.yaml", "n1", "");
    let cfg_s = cfg.to_str().unwrap();
    osctl(&[
        "apply-config",
        "--insecure",
        "--cert-fingerprint",
        &fp,
        "--token",
        "wrong",
        "-n",
        ip,
        "-f",
        cfg_s,
    ])
    .expect_err("maintenance token");
    osctl(&[
        "apply-config",
        "--insecure",
        "--cert-fingerprint",
        &fp,
        "-n",
        ip,
        "-f",
        cfg_s,
    ])
    .expect_err("maintenance token");

    // Dry run in maintenance shows the whole config as added and changes nothing.
    let dry = osctl(&[
        "apply-config",
        "--insecure",
        "--cert-fingerprint",
        &fp,
        "--token",
        &token,
        "-n",
        ip,
        "-f",
        cfg_s,
        "--dry-run",
    ])
    .expect_ok();
    assert!(
        dry.stdout.contains("+kind: MachineConfig"),
        "{}",
        dry.text()
    );
    assert!(node_tests::stored_config(&node.root).is_none());

    node.apply_insecure(&cfg).expect_ok();
    node.wait_configured();
    // The config on disk is private.
    let meta = std::fs::metadata(node_tests::state_record(&node.root)).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );

    // etcd waits for bootstrap; containerd is healthy via its gRPC health API.
    let s = files.osctl(&[ip], &["services"]).expect_ok();
    assert!(
        s.stdout.contains("waiting for `osctl bootstrap`"),
        "{}",
        s.text()
    );
    wait_until(Duration::from_secs(30), "containerd healthy", || {
        files
            .osctl(&[ip], &["service", "containerd"])
            .stdout
            .contains("healthy")
    });
    files.osctl(&[ip], &["bootstrap"]).expect_ok();
    files
        .osctl(&[ip], &["bootstrap"])
        .expect_err("already bootstrapped");
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();

    // Independent check: etcdctl with the node's certificates, over mTLS.
    node.etcdctl(&["put", "greeting", "hello"]).expect_ok();
    let got = node
        .etcdctl(&["get", "greeting", "--print-value-only"])
        .expect_ok();
    assert_eq!(got.stdout.trim(), "hello");
    let m = files.osctl(&[ip], &["etcd", "members"]).expect_ok();
    assert!(
        m.stdout.contains("n1") && m.stdout.contains(&format!("https://{ip}:2380")),
        "{}",
        m.text()
    );
    let st = files
        .osctl(&[ip], &["etcd", "status", "-o", "json"])
        .expect_ok();
    assert!(st.stdout.contains("\"version\": \"3."), "{}", st.text());

    // The running config comes back redacted.
    let c = files.osctl(&[ip], &["get", "config"]).expect_ok();
    assert!(
        c.stdout.contains("BEGIN CERTIFICATE") && !c.stdout.contains("PRIVATE KEY"),
        "{}",
        c.text()
    );
    assert!(c.stdout.contains("<redacted>"));

    // Logs: tail from the ring, and the file on disk.
    let l = files
        .osctl(&[ip], &["logs", "etcd", "--tail", "500"])
        .expect_ok();
    assert!(l.stdout.contains("serving client traffic"), "{}", l.text());
    assert!(node.root.join("var/log/etcd.log").exists());

    // Follow: new lines arrive while the stream is open.
    let mut follow = std::process::Command::new(node_tests::bin("osctl"))
        .args([
            "logs",
            "containerd",
            "-f",
            "--tail",
            "1",
            "--osconfig",
            &files.osconfig(),
            "-n",
            ip,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    files
        .osctl(&[ip], &["service", "containerd", "restart"])
        .expect_ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(l);
            if seen
                .iter()
                .any(|l| l.contains("containerd successfully booted"))
            {
                break;
            }
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        seen.iter()
            .any(|l| l.contains("containerd successfully booted")),
        "no new containerd lines followed: {seen:?}"
    );
}

#[test]
fn sigkill_of_etcd_restarts_it_and_sigkill_of_machined_keeps_it() {
    require!("etcd", "containerd", "runc", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.1.2";
    let (files, mut node) = bootstrapped_node(tmp.path(), ip);
    let etcd_pid = |files: &ClusterFiles| -> i64 {
        let out = files.osctl(&[ip], &["services", "-o", "json"]).expect_ok();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v[0]["result"]["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "etcd")
            .map(|s| s["pid"].as_i64().unwrap_or(0))
            .unwrap()
    };
    node.etcdctl(&["put", "a", "1"]).expect_ok();

    // SIGKILL etcd: restarted with backoff, counted, healthy again.
    let first = etcd_pid(&files);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(
        Duration::from_secs(30),
        "etcd restarted and healthy",
        || {
            let out = files.osctl(&[ip], &["service", "etcd", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
            let s = &v[0]["result"];
            s["healthy"] == true
                && s["restarts"].as_u64() == Some(1)
                && s["pid"].as_i64() != Some(first)
        },
    );
    assert_eq!(
        node.etcdctl(&["get", "a", "--print-value-only"])
            .expect_ok()
            .stdout
            .trim(),
        "1"
    );

    // SIGKILL machined: etcd keeps running with the same PID, and the next
    // machined adopts it rather than restarting it.
    let second = etcd_pid(&files);
    node.kill();
    assert!(node_tests::alive(second as i32), "etcd died with machined");
    node.etcdctl(&["put", "b", "2"]).expect_ok();
    node.restart();
    files.osctl(&[ip], &["health", "--wait", "30"]).expect_ok();
    assert_eq!(
        etcd_pid(&files),
        second,
        "etcd was restarted instead of adopted"
    );
    let s = files.osctl(&[ip], &["services"]).expect_ok();
    assert!(s.stdout.contains("(adopted)"), "{}", s.text());
    // The events of the killed machined were kept (journal on /var/log):
    // the first run's bootstrap and etcd restart, then the second run's
    // start.
    let ev = files.osctl(&[ip], &["events"]).expect_ok();
    let pos = |needle: &str| {
        ev.stdout
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in the events:\n{}", ev.text()))
    };
    let killed = pos("service  etcd failed: killed by signal 9");
    assert!(pos("request  etcd bootstrap") < killed);
    let runs: Vec<_> = ev
        .stdout
        .match_indices("note     machined ")
        .map(|(i, _)| i)
        .collect();
    assert!(
        runs.len() == 2 && runs[0] < killed && killed < runs[1],
        "two runs of machined in the events:\n{}",
        ev.stdout
    );
    // The restart count survived machined's restart.
    assert!(
        s.stdout
            .lines()
            .any(|l| l.starts_with("etcd") && l.split_whitespace().nth(3) == Some("1")),
        "{}",
        s.text()
    );

    // Stop is sticky; start brings it back.
    files.osctl(&[ip], &["service", "etcd", "stop"]).expect_ok();
    wait_until(Duration::from_secs(20), "adopted etcd stopped", || {
        !node_tests::alive(second as i32)
    });
    std::thread::sleep(Duration::from_secs(2));
    let s = files.osctl(&[ip], &["service", "etcd"]).expect_ok();
    assert!(s.stdout.contains("stopped"), "{}", s.text());
    files
        .osctl(&[ip], &["service", "etcd", "start"])
        .expect_ok();
    files.osctl(&[ip], &["health", "--wait", "30"]).expect_ok();
    files
        .osctl(&[ip], &["service", "nope", "restart"])
        .expect_err("no service named");
}

#[test]
fn shutdown_stops_services_and_reset_returns_to_maintenance() {
    require!("etcd", "containerd", "runc", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.1.3";
    let (files, mut node) = bootstrapped_node(tmp.path(), ip);
    // The only etcd member: its data is the cluster's last copy.
    files.osctl(&[ip], &["reset", "--force"]).expect_ok();
    wait_until(Duration::from_secs(20), "maintenance banner", || {
        node.log_text().matches("state:       maintenance").count() >= 2
    });
    assert!(node_tests::stored_config(&node.root).is_none());
    assert!(!node.root.join("var/lib/etcd/member").exists());
    let fp = node.banner("fingerprint:").unwrap();
    let v = osctl(&["version", "--insecure", "--cert-fingerprint", &fp, "-n", ip]).expect_ok();
    assert!(v.stdout.contains("maintenance"));

    // Configure again, then shut down: services stop, machined exits 0.
    let cfg = files.node_config("again.yaml", "n1", "");
    node.apply_insecure(&cfg).expect_ok();
    wait_until(Duration::from_secs(20), "configured again", || {
        node.log_text().matches("state:       configured").count() >= 2
    });
    files.osctl(&[ip], &["shutdown"]).expect_ok();
    wait_until(Duration::from_secs(30), "machined exits", || {
        !std::path::Path::new(&format!("/proc/{}", node.pid())).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", node.pid()))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    });
    node.kill();
    let containerd_alive = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(node.root.to_str().unwrap()))
            .unwrap_or(false)
    });
    assert!(!containerd_alive, "a service outlived shutdown");
}
