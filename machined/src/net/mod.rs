//! Node networking, in this order of precedence:
//! 1. `machine.network.interfaces` from the machine config;
//! 2. the kernel's `ip=` arguments (the kernel's own format; several may be
//!    given, one per interface, which QEMU clusters use);
//! 3. DHCP on the first link with carrier.
//!
//! Links, addresses and routes are set through rtnetlink; the DHCP client is
//! in [`dhcp`]. Only used on a node: host mode leaves the host's network alone.

pub mod dhcp;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use ipnet::IpNet;
use machine_api::config::Network;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{info, warn};

/// Errors while configuring the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("ip={arg}: {message}")]
    KernelArg { arg: String, message: String },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("interface {0} does not exist (links present: {1})")]
    NoSuchLink(String, String),
    #[error(
        "no link has carrier (links present: {0}); plug a cable or set machine.network.interfaces"
    )]
    NoCarrier(String),
    #[error("DHCP on {0}: {1}")]
    Dhcp(String, String),
}

fn netlink(e: impl std::fmt::Display) -> NetError {
    NetError::Netlink(e.to_string())
}

/// Where a plan came from, for the console and the timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanSource {
    MachineConfig,
    KernelCmdline,
    Default,
}

impl std::fmt::Display for PlanSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlanSource::MachineConfig => "machine config",
            PlanSource::KernelCmdline => "kernel command line",
            PlanSource::Default => "default (DHCP on the first link with carrier)",
        })
    }
}

/// One route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePlan {
    pub network: IpNet,
    pub gateway: Option<IpAddr>,
    pub metric: Option<u32>,
}

/// What to do with one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfacePlan {
    /// None: the first link with carrier.
    pub name: Option<String>,
    pub dhcp: bool,
    pub addresses: Vec<IpNet>,
    pub routes: Vec<RoutePlan>,
    pub mtu: Option<u32>,
}

/// The whole network setup of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub source: PlanSource,
    pub interfaces: Vec<IfacePlan>,
    pub nameservers: Vec<IpAddr>,
    /// Host name from the kernel's `ip=` (its fifth field).
    pub hostname: Option<String>,
}

impl Plan {
    /// The plan from the machine config, when it names any interface.
    pub fn from_config(net: &Network) -> Option<Plan> {
        if net.interfaces.is_empty() {
            return None;
        }
        Some(Plan {
            source: PlanSource::MachineConfig,
            interfaces: net
                .interfaces
                .iter()
                .map(|i| IfacePlan {
                    name: Some(i.name.clone()),
                    dhcp: i.dhcp,
                    addresses: i.addresses.iter().map(|a| a.0).collect(),
                    routes: i
                        .routes
                        .iter()
                        .map(|r| RoutePlan {
                            network: r.network.0,
                            gateway: r.gateway.as_ref().map(|g| g.0),
                            metric: r.metric,
                        })
                        .collect(),
                    mtu: i.mtu,
                })
                .collect(),
            nameservers: net.nameservers.iter().map(|n| n.0).collect(),
            hostname: None,
        })
    }

    /// The plan from the kernel's `ip=` arguments, if there are any.
    /// Format: `ip=CLIENT:SERVER:GATEWAY:NETMASK:HOSTNAME:DEVICE:AUTOCONF:DNS0:DNS1`
    /// or `ip=dhcp`; NETMASK may also be a prefix length.
    pub fn from_kernel_cmdline(cmdline: &str) -> Result<Option<Plan>, NetError> {
        let mut plan = Plan {
            source: PlanSource::KernelCmdline,
            interfaces: Vec::new(),
            nameservers: Vec::new(),
            hostname: None,
        };
        let mut any = false;
        let parsed = crate::cmdline::Cmdline::parse(cmdline);
        for arg in parsed.values("ip") {
            any = true;
            let bad = |message: &str| NetError::KernelArg {
                arg: arg.to_owned(),
                message: message.to_owned(),
            };
            match arg {
                "off" | "none" => continue,
                "on" | "any" | "dhcp" | "bootp" | "rarp" | "both" => {
                    plan.interfaces.push(IfacePlan::dhcp(None));
                    continue;
                }
                _ => {}
            }
            let f: Vec<&str> = arg.split(':').collect();
            let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
            let device = field(5).map(str::to_owned);
            let autoconf = field(6).unwrap_or("off");
            if let Some(h) = field(4) {
                plan.hostname = Some(h.to_owned());
            }
            for dns in [field(7), field(8)].into_iter().flatten() {
                plan.nameservers.push(
                    dns.parse()
                        .map_err(|_| bad("DNS server is not an IP address"))?,
                );
            }
            if matches!(autoconf, "dhcp" | "on" | "any" | "both" | "bootp") {
                plan.interfaces.push(IfacePlan::dhcp(device));
                continue;
            }
            let client: IpAddr = field(0)
                .ok_or_else(|| bad("no client address (first field)"))?
                .parse()
                .map_err(|_| bad("the client address is not an IP address"))?;
            let prefix = match field(3) {
                None => {
                    if client.is_ipv4() {
                        24
                    } else {
                        64
                    }
                }
                Some(m) => match (m.parse::<u8>(), m.parse::<Ipv4Addr>()) {
                    (Ok(p), _) => p,
                    (_, Ok(mask)) => {
                        let bits = u32::from(mask);
                        if bits.leading_ones() + bits.trailing_zeros() != 32 {
                            return Err(bad("the netmask is not contiguous"));
                        }
                        bits.leading_ones() as u8
                    }
                    _ => return Err(bad("the netmask is neither dotted nor a prefix length")),
                },
            };
            let address =
                IpNet::new(client, prefix).map_err(|_| bad("the prefix length is too long"))?;
            let mut routes = Vec::new();
            if let Some(gw) = field(2) {
                let gw: IpAddr = gw
                    .parse()
                    .map_err(|_| bad("the gateway is not an IP address"))?;
                let default = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
                routes.push(RoutePlan {
                    network: default.parse().unwrap_or_else(|_| unreachable!()),
                    gateway: Some(gw),
                    metric: None,
                });
            }
            plan.interfaces.push(IfacePlan {
                name: Some(device.unwrap_or_else(|| "eth0".into())),
                dhcp: false,
                addresses: vec![address],
                routes,
                mtu: None,
            });
        }
        Ok(any.then_some(plan))
    }

    /// DHCP on the first link with carrier.
    pub fn default_dhcp() -> Plan {
        Plan {
            source: PlanSource::Default,
            interfaces: vec![IfacePlan::dhcp(None)],
            nameservers: Vec::new(),
            hostname: None,
        }
    }
}

impl IfacePlan {
    fn dhcp(name: Option<String>) -> Self {
        IfacePlan {
            name,
            dhcp: true,
            addresses: Vec::new(),
            routes: Vec::new(),
            mtu: None,
        }
    }
}

/// What the network ended up as.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// (interface, address) in plan order: the first is the node's address.
    pub addresses: Vec<(String, IpNet)>,
    pub nameservers: Vec<IpAddr>,
    pub hostname: Option<String>,
}

impl Outcome {
    /// The node's own address: the first one configured.
    pub fn node_ip(&self) -> Option<IpAddr> {
        self.addresses.first().map(|(_, a)| a.addr())
    }
}

/// A link as netlink reports it.
#[derive(Clone, Debug)]
struct Link {
    index: u32,
    name: String,
    mac: Option<[u8; 6]>,
}

async fn links(handle: &Handle) -> Result<Vec<Link>, NetError> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut out = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(netlink)? {
        let mut name = None;
        let mut mac = None;
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Address(m) if m.len() == 6 => {
                    mac = m.as_slice().try_into().ok();
                }
                _ => {}
            }
        }
        if let Some(name) = name.filter(|n| n != "lo") {
            out.push(Link {
                index: msg.header.index,
                name,
                mac,
            });
        }
    }
    out.sort_by_key(|l| l.index);
    Ok(out)
}

fn names(links: &[Link]) -> String {
    let v: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn has_carrier(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/carrier"))
        .map(|c| c.trim() == "1")
        .unwrap_or(false)
}

async fn set_up(handle: &Handle, link: &Link, mtu: Option<u32>) -> Result<(), NetError> {
    let mut msg = LinkUnspec::new_with_index(link.index).up();
    if let Some(m) = mtu {
        msg = msg.mtu(m);
    }
    handle
        .link()
        .set(msg.build())
        .execute()
        .await
        .map_err(netlink)
}

/// Adds an address; one already there is fine (a machined restart).
async fn add_address(handle: &Handle, link: &Link, addr: IpNet) -> Result<(), NetError> {
    match handle
        .address()
        .add(link.index, addr.addr(), addr.prefix_len())
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(NetError::Netlink(format!(
            "add {addr} to {}: {e}",
            link.name
        ))),
    }
}

async fn add_route(handle: &Handle, link: &Link, r: &RoutePlan) -> Result<(), NetError> {
    let result = match (r.network, r.gateway) {
        (IpNet::V4(net), gw) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(net.addr(), net.prefix_len())
                .output_interface(link.index);
            if let Some(IpAddr::V4(g)) = gw {
                b = b.gateway(g);
            }
            if let Some(m) = r.metric {
                b = b.priority(m);
            }
            handle.route().add(b.build()).execute().await
        }
        (IpNet::V6(net), gw) => {
            let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(net.addr(), net.prefix_len())
                .output_interface(link.index);
            if let Some(IpAddr::V6(g)) = gw {
                b = b.gateway(g);
            }
            if let Some(m) = r.metric {
                b = b.priority(m);
            }
            handle.route().add(b.build()).execute().await
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(NetError::Netlink(format!(
            "route {} via {} on {}: {e}",
            r.network,
            r.gateway
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
            link.name
        ))),
    }
}

/// Waits for a named link (drivers may still be probing) or for the first
/// link with carrier.
async fn find_link(handle: &Handle, name: Option<&str>, wait: Duration) -> Result<Link, NetError> {
    let deadline = Instant::now() + wait;
    loop {
        let all = links(handle).await?;
        match name {
            Some(n) => {
                if let Some(l) = all.iter().find(|l| l.name == n) {
                    return Ok(l.clone());
                }
                if Instant::now() >= deadline {
                    return Err(NetError::NoSuchLink(n.to_owned(), names(&all)));
                }
            }
            None => {
                // Carrier shows only on links that are up.
                for l in &all {
                    let _ = set_up(handle, l, None).await;
                }
                if let Some(l) = all.iter().find(|l| has_carrier(&l.name)) {
                    return Ok(l.clone());
                }
                if Instant::now() >= deadline {
                    return Err(NetError::NoCarrier(names(&all)));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies a plan. Interfaces that fail are reported and skipped so that
/// one bad interface never takes the node's API off the network.
pub async fn apply(plan: &Plan) -> (Outcome, Vec<NetError>) {
    let mut out = Outcome {
        nameservers: plan.nameservers.clone(),
        hostname: plan.hostname.clone(),
        ..Outcome::default()
    };
    let mut errors = Vec::new();
    let (conn, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            errors.push(netlink(e));
            return (out, errors);
        }
    };
    tokio::spawn(conn);
    for iface in &plan.interfaces {
        match apply_iface(&handle, iface, &mut out).await {
            Ok(()) => {}
            Err(e) => {
                warn!("{e}");
                errors.push(e);
            }
        }
    }
    (out, errors)
}

async fn apply_iface(
    handle: &Handle,
    iface: &IfacePlan,
    out: &mut Outcome,
) -> Result<(), NetError> {
    let started = Instant::now();
    let link = find_link(handle, iface.name.as_deref(), Duration::from_secs(5)).await?;
    if started.elapsed() > Duration::from_millis(200) {
        info!(
            "{}: the link appeared after {:.1}s",
            link.name,
            started.elapsed().as_secs_f64()
        );
    }
    set_up(handle, &link, iface.mtu).await?;
    for a in &iface.addresses {
        add_address(handle, &link, *a).await?;
        out.addresses.push((link.name.clone(), *a));
    }
    for r in &iface.routes {
        add_route(handle, &link, r).await?;
    }
    if iface.dhcp {
        let mac = link.mac.ok_or_else(|| {
            NetError::Dhcp(link.name.clone(), "the link has no MAC address".into())
        })?;
        let lease = dhcp::acquire(&link.name, mac, Duration::from_secs(15))
            .await
            .map_err(|e| NetError::Dhcp(link.name.clone(), e.to_string()))?;
        let addr = lease.address();
        add_address(handle, &link, addr).await?;
        if let Some(gw) = lease.router {
            add_route(
                handle,
                &link,
                &RoutePlan {
                    network: "0.0.0.0/0".parse().unwrap_or_else(|_| unreachable!()),
                    gateway: Some(IpAddr::V4(gw)),
                    metric: Some(1024),
                },
            )
            .await?;
        }
        out.nameservers
            .extend(lease.dns.iter().map(|d| IpAddr::V4(*d)));
        out.addresses.push((link.name.clone(), addr));
        info!(
            "{}: DHCP lease {addr} from {} for {}s",
            link.name, lease.server, lease.lease_secs
        );
        dhcp::keep_renewing(link.name.clone(), mac, lease);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_ip_static_with_dotted_mask_and_gateway() {
        let p = Plan::from_kernel_cmdline(
            "console=ttyS0 ip=10.5.0.2::10.5.0.1:255.255.255.0:cp1:eth0:off:10.5.0.1 quiet",
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.source, PlanSource::KernelCmdline);
        assert_eq!(p.hostname.as_deref(), Some("cp1"));
        assert_eq!(p.nameservers, vec!["10.5.0.1".parse::<IpAddr>().unwrap()]);
        let i = &p.interfaces[0];
        assert_eq!(i.name.as_deref(), Some("eth0"));
        assert_eq!(i.addresses, vec!["10.5.0.2/24".parse::<IpNet>().unwrap()]);
        assert_eq!(i.routes[0].network, "0.0.0.0/0".parse::<IpNet>().unwrap());
        assert_eq!(i.routes[0].gateway, Some("10.5.0.1".parse().unwrap()));
    }

    #[test]
    fn several_ip_args_configure_several_interfaces() {
        let p = Plan::from_kernel_cmdline(
            "ip=10.5.0.3:::24::eth0:off ip=10.0.2.15:::255.255.255.0::eth1:off",
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.interfaces.len(), 2);
        assert_eq!(p.interfaces[1].name.as_deref(), Some("eth1"));
        assert!(p.interfaces[0].routes.is_empty());
    }

    #[test]
    fn kernel_ip_dhcp_forms() {
        let p = Plan::from_kernel_cmdline("ip=dhcp").unwrap().unwrap();
        assert!(p.interfaces[0].dhcp && p.interfaces[0].name.is_none());
        let p = Plan::from_kernel_cmdline("ip=:::::eth1:dhcp")
            .unwrap()
            .unwrap();
        assert!(p.interfaces[0].dhcp);
        assert_eq!(p.interfaces[0].name.as_deref(), Some("eth1"));
        assert!(Plan::from_kernel_cmdline("quiet").unwrap().is_none());
    }

    #[test]
    fn bad_kernel_ip_names_the_argument_and_the_field() {
        let e = Plan::from_kernel_cmdline("ip=10.5.0.300::::::off")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ip=10.5.0.300") && e.contains("client address"),
            "{e}"
        );
        let e = Plan::from_kernel_cmdline("ip=10.5.0.3:::255.0.255.0::eth0:off")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not contiguous"), "{e}");
    }
}
