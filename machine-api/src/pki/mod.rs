//! Cluster PKI: certificate authorities and the leaf certificates minted from
//! them, with rcgen.
//!
//! Keys are ECDSA P-256 everywhere: every consumer (etcd, Kubernetes, rustls,
//! openssl, kubectl) accepts it, which is not yet true of Ed25519 for
//! Kubernetes' service-account tokens and some kubeconfig clients.
//! Lifetimes follow kubeadm: CAs 10 years, leaves 1 year.

pub mod bundle;
pub mod kube;
pub mod pem;

use std::net::IpAddr;

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// CA lifetime, as kubeadm: 10 years.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// Leaf lifetime, as kubeadm: 1 year.
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// Certificates start this long before "now", so a node whose clock is a bit
/// behind the machine that minted them still accepts them.
const BACKDATE: Duration = Duration::hours(1);

/// Errors of the PKI module.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: not a PEM certificate: {why}")]
    BadCertificate { what: String, why: String },
    #[error("{what}: not a PEM private key (PKCS#8 expected): {why}")]
    BadKey { what: String, why: String },
    #[error("{what}: the private key does not belong to the certificate")]
    KeyMismatch { what: String },
    #[error("{what}: the certificate is not a CA (basicConstraints CA:TRUE missing)")]
    NotCa { what: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate request: {0}")]
    BadRequest(String),
}

impl PkiError {
    /// The message without the leading name of the thing, for callers that
    /// already show a field path.
    pub fn reason(&self) -> String {
        let text = self.to_string();
        match self {
            PkiError::Generate(_) => text,
            _ => match text.split_once(": ") {
                Some((_, rest)) => rest.to_owned(),
                None => text,
            },
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CertKeyPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertKeyPem {
    // Never print private keys, even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKeyPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// What a leaf certificate is used for (its extended key usage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    ServerAndClient,
}

/// The description of one leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafSpec {
    pub common_name: String,
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub usage: Usage,
}

impl LeafSpec {
    pub fn new(common_name: impl Into<String>, usage: Usage) -> Self {
        LeafSpec {
            common_name: common_name.into(),
            organizations: Vec::new(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            usage,
        }
    }
    pub fn org(mut self, o: impl Into<String>) -> Self {
        self.organizations.push(o.into());
        self
    }
    /// Adds a subject alternative name, as an IP address when it parses as
    /// one, otherwise as a DNS name. Duplicates are dropped.
    pub fn san(mut self, name: impl AsRef<str>) -> Self {
        let name = name.as_ref();
        match name.parse::<IpAddr>() {
            Ok(ip) if !self.ip_addresses.contains(&ip) => self.ip_addresses.push(ip),
            Ok(_) => {}
            Err(_) if !self.dns_names.iter().any(|d| d == name) => {
                self.dns_names.push(name.to_owned())
            }
            Err(_) => {}
        }
        self
    }
}

/// Most subject alternative names the trust endpoint signs into one server
/// certificate ([`CertificateAuthority::sign_server_request`]).
pub const MAX_SERVER_SANS: usize = 32;

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and no leading zero byte to trim
    SerialNumber::from_slice(&bytes)
}

fn subject(common_name: &str, organizations: &[String]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in organizations {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
}

fn new_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

/// Generates a fresh ECDSA P-256 private key, PEM (PKCS#8). Used for the
/// service-account signing key.
pub fn generate_private_key_pem() -> Result<String, PkiError> {
    Ok(new_key()?.serialize_pem())
}

/// Parses a PEM certificate.
pub fn parse_cert_der(what: &str, pem_text: &str) -> Result<Vec<u8>, PkiError> {
    let bad = |why: String| PkiError::BadCertificate {
        what: what.to_owned(),
        why,
    };
    let der = pem::first_cert_der(pem_text).map_err(|e| bad(e.to_string()))?;
    X509Certificate::from_der(&der).map_err(|e| bad(e.to_string()))?;
    Ok(der.to_vec())
}

/// Checks that `key_pem` is the private key of `cert_pem`.
pub fn check_key_matches(what: &str, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    let der = parse_cert_der(what, cert_pem)?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadKey {
        what: what.to_owned(),
        why: e.to_string(),
    })?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| PkiError::BadCertificate {
        what: what.to_owned(),
        why: e.to_string(),
    })?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(PkiError::KeyMismatch {
            what: what.to_owned(),
        });
    }
    Ok(())
}

/// Checks that `cert_pem` is a CA certificate.
pub fn check_is_ca(what: &str, cert_pem: &str) -> Result<(), PkiError> {
    check_der_is_ca(what, &parse_cert_der(what, cert_pem)?)
}

fn check_der_is_ca(what: &str, der: &[u8]) -> Result<(), PkiError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate {
        what: what.to_owned(),
        why: e.to_string(),
    })?;
    if !cert.is_ca() {
        return Err(PkiError::NotCa {
            what: what.to_owned(),
        });
    }
    Ok(())
}

/// When the certificate in `cert_pem` should be replaced: `before` ahead
/// of its expiry. None when it does not parse (replace it now).
pub fn renewal_time(cert_pem: &str, before: std::time::Duration) -> Option<std::time::SystemTime> {
    let der = pem::first_cert_der(cert_pem).ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    let expiry = std::time::UNIX_EPOCH + std::time::Duration::from_secs(not_after);
    Some(expiry.checked_sub(before).unwrap_or(std::time::UNIX_EPOCH))
}

/// Checks that `pem_text` holds one or more CA certificates and nothing
/// else (a trust bundle); returns how many.
pub fn check_ca_bundle(what: &str, pem_text: &str) -> Result<usize, PkiError> {
    let bad = |why: String| PkiError::BadCertificate {
        what: what.to_owned(),
        why,
    };
    let certs = pem::only_certs_from_pem(pem_text).map_err(|e| bad(e.to_string()))?;
    for (i, der) in certs.iter().enumerate() {
        let this = format!("{what} (certificate {})", i + 1);
        check_der_is_ca(&this, der)?;
    }
    Ok(certs.len())
}

/// SHA-256 of a certificate's DER, as lowercase hex: the fingerprint that
/// `--cert-fingerprint` pins.
pub fn fingerprint_sha256(cert_der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(cert_der))
}

/// A certificate authority that can sign leaves.
pub struct CertificateAuthority {
    pem: CertKeyPem,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("pem", &self.pem)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a new self-signed CA, valid for [`CA_VALIDITY`].
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        params.serial_number = Some(random_serial());
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        let pem = CertKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Self::from_pem(common_name, &pem.cert_pem, &pem.key_pem)
    }

    /// Loads a CA from PEM, checking that the key belongs to the certificate
    /// and that the certificate is a CA. `what` names the CA in errors.
    pub fn from_pem(what: &str, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        check_is_ca(what, cert_pem)?;
        check_key_matches(what, cert_pem, key_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadKey {
            what: what.to_owned(),
            why: e.to_string(),
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| PkiError::BadCertificate {
                what: what.to_owned(),
                why: e.to_string(),
            })?;
        Ok(CertificateAuthority {
            pem: CertKeyPem {
                cert_pem: cert_pem.to_owned(),
                key_pem: key_pem.to_owned(),
            },
            issuer,
        })
    }

    /// True when `cert_pem` carries a valid signature of the CA in
    /// `ca_pem` (checked with the CA's public key, not by names).
    pub fn verify_issued(ca_pem: &str, cert_pem: &str) -> bool {
        let (Ok(ca), Ok(cert)) = (pem::first_cert_der(ca_pem), pem::first_cert_der(cert_pem))
        else {
            return false;
        };
        let (Ok((_, ca)), Ok((_, cert))) = (
            X509Certificate::from_der(&ca),
            X509Certificate::from_der(&cert),
        ) else {
            return false;
        };
        cert.verify_signature(Some(ca.public_key())).is_ok()
    }

    pub fn cert_pem(&self) -> &str {
        &self.pem.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.pem.key_pem
    }

    /// Mints a leaf certificate with a fresh key, valid for [`LEAF_VALIDITY`].
    pub fn issue(&self, spec: &LeafSpec) -> Result<CertKeyPem, PkiError> {
        self.issue_for(spec, LEAF_VALIDITY)
    }

    /// Mints a leaf certificate with a fresh key and the given lifetime.
    pub fn issue_for(&self, spec: &LeafSpec, lifetime: Duration) -> Result<CertKeyPem, PkiError> {
        let key = new_key()?;
        let params = leaf_params(spec, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a server certificate for the key in a PKCS#10 request (the
    /// trust endpoint: the private key never leaves the requesting node).
    /// Only the request's common name and DNS/IP subject alternative names
    /// are taken; usage, lifetime and every other field are ours. Returns
    /// the spec that was signed (for the log) and the certificate.
    pub fn sign_server_request(&self, csr_pem: &str) -> Result<(LeafSpec, String), PkiError> {
        self.sign_request_as(csr_pem, |cn, sans| {
            let mut spec = LeafSpec::new(cn, Usage::Server);
            for san in sans {
                spec = spec.san(san);
            }
            Ok(spec)
        })
    }

    /// Signs the key in a PKCS#10 request with a certificate `decide`
    /// makes from the request's common name and DNS/IP names (it may take
    /// them, check them against what it expects, or ignore them). Usage,
    /// lifetime and every other field are ours, never the request's.
    pub fn sign_request_as(
        &self,
        csr_pem: &str,
        decide: impl FnOnce(&str, Vec<String>) -> Result<LeafSpec, PkiError>,
    ) -> Result<(LeafSpec, String), PkiError> {
        let bad = PkiError::BadRequest;
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| bad(e.to_string()))?;
        let cn = match csr.params.distinguished_name.get(&DnType::CommonName) {
            Some(rcgen::DnValue::Utf8String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(bad("the request has no UTF-8 common name".into())),
        };
        let mut sans = Vec::new();
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::DnsName(d) => sans.push(d.as_str().to_owned()),
                SanType::IpAddress(ip) => sans.push(ip.to_string()),
                other => {
                    return Err(bad(format!(
                        "subject alternative name {other:?} is not a DNS name or IP address"
                    )))
                }
            }
        }
        if sans.len() > MAX_SERVER_SANS {
            return Err(bad(format!(
                "more than {MAX_SERVER_SANS} subject alternative names"
            )));
        }
        let spec = decide(&cn, sans)?;
        let params = leaf_params(&spec, LEAF_VALIDITY)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok((spec, cert.pem()))
    }
}

/// A PKCS#10 request for a server certificate with `spec`'s name and SANs,
/// and its fresh private key (PEM): the requesting side of
/// [`CertificateAuthority::sign_server_request`].
pub fn server_certificate_request(spec: &LeafSpec) -> Result<(String, String), PkiError> {
    let key = new_key()?;
    // A request carries only the subject and names; the signer decides
    // everything else.
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(&spec.common_name, &[]);
    for dns in &spec.dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(dns.as_str().try_into()?));
    }
    for ip in &spec.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// The parameters of every leaf we sign.
fn leaf_params(spec: &LeafSpec, lifetime: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(&spec.common_name, &spec.organizations);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match spec.usage {
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::ServerAndClient => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    for dns in &spec.dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(dns.as_str().try_into()?));
    }
    for ip in &spec.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    validity(&mut params, lifetime);
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_request_keeps_the_requesters_key_and_only_name_and_sans() {
        let ca = CertificateAuthority::generate("os").unwrap();
        let spec = LeafSpec::new("w1", Usage::ServerAndClient)
            .san("10.5.0.20")
            .san("w1.example");
        let (csr, key_pem) = server_certificate_request(&spec).unwrap();
        let (signed, cert_pem) = ca.sign_server_request(&csr).unwrap();
        assert_eq!(signed.common_name, "w1");
        assert_eq!(signed.usage, Usage::Server);
        assert_eq!(
            signed.ip_addresses,
            vec!["10.5.0.20".parse::<IpAddr>().unwrap()]
        );
        // The certificate is for the requester's key, which never left it.
        check_key_matches("leaf", &cert_pem, &key_pem).unwrap();
        assert!(ca
            .sign_server_request(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            )
            .is_err());
    }

    #[test]
    fn kubelet_serving_requests_name_only_their_node() {
        use super::kube::{kube_proxy, kubelet_serving_from_request};
        let ca = CertificateAuthority::generate("kubernetes").unwrap();
        let ask = |cn: &str, sans: &[&str]| {
            let mut spec = LeafSpec::new(cn, Usage::Client);
            for s in sans {
                spec = spec.san(s);
            }
            let (csr, _) = server_certificate_request(&spec).unwrap();
            ca.sign_request_as(&csr, kubelet_serving_from_request)
        };
        let (spec, pem) = ask("system:node:w1", &["w1", "10.5.0.21"]).unwrap();
        assert_eq!(spec.usage, Usage::Server);
        assert_eq!(spec.organizations, vec!["system:nodes".to_owned()]);
        assert!(CertificateAuthority::verify_issued(ca.cert_pem(), &pem));
        // Another node's name, a wildcard, an API server name, an
        // identity that is no node, a name that is no DNS name: refused.
        for (cn, sans) in [
            ("system:node:w1", vec!["w2"]),
            ("system:node:w1", vec!["*.cluster.local"]),
            ("system:node:w1", vec!["kubernetes.default"]),
            ("system:kube-proxy", vec![]),
            ("system:node:W1", vec![]),
            ("system:node:", vec![]),
        ] {
            let e = ask(cn, &sans).unwrap_err().to_string();
            assert!(!e.is_empty(), "{cn} {sans:?}");
        }
        // kube-proxy's identity ignores whatever the request names.
        let (csr, _) =
            server_certificate_request(&LeafSpec::new("system:masters", Usage::Client)).unwrap();
        let (spec, _) = ca.sign_request_as(&csr, |_, _| Ok(kube_proxy())).unwrap();
        assert_eq!(spec.common_name, "system:kube-proxy");
    }

    #[test]
    fn ca_round_trip_and_key_mismatch() {
        let a = CertificateAuthority::generate("a").unwrap();
        let b = CertificateAuthority::generate("b").unwrap();
        assert!(CertificateAuthority::from_pem("a", a.cert_pem(), a.key_pem()).is_ok());
        let err = CertificateAuthority::from_pem("a", a.cert_pem(), b.key_pem()).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn leaf_is_not_a_ca() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let leaf = ca
            .issue(&LeafSpec::new("x", Usage::Server).san("10.0.0.1"))
            .unwrap();
        let err = check_is_ca("leaf", &leaf.cert_pem).unwrap_err();
        assert!(matches!(err, PkiError::NotCa { .. }));
        check_key_matches("leaf", &leaf.cert_pem, &leaf.key_pem).unwrap();
    }

    #[test]
    fn debug_output_redacts_keys() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let text = format!("{ca:?}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }

    #[test]
    fn ca_bundle_accepts_ca_certificates_only() {
        let a = CertificateAuthority::generate("a").unwrap();
        let b = CertificateAuthority::generate("b").unwrap();
        let both = format!("{}{}", a.cert_pem(), b.cert_pem());
        assert_eq!(check_ca_bundle("ca.pem", &both).unwrap(), 2);
        let leaf = a.issue(&LeafSpec::new("x", Usage::Server)).unwrap();
        let e = check_ca_bundle("ca.pem", &format!("{}{}", a.cert_pem(), leaf.cert_pem))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.pem (certificate 2)"), "{e}");
        assert!(check_ca_bundle("ca.pem", "hello").is_err());
        assert!(check_ca_bundle("ca.pem", &leaf.key_pem).is_err());
    }

    #[test]
    fn renewal_time_is_before_expiry() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let leaf = ca
            .issue_for(&LeafSpec::new("x", Usage::Server), Duration::days(10))
            .unwrap();
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        let at = renewal_time(&leaf.cert_pem, 3 * day).unwrap();
        // 10 days of life, renewed 3 days before the end: in about 7 days.
        let until = at.duration_since(now).unwrap();
        assert!(
            until > 7 * day - std::time::Duration::from_secs(120),
            "{until:?}"
        );
        assert!(
            until < 7 * day + std::time::Duration::from_secs(120),
            "{until:?}"
        );
        // Asking for more notice than its lifetime: due already.
        assert!(renewal_time(&leaf.cert_pem, 30 * day).unwrap() < now);
        assert!(renewal_time("garbage", day).is_none());
    }
}
