//! A DHCPv4 client (RFC 2131): DISCOVER, OFFER, REQUEST, ACK, then renewal
//! at T1. Messages are encoded by `dhcproto`; the socket is a UDP socket
//! bound to port 68 on one device with the broadcast flag set, so replies
//! reach us before the interface has an address.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use ipnet::{IpNet, Ipv4Net};
use machine_api::retry::Backoff;
use tokio::net::UdpSocket;
use tracing::{info, warn};

/// Errors of one DHCP exchange.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("no offer within {0}s (is there a DHCP server on this link?)")]
    NoOffer(u64),
    #[error("server {0} refused the request (NAK)")]
    Nak(Ipv4Addr),
    #[error("encoding: {0}")]
    Encode(String),
}

/// A granted lease.
#[derive(Clone, Debug)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease_secs: u32,
}

impl Lease {
    pub fn address(&self) -> IpNet {
        IpNet::V4(Ipv4Net::new(self.ip, self.prefix).unwrap_or_else(|_| Ipv4Net::from(self.ip)))
    }
    /// T1: renew at half the lease.
    fn renew_after(&self) -> Duration {
        Duration::from_secs(u64::from(self.lease_secs.max(60)) / 2)
    }
}

fn socket(ifname: &str) -> Result<UdpSocket, DhcpError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(ifname.as_bytes()))?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into())?;
    s.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(s.into())?)
}

fn message(mac: [u8; 6], xid: u32, kind: MessageType, extra: &[DhcpOption]) -> Message {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootRequest)
        .set_xid(xid)
        .set_chaddr(&mac)
        .set_flags(Flags::default().set_broadcast());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
        OptionCode::Renewal,
    ]));
    for o in extra {
        opts.insert(o.clone());
    }
    m
}

async fn send(sock: &UdpSocket, m: &Message, to: Ipv4Addr) -> Result<(), DhcpError> {
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf))
        .map_err(|e| DhcpError::Encode(e.to_string()))?;
    sock.send_to(&buf, SocketAddrV4::new(to, 67)).await?;
    Ok(())
}

/// Waits for a reply to `xid` of one of the given kinds.
async fn receive(sock: &UdpSocket, xid: u32, wait: Duration) -> Result<Option<Message>, DhcpError> {
    let mut buf = vec![0u8; 1500];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let n = match tokio::time::timeout(left, sock.recv_from(&mut buf)).await {
            Err(_) => return Ok(None),
            Ok(r) => r?.0,
        };
        if let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) {
            if m.xid() == xid && m.opcode() == Opcode::BootReply {
                return Ok(Some(m));
            }
        }
    }
}

fn lease_from(ack: &Message, server: Ipv4Addr) -> Lease {
    let opts = ack.opts();
    let prefix = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => u32::from(*m).leading_ones() as u8,
        _ => 24,
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => Vec::new(),
    };
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => *t,
        _ => 3600,
    };
    Lease {
        ip: ack.yiaddr(),
        prefix,
        router,
        dns,
        server,
        lease_secs,
    }
}

fn server_id(m: &Message) -> Option<Ipv4Addr> {
    match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
        _ => None,
    }
}

/// REQUEST for an offered (or held) address; returns the lease on ACK.
async fn request(
    sock: &UdpSocket,
    mac: [u8; 6],
    ip: Ipv4Addr,
    server: Ipv4Addr,
) -> Result<Option<Lease>, DhcpError> {
    let xid: u32 = rand::random();
    let req = message(
        mac,
        xid,
        MessageType::Request,
        &[
            DhcpOption::RequestedIpAddress(ip),
            DhcpOption::ServerIdentifier(server),
        ],
    );
    for attempt in 0..3u32 {
        send(sock, &req, Ipv4Addr::BROADCAST).await?;
        if let Some(reply) = receive(sock, xid, Duration::from_secs(1 << attempt)).await? {
            return match reply.opts().msg_type() {
                Some(MessageType::Ack) => Ok(Some(lease_from(&reply, server))),
                Some(MessageType::Nak) => Err(DhcpError::Nak(server)),
                _ => Ok(None),
            };
        }
    }
    Ok(None)
}

/// A full DISCOVER..ACK exchange, retried with backoff within `wait`.
pub async fn acquire(ifname: &str, mac: [u8; 6], wait: Duration) -> Result<Lease, DhcpError> {
    let sock = socket(ifname)?;
    let deadline = tokio::time::Instant::now() + wait;
    // How long to wait for an offer: 0.5 s, doubling up to 4 s.
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
    while tokio::time::Instant::now() < deadline {
        let xid: u32 = rand::random();
        send(
            &sock,
            &message(mac, xid, MessageType::Discover, &[]),
            Ipv4Addr::BROADCAST,
        )
        .await?;
        if let Some(offer) = receive(&sock, xid, backoff.next_delay()).await? {
            if offer.opts().msg_type() == Some(MessageType::Offer) {
                let server = server_id(&offer).unwrap_or(offer.siaddr());
                if let Some(lease) = request(&sock, mac, offer.yiaddr(), server).await? {
                    return Ok(lease);
                }
            }
        }
    }
    Err(DhcpError::NoOffer(wait.as_secs()))
}

/// Renews the lease at T1 for as long as machined runs; after a failed
/// renewal, starts over with DISCOVER. The address is kept meanwhile: a
/// node that loses its DHCP server keeps serving on the address it had.
pub fn keep_renewing(ifname: String, mac: [u8; 6], mut lease: Lease) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(lease.renew_after()).await;
            let renewed = match socket(&ifname) {
                Ok(sock) => request(&sock, mac, lease.ip, lease.server).await,
                Err(e) => Err(e),
            };
            match renewed {
                Ok(Some(l)) if l.ip == lease.ip => {
                    info!("{ifname}: DHCP lease renewed for {}s", l.lease_secs);
                    lease = l;
                }
                other => {
                    warn!("{ifname}: DHCP renewal failed ({other:?}); rediscovering");
                    match acquire(&ifname, mac, Duration::from_secs(30)).await {
                        Ok(l) if l.ip == lease.ip => lease = l,
                        Ok(l) => warn!(
                            "{ifname}: the DHCP server now offers {} instead of {}; keeping {} until a reboot",
                            l.ip, lease.ip, lease.ip
                        ),
                        Err(e) => warn!("{ifname}: {e}"),
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discover_round_trips_with_broadcast_flag_and_client_id() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let m = message(mac, 42, MessageType::Discover, &[]);
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf)).unwrap();
        let back = Message::decode(&mut Decoder::new(&buf)).unwrap();
        assert_eq!(back.xid(), 42);
        assert!(back.flags().broadcast());
        assert_eq!(&back.chaddr()[..6], &mac);
        assert_eq!(back.opts().msg_type(), Some(MessageType::Discover));
    }

    #[test]
    fn lease_reads_mask_router_dns_and_time() {
        let mut ack = Message::default();
        ack.set_opcode(Opcode::BootReply)
            .set_yiaddr(Ipv4Addr::new(10, 0, 2, 15));
        let o = ack.opts_mut();
        o.insert(DhcpOption::MessageType(MessageType::Ack));
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        o.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 2, 2)]));
        o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 0, 2, 3,
        )]));
        o.insert(DhcpOption::AddressLeaseTime(86400));
        let l = lease_from(&ack, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(l.address().to_string(), "10.0.2.15/24");
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(l.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(l.renew_after(), Duration::from_secs(43200));
    }
}
