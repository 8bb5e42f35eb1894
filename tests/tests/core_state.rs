//! Regression tests for machined's core state machine, against real
//! machined processes in host mode:
//! - the maintenance takeover race (an apply without a token, or with a
//!   seen token, racing the operator's first apply);
//! - a SIGKILL at every write point of every transition's commit;
//! - reboot followed at once by shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use node_tests::{apply_insecure, require, wait_until, ClusterFiles, Machined};

fn hostname_of(files: &ClusterFiles, ip: &str) -> String {
    let out = files.osctl(&[ip], &["get", "config"]).expect_ok().text();
    out.lines()
        .find_map(|l| l.trim().strip_prefix("hostname: "))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The stored record's running config names `hostname`.
fn stored_hostname(root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(root.join("system/state/machine-state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let cfg = v["current"].as_str()?;
    let doc: serde_json::Value = serde_norway::from_str(cfg).ok()?;
    doc["machine"]["hostname"].as_str().map(str::to_owned)
}

#[test]
fn maintenance_takeover_race_is_closed() {
    require!("containerd", "runc", "etcd");
    let tmp = tempfile::tempdir().unwrap();
    let ours = ClusterFiles::generate(&tmp.path().join("ours"), "127.0.16.1");
    let theirs = ClusterFiles::generate(&tmp.path().join("theirs"), "127.0.16.1");
    let good = ours.node_config("n.yaml", "operator-node", "");
    let evil = theirs.node_config("n.yaml", "taken-over", "");
    for attempt in 0..5 {
        let ip = "127.0.16.1";
        let node = Machined::start(&tmp.path().join(format!("n{attempt}")), ip);
        let fp = node.banner("fingerprint:").unwrap();
        let token = node.banner("token:").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let wins = Arc::new(AtomicU32::new(0));
        // Attackers: without a token, and with the token (seen on the
        // console), applying another cluster's config in a loop.
        let attack = |t: String| {
            let (stop, wins, fp, evil) = (stop.clone(), wins.clone(), fp.clone(), evil.clone());
            std::thread::spawn(move || {
                let mut refusals = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let r = apply_insecure(ip, &fp, &t, &evil);
                    if r.ok {
                        wins.fetch_add(1, Ordering::SeqCst);
                    } else {
                        refusals.push(r.text());
                    }
                }
                refusals
            })
        };
        // Two attackers without the token race the operator throughout.
        let mut attackers = vec![attack(String::new()), attack(String::new())];
        std::thread::sleep(Duration::from_millis(150));
        let mine = apply_insecure(ip, &fp, &token, &good);
        assert!(mine.ok, "attempt {attempt}: {}", mine.text());
        // One that saw the token starts once the operator's apply was
        // accepted: the window in which the old listener still served.
        attackers.push(attack(token.clone()));
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::SeqCst);
        let refusals: Vec<String> = attackers
            .into_iter()
            .flat_map(|a| a.join().unwrap())
            .collect();
        let wins = wins.load(Ordering::SeqCst);
        assert_eq!(wins, 0, "attempt {attempt}: an attacker's apply succeeded");
        // Refused for the token, for the closed listener, or because the
        // listener has gone: the configured API has another certificate,
        // and a connection caught while the listener is replaced breaks
        // (reset, refused, an HTTP/2 stream cut off or cancelled), all at the
        // transport level. The attackers racing the operator without the
        // token were refused for it.
        assert!(
            refusals
                .iter()
                .any(|r| r.contains("token missing or wrong")),
            "attempt {attempt}: no refusal for the token: {refusals:?}"
        );
        for r in &refusals {
            assert!(
                r.contains("token missing or wrong")
                    || r.contains("accepts no more configs")
                    || r.contains("fingerprint")
                    || r.contains("connect")
                    || r.contains("Connection reset")
                    || r.contains("Connection refused")
                    || r.contains("h2 protocol error")
                    || r.contains("transport error")
                    || r.contains("operation was canceled"),
                "{r}"
            );
        }
        node.wait_configured();
        assert_eq!(hostname_of(&ours, ip), "operator-node");
        assert_eq!(
            stored_hostname(&node.root).as_deref(),
            Some("operator-node")
        );
        drop(node);
    }
}

/// Each transition's commit, killed at each write point: the next start
/// finds the state before the transition or after it, and a `try` is never
/// left without its way back.
#[test]
fn a_kill_at_every_write_point_leaves_a_consistent_node() {
    require!("containerd", "runc", "etcd");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.16.2";
    let files = ClusterFiles::generate(&tmp.path().join("c"), ip);
    let a = files.node_config("a.yaml", "host-a", "");
    let b = files.node_config("b.yaml", "host-b", "");
    let b_s = b.to_str().unwrap().to_owned();
    // (name, osctl args after the first apply of `a`)
    let transitions: Vec<(&str, Vec<&str>)> = vec![
        (
            "auto",
            vec!["apply-config", "-f", &b_s, "--mode", "no-reboot"],
        ),
        (
            "try",
            vec![
                "apply-config",
                "-f",
                &b_s,
                "--mode",
                "try",
                "--try-timeout",
                "300",
            ],
        ),
        (
            "staged",
            vec!["apply-config", "-f", &b_s, "--mode", "staged"],
        ),
        ("reset", vec!["reset"]),
    ];
    for (name, args) in &transitions {
        for point in ["begin", "staged", "renamed"] {
            let root = tmp.path().join(format!("{name}-{point}"));
            // Commit 1 is the first apply; commit 2 is the transition.
            let spec = format!("commit:2:{point}");
            let mut node = Machined::start_with_env(&root, ip, &[("MACHINED_FAULT", &spec)]);
            node.apply_insecure(&a).expect_ok();
            node.wait_configured();
            let r = files.osctl(&[ip], args);
            // The reply may or may not have made it out; the process died.
            let _ = r;
            wait_until(Duration::from_secs(10), "machined killed", || {
                node.log_text().contains("MACHINED_FAULT: killing")
            });
            // Restart without the fault.
            node = {
                drop(node);
                Machined::start(&root, ip)
            };
            let stored = stored_hostname(&root);
            let record: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(root.join("system/state/machine-state.json"))
                    .unwrap_or_else(|_| "{}".into()),
            )
            .unwrap_or_default();
            let after = point == "renamed";
            match (*name, after) {
                ("reset", true) => {
                    // Marked as resetting: the start finished the reset.
                    assert!(node.log_text().contains("state:       maintenance"));
                    assert_eq!(stored, None);
                }
                ("staged", true) => {
                    // Promoted at this start (a host-mode start is a boot).
                    assert_eq!(stored.as_deref(), Some("host-b"), "{name} {point}");
                }
                ("try", true) => {
                    // Same boot, deadline ahead: the try resumes, still
                    // revertible.
                    assert_eq!(stored.as_deref(), Some("host-b"));
                    assert!(record["trial"].is_object(), "{record}");
                    assert!(record["previous"].is_string(), "{record}");
                    files.osctl(&[ip], &["confirm"]).expect_ok();
                }
                ("auto", true) => assert_eq!(stored.as_deref(), Some("host-b")),
                _ => {
                    // Before the rename: nothing changed.
                    assert_eq!(stored.as_deref(), Some("host-a"), "{name} {point}");
                    assert!(record["trial"].is_null(), "{name} {point}: {record}");
                }
            }
            // No temp file is left behind.
            let leftovers: Vec<_> = std::fs::read_dir(root.join("system/state"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp-"))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
            drop(node);
        }
    }
}

#[test]
fn reboot_then_shutdown_is_refused_not_dropped() {
    require!("containerd", "runc", "etcd");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.16.3";
    let files = ClusterFiles::generate(&tmp.path().join("c"), ip);
    let cfg = files.node_config("n.yaml", "n1", "");
    let node = Machined::start(&tmp.path().join("n"), ip);
    node.apply_insecure(&cfg).expect_ok();
    node.wait_configured();
    files.osctl(&[ip], &["reboot"]).expect_ok();
    let second = files.osctl(&[ip], &["shutdown"]);
    // Refused with the reason, or the API is already gone; never an OK
    // that is then ignored.
    assert!(!second.ok, "shutdown after reboot was acknowledged");
    let t = second.text();
    assert!(
        t.contains("rebooting") || t.contains("connect") || t.contains("unavailable"),
        "{t}"
    );
}
