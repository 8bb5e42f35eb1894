//! `osctl support` against a real bootstrapped node: the archive holds
//! each part a bug report needs, and no private key, token or secret of
//! the node's config appears anywhere in it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use node_tests::{bootstrapped_node, require, run};

const IP: &str = "127.0.17.1";

/// Every string in `v` under a key that names a secret (key, token,
/// secret), long enough to be one; certificates and public keys (the CA
/// certificates sit in the `secrets` section too) are public.
fn secrets(v: &serde_json::Value, under_secret: bool, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s)
            if under_secret
                && s.len() >= 16
                && !s.contains("BEGIN CERTIFICATE")
                && !s.contains("PUBLIC KEY") =>
        {
            out.push(s.clone())
        }
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let k = k.to_ascii_lowercase();
                let secret = k.contains("key") || k.contains("token") || k.contains("secret");
                secrets(v, under_secret || secret, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| secrets(v, under_secret, out)),
        _ => {}
    }
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn the_support_archive_has_every_part_and_no_secret() {
    require!("etcd", "containerd", "runc", "tar");
    let tmp = tempfile::tempdir().unwrap();
    let (files, node) = bootstrapped_node(tmp.path(), IP);
    node.etcdctl(&["put", "support", "x"]).expect_ok();
    let archive = tmp.path().join("support.tar.gz");
    let out = files
        .osctl(&[IP], &["support", archive.to_str().unwrap()])
        .expect_ok();
    assert!(out.stdout.contains("wrote"), "{}", out.text());
    assert!(!tmp.path().join("support.tar.gz.part").exists());

    let x = tmp.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&x))
    .expect_ok();
    let d = x.join(IP);
    for part in [
        "version.json",
        "config.yaml",
        "health.json",
        "boot-timeline.json",
        "etcd-status.json",
        "etcd-members.json",
        "events.txt",
        "services.json",
        "logs/etcd.log",
        "logs/containerd.log",
    ] {
        let p = d.join(part);
        assert!(
            std::fs::metadata(&p).is_ok_and(|m| m.len() > 0),
            "{part} missing or empty; errors: {}",
            std::fs::read_to_string(d.join("errors.txt")).unwrap_or_default()
        );
    }
    let config = std::fs::read_to_string(d.join("config.yaml")).unwrap();
    assert!(config.contains("n1"), "{config}");
    let events = std::fs::read_to_string(d.join("events.txt")).unwrap();
    assert!(events.contains("etcd bootstrap"), "{events}");

    // The node's config (as applied, with every key and token) against
    // every file of the archive.
    let applied: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(files.path("n.yaml")).unwrap()).unwrap();
    let mut secret_values = Vec::new();
    secrets(&applied, false, &mut secret_values);
    assert!(
        secret_values.iter().any(|s| s.contains("PRIVATE KEY")) && secret_values.len() >= 5,
        "the config should hold keys and tokens: {}",
        secret_values.len()
    );
    let mut all = Vec::new();
    files_under(&x, &mut all);
    assert!(all.len() >= 10, "{all:?}");
    for f in &all {
        let text = String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned();
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} holds a private key",
            f.display()
        );
        for s in &secret_values {
            // PEM bodies: look for a line of it, not the whole block.
            let probe = s
                .lines()
                .find(|l| l.len() >= 16 && !l.starts_with("-----"))
                .unwrap_or(s);
            assert!(
                !text.contains(probe),
                "{} holds a secret of the config ({}...)",
                f.display(),
                &probe[..8]
            );
        }
    }
}
