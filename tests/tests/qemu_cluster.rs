//! Boot tests 3 and 4, driven through `osctl cluster create`: QEMU VMs
//! (TCG) on a private multicast-on-loopback network.
//!
//! 3. Three VMs form a 3-member etcd cluster; one VM is killed and writes
//!    still succeed; it is restarted from its disk and rejoins.
//! 4. A bad config sent to a running node is refused and the node stays
//!    healthy; a `try` apply of a config that breaks etcd rolls back by
//!    itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use node_tests::{build_qemu_image, etcd_client_certs, etcdctl, require, wait_until, LocalCluster};

#[test]
fn three_vms_form_etcd_survive_losing_one_and_it_rejoins() {
    require!("qemu-system-x86_64", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let Some(image) = build_qemu_image(&tmp.path().join("image")) else {
        return;
    };
    let c = LocalCluster::create(tmp.path(), "three", &image, 3, 0);
    let show = node_tests::osctl(&[
        "cluster",
        "show",
        "--state-dir",
        c.state_dir.to_str().unwrap(),
        "--name",
        "three",
    ])
    .expect_ok();
    assert_eq!(show.stdout.matches("pid ").count(), 3, "{}", show.text());

    let m = c.osctl(&[0], &["etcd", "members"]).expect_ok();
    for ip in ["10.5.0.10", "10.5.0.11", "10.5.0.12"] {
        assert!(
            m.stdout.contains(&format!("https://{ip}:2380")),
            "{}",
            m.text()
        );
    }
    let certs = etcd_client_certs(
        &c.dir().join("secrets.yaml"),
        &tmp.path().join("etcd-client"),
    );
    etcdctl(&c.etcd_endpoint(0), &certs, &["put", "k0", "three"]).expect_ok();

    // Kill the third VM outright: no shutdown, like a power cut.
    let pid = c.pid(2).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "the VM to die", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    // Two of three members are a quorum: writes still succeed.
    etcdctl(&c.etcd_endpoint(0), &certs, &["put", "k1", "two-of-three"]).expect_ok();
    let st = c.osctl(&[0, 1], &["etcd", "status"]).expect_ok();
    assert!(st.ok, "{}", st.text());

    // Make its disk 1 GiB bigger while it is off (a resized VM disk): the
    // next boot grows EPHEMERAL and its mounted ext4 into the new space.
    let disk = std::path::PathBuf::from(c.nodes()[2]["disk"].as_str().unwrap());
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len + (1 << 30)).unwrap();
    drop(f);

    // Restart it from its disk: config and etcd data are on STATE and
    // EPHEMERAL, so it comes back configured and catches up.
    c.restart_vm(2);
    wait_until(
        Duration::from_secs(240),
        "the restarted node to be healthy",
        || c.osctl(&[2], &["health"]).ok,
    );
    wait_until(
        Duration::from_secs(60),
        "the rejoined member to serve k1",
        || {
            etcdctl(
                &c.etcd_endpoint(2),
                &certs,
                &["get", "k1", "--print-value-only"],
            )
            .stdout
            .trim()
                == "two-of-three"
        },
    );
    let console = c.console(2);
    let second = &console[console.rfind("init started").unwrap()..];
    assert!(!second.contains("maintenance: no config yet"), "{second}");
    assert!(!second.contains("formatted ext4"), "{second}");
    let ephemeral = second
        .lines()
        .find(|l| l.contains("EPHEMERAL (/dev/"))
        .unwrap_or_else(|| panic!("no EPHEMERAL line:\n{second}"));
    assert!(
        ephemeral.contains("grew to the end of the disk")
            && ephemeral.contains("ext4 resized from"),
        "{ephemeral}"
    );
    let m = c.osctl(&[0], &["etcd", "members"]).expect_ok();
    assert_eq!(m.stdout.matches("three-cp").count(), 3, "{}", m.text());
    assert!(
        !m.stdout.contains("true"),
        "a member is still a learner: {}",
        m.text()
    );
}

#[test]
fn running_node_refuses_a_bad_config_and_a_breaking_try_rolls_back() {
    require!("qemu-system-x86_64", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let Some(image) = build_qemu_image(&tmp.path().join("image")) else {
        return;
    };
    // One control-plane node and one worker, whose OS API certificate
    // comes from the control-plane node's trust endpoint.
    let c = LocalCluster::create(tmp.path(), "one", &image, 1, 1);
    let w = c.osctl(&[1], &["services"]).expect_ok();
    assert!(
        w.stdout.contains("containerd") && w.stdout.contains("healthy"),
        "{}",
        w.text()
    );
    assert!(!w.stdout.contains("etcd"), "{}", w.text());
    let certs = etcd_client_certs(
        &c.dir().join("secrets.yaml"),
        &tmp.path().join("etcd-client"),
    );
    etcdctl(&c.etcd_endpoint(0), &certs, &["put", "before", "1"]).expect_ok();
    let cfg_path = c.dir().join("one-cp1.yaml");
    let good = std::fs::read_to_string(&cfg_path).unwrap();

    // Invalid: an unknown role and a pod CIDR with host bits. Refused with
    // field paths; the node keeps its config and stays healthy.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        good.replace("- controlplane", "- kingmaker")
            .replace("10.244.0.0/16", "10.244.1.0/16"),
    )
    .unwrap();
    let r = c
        .osctl(&[0], &["apply-config", "-f", bad.to_str().unwrap()])
        .expect_err("machine.roles");
    assert!(
        r.text().contains("cluster.network.podCIDRs"),
        "{}",
        r.text()
    );
    c.osctl(&[0], &["health"]).expect_ok();

    // A try that breaks etcd rolls back on its own, long before its timeout.
    let mut doc: serde_json::Value = serde_norway::from_str(&good).unwrap();
    node_tests::merge(
        &mut doc,
        &serde_json::json!({"cluster": {"etcd": {"extraArgs": {"heartbeat-interval": "soon"}}}}),
    );
    let broken = tmp.path().join("broken.yaml");
    std::fs::write(&broken, serde_norway::to_string(&doc).unwrap()).unwrap();
    let t = c
        .osctl(
            &[0],
            &[
                "apply-config",
                "-f",
                broken.to_str().unwrap(),
                "--mode",
                "try",
                "--try-timeout",
                "300",
            ],
        )
        .expect_ok();
    assert!(t.stdout.contains("trying"), "{}", t.text());
    wait_until(
        Duration::from_secs(180),
        "the broken try to roll back",
        || {
            let cfg = c.osctl(&[0], &["get", "config"]);
            cfg.ok && !cfg.stdout.contains("heartbeat-interval")
        },
    );
    let h = c.osctl(&[0], &["health", "--wait", "120"]).expect_ok();
    assert!(h.ok, "{}", h.text());
    let ev = c.osctl(&[0], &["health", "-o", "json"]).expect_ok();
    assert!(ev.stdout.contains("rolled back"), "{}", ev.text());
    assert_eq!(
        etcdctl(
            &c.etcd_endpoint(0),
            &certs,
            &["get", "before", "--print-value-only"]
        )
        .expect_ok()
        .stdout
        .trim(),
        "1"
    );
}
