//! Boot tests 3, 4, 6 and 7, driven through `osctl cluster create`: QEMU VMs
//! (TCG) on a private multicast-on-loopback network.
//!
//! 3. Three VMs form a 3-member etcd cluster; one VM is killed and writes
//!    still succeed; it is restarted from its disk and rejoins; a graceful
//!    reset of it then leaves a healthy 2-member cluster.
//! 4. A bad config sent to a running node is refused and the node stays
//!    healthy; a `try` apply of a config that breaks etcd rolls back by
//!    itself.
//! 6. Kubernetes in the image (the source build's binaries,
//!    `KUBE_BIN_DIR`): the control plane's API server answers `/readyz`
//!    through the forwarded port, with the kubeconfig `osctl kubeconfig`
//!    writes, as it is (about 100 s on 2 cores).
//! 7. Three control planes with Kubernetes: each API server answers
//!    through its own forwarded port on the one etcd, and after the first
//!    VM is killed the other two answer `/readyz` and take a write (about
//!    340 s; runs alone, see .config/nextest.toml).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use node_tests::{
    build_qemu_image, build_qemu_image_with_kubernetes, etcd_client_certs, etcdctl, kubectl,
    require, require_kube_bin_dir, wait_until, LocalCluster,
};

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

    // A graceful reset of the third member: it leaves etcd first, so the
    // other two are a healthy 2-member cluster that takes writes. etcd
    // refuses to remove a member that joined moments ago ("unhealthy
    // cluster"); nothing is wiped until it agrees, so retry.
    let mut last = String::new();
    wait_until(
        Duration::from_secs(60),
        "a graceful reset of node 2",
        || {
            let r = c.osctl(&[2], &["reset", "--graceful"]);
            last = r.text();
            assert!(!last.contains("--force"), "{last}");
            r.ok
        },
    );
    assert!(last.contains("maintenance mode"), "{last}");
    let m = c.osctl(&[0], &["etcd", "members"]).expect_ok();
    assert_eq!(m.stdout.matches("three-cp").count(), 2, "{}", m.text());
    assert!(!m.stdout.contains("10.5.0.12"), "{}", m.text());
    c.osctl(&[0, 1], &["health"]).expect_ok();
    etcdctl(&c.etcd_endpoint(0), &certs, &["put", "k2", "two-of-two"]).expect_ok();
    let got = etcdctl(
        &c.etcd_endpoint(1),
        &certs,
        &["get", "k2", "--print-value-only"],
    )
    .expect_ok();
    assert_eq!(got.stdout.trim(), "two-of-two");
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

/// The release the source build makes (`kubernetes/release.env`).
fn kube_release() -> String {
    let env = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../kubernetes/release.env"),
    )
    .unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix("KUBE_VERSION="))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn control_plane_answers_readyz_through_the_forwarded_port() {
    require!("qemu-system-x86_64");
    let Some(bins) = require_kube_bin_dir() else {
        return;
    };
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let Some(image) = build_qemu_image_with_kubernetes(&tmp.path().join("image"), &bins) else {
        return;
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    let release = kube_release();
    assert_eq!(manifest["kubernetes"]["present"], true, "{manifest}");
    assert_eq!(
        format!("v{}", manifest["kubernetes"]["version"].as_str().unwrap()),
        release
    );
    let built = started.elapsed();

    // cluster create waits for /readyz through the forwarded port itself.
    let c = LocalCluster::create_waiting(tmp.path(), "kube", &image, 1, 0, 900);
    let created = started.elapsed();
    for l in c
        .created
        .stderr
        .lines()
        .filter(|l| !l.contains("unhealthy"))
    {
        eprintln!("create: {l}");
    }
    assert!(
        c.created
            .stderr
            .contains("Kubernetes API ready (/readyz ok"),
        "{}",
        c.created.text()
    );
    let show = node_tests::osctl(&[
        "cluster",
        "show",
        "--state-dir",
        c.state_dir.to_str().unwrap(),
        "--name",
        "kube",
    ])
    .expect_ok();
    let forwarded = c.k8s_endpoint(0);
    assert!(
        show.stdout
            .contains(forwarded.trim_start_matches("https://")),
        "{}",
        show.text()
    );

    // The kubeconfig as osctl writes it, with the context cluster create
    // added (no -n, no server given): it points at the forwarded port.
    let kc = tmp.path().join("kubeconfig");
    node_tests::osctl(&[
        "kubeconfig",
        kc.to_str().unwrap(),
        "--osconfig",
        c.osconfig.to_str().unwrap(),
        "--context",
        "kube",
    ])
    .expect_ok();
    let text = std::fs::read_to_string(&kc).unwrap();
    assert!(text.contains(&format!("server: {forwarded}")), "{text}");
    let r = kubectl(&bins, &kc, &["get", "--raw", "/readyz"]).expect_ok();
    assert_eq!(r.stdout.trim(), "ok", "{}", r.text());
    let v = kubectl(&bins, &kc, &["version", "-o", "json"]).expect_ok();
    let v: serde_json::Value = serde_json::from_str(&v.stdout).unwrap();
    assert_eq!(v["serverVersion"]["gitVersion"], release.as_str(), "{v}");
    // The admin is a cluster admin; anonymous users only see health.
    let can = kubectl(&bins, &kc, &["auth", "can-i", "*", "*"]).expect_ok();
    assert_eq!(can.stdout.trim(), "yes", "{}", can.text());

    // machined's own view: the three components healthy (a 2 s health
    // check may time out now and then under emulation, so ask again).
    let healthy = |svc: &str, text: &str| {
        text.lines()
            .any(|l| l.starts_with(svc) && l.contains(" healthy "))
    };
    wait_until(
        Duration::from_secs(120),
        "the control-plane services healthy",
        || {
            let s = c.osctl(&[0], &["services"]);
            s.ok && [
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
            ]
            .iter()
            .all(|svc| healthy(svc, &s.stdout))
        },
    );
    eprintln!(
        "timing: image {:.0}s, cluster create to /readyz {:.0}s, checks {:.0}s",
        built.as_secs_f64(),
        (created - built).as_secs_f64(),
        (started.elapsed() - created).as_secs_f64()
    );
}

#[test]
fn three_control_planes_answer_and_the_api_survives_losing_one() {
    require!("qemu-system-x86_64");
    let Some(bins) = require_kube_bin_dir() else {
        return;
    };
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let Some(image) = build_qemu_image_with_kubernetes(&tmp.path().join("image"), &bins) else {
        return;
    };
    let built = started.elapsed();
    // Three API servers starting at once under TCG take about ten minutes
    // on 2 cores.
    let c = LocalCluster::create_waiting(tmp.path(), "kube3", &image, 3, 0, 1500);
    let created = started.elapsed();
    for l in c
        .created
        .stderr
        .lines()
        .filter(|l| !l.contains("unhealthy"))
    {
        eprintln!("create: {l}");
    }
    let boot = c.osctl(&[0, 1, 2], &["boot"]);
    eprintln!("{}", boot.stdout);
    let kc = tmp.path().join("kubeconfig");
    node_tests::osctl(&[
        "kubeconfig",
        kc.to_str().unwrap(),
        "--osconfig",
        c.osconfig.to_str().unwrap(),
        "--context",
        "kube3",
    ])
    .expect_ok();
    let readyz = |i: usize| {
        kubectl(
            &bins,
            &kc,
            &["--server", &c.k8s_endpoint(i), "get", "--raw", "/readyz"],
        )
    };
    // Every control plane's API server answers through its own forwarded
    // port, on the one etcd cluster: a write through one is read through
    // another.
    // Three API servers under TCG on 2 cores: a readyz or a write can
    // time out now and then (etcd's 2 s request timeout), so each is given
    // a minute to succeed.
    for i in 0..3 {
        let mut last = String::new();
        wait_until(
            Duration::from_secs(60),
            &format!("cp{} /readyz", i + 1),
            || {
                let r = readyz(i);
                last = r.text();
                r.ok && r.stdout.trim() == "ok"
            },
        );
        eprintln!("cp{} /readyz: ok ({})", i + 1, last.trim());
    }
    wait_until(Duration::from_secs(60), "configmap before created", || {
        kubectl(
            &bins,
            &kc,
            &["create", "configmap", "before", "--from-literal=k=1"],
        )
        .ok || kubectl(&bins, &kc, &["get", "configmap", "before"]).ok
    });
    let got = kubectl_retrying(
        &bins,
        &kc,
        &[
            "--server",
            &c.k8s_endpoint(2),
            "get",
            "configmap",
            "before",
            "-o",
            "jsonpath={.data.k}",
        ],
    );
    assert_eq!(got.stdout.trim(), "1", "{}", got.text());

    // Kill the first control plane's VM outright (the node the kubeconfig
    // points at, which bootstrapped etcd): the other two keep answering
    // and take writes.
    let pid = c.pid(0).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "the VM to die", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(120),
        "the other API servers to answer /readyz",
        || (1..3).all(|i| readyz(i).stdout.trim() == "ok"),
    );
    let answered = killed.elapsed();
    // A write through a survivor. Its API server's etcd client also had
    // the dead member's endpoint (cluster.etcd.endpoints), and a request
    // sent there fails until gRPC's keepalive gives up on it (seen once:
    // `keepalive ping failed to receive ACK within timeout`), so a write
    // may need a few tries; each is a new object name, so no try can
    // half-succeed into the next.
    let mut tries = Vec::new();
    let mut written = None;
    let write_deadline = Instant::now() + Duration::from_secs(120);
    while written.is_none() && Instant::now() < write_deadline {
        let name = format!("after-{}", tries.len());
        let r = kubectl(
            &bins,
            &kc,
            &[
                "--server",
                &c.k8s_endpoint(1),
                "create",
                "configmap",
                &name,
                "--from-literal=k=2",
            ],
        );
        if r.ok {
            written = Some(name);
        } else {
            tries.push(format!(
                "{:.1}s: {}",
                killed.elapsed().as_secs_f64(),
                r.text().trim()
            ));
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let written = written.unwrap_or_else(|| {
        panic!(
            "no write succeeded within 120 s of the kill:\n{}",
            tries.join("\n")
        )
    });
    let wrote = killed.elapsed();
    let got = kubectl_retrying(
        &bins,
        &kc,
        &[
            "--server",
            &c.k8s_endpoint(2),
            "get",
            "configmap",
            &written,
            "-o",
            "jsonpath={.data.k}",
        ],
    );
    assert_eq!(got.stdout.trim(), "2", "{}", got.text());
    for t in &tries {
        eprintln!("write failed at {t}");
    }
    eprintln!(
        "timing: image {:.0}s, cluster create to /readyz on 3 {:.0}s, /readyz on the other two {:.1}s after the kill, a write {:.1}s after it ({} failed tries), total {:.0}s",
        built.as_secs_f64(),
        (created - built).as_secs_f64(),
        answered.as_secs_f64(),
        wrote.as_secs_f64(),
        tries.len(),
        started.elapsed().as_secs_f64()
    );
}

/// A read through kubectl, tried for up to a minute: under TCG an API
/// server's etcd request can time out now and then. Fails with the last
/// answer.
fn kubectl_retrying(
    bins: &std::path::Path,
    kc: &std::path::Path,
    args: &[&str],
) -> node_tests::Run {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = kubectl(bins, kc, args);
        if r.ok || Instant::now() > deadline {
            return r.expect_ok();
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}
