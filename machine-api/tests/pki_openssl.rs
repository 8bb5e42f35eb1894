//! Every generated certificate checked by an independent implementation:
//! openssl verifies each chain and reads back subjects, SANs, key usages and
//! lifetimes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use machine_api::config::generate::{machine_config, ClusterInput};
use machine_api::config::Role;
use machine_api::pki::bundle::{os_client_cert, OsRole, SecretsBundle};
use machine_api::pki::kube::{mint_node_leaves, NodeIdentity, Signer};
use machine_api::pki::Usage;

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed (apt-get install openssl)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name.replace('/', "_"));
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// `openssl x509 -ext` prints one line of values after each extension header.
fn ext_values(cert: &str, ext: &str) -> BTreeSet<String> {
    let (ok, text) = openssl(&["x509", "-in", cert, "-noout", "-ext", ext]);
    assert!(ok, "{text}");
    text.lines()
        .skip(1)
        .flat_map(|l| l.split(','))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

fn subject(cert: &str) -> String {
    let (ok, text) = openssl(&[
        "x509", "-in", cert, "-noout", "-subject", "-nameopt", "RFC2253",
    ]);
    assert!(ok, "{text}");
    text.trim().trim_start_matches("subject=").to_owned()
}

fn days_valid(cert: &str) -> i64 {
    // -checkend answers "valid for N more seconds?"; bracket the lifetime.
    let secs = |d: i64| (d * 86400).to_string();
    let valid_for = |d: i64| openssl(&["x509", "-in", cert, "-noout", "-checkend", &secs(d)]).0;
    let mut lo = 0;
    let mut hi = 20_000;
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if valid_for(mid) {
            lo = mid
        } else {
            hi = mid
        }
    }
    lo
}

fn input() -> ClusterInput {
    ClusterInput {
        name: "demo".parse().unwrap(),
        endpoint: "https://cp.example.com:6443".parse().unwrap(),
        kubernetes_version: "1.34.2".parse().unwrap(),
        install_disk: None,
    }
}

#[test]
fn every_ca_is_a_ten_year_ca_with_cert_sign() {
    let dir = tempfile::tempdir().unwrap();
    let b = SecretsBundle::generate().unwrap();
    for (name, ca) in [
        ("os", &b.os_ca),
        ("kubernetes", &b.kubernetes_ca),
        ("etcd", &b.etcd_ca),
        ("front-proxy", &b.front_proxy_ca),
    ] {
        let crt = write(dir.path(), &format!("{name}-ca.crt"), &ca.crt);
        let key = write(dir.path(), &format!("{name}-ca.key"), &ca.key);
        let (ok, text) = openssl(&["verify", "-CAfile", &crt, &crt]);
        assert!(ok, "{name}: {text}");
        let bc = ext_values(&crt, "basicConstraints");
        assert!(bc.contains("CA:TRUE"), "{name}: {bc:?}");
        let ku = ext_values(&crt, "keyUsage");
        assert!(ku.contains("Certificate Sign"), "{name}: {ku:?}");
        let days = days_valid(&crt);
        assert!((3648..=3650).contains(&days), "{name}: valid {days} days");
        // The key is the certificate's key.
        let (_, pub_from_cert) = openssl(&["x509", "-in", &crt, "-noout", "-pubkey"]);
        let (ok, pub_from_key) = openssl(&["pkey", "-in", &key, "-pubout"]);
        assert!(ok, "{pub_from_key}");
        assert_eq!(pub_from_cert, pub_from_key, "{name}");
        let (ok, text) = openssl(&["pkey", "-in", &key, "-noout", "-text_pub"]);
        assert!(
            ok && text.contains("prime256v1"),
            "{name}: not P-256: {text}"
        );
    }
}

#[test]
fn every_node_leaf_verifies_and_has_kubeadm_subjects_sans_and_usages() {
    let dir = tempfile::tempdir().unwrap();
    let b = SecretsBundle::generate().unwrap();
    let cfg = machine_config(
        &b,
        &input(),
        &[Role::Controlplane, Role::Etcd, Role::Worker],
    );
    let node = NodeIdentity {
        name: "cp-1".into(),
        addresses: vec!["10.5.0.2".parse().unwrap()],
    };
    let leaves = mint_node_leaves(&b, &cfg, &node).unwrap();
    let names: BTreeSet<&str> = leaves.iter().map(|l| l.name).collect();
    for expected in [
        "os-api",
        "etcd/server",
        "etcd/peer",
        "etcd/healthcheck-client",
        "apiserver",
        "apiserver-kubelet-client",
        "apiserver-etcd-client",
        "front-proxy-client",
        "admin",
        "controller-manager",
        "scheduler",
        "kubelet-client",
        "kubelet-serving",
        "kube-proxy",
    ] {
        assert!(
            names.contains(expected),
            "missing leaf {expected}: {names:?}"
        );
    }
    let cas = [
        (Signer::Os, write(dir.path(), "os-ca.crt", &b.os_ca.crt)),
        (
            Signer::Kubernetes,
            write(dir.path(), "k8s-ca.crt", &b.kubernetes_ca.crt),
        ),
        (
            Signer::Etcd,
            write(dir.path(), "etcd-ca.crt", &b.etcd_ca.crt),
        ),
        (
            Signer::FrontProxy,
            write(dir.path(), "fp-ca.crt", &b.front_proxy_ca.crt),
        ),
    ];
    for leaf in &leaves {
        let crt = write(
            dir.path(),
            &format!("{}.crt", leaf.name),
            &leaf.pem.cert_pem,
        );
        for (signer, ca) in &cas {
            let (ok, text) = openssl(&["verify", "-CAfile", ca, &crt]);
            if *signer == leaf.signer {
                assert!(ok, "{}: does not verify against its CA: {text}", leaf.name);
            } else {
                assert!(
                    !ok,
                    "{}: verifies against the wrong CA {signer:?}",
                    leaf.name
                );
            }
        }
        // Purpose checks: openssl's own notion of server/client use.
        let purpose = match leaf.spec.usage {
            Usage::Server => vec!["sslserver"],
            Usage::Client => vec!["sslclient"],
            Usage::ServerAndClient => vec!["sslserver", "sslclient"],
        };
        let ca = &cas.iter().find(|(s, _)| *s == leaf.signer).unwrap().1;
        for p in &purpose {
            let (ok, text) = openssl(&["verify", "-CAfile", ca, "-purpose", p, &crt]);
            assert!(ok, "{}: not valid for {p}: {text}", leaf.name);
        }
        let eku = ext_values(&crt, "extendedKeyUsage");
        let want: BTreeSet<String> = match leaf.spec.usage {
            Usage::Server => ["TLS Web Server Authentication"].as_slice(),
            Usage::Client => ["TLS Web Client Authentication"].as_slice(),
            Usage::ServerAndClient => [
                "TLS Web Server Authentication",
                "TLS Web Client Authentication",
            ]
            .as_slice(),
        }
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(eku, want, "{}", leaf.name);
        assert!(
            ext_values(&crt, "basicConstraints").contains("CA:FALSE"),
            "{}",
            leaf.name
        );
        let days = days_valid(&crt);
        assert!(
            (363..=365).contains(&days),
            "{}: valid {days} days",
            leaf.name
        );
    }

    let by = |n: &str| {
        let l = leaves.iter().find(|l| l.name == n).unwrap();
        write(dir.path(), &format!("{n}.crt"), &l.pem.cert_pem)
    };
    let sans = |n: &str| ext_values(&by(n), "subjectAltName");
    let set = |v: &[&str]| {
        v.iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<String>>()
    };

    assert_eq!(
        sans("apiserver"),
        set(&[
            "DNS:cp-1",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
            "DNS:cp.example.com",
            "DNS:localhost",
            "IP Address:10.5.0.2",
            "IP Address:10.96.0.1",
            "IP Address:127.0.0.1",
        ])
    );
    let etcd_sans = set(&[
        "DNS:cp-1",
        "DNS:localhost",
        "IP Address:10.5.0.2",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
    ]);
    assert_eq!(sans("etcd/server"), etcd_sans);
    assert_eq!(sans("etcd/peer"), etcd_sans);
    assert!(sans("os-api").contains("IP Address:10.5.0.2"));
    assert_eq!(
        sans("kubelet-serving"),
        set(&["DNS:cp-1", "IP Address:10.5.0.2"])
    );

    assert_eq!(subject(&by("apiserver")), "CN=kube-apiserver");
    assert_eq!(
        subject(&by("apiserver-kubelet-client")),
        "CN=kube-apiserver-kubelet-client,O=kubeadm:cluster-admins"
    );
    assert_eq!(
        subject(&by("apiserver-etcd-client")),
        "CN=kube-apiserver-etcd-client"
    );
    assert_eq!(subject(&by("front-proxy-client")), "CN=front-proxy-client");
    assert_eq!(
        subject(&by("admin")),
        "CN=kubernetes-admin,O=kubeadm:cluster-admins"
    );
    assert_eq!(
        subject(&by("super-admin")),
        "CN=kubernetes-super-admin,O=system:masters"
    );
    assert_eq!(
        subject(&by("controller-manager")),
        "CN=system:kube-controller-manager"
    );
    assert_eq!(subject(&by("scheduler")), "CN=system:kube-scheduler");
    assert_eq!(
        subject(&by("kubelet-client")),
        "CN=system:node:cp-1,O=system:nodes"
    );
    assert_eq!(
        subject(&by("kube-proxy")),
        "CN=system:kube-proxy,O=system:node-proxier"
    );
    assert_eq!(
        subject(&by("etcd/healthcheck-client")),
        "CN=kube-etcd-healthcheck-client"
    );
}

#[test]
fn os_client_certificates_carry_their_role_in_the_organization() {
    let dir = tempfile::tempdir().unwrap();
    let b = SecretsBundle::generate().unwrap();
    let ca = write(dir.path(), "os-ca.crt", &b.os_ca.crt);
    for role in [OsRole::Admin, OsRole::Operator, OsRole::Reader] {
        let c = os_client_cert(&b, "alice", role).unwrap();
        let crt = write(dir.path(), "client.crt", &c.cert_pem);
        let (ok, text) = openssl(&["verify", "-CAfile", &ca, "-purpose", "sslclient", &crt]);
        assert!(ok, "{text}");
        assert_eq!(subject(&crt), format!("CN=alice,O={}", role.organization()));
    }
}

#[test]
fn a_worker_leaf_set_needs_no_ca_key_but_an_etcd_node_gets_etcd_certs() {
    let b = SecretsBundle::generate().unwrap();
    let etcd_only = machine_config(&b, &input(), &[Role::Etcd]);
    let node = NodeIdentity {
        name: "etcd-1".into(),
        addresses: vec!["10.5.0.3".parse().unwrap()],
    };
    let names: Vec<&str> = mint_node_leaves(&b, &etcd_only, &node)
        .unwrap()
        .iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(
        names,
        [
            "os-api",
            "etcd/server",
            "etcd/peer",
            "etcd/healthcheck-client"
        ]
    );
}
