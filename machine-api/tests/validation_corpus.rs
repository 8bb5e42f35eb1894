//! A corpus of bad machine configs: each must be refused with the right
//! field path (and line, where the document has one).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::sync::OnceLock;

use machine_api::config::generate::{machine_config, ClusterInput};
use machine_api::config::{MachineConfig, Role};
use machine_api::image_signature::{SigningKey, TrustedKey};
use machine_api::pki::bundle::SecretsBundle;
use serde_json::{json, Value};

fn bundle() -> &'static SecretsBundle {
    static B: OnceLock<SecretsBundle> = OnceLock::new();
    B.get_or_init(|| SecretsBundle::generate().unwrap())
}

/// A public key in PEM, as `osctl gen signing-key` writes it: the `n`th of
/// a fixed few, so cases can list several different keys.
fn image_key(n: usize) -> String {
    static KEYS: OnceLock<Vec<String>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..17)
            .map(|_| SigningKey::generate().unwrap().public().to_pem())
            .collect()
    })[n]
        .clone()
}

fn base(roles: &[Role]) -> Value {
    let input = ClusterInput {
        name: "demo".parse().unwrap(),
        endpoint: "https://10.5.0.2:6443".parse().unwrap(),
        kubernetes_version: "1.34.2".parse().unwrap(),
        install_disk: Some("/dev/vda".into()),
    };
    serde_json::to_value(machine_config(bundle(), &input, roles)).unwrap()
}

fn set(doc: &mut Value, pointer: &str, v: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let p = if parent.is_empty() {
        &mut *doc
    } else {
        doc.pointer_mut(parent)
            .unwrap_or_else(|| panic!("no {parent}"))
    };
    match p {
        Value::Object(m) => {
            m.insert(key.to_owned(), v);
        }
        Value::Array(a) => a[key.parse::<usize>().unwrap()] = v,
        _ => panic!("{parent} is not a container"),
    }
}

fn problems_of(text: &str) -> Vec<(String, Option<usize>, String)> {
    match MachineConfig::parse(text) {
        Ok(_) => vec![],
        Err(p) => {
            p.0.into_iter()
                .map(|p| (p.path, p.line, p.message))
                .collect()
        }
    }
}

fn assert_refused(name: &str, doc: &Value, paths: &[&str]) {
    let text = serde_norway::to_string(doc).unwrap();
    let got = problems_of(&text);
    assert!(!got.is_empty(), "{name}: accepted, expected {paths:?}");
    for want in paths {
        assert!(
            got.iter().any(|(p, _, _)| p == want),
            "{name}: no problem at {want}; got {got:#?}"
        );
    }
    for (path, line, message) in &got {
        assert!(line.is_some(), "{name}: {path}: {message}: no line");
    }
}

const CP: &[Role] = &[Role::Controlplane, Role::Etcd];
const W: &[Role] = &[Role::Worker];

#[test]
fn generated_configs_are_valid() {
    for roles in [
        CP,
        W,
        &[Role::Etcd],
        &[Role::Controlplane, Role::Etcd, Role::Worker],
    ] {
        let text = serde_norway::to_string(&base(roles)).unwrap();
        assert_eq!(problems_of(&text), vec![], "roles {roles:?}");
    }
}

#[test]
fn corpus_of_bad_documents() {
    type Case = (
        &'static str,
        &'static [Role],
        fn(&mut Value),
        &'static [&'static str],
    );
    let other = SecretsBundle::generate().unwrap();
    let other_etcd_key = other.etcd_ca.key.clone();
    let cases: Vec<Case> = vec![
        (
            "overlapping pod and service CIDRs",
            CP,
            |d| set(d, "/cluster/network/serviceCIDRs", json!(["10.244.0.0/20"])),
            &["cluster.network.serviceCIDRs[0]"],
        ),
        (
            "CIDR that does not parse",
            CP,
            |d| set(d, "/cluster/network/podCIDRs", json!(["10.244.0.0/99"])),
            &["cluster.network.podCIDRs[0]"],
        ),
        (
            "CIDR with host bits",
            CP,
            |d| set(d, "/cluster/network/podCIDRs", json!(["10.244.1.0/16"])),
            &["cluster.network.podCIDRs[0]"],
        ),
        (
            "service CIDR too large",
            CP,
            |d| set(d, "/cluster/network/serviceCIDRs", json!(["10.0.0.0/8"])),
            &["cluster.network.serviceCIDRs[0]"],
        ),
        (
            "two IPv4 pod CIDRs",
            CP,
            |d| {
                set(
                    d,
                    "/cluster/network/podCIDRs",
                    json!(["10.244.0.0/16", "10.245.0.0/16"]),
                )
            },
            &["cluster.network.podCIDRs[1]"],
        ),
        (
            "worker carrying a CA key",
            W,
            |d| {
                let key = bundle().kubernetes_ca.key.clone();
                set(d, "/secrets/kubernetesCA/key", json!(key))
            },
            &["secrets.kubernetesCA.key"],
        ),
        (
            "worker carrying the service-account key",
            W,
            |d| {
                let key = bundle().service_account_key.clone();
                set(d, "/secrets/serviceAccountKey", json!(key))
            },
            &["secrets.serviceAccountKey"],
        ),
        (
            "controlplane without the Kubernetes CA key",
            CP,
            |d| set(d, "/secrets/kubernetesCA/key", Value::Null),
            &["secrets.kubernetesCA.key"],
        ),
        (
            "etcd CA key of another cluster",
            CP,
            |_| {},
            &["secrets.etcdCA.key"],
        ),
        (
            "endpoint that is not https",
            CP,
            |d| {
                set(
                    d,
                    "/cluster/controlPlane/endpoint",
                    json!("http://10.5.0.2:6443"),
                )
            },
            &["cluster.controlPlane.endpoint"],
        ),
        (
            "endpoint that is not a URL",
            CP,
            |d| set(d, "/cluster/controlPlane/endpoint", json!("10.5.0.2:6443")),
            &["cluster.controlPlane.endpoint"],
        ),
        (
            "unknown role",
            CP,
            |d| set(d, "/machine/roles/0", json!("master")),
            &["machine.roles[0]"],
        ),
        (
            "no roles",
            CP,
            |d| set(d, "/machine/roles", json!([])),
            &["machine.roles"],
        ),
        (
            "role twice",
            CP,
            |d| set(d, "/machine/roles", json!(["etcd", "etcd"])),
            &["machine.roles[1]"],
        ),
        (
            "controlplane with nowhere to find etcd",
            CP,
            |d| set(d, "/machine/roles", json!(["controlplane"])),
            &["cluster.etcd"],
        ),
        (
            "roles as a string",
            CP,
            |d| set(d, "/machine/roles", json!("worker")),
            &["machine.roles"],
        ),
        (
            "unknown field",
            CP,
            |d| set(d, "/cluster/podCidr", json!("10.0.0.0/8")),
            &["cluster.podCidr"],
        ),
        (
            "duplicate addresses",
            W,
            |d| {
                set(
                    d,
                    "/machine/network",
                    json!({"interfaces": [
                {"name": "eth0", "addresses": ["192.168.1.10/24"]},
                {"name": "eth1", "addresses": ["192.168.1.10/24"]}]}),
                )
            },
            &["machine.network.interfaces[1].addresses[0]"],
        ),
        (
            "duplicate interface",
            W,
            |d| {
                set(
                    d,
                    "/machine/network",
                    json!({"interfaces": [
                {"name": "eth0", "dhcp": true}, {"name": "eth0", "dhcp": true}]}),
                )
            },
            &["machine.network.interfaces[1].name"],
        ),
        (
            "interface with neither DHCP nor address",
            W,
            |d| {
                set(
                    d,
                    "/machine/network",
                    json!({"interfaces": [{"name": "eth0"}]}),
                )
            },
            &["machine.network.interfaces[0]"],
        ),
        (
            "gateway of the wrong family",
            W,
            |d| {
                set(
                    d,
                    "/machine/network",
                    json!({"interfaces": [{"name": "eth0", "dhcp": true,
                "routes": [{"network": "0.0.0.0/0", "gateway": "fd00::1"}]}]}),
                )
            },
            &["machine.network.interfaces[0].routes[0].gateway"],
        ),
        (
            "node address inside the pod network",
            W,
            |d| {
                set(
                    d,
                    "/machine/network",
                    json!({"interfaces": [{"name": "eth0", "addresses": ["10.244.3.4/24"]}]}),
                )
            },
            &["machine.network.interfaces[0].addresses[0]"],
        ),
        (
            "bad nameserver",
            W,
            |d| set(d, "/machine/network", json!({"nameservers": ["1.1.1"]})),
            &["machine.network.nameservers[0]"],
        ),
        (
            "bad hostname",
            W,
            |d| set(d, "/machine/hostname", json!("Node_1")),
            &["machine.hostname"],
        ),
        (
            "install disk that is not a device",
            W,
            |d| set(d, "/machine/installDisk", json!("sda")),
            &["machine.installDisk"],
        ),
        (
            "bad kernel module name",
            W,
            |d| set(d, "/machine/kernelModules", json!(["br netfilter"])),
            &["machine.kernelModules[0]"],
        ),
        (
            "flag written with dashes",
            CP,
            |d| set(d, "/cluster/apiServer", json!({"extraArgs": {"--v": 2}})),
            &["cluster.apiServer.extraArgs.--v"],
        ),
        (
            "pre-release Kubernetes",
            CP,
            |d| set(d, "/cluster/kubernetesVersion", json!("1.35.0-rc.1")),
            &["cluster.kubernetesVersion"],
        ),
        (
            "unsupported Kubernetes",
            CP,
            |d| set(d, "/cluster/kubernetesVersion", json!("1.20.0")),
            &["cluster.kubernetesVersion"],
        ),
        (
            "wrong apiVersion",
            CP,
            |d| set(d, "/apiVersion", json!("v2")),
            &["apiVersion"],
        ),
        (
            "wrong kind",
            CP,
            |d| set(d, "/kind", json!("Pod")),
            &["kind"],
        ),
        (
            "cluster name with dots",
            CP,
            |d| set(d, "/cluster/name", json!("a.b")),
            &["cluster.name"],
        ),
        (
            "etcd endpoint over http and duplicated",
            CP,
            |d| {
                set(
                    d,
                    "/cluster/etcd",
                    json!({"endpoints": ["http://10.5.0.3:2379", "http://10.5.0.3:2379"]}),
                )
            },
            &["cluster.etcd.endpoints[0]", "cluster.etcd.endpoints[1]"],
        ),
        (
            "node pod CIDR outside the cluster's",
            CP,
            |d| {
                set(
                    d,
                    "/cluster/network/nodePodCIDR",
                    json!({"cidr": "10.9.0.0/24"}),
                )
            },
            &["cluster.network.nodePodCIDR.cidr"],
        ),
        (
            "node pod CIDR both allocated and fixed",
            CP,
            |d| {
                set(
                    d,
                    "/cluster/network/nodePodCIDR",
                    json!({"maskSize": 24, "cidr": "10.244.9.0/24"}),
                )
            },
            &["cluster.network.nodePodCIDR"],
        ),
        (
            "bad bootstrap token",
            W,
            |d| set(d, "/secrets/bootstrapToken", json!("abc")),
            &["secrets.bootstrapToken"],
        ),
        (
            "short encryption secret",
            CP,
            |d| set(d, "/secrets/secretboxEncryptionSecret", json!("c2hvcnQ=")),
            &["secrets.secretboxEncryptionSecret"],
        ),
        (
            "CA certificate that is not PEM",
            W,
            |d| set(d, "/secrets/osCA/crt", json!("hello")),
            &["secrets.osCA.crt"],
        ),
        (
            "MTU out of range",
            W,
            |d| {
                set(
                    d,
                    "/machine/network",
                    json!({"interfaces": [{"name": "eth0", "dhcp": true, "mtu": 100}]}),
                )
            },
            &["machine.network.interfaces[0].mtu"],
        ),
        (
            "certSAN that is a path",
            W,
            |d| set(d, "/machine/certSANs", json!(["../../x"])),
            &["machine.certSANs[0]"],
        ),
        (
            "certSAN with a space",
            W,
            |d| set(d, "/machine/certSANs", json!(["node1.example.com", "a b"])),
            &["machine.certSANs[1]"],
        ),
        (
            "certSAN with two wildcards",
            CP,
            |d| {
                set(
                    d,
                    "/machine/certSANs",
                    json!(["10.5.0.9", "*.*.example.com"]),
                )
            },
            &["machine.certSANs[1]"],
        ),
        (
            "300 wildcard certSANs",
            W,
            |d| {
                let many: Vec<String> = (0..300).map(|i| format!("*.n{i}.example.com")).collect();
                set(d, "/machine/certSANs", json!(many))
            },
            &["machine.certSANs"],
        ),
        (
            "API server certSAN that is not a name",
            CP,
            |d| {
                set(
                    d,
                    "/cluster/apiServer",
                    json!({"certSANs": ["k8s.example.com", "http://x"]}),
                )
            },
            &["cluster.apiServer.certSANs[1]"],
        ),
        (
            "sysctl with a leading slash",
            W,
            |d| set(d, "/machine/sysctls", json!({"/net/ipv4/ip_forward": "1"})),
            &["machine.sysctls[\"/net/ipv4/ip_forward\"]"],
        ),
        (
            "sysctl climbing out of /proc/sys",
            W,
            |d| set(d, "/machine/sysctls", json!({"net/../../../etc/x": "1"})),
            &["machine.sysctls[\"net/../../../etc/x\"]"],
        ),
        (
            "sysctl with a trailing dot",
            W,
            |d| set(d, "/machine/sysctls", json!({"net.ipv4.": "1"})),
            &["machine.sysctls[\"net.ipv4.\"]"],
        ),
        (
            "etcd flag value with a newline",
            CP,
            |d| {
                set(
                    d,
                    "/cluster/etcd",
                    json!({"extraArgs": {"quota-backend-bytes": "1\n--data-dir=/tmp/x"}}),
                )
            },
            &["cluster.etcd.extraArgs.quota-backend-bytes"],
        ),
        (
            "etcd flag name with an equals sign",
            CP,
            |d| {
                set(
                    d,
                    "/cluster/etcd",
                    json!({"extraArgs": {"data-dir=/x": "1"}}),
                )
            },
            &["cluster.etcd.extraArgs[\"data-dir=/x\"]"],
        ),
        (
            "kubelet flag name with a newline",
            W,
            |d| set(d, "/machine/kubelet", json!({"extraArgs": {"v\nx": "2"}})),
            &["machine.kubelet.extraArgs[\"v\\nx\"]"],
        ),
        (
            "MTU of the wrong type",
            W,
            |d| {
                set(
                    d,
                    "/machine/network",
                    json!({"interfaces": [{"name": "eth0", "dhcp": true, "mtu": "big"}]}),
                )
            },
            &["machine.network.interfaces[0].mtu"],
        ),
        (
            "etcd snapshots too often and none kept",
            CP,
            |d| {
                set(
                    d,
                    "/cluster/etcd",
                    json!({"snapshots": {"intervalMinutes": 1, "keep": 0}}),
                )
            },
            &[
                "cluster.etcd.snapshots.intervalMinutes",
                "cluster.etcd.snapshots.keep",
            ],
        ),
        (
            "trusted image key that is not a key",
            W,
            |d| {
                set(
                    d,
                    "/machine/upgrade",
                    json!({"trustedImageKeys": [image_key(0), "ssh-ed25519 AAAA builder"]}),
                )
            },
            &["machine.upgrade.trustedImageKeys[1]"],
        ),
        (
            "trusted image key that is a certificate",
            CP,
            |d| {
                let crt = bundle().os_ca.crt.clone();
                set(d, "/machine/upgrade", json!({"trustedImageKeys": [crt]}))
            },
            &["machine.upgrade.trustedImageKeys[0]"],
        ),
        (
            "trusted image key that is the private key",
            W,
            |d| {
                let private = SigningKey::generate().unwrap().to_pkcs8_pem();
                set(
                    d,
                    "/machine/upgrade",
                    json!({"trustedImageKeys": [private]}),
                )
            },
            &["machine.upgrade.trustedImageKeys[0]"],
        ),
        (
            "trusted image key listed twice",
            W,
            |d| {
                let again = format!("\n{}", image_key(0));
                set(
                    d,
                    "/machine/upgrade",
                    json!({"trustedImageKeys": [image_key(0), image_key(1), again]}),
                )
            },
            &["machine.upgrade.trustedImageKeys[2]"],
        ),
        (
            "17 trusted image keys",
            W,
            |d| {
                let keys: Vec<String> = (0..17).map(image_key).collect();
                set(d, "/machine/upgrade", json!({"trustedImageKeys": keys}))
            },
            &["machine.upgrade.trustedImageKeys"],
        ),
        (
            "trusted image keys as one string",
            W,
            |d| {
                set(
                    d,
                    "/machine/upgrade",
                    json!({"trustedImageKeys": image_key(0)}),
                )
            },
            &["machine.upgrade.trustedImageKeys"],
        ),
        (
            "escape in a trusted image key",
            W,
            |d| {
                let key = image_key(0).replace("-----\n", "-----\n\u{1b}");
                set(d, "/machine/upgrade", json!({"trustedImageKeys": [key]}))
            },
            &["machine.upgrade.trustedImageKeys[0]"],
        ),
    ];
    for (name, roles, mutate, paths) in cases {
        let mut doc = base(roles);
        mutate(&mut doc);
        if name == "etcd CA key of another cluster" {
            set(&mut doc, "/secrets/etcdCA/key", json!(other_etcd_key));
        }
        assert_refused(name, &doc, paths);
    }
}

#[test]
fn every_problem_is_reported_in_one_run_with_original_indices() {
    let mut doc = base(W);
    set(&mut doc, "/machine/roles", json!(["worker", "wrker"]));
    set(&mut doc, "/machine/bogus", json!(1));
    set(
        &mut doc,
        "/cluster/controlPlane/endpoint",
        json!("http://10.5.0.2:6443"),
    );
    set(
        &mut doc,
        "/cluster/network/podCIDRs",
        json!(["10.244.0.0/99", "fd00::/48"]),
    );
    set(
        &mut doc,
        "/cluster/network/serviceCIDRs",
        json!(["10.96.0.0/12", "banana"]),
    );
    let text = serde_norway::to_string(&doc).unwrap();
    let paths: Vec<String> = problems_of(&text).into_iter().map(|p| p.0).collect();
    for want in [
        "machine.roles[1]",
        "machine.bogus",
        "cluster.controlPlane.endpoint",
        "cluster.network.podCIDRs[0]",
        "cluster.network.serviceCIDRs[1]",
    ] {
        assert!(paths.iter().any(|p| p == want), "missing {want}: {paths:?}");
    }
}

#[test]
fn lines_point_at_the_offending_field() {
    let text = "apiVersion: v1alpha1\nkind: MachineConfig\nmachine:\n  roles:\n    - worker\n    - wrker\n";
    let got = problems_of(text);
    let role = got
        .iter()
        .find(|p| p.0 == "machine.roles[1]")
        .expect("role problem");
    assert_eq!(role.1, Some(6));
    let missing = got
        .iter()
        .find(|p| p.0 == "cluster")
        .expect("missing cluster");
    assert!(missing.2.contains("missing"), "{missing:?}");
}

#[test]
fn broken_yaml_is_one_clear_problem() {
    for (text, want) in [
        ("", "empty"),
        ("machine: [worker\n", "not valid YAML"),
        ("\t- :\n", "not valid YAML"),
        ("- a\n- b\n", "invalid type"),
    ] {
        let got = problems_of(text);
        assert!(!got.is_empty(), "{text:?} accepted");
        assert!(got[0].2.contains(want), "{text:?}: {got:?}");
    }
    // A truncated document: everything up to the cut is read; the missing
    // rest is named.
    let full = serde_norway::to_string(&base(W)).unwrap();
    let cut = &full[..full.find("secrets:").unwrap()];
    let got = problems_of(cut);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "secrets");
}

#[test]
fn redaction_removes_every_private_key_and_token() {
    let text = serde_norway::to_string(&base(CP)).unwrap();
    let cfg = MachineConfig::parse(&text).unwrap();
    let shown = cfg.redacted().to_yaml();
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(!shown.contains(&bundle().bootstrap_token));
    assert!(!shown.contains(&bundle().machine_token));
    assert!(!shown.contains(&bundle().secretbox_encryption_secret));
    assert!(shown.contains("BEGIN CERTIFICATE"));
}

#[test]
fn trusted_image_keys_are_read_from_a_valid_config() {
    for roles in [CP, W] {
        let mut doc = base(roles);
        set(
            &mut doc,
            "/machine/upgrade",
            json!({"trustedImageKeys": [image_key(0), image_key(1)]}),
        );
        let text = serde_norway::to_string(&doc).unwrap();
        assert!(text.contains("trustedImageKeys:"), "{text}");
        let cfg = MachineConfig::parse(&text).unwrap_or_else(|p| panic!("{p}"));
        let want: Vec<TrustedKey> = [image_key(0), image_key(1)]
            .iter()
            .map(|k| TrustedKey::from_pem(k, "k").unwrap())
            .collect();
        assert_eq!(cfg.trusted_image_keys(), want);
        // Written back as it was read.
        assert_eq!(MachineConfig::parse(&cfg.to_yaml()).unwrap(), cfg);
    }
    // Without the section, no keys and nothing written.
    let cfg = MachineConfig::parse(&serde_norway::to_string(&base(W)).unwrap()).unwrap();
    assert!(cfg.trusted_image_keys().is_empty());
    assert!(!cfg.to_yaml().contains("upgrade"));
}

#[test]
fn a_bad_trusted_image_key_says_what_to_give() {
    let mut doc = base(W);
    set(
        &mut doc,
        "/machine/upgrade",
        json!({"trustedImageKeys": [image_key(0), "hello", image_key(0)]}),
    );
    let got = problems_of(&serde_norway::to_string(&doc).unwrap());
    let msg = |path: &str| {
        got.iter()
            .find(|p| p.0 == path)
            .unwrap_or_else(|| panic!("no problem at {path}: {got:?}"))
            .2
            .clone()
    };
    let bad = msg("machine.upgrade.trustedImageKeys[1]");
    assert!(
        bad.contains("BEGIN PUBLIC KEY") && bad.contains("osctl gen signing-key"),
        "{bad}"
    );
    let dup = msg("machine.upgrade.trustedImageKeys[2]");
    assert!(
        dup.contains("already listed at machine.upgrade.trustedImageKeys[0]"),
        "{dup}"
    );
}

/// Control characters are refused in every string field and name, and the
/// problem names the field; only PEM fields may hold newlines.
#[test]
fn control_characters_are_refused_in_every_field() {
    type Put = fn(&mut Value, &str);
    let fields: Vec<(&str, &[Role], Put)> = vec![
        ("machine.installDisk", W, |d, s| {
            set(d, "/machine/installDisk", json!(format!("/dev/vda{s}")))
        }),
        ("machine.network.interfaces[0].name", W, |d, s| {
            set(
                d,
                "/machine/network",
                json!({"interfaces": [{"name": format!("eth{s}0"), "dhcp": true}]}),
            )
        }),
        ("machine.sysctls[\"net.ipv4.ip_forward\"]", W, |d, s| {
            set(
                d,
                "/machine/sysctls",
                json!({"net.ipv4.ip_forward": format!("1{s}")}),
            )
        }),
        ("machine.kernelModules[0]", W, |d, s| {
            set(d, "/machine/kernelModules", json!([format!("br{s}")]))
        }),
        ("machine.certSANs[0]", W, |d, s| {
            set(d, "/machine/certSANs", json!([format!("a{s}.example.com")]))
        }),
        ("machine.kubelet.extraArgs.node-labels", W, |d, s| {
            set(
                d,
                "/machine/kubelet",
                json!({"extraArgs": {"node-labels": format!("a=b{s}")}}),
            )
        }),
        ("cluster.etcd.extraArgs.quota-backend-bytes", CP, |d, s| {
            set(
                d,
                "/cluster/etcd",
                json!({"extraArgs": {"quota-backend-bytes": format!("8589934592{s}")}}),
            )
        }),
        ("cluster.apiServer.extraArgs.audit-log-path", CP, |d, s| {
            set(
                d,
                "/cluster/apiServer",
                json!({"extraArgs": {"audit-log-path": format!("/var/log/a{s}")}}),
            )
        }),
        ("cluster.scheduler.extraArgs.v", CP, |d, s| {
            set(
                d,
                "/cluster/scheduler",
                json!({"extraArgs": {"v": format!("2{s}")}}),
            )
        }),
        ("cluster.controlPlane.endpoint", CP, |d, s| {
            set(
                d,
                "/cluster/controlPlane/endpoint",
                json!(format!("https://10.5.0.2:6443/{s}")),
            )
        }),
        ("secrets.bootstrapToken", W, |d, s| {
            set(
                d,
                "/secrets/bootstrapToken",
                json!(format!("abcdef.0123456789abcdef{s}")),
            )
        }),
        ("apiVersion", W, |d, s| {
            set(d, "/apiVersion", json!(format!("v1alpha1{s}")))
        }),
    ];
    for c in ['\n', '\r', '\t', '\u{0}', '\u{1b}', '\u{7f}', '\u{9b}'] {
        let s = c.to_string();
        for (path, roles, put) in &fields {
            let mut doc = base(roles);
            put(&mut doc, &s);
            assert_refused(&format!("{c:?} in {path}"), &doc, &[path]);
        }
    }
    // A PEM field may span lines, but holds nothing else.
    let mut doc = base(W);
    let crt = bundle().os_ca.crt.replace("-----\n", "-----\n\u{1b}");
    set(&mut doc, "/secrets/osCA/crt", json!(crt));
    assert_refused("escape in a PEM field", &doc, &["secrets.osCA.crt"]);
}

/// A long list of problems (the probe's 300 unknown fields) renders within
/// a reply's budget, naming how many were left out.
#[test]
fn a_long_problem_list_is_summarized_within_budget() {
    let mut doc = base(W);
    for i in 0..300 {
        set(&mut doc, &format!("/machine/unknownField{i}"), json!(i));
    }
    let text = serde_norway::to_string(&doc).unwrap();
    let problems = MachineConfig::parse(&text).unwrap_err();
    assert!(
        problems.to_string().len() > 8192,
        "{}",
        problems.to_string().len()
    );
    let s = problems.summary(machine_api::config::MAX_STATUS_MESSAGE_BYTES);
    assert!(s.len() <= 4096, "{}", s.len());
    assert!(s.starts_with("line "), "{s}");
    assert!(s.contains("more problems; `osctl validate FILE`"), "{s}");
}
