//! The `controlplane` role in host mode: machined runs the real
//! kube-apiserver, kube-controller-manager and kube-scheduler (built from
//! the pinned Go modules) against the real etcd it runs, and independent
//! tools check the result: kubectl (readiness, RBAC, kubeconfigs,
//! bootstrap objects), etcdctl (encryption at rest).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use node_tests::{kube_bin_dir, run, wait_until, ClusterFiles, Machined, Run};

fn kubectl(bins: &Path, kubeconfig: &Path, args: &[&str]) -> Run {
    // kubectl's discovery cache beside the kubeconfig, not in the tree.
    let cache = kubeconfig.with_extension("kube-cache");
    run(Command::new(bins.join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .args(["--request-timeout", "20s"])
        .args(args))
}

/// A kubeconfig for `user` with a certificate from the cluster's
/// Kubernetes CA (from the generated secrets bundle).
fn kubeconfig_for(files: &ClusterFiles, server: &str, cn: &str, org: Option<&str>, out: &Path) {
    use machine_api::pki::{LeafSpec, Usage};
    let bundle: machine_api::pki::bundle::SecretsBundle =
        serde_norway::from_str(&std::fs::read_to_string(files.path("secrets.yaml")).unwrap())
            .unwrap();
    let ca = bundle.kubernetes_ca.authority("kubernetesCA").unwrap();
    let mut spec = LeafSpec::new(cn, Usage::Client);
    if let Some(o) = org {
        spec = spec.org(o);
    }
    let leaf = ca.issue(&spec).unwrap();
    // Written here, not by machined's code: an independent kubeconfig.
    let dir = out.with_extension("d");
    std::fs::create_dir_all(&dir).unwrap();
    for (n, t) in [
        ("ca.crt", ca.cert_pem()),
        ("c.crt", &leaf.cert_pem),
        ("c.key", &leaf.key_pem),
    ] {
        std::fs::write(dir.join(n), t).unwrap();
    }
    let d = dir.display();
    std::fs::write(
        out,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: '{server}', certificate-authority: '{d}/ca.crt'}}}}]\nusers: [{{name: u, user: {{client-certificate: '{d}/c.crt', client-key: '{d}/c.key'}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .unwrap();
}

fn resource_versions(bins: &Path, kc: &Path) -> String {
    let mut out = String::new();
    for (ns, kind, name) in [
        ("", "clusterrolebinding", "kubeadm:cluster-admins"),
        ("", "clusterrole", "system:kube-apiserver-to-kubelet"),
        ("kube-system", "configmap", "kube-proxy"),
        ("kube-system", "deployment", "coredns"),
        ("kube-system", "service", "kube-dns"),
    ] {
        let mut args = vec![
            "get",
            kind,
            name,
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ];
        if !ns.is_empty() {
            args.extend(["-n", ns]);
        }
        let r = kubectl(bins, kc, &args).expect_ok();
        out.push_str(&format!("{kind}/{name}={} ", r.stdout.trim()));
    }
    out
}

#[test]
fn control_plane_in_host_mode() {
    node_tests::require!("etcd", "containerd", "runc", "etcdctl", "curl");
    let Some(bins) = kube_bin_dir() else {
        eprintln!("SKIPPED: no Kubernetes binaries (scripts/build-kubernetes.sh; KUBE_BIN_DIR)");
        assert!(
            std::env::var_os("CI").is_none(),
            "KUBE_BIN_DIR missing in CI"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.4.1";
    let files = ClusterFiles::generate(&tmp.path().join("c"), ip);
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let node = Machined::start_with_env(&tmp.path().join("n"), ip, &[("PATH", &path)]);
    let cfg = files.node_config("cp.yaml", "cp1", "");
    node.apply_insecure(&cfg).expect_ok();
    node.wait_configured();
    files.osctl(&[ip], &["bootstrap"]).expect_ok();
    let health = files.osctl(&[ip], &["health", "--wait", "240"]);
    assert!(
        health.ok,
        "{}\n{}",
        health.text(),
        files
            .osctl(&[ip], &["logs", "kube-apiserver", "--tail", "30"])
            .text()
    );
    let services = files.osctl(&[ip], &["services"]).expect_ok().stdout;
    for s in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        assert!(services.contains(s), "{services}");
    }

    // The operator's kubeconfig from the node, merged into a file that
    // already has another context.
    let kc = tmp.path().join("kubeconfig");
    std::fs::write(
        &kc,
        "apiVersion: v1\nkind: Config\nclusters: [{name: other, cluster: {server: 'https://192.0.2.1'}}]\nusers: []\ncontexts: [{name: other, context: {cluster: other, user: x}}]\ncurrent-context: other\n",
    )
    .unwrap();
    files
        .osctl(&[ip], &["kubeconfig", kc.to_str().unwrap()])
        .expect_ok();
    let view = kubectl(
        &bins,
        &kc,
        &["config", "view", "-o", "jsonpath={.contexts[*].name}"],
    )
    .expect_ok()
    .stdout;
    assert!(
        view.contains("other") && view.contains("kubernetes-admin@test"),
        "{view}"
    );
    let ready = kubectl(&bins, &kc, &["get", "--raw", "/readyz"]).expect_ok();
    assert_eq!(ready.stdout.trim(), "ok");
    let v = kubectl(&bins, &kc, &["version", "-o", "json"])
        .expect_ok()
        .stdout;
    assert!(v.contains("\"gitVersion\": \"v1.35.4\""), "{v}");
    // The node's own kubeconfigs are valid kubeconfigs.
    let kdir = node.root.join("system/secrets/kubernetes");
    for c in ["controller-manager.conf", "scheduler.conf", "admin.conf"] {
        kubectl(&bins, &kdir.join(c), &["config", "view"]).expect_ok();
    }

    // Secrets are encrypted at rest: etcd holds the secretbox envelope.
    kubectl(
        &bins,
        &kc,
        &[
            "create",
            "secret",
            "generic",
            "s1",
            "--from-literal=k=plain-value",
        ],
    )
    .expect_ok();
    let raw = node
        .etcdctl(&["get", "/registry/secrets/default/s1", "--print-value-only"])
        .expect_ok()
        .stdout;
    assert!(raw.contains("k8s:enc:secretbox:v1:cluster-key"), "{raw}");
    assert!(!raw.contains("plain-value"));

    // RBAC: the admin may do anything; a node identity what the Node
    // authorizer allows; anonymous only the health endpoints.
    let yes = |kc: &Path, args: &[&str]| {
        let mut a = vec!["auth", "can-i"];
        a.extend(args);
        kubectl(&bins, kc, &a).stdout.trim().to_owned()
    };
    assert_eq!(yes(&kc, &["*", "*"]), "yes");
    let server = format!("https://{ip}:6443");
    let node_kc = tmp.path().join("node.kubeconfig");
    kubeconfig_for(
        &files,
        &server,
        "system:node:cp1",
        Some("system:nodes"),
        &node_kc,
    );
    assert_eq!(yes(&node_kc, &["get", "nodes/cp1"]), "yes");
    assert!(yes(&node_kc, &["get", "nodes/cp2"]).starts_with("no"));
    assert!(yes(&node_kc, &["create", "clusterrolebindings"]).starts_with("no"));
    assert!(yes(&node_kc, &["list", "secrets", "-A"]).starts_with("no"));
    let nobody = tmp.path().join("nobody.kubeconfig");
    kubeconfig_for(&files, &server, "nobody", None, &nobody);
    assert!(yes(&nobody, &["get", "pods"]).starts_with("no"));
    // Anonymous (curl, no client certificate): health yes, API no.
    let curl = |path: &str| {
        run(Command::new("curl")
            .args(["-sS", "--max-time", "10", "-w", " %{http_code}", "--cacert"])
            .arg(kdir.join("ca.crt"))
            .arg(format!("{server}{path}")))
        .expect_ok()
        .stdout
    };
    assert_eq!(curl("/readyz"), "ok 200");
    assert_eq!(curl("/livez").trim_end(), "ok 200");
    assert!(curl("/api/v1/namespaces").ends_with(" 401"));

    // The bootstrap objects exist, and applying them again (the
    // controller-manager's pre-start step runs at each start) changes
    // nothing.
    let before = resource_versions(&bins, &kc);
    kubectl(
        &bins,
        &kc,
        &["-n", "kube-system", "get", "secret", "-o", "name"],
    )
    .expect_ok()
    .stdout
    .contains("secret/bootstrap-token-")
    .then_some(())
    .expect("bootstrap token secret");
    // Within one boot the same objects are applied once (a restart of the
    // controller-manager after a lost lease does not run kubectl again):
    // a restart keeps them as they are...
    let applied = node.root.join("run/machined/bootstrap-objects.sha256");
    assert!(applied.exists());
    files
        .osctl(&[ip], &["service", "kube-controller-manager", "restart"])
        .expect_ok();
    files.osctl(&[ip], &["health", "--wait", "120"]).expect_ok();
    assert_eq!(
        node.log_text().matches("bootstrap objects applied").count(),
        1
    );
    // ...and without the mark (a new boot) they are applied again, which
    // changes nothing.
    std::fs::remove_file(&applied).unwrap();
    files
        .osctl(&[ip], &["service", "kube-controller-manager", "restart"])
        .expect_ok();
    files.osctl(&[ip], &["health", "--wait", "120"]).expect_ok();
    wait_until(
        Duration::from_secs(60),
        "bootstrap objects re-applied",
        || node.log_text().matches("bootstrap objects applied").count() >= 2,
    );
    assert_eq!(resource_versions(&bins, &kc), before);

    // Flags are the real binaries' own: a misspelt one makes the
    // apiserver refuse to start, and says so in its log.
    let bad = files.node_config(
        "bad.yaml",
        "cp1",
        "{cluster: {apiServer: {extraArgs: {enable-admision-plugins: NodeRestriction}}}}",
    );
    files
        .osctl(
            &[ip],
            &[
                "apply-config",
                "-f",
                bad.to_str().unwrap(),
                "--mode",
                "no-reboot",
            ],
        )
        .expect_ok();
    wait_until(
        Duration::from_secs(60),
        "apiserver refuses the flag",
        || {
            files
                .osctl(&[ip], &["logs", "kube-apiserver", "--tail", "50"])
                .stdout
                .contains("unknown flag: --enable-admision-plugins")
        },
    );
    files
        .osctl(
            &[ip],
            &[
                "apply-config",
                "-f",
                cfg.to_str().unwrap(),
                "--mode",
                "no-reboot",
            ],
        )
        .expect_ok();
    files.osctl(&[ip], &["health", "--wait", "180"]).expect_ok();

    // Renewal on the running node. machined restarted with renewal due 20 s
    // before a year is up, so every leaf minted before that is due: it
    // mints the files again and restarts the components with them (the
    // controller-manager gets a new PID: it reads its kubeconfig only at
    // start), the API server serves a new certificate, and answers.
    let served = || {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("{ip}:6443")])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        machine_api::pki::pem::first_cert_der(&out.stdout)
            .map(|d| d.to_vec())
            .unwrap_or_default()
    };
    let pid = |name: &str| -> i64 {
        let out = files
            .osctl(&[ip], &["service", name, "-o", "json"])
            .expect_ok();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v[0]["result"]["pid"].as_i64().unwrap_or(0)
    };
    let (cert_before, cm_before) = (served(), pid("kube-controller-manager"));
    assert!(!cert_before.is_empty());
    let mut node = node;
    node.restart_with_env("MACHINED_RENEW_BEFORE", Some("31535980"));
    wait_until(
        Duration::from_secs(60),
        "control-plane certificates renewed",
        || {
            files
                .osctl(&[ip], &["events"])
                .stdout
                .contains("control-plane certificates renewed")
        },
    );
    node.restart_with_env("MACHINED_RENEW_BEFORE", None);
    files.osctl(&[ip], &["health", "--wait", "180"]).expect_ok();
    assert_ne!(
        served(),
        cert_before,
        "the API server serves the old certificate"
    );
    assert_ne!(pid("kube-controller-manager"), cm_before);
    let ready = kubectl(&bins, &kc, &["get", "--raw", "/readyz"]).expect_ok();
    assert_eq!(ready.stdout.trim(), "ok");
}

/// Without Kubernetes binaries, the controlplane role says which are
/// missing, and etcd and containerd keep running.
#[test]
fn controlplane_role_without_binaries_names_them() {
    node_tests::require!("etcd", "containerd", "runc");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.4.2";
    let files = ClusterFiles::generate(&tmp.path().join("c"), ip);
    // PATH without any Kubernetes binary.
    let node = Machined::start_with_env(
        &tmp.path().join("n"),
        ip,
        &[(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )],
    );
    node.apply_insecure(&files.node_config("cp.yaml", "cp1", ""))
        .expect_ok();
    node.wait_configured();
    files.osctl(&[ip], &["bootstrap"]).expect_ok();
    let h = files.osctl(&[ip], &["health", "--wait", "60"]);
    let t = h.text();
    assert!(
        t.contains("this image has no kube-apiserver, kube-controller-manager, kube-scheduler"),
        "{t}"
    );
    let services = files.osctl(&[ip], &["services"]).expect_ok().stdout;
    assert!(
        services.contains("etcd") && services.contains("containerd"),
        "{services}"
    );
    assert!(!services.contains("kube-apiserver"), "{services}");
}
