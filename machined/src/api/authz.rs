//! Who may call what. One table maps every RPC to the least role allowed
//! and whether maintenance mode serves it; a tower layer applies it to every
//! request before any handler runs, so a handler cannot forget a check.
//! An RPC missing from the table is refused (and a test fails).

use std::sync::Arc;
use std::task::{Context, Poll};

use machine_api::pki::bundle::OsRole;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The least role an RPC needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// os:reader, os:operator, os:admin.
    Read,
    /// os:operator, os:admin.
    Operate,
    /// os:admin only.
    Admin,
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// gRPC path: `/package.Service/Method`.
    pub path: &'static str,
    pub access: Access,
    /// Served without a config (maintenance mode, no client certificate).
    pub maintenance: bool,
}

const fn rule(path: &'static str, access: Access, maintenance: bool) -> Rule {
    Rule {
        path,
        access,
        maintenance,
    }
}

/// The service served on the trust port instead (server TLS only, the
/// machine token authorizes each call): never added to the API server.
pub const NOT_ON_THE_API_PORT: &str = "TrustService";

/// Every RPC of the API.
pub const RULES: &[Rule] = &[
    rule(
        "/machine.v1alpha1.MachineService/Version",
        Access::Read,
        true,
    ),
    rule(
        "/machine.v1alpha1.MachineService/ApplyConfiguration",
        Access::Admin,
        true,
    ),
    rule(
        "/machine.v1alpha1.MachineService/ConfirmConfiguration",
        Access::Admin,
        false,
    ),
    // The redacted config still describes the node; readers may see it.
    rule(
        "/machine.v1alpha1.MachineService/GetConfiguration",
        Access::Read,
        false,
    ),
    rule(
        "/machine.v1alpha1.MachineService/Health",
        Access::Read,
        false,
    ),
    rule(
        "/machine.v1alpha1.MachineService/BootTimeline",
        Access::Read,
        false,
    ),
    // Cluster-admin credentials: as powerful as the config itself.
    rule(
        "/machine.v1alpha1.MachineService/Kubeconfig",
        Access::Admin,
        false,
    ),
    rule(
        "/machine.v1alpha1.MachineService/Reboot",
        Access::Operate,
        false,
    ),
    rule(
        "/machine.v1alpha1.MachineService/Shutdown",
        Access::Admin,
        false,
    ),
    rule(
        "/machine.v1alpha1.MachineService/Reset",
        Access::Admin,
        false,
    ),
    // Replaces the node's operating system.
    rule(
        "/machine.v1alpha1.MachineService/Upgrade",
        Access::Admin,
        false,
    ),
    rule(
        "/machine.v1alpha1.MachineService/Rollback",
        Access::Admin,
        false,
    ),
    // Like service logs: readers may see it.
    rule(
        "/machine.v1alpha1.MachineService/Dmesg",
        Access::Read,
        false,
    ),
    rule(
        "/machine.v1alpha1.MachineService/Events",
        Access::Read,
        false,
    ),
    rule("/machine.v1alpha1.ServiceService/List", Access::Read, false),
    rule(
        "/machine.v1alpha1.ServiceService/Start",
        Access::Operate,
        false,
    ),
    rule(
        "/machine.v1alpha1.ServiceService/Stop",
        Access::Operate,
        false,
    ),
    rule(
        "/machine.v1alpha1.ServiceService/Restart",
        Access::Operate,
        false,
    ),
    rule("/machine.v1alpha1.ServiceService/Logs", Access::Read, false),
    rule(
        "/machine.v1alpha1.EtcdService/Bootstrap",
        Access::Admin,
        false,
    ),
    rule("/machine.v1alpha1.EtcdService/Members", Access::Read, false),
    rule("/machine.v1alpha1.EtcdService/Status", Access::Read, false),
    rule(
        "/machine.v1alpha1.EtcdService/AddMember",
        Access::Admin,
        false,
    ),
    rule(
        "/machine.v1alpha1.EtcdService/RemoveMember",
        Access::Admin,
        false,
    ),
    // The whole keyspace, Secrets included: as sensitive as the CA keys.
    rule(
        "/machine.v1alpha1.EtcdService/Snapshot",
        Access::Admin,
        false,
    ),
    // Replaces the cluster's data.
    rule(
        "/machine.v1alpha1.EtcdService/Recover",
        Access::Admin,
        false,
    ),
    rule(
        "/machine.v1alpha1.EtcdService/Defragment",
        Access::Operate,
        false,
    ),
    // One RPC lists and disarms, so it needs the role disarming needs.
    rule(
        "/machine.v1alpha1.EtcdService/Alarms",
        Access::Operate,
        false,
    ),
    rule(
        "/machine.v1alpha1.EtcdService/ForfeitLeadership",
        Access::Operate,
        false,
    ),
];

pub fn allows(role: OsRole, access: Access) -> bool {
    match access {
        Access::Read => true,
        Access::Operate => matches!(role, OsRole::Admin | OsRole::Operator),
        Access::Admin => role == OsRole::Admin,
    }
}

/// The role in a client certificate: the first Organization that names one.
pub fn role_of(cert_der: &[u8]) -> Option<OsRole> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let role = cert
        .subject()
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .find_map(OsRole::from_organization);
    role
}

/// Decides one request.
pub fn decide(
    path: &str,
    maintenance: bool,
    peer_leaf: Option<&[u8]>,
) -> Result<(), tonic::Status> {
    let Some(rule) = RULES.iter().find(|r| r.path == path) else {
        return Err(tonic::Status::permission_denied(format!(
            "{path} is not in the authorization table"
        )));
    };
    if maintenance {
        return if rule.maintenance {
            Ok(())
        } else {
            Err(tonic::Status::failed_precondition(
                "the node is in maintenance mode (no config yet): only version and apply-config are served",
            ))
        };
    }
    let Some(der) = peer_leaf else {
        return Err(tonic::Status::unauthenticated(
            "a client certificate is required",
        ));
    };
    let Some(role) = role_of(der) else {
        return Err(tonic::Status::permission_denied(
            "the client certificate names no role (Organization os:admin, os:operator or os:reader)",
        ));
    };
    if allows(role, rule.access) {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "role {} may not call {}",
            role.organization(),
            path.rsplit('/').next().unwrap_or(path)
        )))
    }
}

/// The tower layer that applies [`decide`] to every request.
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    pub maintenance: bool,
}

impl<S> tower::Layer<S> for AuthzLayer {
    type Service = Authz<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            maintenance: self.maintenance,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    maintenance: bool,
}

/// The caller's role, for handlers that log who did what.
#[derive(Clone, Debug)]
pub struct Caller(pub Option<Arc<str>>);

/// Which listener a request came in on: handlers must not infer it from
/// the node's state, which may have changed since the connection opened
/// (the maintenance takeover race).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Maintenance,
    MutualTls,
}

/// Work a handler attached to its response (reload, reboot): fired when
/// the response body has been sent, or dropped unsent.
#[derive(Clone, Debug)]
pub struct FireAfterReply(pub Arc<std::sync::Mutex<Option<crate::node::AfterReply>>>);

/// A response body that holds [`FireAfterReply`] until hyper drops the
/// body: after its last frame (the trailers carrying the status) has been
/// handed to the connection.
struct AfterBody {
    inner: tonic::body::Body,
    _fire: Option<crate::node::AfterReply>,
}

impl http_body::Body for AfterBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Moves a handler's after-reply work from the response's extensions into
/// its body.
fn hold_until_sent(
    mut resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let Some(FireAfterReply(slot)) = resp.extensions_mut().remove::<FireAfterReply>() else {
        return resp;
    };
    let fire = slot.lock().ok().and_then(|mut s| s.take());
    resp.map(|inner| tonic::body::Body::new(AfterBody { inner, _fire: fire }))
}

impl<S, B> tower::Service<http::Request<B>> for Authz<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<Self::Response, Self::Error>>,
        futures::future::MapOk<
            S::Future,
            fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs());
        let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        match decide(req.uri().path(), self.maintenance, leaf) {
            Ok(()) => {
                let who = leaf
                    .and_then(|d| {
                        X509Certificate::from_der(d)
                            .ok()
                            .map(|(_, c)| c.subject().to_string())
                    })
                    .map(Arc::from);
                req.extensions_mut().insert(Caller(who));
                req.extensions_mut().insert(if self.maintenance {
                    Listener::Maintenance
                } else {
                    Listener::MutualTls
                });
                use futures::TryFutureExt;
                futures::future::Either::Right(self.inner.call(req).map_ok(
                    hold_until_sent
                        as fn(
                            http::Response<tonic::body::Body>,
                        ) -> http::Response<tonic::body::Body>,
                ))
            }
            Err(status) => {
                futures::future::Either::Left(futures::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every RPC in the proto is in the table, and the table names no RPC
    /// the proto lacks.
    #[test]
    fn table_covers_every_rpc() {
        let fds = prost_types_fds();
        let mut paths = Vec::new();
        for file in fds.file {
            let pkg = file.package.unwrap_or_default();
            for svc in file.service {
                if svc.name.as_deref() == Some(NOT_ON_THE_API_PORT) {
                    continue;
                }
                for m in svc.method {
                    paths.push(format!(
                        "/{pkg}.{}/{}",
                        svc.name.clone().unwrap_or_default(),
                        m.name.unwrap_or_default()
                    ));
                }
            }
        }
        assert!(paths.len() >= 18, "{paths:?}");
        for p in &paths {
            assert!(
                RULES.iter().any(|r| r.path == p),
                "{p} is missing from RULES"
            );
        }
        for r in RULES {
            assert!(
                paths.iter().any(|p| p == r.path),
                "{} is not an RPC",
                r.path
            );
        }
    }

    fn prost_types_fds() -> prost_types::FileDescriptorSet {
        prost_types::FileDescriptorSet::decode(machine_api::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes")
    }

    #[test]
    fn maintenance_serves_only_version_and_apply() {
        let served: Vec<&str> = RULES
            .iter()
            .filter(|r| r.maintenance)
            .map(|r| r.path)
            .collect();
        assert_eq!(served.len(), 2);
        assert!(decide("/machine.v1alpha1.MachineService/Version", true, None).is_ok());
        assert!(decide("/machine.v1alpha1.EtcdService/Bootstrap", true, None).is_err());
    }

    #[test]
    fn roles() {
        assert!(allows(OsRole::Reader, Access::Read));
        assert!(!allows(OsRole::Reader, Access::Operate));
        assert!(allows(OsRole::Operator, Access::Operate));
        assert!(!allows(OsRole::Operator, Access::Admin));
        assert!(allows(OsRole::Admin, Access::Admin));
        assert!(decide("/x.Y/Z", false, None).is_err());
    }
}
