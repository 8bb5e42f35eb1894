//! Pod networking on a node with Kubernetes roles: the CNI configuration
//! for the node's own pod CIDR, and a route to every other node's pod CIDR
//! through that node's address, read from the Node objects. This is the
//! step "Kubernetes the Hard Way" does by hand with `ip route add`.
//!
//! One loop per machined, every few seconds while the node has a worker or
//! control-plane role: list the Nodes (with kube-proxy's client
//! certificate on a worker, the controller-manager's on a control plane),
//! write `10-machined.conflist` once the node's `spec.podCIDR` is known
//! (kubelet reports the node Ready only then), and make the kernel's routes
//! of protocol [`ROUTE_PROTOCOL`] exactly the wanted set: added, changed
//! or removed as Nodes come, move or go. Routes of other protocols are
//! never touched. Pods reach outside the cluster through a masquerade
//! rule for traffic leaving the pod CIDRs (the bridge plugin's own
//! `ipMasq` needs iptables, which the image does not carry).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::IpNet;
use machine_api::config::{MachineConfig, Role};
use rtnetlink::RouteMessageBuilder;
use serde::Deserialize;

use crate::node::Node;

/// The routing protocol number marking routes this controller owns
/// (`ip route show proto 0x9a`); the kernel and DHCP use others.
pub const ROUTE_PROTOCOL: u8 = 0x9a;
/// The CNI network's file name in the CNI conf dir.
pub const CONFLIST: &str = "10-machined.conflist";
/// The bridge pods attach to.
pub const BRIDGE: &str = "cni0";

/// What this controller needs of a Node object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRoute {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
    pub internal_ip: Option<IpAddr>,
}

#[derive(Deserialize)]
struct NodeList {
    items: Vec<NodeObject>,
}
#[derive(Deserialize)]
struct NodeObject {
    metadata: Meta,
    #[serde(default)]
    spec: NodeSpec,
    #[serde(default)]
    status: NodeStatus,
}
#[derive(Deserialize)]
struct Meta {
    name: String,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NodeSpec {
    #[serde(default, rename = "podCIDRs")]
    pod_cidrs: Vec<String>,
    #[serde(default, rename = "podCIDR")]
    pod_cidr: Option<String>,
}
#[derive(Deserialize, Default)]
struct NodeStatus {
    #[serde(default)]
    addresses: Vec<Address>,
}
#[derive(Deserialize)]
struct Address {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

/// The Nodes of a `GET /api/v1/nodes` answer. Unparsable CIDRs and
/// addresses are dropped (a Node is the apiserver's, already validated).
pub fn parse_nodes(body: &[u8]) -> Result<Vec<NodeRoute>, String> {
    let list: NodeList = serde_json::from_slice(body)
        .map_err(|e| format!("a node list that does not parse: {e}"))?;
    Ok(list
        .items
        .into_iter()
        .map(|n| {
            let mut cidrs: Vec<IpNet> = n
                .spec
                .pod_cidrs
                .iter()
                .chain(n.spec.pod_cidr.iter())
                .filter_map(|c| c.parse().ok())
                .collect();
            cidrs.sort();
            cidrs.dedup();
            NodeRoute {
                name: n.metadata.name,
                pod_cidrs: cidrs,
                internal_ip: n
                    .status
                    .addresses
                    .iter()
                    .find(|a| a.kind == "InternalIP")
                    .and_then(|a| a.address.parse().ok()),
            }
        })
        .collect())
}

/// The routes this node wants: every other node's pod CIDRs via its
/// InternalIP, of the same address family. A CIDR claimed by two nodes
/// (a node renamed, an old object) goes to the first by name, stably.
pub fn wanted_routes(nodes: &[NodeRoute], me: &str) -> BTreeMap<IpNet, IpAddr> {
    let mut out = BTreeMap::new();
    let mut sorted: Vec<&NodeRoute> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for n in sorted {
        if n.name == me {
            continue;
        }
        let Some(via) = n.internal_ip else { continue };
        for c in &n.pod_cidrs {
            if c.addr().is_ipv4() == via.is_ipv4() {
                out.entry(*c).or_insert(via);
            }
        }
    }
    out
}

/// The CNI network for `pod_cidrs`: a bridge with the node's pod CIDR
/// (host-local addresses, the bridge as gateway) and portmap for
/// hostPorts. containerd sets up each pod's loopback itself.
pub fn conflist(pod_cidrs: &[IpNet], data_dir: &Path) -> String {
    let ranges: Vec<serde_json::Value> = pod_cidrs
        .iter()
        .map(|c| serde_json::json!([{"subnet": c.to_string()}]))
        .collect();
    let mut routes = Vec::new();
    if pod_cidrs.iter().any(|c| c.addr().is_ipv4()) {
        routes.push(serde_json::json!({"dst": "0.0.0.0/0"}));
    }
    if pod_cidrs.iter().any(|c| c.addr().is_ipv6()) {
        routes.push(serde_json::json!({"dst": "::/0"}));
    }
    let doc = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "machined",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": data_dir.display().to_string(),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// The nftables table that masquerades pod traffic leaving the cluster's
/// pod CIDRs (to nodes, the host, the outside world); pod-to-pod traffic
/// keeps its addresses.
pub fn masquerade_ruleset(cluster_cidrs: &[IpNet]) -> String {
    let mut rules = String::new();
    for c in cluster_cidrs {
        let fam = if c.addr().is_ipv4() { "ip" } else { "ip6" };
        rules.push_str(&format!(
            "    {fam} saddr {c} {fam} daddr != {c} masquerade\n"
        ));
    }
    format!(
        "table inet machined-pods\ndelete table inet machined-pods\n\
         table inet machined-pods {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{rules}  }}\n}}\n"
    )
}

/// How this node reads Node objects.
struct Reader {
    client: reqwest::Client,
    url: String,
}

fn reader(cfg: &MachineConfig, node: &Node) -> Result<Option<Reader>, String> {
    let paths = &node.opts.paths;
    let ca = cfg
        .secrets
        .kubernetes_ca
        .as_ref()
        .ok_or("the config has no secrets.kubernetesCA")?;
    let (identity_pem, url) = if cfg.has_role(Role::Controlplane) {
        let dir = crate::roles::kubernetes::files::KubeFiles::dir_of(paths);
        let (Ok(c), Ok(k)) = (
            std::fs::read(dir.join("controller-manager.crt")),
            std::fs::read(dir.join("controller-manager.key")),
        ) else {
            return Ok(None);
        };
        let ip = node.identity_for(Some(cfg)).ip;
        (
            [c, k].concat(),
            crate::roles::kubernetes::files::https(ip, crate::roles::kubernetes::APISERVER_PORT),
        )
    } else {
        // kube-proxy's identity (system:node-proxier may list Nodes; the
        // Node authorizer lets a kubelet read only its own).
        let dir = crate::roles::kubernetes::worker::dir_of(paths);
        let (Ok(c), Ok(k)) = (
            std::fs::read(dir.join("kube-proxy.crt")),
            std::fs::read(dir.join("kube-proxy.key")),
        ) else {
            return Ok(None);
        };
        let ep = cfg.cluster.control_plane.endpoint.0.to_string();
        ([c, k].concat(), ep.trim_end_matches('/').to_owned())
    };
    let identity = reqwest::Identity::from_pem(&identity_pem).map_err(|e| e.to_string())?;
    let ca = reqwest::Certificate::from_pem(ca.crt.as_bytes()).map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .identity(identity)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Some(Reader {
        client,
        url: format!("{url}/api/v1/nodes"),
    }))
}

/// Bounded: a Node list larger than this is refused rather than read.
const MAX_NODE_LIST: usize = 32 << 20;

async fn list_nodes(r: &Reader) -> Result<Vec<NodeRoute>, String> {
    let mut resp = r
        .client
        .get(&r.url)
        .send()
        .await
        .map_err(|e| format!("{}: {}", r.url, crate::node::chain(&e)))?;
    if !resp.status().is_success() {
        let status = resp.status();
        // The apiserver's Status object says why (a 403 names the user).
        let body = resp.text().await.unwrap_or_default();
        let why = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        return Err(format!("{}: {status} {why}", r.url));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_NODE_LIST {
            return Err(format!("{}: more than {MAX_NODE_LIST} bytes", r.url));
        }
    }
    parse_nodes(&body)
}

/// The loop (spawned once at start).
pub async fn run(node: Arc<Node>) {
    let mut last_error = String::new();
    let mut masquerade_for: Vec<IpNet> = Vec::new();
    loop {
        let wait = match sync_once(&node, &mut masquerade_for).await {
            Ok(active) => {
                last_error.clear();
                if active {
                    Duration::from_secs(10)
                } else {
                    Duration::from_secs(5)
                }
            }
            Err(e) => {
                if e != last_error {
                    node.note_event(format!("pod network: {e}"));
                    last_error = e;
                }
                Duration::from_secs(5)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One pass; `Ok(false)` while there is nothing to do yet.
async fn sync_once(node: &Node, masquerade_for: &mut Vec<IpNet>) -> Result<bool, String> {
    let Some(cfg) = node.config() else {
        return Ok(false);
    };
    if !(cfg.has_role(Role::Worker) || cfg.has_role(Role::Controlplane)) {
        return Ok(false);
    }
    // In host mode the host's network is left alone: only a worker's CNI
    // network is written, and a control plane has nothing to do.
    if node.opts.host_mode && !cfg.has_role(Role::Worker) {
        return Ok(false);
    }
    let cluster: Vec<IpNet> = cfg.cluster.network.pod_cidrs.iter().map(|c| c.0).collect();
    if !node.opts.host_mode && *masquerade_for != cluster {
        apply_masquerade(node, &cluster).await?;
        *masquerade_for = cluster;
    }
    let Some(reader) = reader(&cfg, node)? else {
        return Ok(false);
    };
    let nodes = list_nodes(&reader).await?;
    let me = node.identity_for(Some(&cfg)).name;
    if cfg.has_role(Role::Worker) {
        if let Some(mine) = nodes.iter().find(|n| n.name == me) {
            if !mine.pod_cidrs.is_empty() {
                let paths = &node.opts.paths;
                let text = conflist(&mine.pod_cidrs, &paths.root.join("var/lib/cni/networks"));
                let p = paths.cni_conf_dir().join(CONFLIST);
                if std::fs::read_to_string(&p).ok().as_deref() != Some(&text) {
                    machine_api::atomic::write_atomic(&p, text.as_bytes(), 0o644)
                        .map_err(|e| format!("{}: {e}", p.display()))?;
                    tracing::info!(cidrs = ?mine.pod_cidrs, "CNI network written for this node's pod CIDRs");
                }
            }
        }
    }
    if !node.opts.host_mode {
        let wanted = wanted_routes(&nodes, &me);
        sync_routes(&wanted).await?;
    }
    Ok(true)
}

async fn apply_masquerade(node: &Node, cluster: &[IpNet]) -> Result<(), String> {
    let nft = crate::paths::find_binary(node.opts.bin_dir.as_deref(), "nft")
        .or_else(|| {
            ["/usr/sbin/nft", "/usr/bin/nft"]
                .into_iter()
                .map(std::path::PathBuf::from)
                .find(|p| p.is_file())
        })
        .ok_or("nft is not in this image: pods cannot reach beyond the cluster")?;
    let mut child = tokio::process::Command::new(nft)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin
            .write_all(masquerade_ruleset(cluster).as_bytes())
            .await
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| "nft timed out after 30 s".to_owned())?
        .map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft refused the masquerade rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Makes the kernel's routes of [`ROUTE_PROTOCOL`] exactly `wanted`.
async fn sync_routes(wanted: &BTreeMap<IpNet, IpAddr>) -> Result<(), String> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let result = async {
        let mut have: BTreeMap<IpNet, (IpAddr, rtnetlink::packet_route::route::RouteMessage)> =
            BTreeMap::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = handle.route().get(msg).execute();
            while let Some(r) = routes.try_next().await.map_err(|e| e.to_string())? {
                if u8::from(r.header.protocol) != ROUTE_PROTOCOL {
                    continue;
                }
                if let Some((dst, gw)) = route_of(&r) {
                    have.insert(dst, (gw, r));
                }
            }
        }
        for (dst, (gw, msg)) in &have {
            if wanted.get(dst) != Some(gw) {
                handle
                    .route()
                    .del(msg.clone())
                    .execute()
                    .await
                    .map_err(|e| format!("remove route {dst} via {gw}: {e}"))?;
                tracing::info!(%dst, %gw, "pod route removed");
            }
        }
        for (dst, gw) in wanted {
            if have.get(dst).map(|(g, _)| g) == Some(gw) {
                continue;
            }
            let proto = rtnetlink::packet_route::route::RouteProtocol::from(ROUTE_PROTOCOL);
            let msg = match (dst, gw) {
                (IpNet::V4(d), IpAddr::V4(g)) => RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len())
                    .gateway(*g)
                    .protocol(proto)
                    .build(),
                (IpNet::V6(d), IpAddr::V6(g)) => RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len())
                    .gateway(*g)
                    .protocol(proto)
                    .build(),
                _ => continue,
            };
            handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| format!("route {dst} via {gw}: {e}"))?;
            tracing::info!(%dst, %gw, "pod route added");
        }
        Ok(())
    }
    .await;
    task.abort();
    result
}

fn route_of(r: &rtnetlink::packet_route::route::RouteMessage) -> Option<(IpNet, IpAddr)> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let mut dst = None;
    let mut gw = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => gw = Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => gw = Some(IpAddr::V6(*v6)),
            _ => {}
        }
    }
    let net = IpNet::new(dst?, r.header.destination_prefix_length).ok()?;
    Some((net, gw?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"kind":"NodeList","items":[
      {"metadata":{"name":"w1"},"spec":{"podCIDR":"10.244.1.0/24","podCIDRs":["10.244.1.0/24"]},
       "status":{"addresses":[{"type":"InternalIP","address":"10.5.0.21"},{"type":"Hostname","address":"w1"}]}},
      {"metadata":{"name":"w2"},"spec":{"podCIDRs":["10.244.2.0/24","fd00:10:244:2::/64"]},
       "status":{"addresses":[{"type":"InternalIP","address":"10.5.0.22"}]}},
      {"metadata":{"name":"cp1"},"spec":{"podCIDR":"10.244.0.0/24"},
       "status":{"addresses":[{"type":"InternalIP","address":"10.5.0.2"}]}},
      {"metadata":{"name":"new"},"spec":{},"status":{}}
    ]}"#;

    #[test]
    fn routes_go_to_every_other_node_through_its_address() {
        let nodes = parse_nodes(LIST.as_bytes()).unwrap();
        let r = wanted_routes(&nodes, "w1");
        let want: BTreeMap<IpNet, IpAddr> = [
            ("10.244.0.0/24", "10.5.0.2"),
            ("10.244.2.0/24", "10.5.0.22"),
        ]
        .into_iter()
        .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()))
        .collect();
        // The IPv6 CIDR of a node with only an IPv4 address has no route;
        // a node without a CIDR or address has none either.
        assert_eq!(r, want);
    }

    #[test]
    fn a_cidr_claimed_twice_goes_to_one_node_stably() {
        let n = |name: &str, ip: &str| NodeRoute {
            name: name.into(),
            pod_cidrs: vec!["10.244.9.0/24".parse().unwrap()],
            internal_ip: Some(ip.parse().unwrap()),
        };
        let a = wanted_routes(&[n("b", "10.0.0.2"), n("a", "10.0.0.1")], "x");
        let b = wanted_routes(&[n("a", "10.0.0.1"), n("b", "10.0.0.2")], "x");
        assert_eq!(a, b);
        assert_eq!(a.values().next().unwrap().to_string(), "10.0.0.1");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_nodes(b"{").is_err());
        assert!(parse_nodes(b"{\"items\": 3}").is_err());
    }

    #[test]
    fn conflist_uses_the_nodes_cidr() {
        let text = conflist(
            &["10.244.1.0/24".parse().unwrap()],
            Path::new("/var/lib/cni/networks"),
        );
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let bridge = &doc["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["ipam"]["type"], "host-local");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(doc["plugins"][1]["type"], "portmap");
    }

    #[test]
    fn masquerade_spares_pod_to_pod_traffic() {
        let r = masquerade_ruleset(&["10.244.0.0/16".parse().unwrap()]);
        assert!(r.contains("ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade"));
        // Re-applying replaces the table, never duplicates it.
        assert!(r.contains("delete table inet machined-pods"));
    }
}
