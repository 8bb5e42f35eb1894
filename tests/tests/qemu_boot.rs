//! Boot test 1: the qemu profile's kernel + initramfs boots under QEMU
//! (TCG), machined answers in maintenance mode, `osctl apply-config
//! --insecure` with the console's fingerprint and token makes it an etcd
//! node, `osctl bootstrap`, and etcd is healthy over mTLS — checked by
//! osctl and by etcdctl through a forwarded port; then a snapshot, a wipe
//! and a recovery from it bring back the key written before it.
//!
//! Builds the image with the workspace's imager from the committed lock;
//! skips (saying so) when QEMU or the package mirror is unavailable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use node_tests::{
    build_qemu_image, console_value as banner, etcd_client_certs, free_port, osctl, require,
    wait_until, ClusterFiles, UefiVm, Vm,
};

#[test]
fn image_boots_to_maintenance_and_becomes_a_healthy_etcd_node() {
    require!("qemu-system-x86_64", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let Some(out) = build_qemu_image(&tmp.path().join("image")) else {
        return;
    };

    let (api, etcd, metrics) = (free_port(), free_port(), free_port());
    let serial = tmp.path().join("serial.log");
    let started = Instant::now();
    let _vm = Vm(Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "1536",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-monitor", "none", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(out.join("qemu-vmlinuz"))
        .arg("-initrd")
        .arg(out.join("qemu-initramfs.cpio.zst"))
        .args([
            "-append",
            "console=ttyS0 panic=-1 ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off",
        ])
        .args([
            "-netdev",
            &format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{api}-:50000,hostfwd=tcp:127.0.0.1:{etcd}-:2379,hostfwd=tcp:127.0.0.1:{metrics}-:50002"
            ),
        ])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    let log = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_until(
        Duration::from_secs(180),
        "machined's maintenance banner on the console",
        || banner(&log(), "token:").is_some(),
    );
    let text = log();
    let fp = banner(&text, "fingerprint:").unwrap();
    let token = banner(&text, "token:").unwrap();
    assert!(text.contains("init started"), "{text}");
    eprintln!(
        "maintenance banner after {:.1}s wall",
        started.elapsed().as_secs_f64()
    );

    // Maintenance mode: pinned fingerprint, one-time token.
    let node = format!("127.0.0.1:{api}");
    // The forwarded port may lag the guest a little under load.
    let version = || {
        osctl(&[
            "version",
            "--insecure",
            "--cert-fingerprint",
            &fp,
            "-n",
            &node,
        ])
    };
    let mut v = version();
    for _ in 0..20 {
        if v.ok {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        v = version();
    }
    let v = v.expect_ok();
    assert!(v.stdout.contains("maintenance"), "{}", v.text());
    let files = ClusterFiles::generate(&tmp.path().join("cluster"), "10.0.2.15");
    let cfg = files.node_config("vm.yaml", "vm-1", "");
    node_tests::apply_insecure(&node, &fp, "wrong", &cfg).expect_err("maintenance token");
    node_tests::apply_insecure(&node, &fp, &token, &cfg).expect_ok();

    // Configured: mutual TLS from now on.
    wait_until(Duration::from_secs(60), "the configured API", || {
        files.osctl(&[&node], &["version"]).ok
    });
    files.osctl(&[&node], &["bootstrap"]).expect_ok();
    let t = Instant::now();
    files
        .osctl(&[&node], &["health", "--wait", "180"])
        .expect_ok();
    eprintln!(
        "etcd healthy {:.1}s after bootstrap (TCG)",
        t.elapsed().as_secs_f64()
    );
    // The kernel log through the API: the boot's first line is there.
    let dmesg = files.osctl(&[&node], &["dmesg"]).expect_ok();
    assert!(
        dmesg.stdout.contains("Linux version") && dmesg.stdout.starts_with("[    0."),
        "{}",
        dmesg.text()
    );
    scrape_metrics(&files, tmp.path(), metrics);
    let m = files.osctl(&[&node], &["etcd", "members"]).expect_ok();
    assert!(
        m.stdout.contains("vm-1") && m.stdout.contains("https://10.0.2.15:2380"),
        "{}",
        m.text()
    );

    // Independent check: etcdctl over mTLS through the forwarded port, with
    // a client certificate minted from the cluster's etcd CA.
    let certs = etcd_client_certs(&files.path("secrets.yaml"), &tmp.path().join("etcd-client"));
    let endpoint = format!("https://127.0.0.1:{etcd}");
    node_tests::etcdctl(&endpoint, &certs, &["put", "booted", "yes"]).expect_ok();
    let got = node_tests::etcdctl(&endpoint, &certs, &["get", "booted", "--print-value-only"])
        .expect_ok();
    assert_eq!(got.stdout.trim(), "yes");

    // Backup and restore on the image: snapshot, a key written after it,
    // a wipe (the only member: --force), the config again, and a recovery
    // from the snapshot with the image's etcdctl.
    let snap = tmp.path().join("backup.db");
    let t = Instant::now();
    files
        .osctl(&[&node], &["etcd", "snapshot", snap.to_str().unwrap()])
        .expect_ok();
    let snapshot_s = t.elapsed().as_secs_f64();
    node_tests::etcdctl(&endpoint, &certs, &["put", "after-snapshot", "lost"]).expect_ok();
    let banners = log().matches("token:").count();
    files.osctl(&[&node], &["reset", "--force"]).expect_ok();
    wait_until(
        Duration::from_secs(60),
        "maintenance mode after the reset",
        || log().matches("token:").count() > banners,
    );
    let text = log();
    let (fp, token) = (
        banner(&text, "fingerprint:").unwrap(),
        banner(&text, "token:").unwrap(),
    );
    wait_until(Duration::from_secs(30), "the maintenance API again", || {
        node_tests::apply_insecure(&node, &fp, &token, &cfg).ok
    });
    wait_until(Duration::from_secs(60), "the configured API again", || {
        files.osctl(&[&node], &["version"]).ok
    });
    let t = Instant::now();
    let r = files
        .osctl(
            &[&node],
            &["bootstrap", "--recover-from", snap.to_str().unwrap()],
        )
        .expect_ok();
    assert!(r.stdout.contains("restored"), "{}", r.text());
    files
        .osctl(&[&node], &["health", "--wait", "180"])
        .expect_ok();
    let recover_s = t.elapsed().as_secs_f64();
    let get = |k: &str| {
        node_tests::etcdctl(&endpoint, &certs, &["get", k, "--print-value-only"])
            .expect_ok()
            .stdout
            .trim()
            .to_owned()
    };
    assert_eq!(get("booted"), "yes");
    assert_eq!(get("after-snapshot"), "");
    eprintln!(
        "etcd snapshot of {} bytes in {snapshot_s:.1}s; recovery to healthy in {recover_s:.1}s (TCG)",
        std::fs::metadata(&snap).unwrap().len()
    );
}

/// The booted node's metrics over mutual TLS (curl with the operator's
/// certificate, the node's name as the server's), parsed by the Prometheus
/// project's own parsers; without a client certificate, nothing.
fn scrape_metrics(files: &ClusterFiles, tmp: &std::path::Path, port: u16) {
    use node_tests::prometheus::{
        assert_healthy_etcd_node, curl, operator_curl_files, parse, python,
    };
    let python =
        python().expect("python with prometheus_client (scripts/test.sh makes target/pyenv)");
    let [ca, crt, key] = operator_curl_files(files, &tmp.join("curl"));
    let to = format!("10.0.2.15:50002:127.0.0.1:{port}");
    let url = "https://10.0.2.15:50002/metrics";
    let (ok, text, err) = curl(&[
        "--connect-to",
        &to,
        "--cacert",
        &ca,
        "--cert",
        &crt,
        "--key",
        &key,
        url,
    ]);
    assert!(ok, "scrape over mutual TLS failed: {err}");
    let samples = parse(&python, &text);
    assert_healthy_etcd_node(&samples, &text);
    let (ok, text, _) = curl(&["--connect-to", &to, "--cacert", &ca, url]);
    assert!(
        !ok && !text.contains("machined_"),
        "served without a client certificate: {text}"
    );
    eprintln!(
        "metrics: {} samples scraped over mTLS from the VM",
        samples.len()
    );
}

/// Boot test 2: the raw disk image boots through OVMF and systemd-boot;
/// init switches to slot A's squashfs; machined formats STATE and
/// EPHEMERAL (grown to the bigger disk) and gets its address by DHCP.
/// After apply, bootstrap and a reboot the config is still there, a key
/// written to etcd before the reboot is read after it, and so are the
/// service logs written before it.
#[test]
fn disk_image_boots_through_uefi_and_keeps_config_and_etcd_data_across_reboot() {
    require!("qemu-system-x86_64", "etcdctl");
    if UefiVm::firmware().is_none() {
        machine_api::skip_test!("OVMF is not installed (apt-get install ovmf)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some(image) = build_qemu_image(&tmp.path().join("image")) else {
        return;
    };
    let (api, etcd) = (free_port(), free_port());
    // The node's own disk: a copy, bigger than the image, so EPHEMERAL grows.
    let vm = UefiVm::boot(tmp.path(), &image, 3 << 30, &[(api, 50000), (etcd, 2379)]);
    let serial = vm.serial.clone();
    let log = || std::fs::read_to_string(&serial).unwrap_or_default();
    wait_until(
        Duration::from_secs(240),
        "the maintenance banner after a UEFI disk boot",
        || banner(&log(), "token:").is_some(),
    );
    let text = log();
    assert!(
        text.contains("root: slot A"),
        "init did not switch to slot A:\n{text}"
    );
    assert!(text.contains("grew to the end of the disk"), "{text}");
    assert!(text.contains("DHCP lease 10.0.2.15/24"), "{text}");
    // systemd-boot's try counter is removed once the API serves.
    wait_until(
        Duration::from_secs(30),
        "the boot entry to be marked good",
        || log().contains("boot entry slot-a+"),
    );
    assert!(log().contains("marked good (slot-a.conf)"), "{}", log());
    let fp = banner(&text, "fingerprint:").unwrap();
    let token = banner(&text, "token:").unwrap();
    let node = format!("127.0.0.1:{api}");

    let files = ClusterFiles::generate(&tmp.path().join("cluster"), "10.0.2.15");
    // Kernel settings the Kubernetes roles need, applied on a real kernel:
    // the module first (its sysctl exists only once it is loaded).
    let cfg = files.node_config(
        "vm.yaml",
        "disk-1",
        "{machine: {kernelModules: [br_netfilter], sysctls: {net.ipv4.ip_forward: '1', net.bridge.bridge-nf-call-iptables: '1'}}}",
    );
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
    node_tests::etcdctl(&endpoint, &certs, &["put", "before-reboot", "kept"]).expect_ok();
    let timeline = files.osctl(&[&node], &["boot"]).expect_ok();
    assert!(
        timeline.stdout.contains("disks ready") && timeline.stdout.contains("etcd healthy"),
        "{}",
        timeline.text()
    );
    // machined read each value back from /proc/sys after writing it.
    assert!(
        timeline.stdout.contains("module br_netfilter")
            && timeline.stdout.contains("net.ipv4.ip_forward=1")
            && timeline
                .stdout
                .contains("net.bridge.bridge-nf-call-iptables=1"),
        "{}",
        timeline.text()
    );

    // Reboot: services stop, init unmounts, the firmware boots slot A again.
    let boots_before = log().matches("init started").count();
    files.osctl(&[&node], &["reboot"]).expect_ok();
    wait_until(Duration::from_secs(240), "the node to boot again", || {
        log().matches("init started").count() > boots_before
    });
    wait_until(
        Duration::from_secs(180),
        "the configured API after reboot",
        || files.osctl(&[&node], &["version"]).ok,
    );
    let after = log();
    let second_boot = &after[after.rfind("init started").unwrap()..];
    wait_until(
        Duration::from_secs(30),
        "the second boot's boot-entry check",
        || log().contains("boot entry of slot A already good"),
    );
    assert!(
        !second_boot.contains("formatted ext4"),
        "the second boot formatted a partition again:\n{second_boot}"
    );
    let cfg = files.osctl(&[&node], &["get", "config"]).expect_ok();
    assert!(cfg.stdout.contains("disk-1"), "{}", cfg.text());
    files
        .osctl(&[&node], &["health", "--wait", "180"])
        .expect_ok();
    let got = node_tests::etcdctl(
        &endpoint,
        &certs,
        &["get", "before-reboot", "--print-value-only"],
    )
    .expect_ok();
    assert_eq!(got.stdout.trim(), "kept");
    // Service logs live on EPHEMERAL: etcd's lines from the first boot
    // (when it founded the cluster: `initial-cluster-state` "new"; every
    // later start says "existing") are still served after the reboot.
    let logs = files
        .osctl(&[&node], &["logs", "etcd", "--tail", "0"])
        .expect_ok();
    assert!(
        logs.stdout.contains("\"initial-cluster-state\":\"new\""),
        "the first boot's etcd log is gone after the reboot:\n{}",
        logs.text()
    );
    // So are machined's events: the first boot's bootstrap, then the
    // second boot's start.
    let ev = files.osctl(&[&node], &["events"]).expect_ok();
    let bootstrap = ev.stdout.find("request  etcd bootstrap");
    let last_start = ev.stdout.rfind("note     machined ");
    assert!(
        bootstrap.is_some() && last_start.is_some() && bootstrap < last_start,
        "the first boot's events are gone after the reboot:\n{}",
        ev.text()
    );
}
