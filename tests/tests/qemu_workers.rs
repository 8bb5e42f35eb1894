//! Boot test 8, the Hard Way's smoke test on our images: `osctl cluster
//! create --controlplanes 1 --workers 2` (TCG), then with kubectl through
//! the forwarded API port:
//! - both workers register and turn Ready (their kubelets bootstrapped
//!   with the cluster's token; machined wrote the CNI network once the
//!   controller-manager gave each node a pod CIDR);
//! - the baked container images are in containerd (`ctr images ls`
//!   through nothing but the image itself: kubelet runs them);
//! - a Deployment of the baked busybox runs one pod per worker; `kubectl
//!   logs` and `kubectl exec` work (the apiserver reaches kubelets, whose
//!   CA-signed serving certificates it checks);
//! - a pod reaches the pod on the other worker by IP, over the routes
//!   machined programmed from the Node objects;
//! - CoreDNS (from its baked image) resolves `kubernetes.default` from a pod;
//! - a NodePort service answers from the host through a worker's
//!   forwarded port (kube-proxy, nftables mode);
//! - a Secret is stored encrypted in etcd (`k8s:enc:secretbox:v1:`);
//! - a worker rebooted with `osctl reboot` comes back Ready and its pod
//!   runs again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use node_tests::{
    build_qemu_image_with_kubernetes, etcd_client_certs, etcdctl, kubectl, require,
    require_kube_bin_dir, wait_until, LocalCluster,
};

const WORKLOAD: &str = include_str!("../manifests/smoke-web.yaml");

/// The `items` of a `kubectl get -o json` answer; none when kubectl fails
/// (the API may be restarting).
fn items(bins: &Path, kc: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let r = kubectl(bins, kc, args);
    if !r.ok {
        return Vec::new();
    }
    serde_json::from_str::<serde_json::Value>(&r.stdout)
        .ok()
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

fn ready_nodes(bins: &Path, kc: &Path) -> Vec<String> {
    items(bins, kc, &["get", "nodes", "-o", "json"])
        .iter()
        .filter(|n| {
            n["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .map(|n| {
            n["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// `(pod name, node, pod IP)` of the running web pods.
fn web_pods(bins: &Path, kc: &Path) -> Vec<(String, String, String)> {
    items(bins, kc, &["get", "pods", "-l", "app=web", "-o", "json"])
        .iter()
        .filter(|p| {
            p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
        })
        .filter(|p| {
            p["status"]["containerStatuses"]
                .as_array()
                .is_some_and(|c| c.iter().all(|c| c["ready"] == true))
        })
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p["status"]["podIP"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn workers_join_and_run_the_hard_ways_smoke_test() {
    require!("qemu-system-x86_64", "etcdctl");
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
    let refs: Vec<&str> = manifest["containerImages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ref"].as_str().unwrap())
        .collect();
    for want in [
        "localhost/node-os/pause:1",
        "localhost/node-os/busybox:1",
        "localhost/node-os/coredns:v1.13.1",
    ] {
        assert!(refs.contains(&want), "{want} not baked: {manifest}");
    }
    let c = LocalCluster::create_waiting(tmp.path(), "smoke", &image, 1, 2, 1200);
    let created = started.elapsed();
    let kc = tmp.path().join("kubeconfig");
    node_tests::osctl(&[
        "kubeconfig",
        kc.to_str().unwrap(),
        "--osconfig",
        c.osconfig.to_str().unwrap(),
        "--context",
        "smoke",
    ])
    .expect_ok();

    // Both workers Ready.
    wait_until(Duration::from_secs(900), "both workers Ready", || {
        ready_nodes(&bins, &kc).len() == 2
    });
    let all_ready = started.elapsed();
    let wide = kubectl(&bins, &kc, &["get", "nodes", "-o", "wide"]).expect_ok();
    eprintln!("{}", wide.stdout);
    // Each kubelet asked for its client certificate with the bootstrap
    // token, and the controller-manager approved and signed it: no manual
    // approval.
    let csrs = kubectl(&bins, &kc, &["get", "csr", "-o", "json"]).expect_ok();
    let csrs: serde_json::Value = serde_json::from_str(&csrs.stdout).unwrap();
    let items = csrs["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{csrs}");
    for csr in items {
        assert_eq!(
            csr["spec"]["signerName"],
            "kubernetes.io/kube-apiserver-client-kubelet"
        );
        assert!(
            csr["spec"]["username"]
                .as_str()
                .unwrap()
                .starts_with("system:bootstrap:"),
            "{csr}"
        );
        assert!(
            csr["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["type"] == "Approved"),
            "{csr}"
        );
        assert!(csr["status"]["certificate"].is_string(), "{csr}");
    }

    // One web pod per worker.
    let manifest_file = tmp.path().join("web.yaml");
    std::fs::write(&manifest_file, WORKLOAD).unwrap();
    kubectl(
        &bins,
        &kc,
        &["apply", "-f", manifest_file.to_str().unwrap()],
    )
    .expect_ok();
    let t0 = Instant::now();
    wait_until(
        Duration::from_secs(600),
        "a running web pod on each worker",
        || {
            let pods = web_pods(&bins, &kc);
            let mut nodes: Vec<&str> = pods.iter().map(|p| p.1.as_str()).collect();
            nodes.sort();
            nodes.dedup();
            nodes.len() == 2
        },
    );
    let pod_start = t0.elapsed();
    let pods = web_pods(&bins, &kc);
    let (a, b) = (&pods[0], &pods[1]);

    // logs and exec through the apiserver to the kubelets.
    let logs = kubectl(&bins, &kc, &["logs", &a.0]).expect_ok();
    assert!(logs.stdout.contains("serving"), "{}", logs.text());
    let exec = kubectl(&bins, &kc, &["exec", &a.0, "--", "hostname"]).expect_ok();
    assert_eq!(exec.stdout.trim(), a.0, "{}", exec.text());

    // Pod to pod across workers, by IP, over machined's routes.
    let got = kubectl(
        &bins,
        &kc,
        &[
            "exec",
            &a.0,
            "--",
            "wget",
            "-q",
            "-T",
            "10",
            "-O",
            "-",
            &format!("http://{}:8080/", b.2),
        ],
    )
    .expect_ok();
    assert_eq!(
        got.stdout.trim(),
        b.0,
        "pod {} -> pod {} ({}): {}",
        a.0,
        b.0,
        b.2,
        got.text()
    );

    // Cluster DNS from a pod.
    wait_until(
        Duration::from_secs(300),
        "kubernetes.default resolves from a pod",
        || {
            let r = kubectl(
                &bins,
                &kc,
                &[
                    "exec",
                    &b.0,
                    "--",
                    "nslookup",
                    "kubernetes.default.svc.cluster.local",
                ],
            );
            r.ok && r.stdout.contains("10.96.0.1")
        },
    );

    // A NodePort service from the host, through each worker's forwarded port.
    for n in c.nodes().iter().filter(|n| n["node_port"].is_u64()) {
        let port = n["node_port"].as_u64().unwrap();
        wait_until(
            Duration::from_secs(120),
            "the NodePort answers from the host",
            || {
                let r = node_tests::run(std::process::Command::new("curl").args([
                    "-s",
                    "-m",
                    "10",
                    &format!("http://127.0.0.1:{port}/"),
                ]));
                r.ok && pods.iter().any(|p| r.stdout.trim() == p.0)
            },
        );
    }

    // A Secret is encrypted at rest in etcd.
    kubectl(
        &bins,
        &kc,
        &[
            "create",
            "secret",
            "generic",
            "smoke",
            "--from-literal=k=plain-text-value",
        ],
    )
    .expect_ok();
    let certs = etcd_client_certs(&c.dir().join("secrets.yaml"), tmp.path());
    let raw = etcdctl(
        &c.etcd_endpoint(0),
        &certs,
        &[
            "get",
            "/registry/secrets/default/smoke",
            "--print-value-only",
        ],
    )
    .expect_ok();
    assert!(
        raw.stdout.starts_with("k8s:enc:secretbox:v1:"),
        "{}",
        &raw.stdout[..raw.stdout.len().min(80)]
    );
    assert!(!raw.stdout.contains("plain-text-value"));

    // A rebooted worker comes back Ready (as itself: its kubelet identity
    // is kept on STATE) and runs its pod again.
    let boot_id = |bins: &Path, kc: &Path| {
        let r = kubectl(
            bins,
            kc,
            &[
                "get",
                "node",
                "smoke-w2",
                "-o",
                "jsonpath={.status.nodeInfo.bootID}",
            ],
        );
        if r.ok {
            r.stdout.trim().to_owned()
        } else {
            String::new()
        }
    };
    let restarts = |bins: &Path, kc: &Path| -> Option<u64> {
        let r = kubectl(bins, kc, &["get", "pods", "-l", "app=web", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).ok()?;
        v["items"]
            .as_array()?
            .iter()
            .find(|p| p["spec"]["nodeName"] == "smoke-w2")
            .and_then(|p| p["status"]["containerStatuses"][0]["restartCount"].as_u64())
    };
    let before = boot_id(&bins, &kc);
    let restarts_before = restarts(&bins, &kc).unwrap();
    let w2 = c
        .nodes()
        .iter()
        .position(|n| n["name"] == "smoke-w2")
        .unwrap();
    let csrs_before = kubectl(&bins, &kc, &["get", "csr", "-o", "name"])
        .expect_ok()
        .stdout;
    c.osctl(&[w2], &["reboot"]).expect_ok();
    wait_until(
        Duration::from_secs(900),
        "smoke-w2 Ready after its reboot with its web pod running again",
        || {
            let id = boot_id(&bins, &kc);
            !id.is_empty()
                && id != before
                && ready_nodes(&bins, &kc).contains(&"smoke-w2".to_owned())
                && restarts(&bins, &kc).is_some_and(|n| n > restarts_before)
                && web_pods(&bins, &kc).iter().any(|p| p.1 == "smoke-w2")
        },
    );
    // No new TLS bootstrap: the kept client certificate was used.
    let csrs_after = kubectl(&bins, &kc, &["get", "csr", "-o", "name"])
        .expect_ok()
        .stdout;
    assert_eq!(
        csrs_before, csrs_after,
        "a rebooted worker bootstrapped again"
    );
    eprintln!(
        "timing: cluster create {:.0}s, to all nodes Ready {:.0}s, web pods running {:.0}s after apply, whole test {:.0}s",
        created.as_secs_f64(),
        all_ready.as_secs_f64(),
        pod_start.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
