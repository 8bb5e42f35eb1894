//! A/B upgrades on a real disk boot (OVMF, systemd-boot, TCG):
//!
//! 1. v1 boots from slot A, becomes an etcd node; a key goes into etcd.
//! 2. A bundle signed by a key the node does not trust is refused; nothing
//!    changes.
//! 3. An upgrade to a broken image (its machined exits at once) is
//!    installed into slot B; the node boots it, init gives each try up,
//!    systemd-boot's counter runs out, and the node comes back on v1 in
//!    slot A by itself, config and etcd data intact.
//! 4. An upgrade to v2 is installed into slot B, boots, becomes healthy
//!    and is marked good: `osctl version` shows v2 running in B.
//! 5. `osctl rollback` starts v1 in slot A again.
//!
//! Prints the upgrade's transfer-and-write and reboot-to-healthy times and
//! the rollback time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use node_tests::{
    build_qemu_image_with, console_value as banner, etcd_client_certs, free_port, osctl, require,
    wait_until, ClusterFiles, UefiVm,
};

fn version_line(files: &ClusterFiles, node: &str) -> Option<String> {
    let r = files.osctl(&[node], &["version"]);
    r.ok.then(|| r.stdout.lines().last().unwrap_or("").to_owned())
}

/// Waits until `osctl version` answers with a line containing every needle.
fn wait_version(files: &ClusterFiles, node: &str, limit: Duration, needles: &[&str]) -> String {
    let mut last = String::new();
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(l) = version_line(files, node) {
            if needles.iter().all(|n| l.contains(n)) {
                return l;
            }
            last = l;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("timed out after {limit:?} waiting for {needles:?} in `osctl version`; last: {last}");
}

fn build(
    dir: &Path,
    version: &str,
    key: &Path,
    machined: Option<&Path>,
) -> Option<std::path::PathBuf> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--image-version".into(),
        version.into(),
        "--sign".into(),
        key.into(),
    ];
    if let Some(m) = machined {
        args.push("--machined".into());
        args.push(m.into());
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    build_qemu_image_with(&dir.join(version), &refs)
}

#[test]
fn upgrade_falls_back_from_a_broken_image_then_upgrades_and_rolls_back() {
    require!("qemu-system-x86_64", "etcdctl");
    if UefiVm::firmware().is_none() {
        machine_api::skip_test!("OVMF is not installed (apt-get install ovmf)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    osctl(&["gen", "signing-key", "-o", keys.to_str().unwrap()]).expect_ok();
    let key = keys.join("image-signing.key");
    let Some(v1) = build(tmp.path(), "1.0.0", &key, None) else {
        return;
    };
    // A machined that exits at once: the image boots, its node never comes up.
    let broken = build(
        tmp.path(),
        "1.1.0-broken",
        &key,
        Some(Path::new("/bin/false")),
    )
    .unwrap();
    let v2 = build(tmp.path(), "2.0.0", &key, None).unwrap();
    let other_keys = tmp.path().join("other-keys");
    osctl(&["gen", "signing-key", "-o", other_keys.to_str().unwrap()]).expect_ok();

    let (api, etcd) = (free_port(), free_port());
    let vm = UefiVm::boot(tmp.path(), &v1, 3 << 30, &[(api, 50000), (etcd, 2379)]);
    wait_until(Duration::from_secs(240), "the maintenance banner", || {
        banner(&vm.console(), "token:").is_some()
    });
    let text = vm.console();
    let (fp, token) = (
        banner(&text, "fingerprint:").unwrap(),
        banner(&text, "token:").unwrap(),
    );
    let node = format!("127.0.0.1:{api}");
    let files = ClusterFiles::generate(&tmp.path().join("cluster"), "10.0.2.15");
    let trusted = std::fs::read_to_string(keys.join("image-signing.pub")).unwrap();
    let patch = serde_json::json!({"machine": {"upgrade": {"trustedImageKeys": [trusted]}}});
    let cfg = files.node_config("vm.yaml", "up-1", &serde_json::to_string(&patch).unwrap());
    wait_until(Duration::from_secs(30), "the maintenance API", || {
        node_tests::apply_insecure(&node, &fp, &token, &cfg).ok
    });
    wait_until(Duration::from_secs(60), "the configured API", || {
        files.osctl(&[&node], &["version"]).ok
    });
    files.osctl(&[&node], &["bootstrap"]).expect_ok();
    files
        .osctl(&[&node], &["health", "--wait", "180"])
        .expect_ok();
    let certs = etcd_client_certs(&files.path("secrets.yaml"), &tmp.path().join("etcd-client"));
    let endpoint = format!("https://127.0.0.1:{etcd}");
    node_tests::etcdctl(&endpoint, &certs, &["put", "before-upgrades", "kept"]).expect_ok();
    // The key written on v1 is still there (etcd's data survived).
    let key_kept = || {
        let got = node_tests::etcdctl(
            &endpoint,
            &certs,
            &["get", "before-upgrades", "--print-value-only"],
        )
        .expect_ok();
        assert_eq!(got.stdout.trim(), "kept");
    };
    let line = wait_version(
        &files,
        &node,
        Duration::from_secs(30),
        &["1.0.0", "*A 1.0.0 good"],
    );
    eprintln!("v1: {line}");

    // 2. Another builder's signature.
    let other = tmp.path().join("foreign");
    let foreign = other.join("qemu-upgrade.tar");
    {
        std::fs::create_dir_all(&other).unwrap();
        let bundle = foreign.clone();
        // Re-sign v2's manifest with the other key: same files, untrusted signer.
        let manifest = std::fs::read(v2.join("manifest.json")).unwrap();
        let k = machine_api::image_signature::SigningKey::from_pkcs8_pem(
            &std::fs::read_to_string(other_keys.join("image-signing.key")).unwrap(),
            "other",
        )
        .unwrap();
        let mut b = tar::Builder::new(std::fs::File::create(&bundle).unwrap());
        let mut add = |name: &str, path: &Path| {
            let data = std::fs::read(path).unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        };
        add("manifest.json", &v2.join("manifest.json"));
        let sig = other.join("sig");
        std::fs::write(&sig, k.sign(&manifest)).unwrap();
        add("manifest.json.sig", &sig);
        for f in [
            "qemu-vmlinuz",
            "qemu-boot-initrd.cpio.zst",
            "qemu-root.squashfs",
        ] {
            add(f, &v2.join(f));
        }
        b.finish().unwrap();
    }
    files
        .osctl(&[&node], &["upgrade", "--image", foreign.to_str().unwrap()])
        .expect_err("signature check failed");
    wait_version(&files, &node, Duration::from_secs(10), &["*A 1.0.0 good"]);

    // 3. The broken image: installed into B, boots, is given up, A again.
    let boots = |c: &str| c.matches("init started").count();
    let before = boots(&vm.console());
    // osctl waits for the node to come back healthy on B, and says it
    // came back on A instead.
    files
        .osctl(
            &[&node],
            &[
                "upgrade",
                "--image",
                broken.join("qemu-upgrade.tar").to_str().unwrap(),
                "--wait",
                "900",
            ],
        )
        .expect_err("came back on slot A running 1.0.0 instead of");
    wait_until(
        Duration::from_secs(900),
        "three failed tries of slot B and a boot of slot A",
        || {
            let c = vm.console();
            let tail = &c[c.len().min(c.rfind("init started").unwrap_or(0))..];
            boots(&c) >= before + 4 && tail.contains("root: slot A")
        },
    );
    let c = vm.console();
    assert!(
        c.matches("rebooting, so systemd-boot counts this try down")
            .count()
            >= 3,
        "init did not give the broken slot up:\n{c}"
    );
    let line = wait_version(
        &files,
        &node,
        Duration::from_secs(240),
        &["*A 1.0.0 good", "B 1.1.0-broken failed (no tries left)"],
    );
    eprintln!("after the broken upgrade: {line}");
    files
        .osctl(&[&node], &["health", "--wait", "180"])
        .expect_ok();
    key_kept();
    let cfg_now = files.osctl(&[&node], &["get", "config"]).expect_ok();
    assert!(cfg_now.stdout.contains("up-1"), "{}", cfg_now.text());

    // 4. v2, from a URL (osctl downloads it once, then streams it).
    let web = node_tests::HttpServer::start(&v2, "127.0.0.1");
    let t0 = Instant::now();
    let up = files
        .osctl(
            &[&node],
            &[
                "upgrade",
                "--image",
                &format!("http://{}/qemu-upgrade.tar", web.addr),
            ],
        )
        .expect_ok();
    drop(web);
    assert!(up.stderr.contains("downloaded"), "{}", up.text());
    // It returned once the node answered healthy from slot B; its own
    // count of that wait splits the time.
    let total = t0.elapsed();
    // The entry the node wrote, unless its answer was lost in the reboot
    // (then osctl says so and judged by the version the node booted).
    assert!(
        up.stdout.contains("slot-2-b+3.conf")
            || up.stdout.contains("answer to the upload was lost"),
        "{}",
        up.text()
    );
    let waited: f64 = up
        .stderr
        .lines()
        .find_map(|l| {
            l.split_once("healthy on slot B")?
                .1
                .split_once(") ")?
                .1
                .split_once("s after the upload ended")?
                .0
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no 'healthy on slot B' line:\n{}", up.text()));
    let to_healthy = Duration::from_secs_f64(waited);
    let transfer = total.saturating_sub(to_healthy);
    let line = wait_version(
        &files,
        &node,
        Duration::from_secs(120),
        &["2.0.0", "*B 2.0.0 good"],
    );
    eprintln!("after the v2 upgrade: {line}");
    assert!(line.contains("A 1.0.0 good"), "{line}");
    key_kept();

    // 5. Back to v1 by hand.
    let t1 = Instant::now();
    files.osctl(&[&node], &["rollback"]).expect_ok();
    let line = wait_version(
        &files,
        &node,
        Duration::from_secs(600),
        &["1.0.0", "*A 1.0.0 good", "B 2.0.0 good"],
    );
    let rollback = t1.elapsed();
    eprintln!("after rollback: {line}");
    files
        .osctl(&[&node], &["health", "--wait", "180"])
        .expect_ok();
    // The node's own split of its install time (in its answer, unless
    // that was lost in the reboot).
    let split = up
        .stdout
        .split("; ")
        .find(|p| p.contains("s waiting for the upload"))
        .unwrap_or("the node's answer was lost");
    eprintln!(
        "figures: upgrade download+transfer+verify+write {:.1}s (node: {split}), reboot to healthy and marked good {:.1}s; rollback to v1 serving {:.1}s",
        transfer.as_secs_f64(),
        to_healthy.as_secs_f64(),
        rollback.as_secs_f64()
    );
    drop(vm);
}
