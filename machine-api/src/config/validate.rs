//! Checks across fields that types alone cannot express: role combinations,
//! overlapping networks, secrets that do not belong on a node, and so on.
//! Every check appends to one list so an operator sees all problems at once.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use super::parse::{key_path, Problem};
use super::scalar::{Cidr, Endpoint};
use super::types::*;
use crate::image_signature::{SignatureError, TrustedKey, MAX_TRUSTED_KEYS};
use crate::pki::bundle::{is_bootstrap_token, is_encryption_secret, is_machine_token};
use crate::pki::{check_is_ca, check_key_matches};

/// Fields whose value is PEM text, the only values that may span lines
/// (see [`super::parse::control_characters`]).
pub(super) const PEM_FIELDS: &[&str] = &[
    "crt",
    "key",
    "caCert",
    "clientCert",
    "clientKey",
    "serviceAccountKey",
    "trustedImageKeys",
];

#[derive(Default)]
struct Report(Vec<Problem>);

impl Report {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            line: None,
            message: message.into(),
        });
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn is_ipv4(n: &IpNet) -> bool {
    matches!(n, IpNet::V4(_))
}

/// Every problem with `cfg` that its types do not already rule out.
pub fn validate(cfg: &MachineConfig) -> Vec<Problem> {
    let mut r = Report::default();
    if cfg.api_version != API_VERSION {
        r.add(
            "apiVersion",
            format!(
                "unsupported version {:?}: this release reads {API_VERSION:?}",
                cfg.api_version
            ),
        );
    }
    if cfg.kind != KIND {
        r.add("kind", format!("expected {KIND:?}, found {:?}", cfg.kind));
    }
    roles(cfg, &mut r);
    machine(&cfg.machine, &mut r);
    cluster(cfg, &mut r);
    secrets(cfg, &mut r);
    r.0
}

fn roles(cfg: &MachineConfig, r: &mut Report) {
    let roles = &cfg.machine.roles;
    if roles.is_empty() {
        r.add(
            "machine.roles",
            "at least one role is required: etcd, controlplane or worker",
        );
    }
    let mut seen = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        if seen.contains(role) {
            r.add(
                format!("machine.roles[{i}]"),
                format!("role {:?} is listed twice", role.as_str()),
            );
        }
        seen.push(*role);
    }
    let etcd = cfg.has_role(Role::Etcd);
    let cp = cfg.has_role(Role::Controlplane);
    let external = cfg.cluster.etcd.external.is_some();
    if cp && !etcd && !external && cfg.cluster.etcd.endpoints.is_empty() {
        r.add(
            "cluster.etcd",
            "a controlplane node without the etcd role needs etcd: add the etcd role, list members in cluster.etcd.endpoints, or set cluster.etcd.external",
        );
    }
    if external && etcd {
        r.add(
            "cluster.etcd.external",
            "an external etcd cannot be combined with the etcd role on this node",
        );
    }
    if external && !cfg.cluster.etcd.endpoints.is_empty() {
        r.add(
            "cluster.etcd.endpoints",
            "set either endpoints (etcd run by this OS) or external, not both",
        );
    }
    if external && !cp {
        r.add(
            "cluster.etcd.external",
            "only controlplane nodes use an external etcd",
        );
    }
}

fn is_module_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A sysctl name: at least two parts of letters, digits, `_` and `-`,
/// separated by single dots (`net.ipv4.ip_forward`) or slashes
/// (`net/ipv4/conf/eth0.100/rp_filter`, where a dot is part of a name); no
/// leading or trailing separator, so it can only name a file under
/// `/proc/sys`.
fn is_sysctl_key(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    };
    if s.is_empty() || s.len() > 256 {
        return false;
    }
    if s.contains('/') {
        // The slash form: dots belong to names (VLAN interfaces).
        let parts: Vec<&str> = s.split('/').collect();
        parts.len() >= 2
            && parts.iter().all(|p| {
                !p.starts_with('.')
                    && !p.ends_with('.')
                    && !p.contains("..")
                    && part(&p.replace('.', ""))
            })
    } else {
        let parts: Vec<&str> = s.split('.').collect();
        parts.len() >= 2 && parts.iter().all(|p| part(p))
    }
}

/// Why `name` is not a DNS name or IP address a certificate can carry.
fn san_problem(name: &str) -> Option<&'static str> {
    if name.parse::<IpAddr>().is_ok() {
        return None;
    }
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > 253 {
        return Some("longer than 253 characters");
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    let wildcard = host.len() != name.len();
    if host.contains('*') {
        return Some(
            "a wildcard is allowed only once, as the whole first label: *.nodes.example.com",
        );
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Some("use lowercase letters, digits, '-' and '.' only");
    }
    let labels: Vec<&str> = host.split('.').collect();
    for label in &labels {
        if label.is_empty() || label.len() > 63 {
            return Some("each dot-separated label must be 1 to 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a label may not start or end with '-'");
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some(
            "the last label cannot be all digits (an IPv4 address has four numbers of 0 to 255)",
        );
    }
    if wildcard && labels.len() < 2 {
        return Some("a wildcard needs at least two labels after it: *.nodes.example.com");
    }
    None
}

/// Extra names of a server certificate: each a DNS name or IP address, at
/// most [`MAX_CERT_SANS`].
fn cert_sans(path: &str, sans: &[String], r: &mut Report) {
    if sans.len() > MAX_CERT_SANS {
        r.add(
            path,
            format!(
                "{} names, at most {MAX_CERT_SANS} fit beside the node's own names and addresses: remove some (a wildcard such as *.nodes.example.com covers many)",
                sans.len()
            ),
        );
    }
    for (i, name) in sans.iter().enumerate() {
        if let Some(why) = san_problem(name) {
            r.add(
                format!("{path}[{i}]"),
                format!("{name:?} is not a DNS name or IP address: {why}"),
            );
        }
    }
}

/// A command-line flag name as written after `--`.
fn is_flag_name(k: &str) -> bool {
    k.len() <= 100
        && k.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

fn machine(m: &Machine, r: &mut Report) {
    if let Some(disk) = &m.install_disk {
        if !disk.starts_with("/dev/") || disk.contains("..") || disk.len() <= 5 {
            r.add(
                "machine.installDisk",
                format!("{disk:?} is not a device path such as /dev/vda or /dev/nvme0n1"),
            );
        }
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut addrs: HashMap<IpAddr, String> = HashMap::new();
    for (i, iface) in m.network.interfaces.iter().enumerate() {
        let base = format!("machine.network.interfaces[{i}]");
        if iface.name.is_empty()
            || iface.name.len() > 15
            || iface.name.contains('/')
            || iface.name.chars().any(char::is_whitespace)
        {
            r.add(
                format!("{base}.name"),
                format!(
                    "{:?} is not an interface name (1 to 15 characters, no '/' or spaces)",
                    iface.name
                ),
            );
        }
        if let Some(first) = names.insert(&iface.name, i) {
            r.add(
                format!("{base}.name"),
                format!(
                    "interface {:?} is already configured at machine.network.interfaces[{first}]",
                    iface.name
                ),
            );
        }
        if !iface.dhcp && iface.addresses.is_empty() {
            r.add(base.clone(), "set dhcp: true or give at least one address");
        }
        if let Some(mtu) = iface.mtu {
            if !(576..=9216).contains(&mtu) {
                r.add(
                    format!("{base}.mtu"),
                    format!("MTU {mtu} is outside 576..=9216"),
                );
            }
        }
        for (j, a) in iface.addresses.iter().enumerate() {
            let path = format!("{base}.addresses[{j}]");
            let ip = a.0.addr();
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                r.add(
                    path.clone(),
                    format!("{ip} cannot be assigned to an interface"),
                );
            }
            if let Some(first) = addrs.insert(ip, path.clone()) {
                r.add(path, format!("address {ip} is already assigned at {first}"));
            }
        }
        for (j, route) in iface.routes.iter().enumerate() {
            if let Some(gw) = route.gateway {
                if gw.0.is_ipv4() != is_ipv4(&route.network.0) {
                    r.add(
                        format!("{base}.routes[{j}].gateway"),
                        format!(
                            "gateway {} and network {} are of different IP families",
                            gw.0, route.network.0
                        ),
                    );
                }
            }
        }
    }
    for k in m.sysctls.keys() {
        if !is_sysctl_key(k) {
            r.add(
                format!("machine.sysctls[{k:?}]"),
                "not a sysctl name: write it as sysctl(8) does, e.g. net.ipv4.ip_forward (letters, digits, '_' and '-' between single dots or slashes, none leading or trailing)",
            );
        }
    }
    cert_sans("machine.certSANs", &m.cert_sans, r);
    for (i, module) in m.kernel_modules.iter().enumerate() {
        if !is_module_name(module) {
            r.add(
                format!("machine.kernelModules[{i}]"),
                format!("{module:?} is not a kernel module name"),
            );
        }
    }
    extra_args("machine.kubelet.extraArgs", &m.kubelet.extra_args, r);
    trusted_image_keys(&m.upgrade.trusted_image_keys, r);
    if let Some(port) = m.metrics.insecure_port {
        if let Some(why) = metrics_port_problem(port) {
            r.add("machine.metrics.insecurePort", format!("port {port} {why}"));
        }
    }
}

/// Why `port` cannot be machined's plain-HTTP metrics port: a privileged
/// port, or one that machined or etcd already listens on.
fn metrics_port_problem(port: u16) -> Option<&'static str> {
    match port {
        0..=1023 => Some("is a privileged port: use 1024 to 65535"),
        2379 | 2380 => Some("is etcd's (client 2379, peer 2380)"),
        50000 => Some("is the OS API's"),
        50001 => Some("is the trust endpoint's"),
        50002 => Some("is the mutual-TLS metrics port's"),
        _ => None,
    }
}

/// `machine.upgrade.trustedImageKeys`: each an ed25519 public key in PEM,
/// at most [`MAX_TRUSTED_KEYS`], none twice (the same key written twice,
/// even differently, is one key).
fn trusted_image_keys(keys: &[String], r: &mut Report) {
    const PATH: &str = "machine.upgrade.trustedImageKeys";
    if keys.len() > MAX_TRUSTED_KEYS {
        r.add(
            PATH,
            format!(
                "{} keys, at most {MAX_TRUSTED_KEYS}: remove the keys of builders this node no longer takes images from",
                keys.len()
            ),
        );
    }
    let mut seen: HashMap<TrustedKey, usize> = HashMap::new();
    for (i, pem) in keys.iter().enumerate() {
        let path = format!("{PATH}[{i}]");
        match TrustedKey::from_pem(pem, &path) {
            Ok(key) => {
                if let Some(first) = seen.get(&key) {
                    r.add(
                        path,
                        format!(
                            "{} is already listed at {PATH}[{first}]: remove one",
                            key.id()
                        ),
                    );
                } else {
                    seen.insert(key, i);
                }
            }
            Err(SignatureError::Key { reason, .. }) => r.add(path, reason),
            Err(e) => r.add(path, e.to_string()),
        }
    }
}

fn extra_args(path: &str, args: &BTreeMap<String, String>, r: &mut Report) {
    for k in args.keys() {
        let bare = k.trim_start_matches('-');
        if k.starts_with('-') && is_flag_name(bare) {
            r.add(
                key_path(path, k),
                format!("write the flag without leading dashes: {bare:?}"),
            );
        } else if !is_flag_name(k) {
            r.add(
                key_path(path, k),
                format!("{k:?} is not a flag name: use letters, digits, '-' and '_' as in the component's --help, without the leading dashes (e.g. \"quota-backend-bytes\")"),
            );
        }
    }
}

fn https_url(path: &str, url: &Endpoint, default_port: bool, r: &mut Report) {
    let shown = url.to_string();
    let url = &url.0;
    if url.scheme() != "https" {
        r.add(
            path,
            format!(
                "{shown} must use https:// (plain {}:// would send credentials unencrypted)",
                url.scheme()
            ),
        );
    }
    if url.host_str().is_none_or(str::is_empty) {
        r.add(path, format!("{shown} has no host"));
    }
    if !default_port && url.port().is_none() {
        r.add(path, format!("{shown} needs an explicit port"));
    }
    if url.path() != "/" && !url.path().is_empty() {
        r.add(path, format!("{shown} must not have a path"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        r.add(path, "credentials do not belong in the URL");
    }
}

fn cidr_list(path: &str, cidrs: &[Cidr], r: &mut Report) {
    if cidrs.is_empty() {
        r.add(path, "at least one CIDR is required");
    }
    if cidrs.len() > 2 {
        r.add(path, "at most two CIDRs: one IPv4 and one IPv6");
    }
    if cidrs.len() == 2 && is_ipv4(&cidrs[0].0) == is_ipv4(&cidrs[1].0) {
        r.add(
            format!("{path}[1]"),
            "a dual-stack list needs one IPv4 and one IPv6 CIDR",
        );
    }
}

fn cluster(cfg: &MachineConfig, r: &mut Report) {
    let c = &cfg.cluster;
    if !c.name.is_label() {
        r.add(
            "cluster.name",
            format!("{:?} must be a single DNS label (no dots)", c.name.0),
        );
    }
    https_url(
        "cluster.controlPlane.endpoint",
        &c.control_plane.endpoint,
        true,
        r,
    );
    let v = &c.kubernetes_version;
    if v.major != 1 || v.minor < 30 {
        r.add(
            "cluster.kubernetesVersion",
            format!("{v} is not supported: use 1.30 or newer"),
        );
    }

    let n = &c.network;
    cidr_list("cluster.network.podCIDRs", &n.pod_cidrs, r);
    cidr_list("cluster.network.serviceCIDRs", &n.service_cidrs, r);
    for (i, s) in n.service_cidrs.iter().enumerate() {
        // kube-apiserver refuses service ranges larger than this.
        let (min, fam) = if is_ipv4(&s.0) {
            (12, "IPv4")
        } else {
            (108, "IPv6")
        };
        if s.0.prefix_len() < min {
            r.add(
                format!("cluster.network.serviceCIDRs[{i}]"),
                format!(
                    "{} is too large: an {fam} service CIDR must be /{min} or smaller",
                    s.0
                ),
            );
        }
        for (j, p) in n.pod_cidrs.iter().enumerate() {
            if overlaps(&s.0, &p.0) {
                r.add(
                    format!("cluster.network.serviceCIDRs[{i}]"),
                    format!("{} overlaps cluster.network.podCIDRs[{j}] ({})", s.0, p.0),
                );
            }
        }
    }
    let npc = &n.node_pod_cidr;
    match (npc.mask_size, &npc.cidr) {
        (Some(_), Some(_)) => r.add(
            "cluster.network.nodePodCIDR",
            "set either maskSize or cidr, not both",
        ),
        (None, None) => r.add(
            "cluster.network.nodePodCIDR",
            "set maskSize (allocated by the controller manager) or cidr",
        ),
        (Some(mask), None) => {
            if let Some(v4) = n.pod_cidrs.iter().find(|p| is_ipv4(&p.0)) {
                if mask < v4.0.prefix_len() || mask > 30 {
                    r.add(
                        "cluster.network.nodePodCIDR.maskSize",
                        format!(
                            "/{mask} must be between the pod CIDR's /{} and /30",
                            v4.0.prefix_len()
                        ),
                    );
                }
            }
        }
        (None, Some(cidr)) => {
            if !n.pod_cidrs.iter().any(|p| p.0.contains(&cidr.0)) {
                r.add(
                    "cluster.network.nodePodCIDR.cidr",
                    format!("{} is not inside cluster.network.podCIDRs", cidr.0),
                );
            }
        }
    }
    for (i, iface) in cfg.machine.network.interfaces.iter().enumerate() {
        for (j, a) in iface.addresses.iter().enumerate() {
            let ip = a.0.addr();
            for (what, list) in [
                ("podCIDRs", &n.pod_cidrs),
                ("serviceCIDRs", &n.service_cidrs),
            ] {
                if list.iter().any(|c| c.0.contains(&ip)) {
                    r.add(
                        format!("machine.network.interfaces[{i}].addresses[{j}]"),
                        format!("node address {ip} lies inside cluster.network.{what}"),
                    );
                }
            }
        }
    }

    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, e) in c.etcd.endpoints.iter().enumerate() {
        let path = format!("cluster.etcd.endpoints[{i}]");
        https_url(&path, e, false, r);
        if let Some(first) = seen.insert(e.to_string(), i) {
            r.add(
                path,
                format!("duplicate of cluster.etcd.endpoints[{first}]"),
            );
        }
    }
    if let Some(ext) = &c.etcd.external {
        if ext.endpoints.is_empty() {
            r.add(
                "cluster.etcd.external.endpoints",
                "at least one endpoint is required",
            );
        }
        for (i, e) in ext.endpoints.iter().enumerate() {
            https_url(
                &format!("cluster.etcd.external.endpoints[{i}]"),
                e,
                false,
                r,
            );
        }
        if let Err(e) = check_is_ca("caCert", &ext.ca_cert) {
            r.add("cluster.etcd.external.caCert", e.reason());
        }
        if let Err(e) = check_key_matches("clientCert", &ext.client_cert, &ext.client_key) {
            r.add("cluster.etcd.external.clientKey", e.reason());
        }
    }
    extra_args("cluster.etcd.extraArgs", &c.etcd.extra_args, r);
    if let Some(s) = &c.etcd.snapshots {
        if !(5..=10_080).contains(&s.interval_minutes) {
            r.add(
                "cluster.etcd.snapshots.intervalMinutes",
                "give 5 to 10080 minutes (a week)",
            );
        }
        if !(1..=100).contains(&s.keep) {
            r.add("cluster.etcd.snapshots.keep", "keep 1 to 100 snapshots");
        }
    }
    cert_sans("cluster.apiServer.certSANs", &c.api_server.cert_sans, r);
    extra_args("cluster.apiServer.extraArgs", &c.api_server.extra_args, r);
    extra_args(
        "cluster.controllerManager.extraArgs",
        &c.controller_manager.extra_args,
        r,
    );
    extra_args("cluster.scheduler.extraArgs", &c.scheduler.extra_args, r);
    extra_args("cluster.proxy.extraArgs", &c.proxy.extra_args, r);
}

fn ca(path: &str, ca: &CertAndKey, need_key: bool, may_have_key: bool, r: &mut Report) {
    if let Err(e) = check_is_ca(path, &ca.crt) {
        r.add(format!("{path}.crt"), e.reason());
        return;
    }
    match (&ca.key, need_key, may_have_key) {
        (None, true, _) => r.add(
            format!("{path}.key"),
            "this node's roles need the CA private key to mint their certificates",
        ),
        (Some(_), _, false) => r.add(
            format!("{path}.key"),
            "this node's roles must not carry the CA private key: remove it (regenerate with `osctl gen config`)",
        ),
        (Some(key), _, true) => {
            if let Err(e) = check_key_matches(path, &ca.crt, key) {
                r.add(format!("{path}.key"), e.reason());
            }
        }
        (None, false, _) => {}
    }
}

fn secrets(cfg: &MachineConfig, r: &mut Report) {
    let s = &cfg.secrets;
    let cp = cfg.has_role(Role::Controlplane);
    let etcd = cfg.has_role(Role::Etcd);
    let worker = cfg.has_role(Role::Worker);
    let server = cp || etcd;

    ca("secrets.osCA", &s.os_ca, server, server, r);
    if !is_machine_token(&s.machine_token) {
        r.add(
            "secrets.machineToken",
            "must be at least 32 characters of [a-z0-9]",
        );
    }

    let require = |r: &mut Report, path: &str, present: bool, need: bool, forbid: bool| {
        if need && !present {
            r.add(path, "required for this node's roles");
        } else if forbid && present {
            r.add(
                path,
                "this node's roles must not carry it: remove it (regenerate with `osctl gen config`)",
            );
        }
    };

    match &s.kubernetes_ca {
        Some(k) => ca("secrets.kubernetesCA", k, cp, cp, r),
        None => require(r, "secrets.kubernetesCA", false, cp || worker, false),
    }
    let external = cfg.cluster.etcd.external.is_some();
    match &s.etcd_ca {
        Some(e) => ca(
            "secrets.etcdCA",
            e,
            server && !external,
            server && !external,
            r,
        ),
        None => require(r, "secrets.etcdCA", false, server && !external, false),
    }
    match &s.front_proxy_ca {
        Some(f) => ca("secrets.frontProxyCA", f, cp, cp, r),
        None => require(r, "secrets.frontProxyCA", false, cp, false),
    }
    require(
        r,
        "secrets.serviceAccountKey",
        s.service_account_key.is_some(),
        cp,
        !cp,
    );
    if let Some(k) = &s.service_account_key {
        if cp && rcgen::KeyPair::from_pem(k).is_err() {
            r.add(
                "secrets.serviceAccountKey",
                "not a PEM private key (PKCS#8 expected)",
            );
        }
    }
    require(
        r,
        "secrets.bootstrapToken",
        s.bootstrap_token.is_some(),
        cp || worker,
        !(cp || worker),
    );
    if let Some(t) = &s.bootstrap_token {
        if !is_bootstrap_token(t) {
            r.add(
                "secrets.bootstrapToken",
                "must match [a-z0-9]{6}.[a-z0-9]{16}",
            );
        }
    }
    require(
        r,
        "secrets.secretboxEncryptionSecret",
        s.secretbox_encryption_secret.is_some(),
        cp,
        !cp,
    );
    if let Some(sec) = &s.secretbox_encryption_secret {
        if cp && !is_encryption_secret(sec) {
            r.add(
                "secrets.secretboxEncryptionSecret",
                "must be base64 of exactly 32 bytes (generate with `head -c 32 /dev/urandom | base64`)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_ports() {
        for ok in [1024, 9100, 50003, 65535] {
            assert_eq!(metrics_port_problem(ok), None, "{ok}");
        }
        for bad in [0, 80, 1023, 2379, 2380, 50000, 50001, 50002] {
            assert!(metrics_port_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn sysctl_names() {
        for ok in [
            "net.ipv4.ip_forward",
            "net.bridge.bridge-nf-call-iptables",
            "vm.max_map_count",
            "net/ipv4/conf/eth0.100/rp_filter",
            "kernel.pid_max",
        ] {
            assert!(is_sysctl_key(ok), "{ok}");
        }
        for bad in [
            "",
            "/net.ipv4.ip_forward",
            "net.ipv4.",
            ".net",
            "net..ipv4",
            "net//ipv4",
            "net/ipv4/",
            "/proc/sys/net",
            "../../etc/passwd",
            "net.ipv4.ip forward",
            "kernel",
            "net.ipv4.ip_forward\n",
            "net/./ipv4",
            "net/../x",
        ] {
            assert!(!is_sysctl_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn san_names() {
        for ok in [
            "node1.example.com",
            "*.nodes.example.com",
            "10.5.0.2",
            "fd00::1",
            "localhost",
            "a-b.c",
            "x1",
        ] {
            assert_eq!(san_problem(ok), None, "{ok}");
        }
        for bad in [
            "../../x",
            "a b",
            "",
            "*",
            "*.com",
            "*.*.example.com",
            "a.*.example.com",
            "foo*.example.com",
            "-a.example.com",
            "a-.example.com",
            "Node1.example.com",
            "a..b",
            "10.0.0.256",
            "1.2.3",
            "a/b",
            "a_b.example.com",
            "a.b\n",
            &"a".repeat(64),
            &format!("{}.x", "a.".repeat(130)),
        ] {
            assert!(san_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn documented_san_limit_is_the_checked_one() {
        let schema = crate::config::json_schema().to_string();
        assert_eq!(
            schema.matches(&format!("at most {MAX_CERT_SANS}.")).count(),
            2,
            "update the certSANs doc comments to MAX_CERT_SANS"
        );
    }

    #[test]
    fn documented_trusted_key_limit_is_the_checked_one() {
        let schema = crate::config::json_schema().to_string();
        assert!(
            schema.contains(&format!("At most {MAX_TRUSTED_KEYS}, none twice")),
            "update the trustedImageKeys doc comment to MAX_TRUSTED_KEYS"
        );
    }

    #[test]
    fn flag_names() {
        for ok in ["v", "quota-backend-bytes", "log_dir", "feature-gates", "v2"] {
            assert!(is_flag_name(ok), "{ok}");
        }
        for bad in ["", "--v", "-v", "a=b", "a b", "a\nb", "a.b", "_x"] {
            assert!(!is_flag_name(bad), "{bad:?}");
        }
    }
}
