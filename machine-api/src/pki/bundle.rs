//! The secrets bundle: every CA, key and token of one cluster, in one file
//! (`secrets.yaml`). Machine configs carry only the part of it their roles need.

use rand::RngExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    check_is_ca, check_key_matches, generate_private_key_pem, CertificateAuthority, LeafSpec,
    PkiError, Usage,
};
use crate::config::{CertAndKey, Problem, Role, Secrets};

/// `kind` of the secrets bundle document.
pub const BUNDLE_KIND: &str = "SecretsBundle";

/// A CA certificate with its private key, both PEM.
#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaPem {
    pub crt: String,
    pub key: String,
}

impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPem")
            .field("crt", &self.crt)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CaPem {
    fn generate(common_name: &str) -> Result<Self, PkiError> {
        let ca = CertificateAuthority::generate(common_name)?;
        Ok(CaPem {
            crt: ca.cert_pem().to_owned(),
            key: ca.key_pem().to_owned(),
        })
    }

    /// Loads the CA for signing; `what` names it in errors.
    pub fn authority(&self, what: &str) -> Result<CertificateAuthority, PkiError> {
        CertificateAuthority::from_pem(what, &self.crt, &self.key)
    }

    fn with_key(&self) -> CertAndKey {
        CertAndKey {
            crt: self.crt.clone(),
            key: Some(self.key.clone()),
        }
    }

    fn cert_only(&self) -> CertAndKey {
        CertAndKey {
            crt: self.crt.clone(),
            key: None,
        }
    }
}

/// Every secret of a cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretsBundle {
    pub api_version: String,
    pub kind: String,
    /// CA of the OS API.
    #[serde(rename = "osCA")]
    pub os_ca: CaPem,
    /// Kubernetes CA.
    #[serde(rename = "kubernetesCA")]
    pub kubernetes_ca: CaPem,
    /// etcd CA.
    #[serde(rename = "etcdCA")]
    pub etcd_ca: CaPem,
    /// Front-proxy CA.
    #[serde(rename = "frontProxyCA")]
    pub front_proxy_ca: CaPem,
    /// Service-account token signing key (PEM).
    pub service_account_key: String,
    /// Kubelet TLS bootstrap token.
    pub bootstrap_token: String,
    /// Base64 of 32 bytes: Secret encryption at rest.
    pub secretbox_encryption_secret: String,
    /// Node trust-bootstrap token.
    pub machine_token: String,
}

const TOKEN_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_token(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| TOKEN_ALPHABET[rng.random_range(0..TOKEN_ALPHABET.len())] as char)
        .collect()
}

fn is_token_text(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// True for a kubelet bootstrap token: `[a-z0-9]{6}.[a-z0-9]{16}`.
pub fn is_bootstrap_token(s: &str) -> bool {
    match s.split_once('.') {
        Some((id, secret)) => {
            id.len() == 6 && secret.len() == 16 && is_token_text(id) && is_token_text(secret)
        }
        None => false,
    }
}

/// True for a machine token: at least 32 characters of `[a-z0-9]`.
pub fn is_machine_token(s: &str) -> bool {
    s.len() >= 32 && is_token_text(s)
}

/// True when `s` is base64 of exactly 32 bytes.
pub fn is_encryption_secret(s: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map(|b| b.len() == 32)
        .unwrap_or(false)
}

impl SecretsBundle {
    /// Generates a fresh bundle.
    pub fn generate() -> Result<Self, PkiError> {
        use base64::Engine;
        let mut key = [0u8; 32];
        rand::fill(&mut key[..]);
        Ok(SecretsBundle {
            api_version: crate::config::API_VERSION.into(),
            kind: BUNDLE_KIND.into(),
            os_ca: CaPem::generate("os-api-ca")?,
            kubernetes_ca: CaPem::generate("kubernetes")?,
            etcd_ca: CaPem::generate("etcd-ca")?,
            front_proxy_ca: CaPem::generate("front-proxy-ca")?,
            service_account_key: generate_private_key_pem()?,
            bootstrap_token: format!("{}.{}", random_token(6), random_token(16)),
            secretbox_encryption_secret: base64::engine::general_purpose::STANDARD.encode(key),
            machine_token: random_token(32),
        })
    }

    /// Every problem with the bundle, with field paths.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut push = |path: &str, message: String| {
            out.push(Problem {
                path: path.into(),
                line: None,
                message,
            })
        };
        if self.api_version != crate::config::API_VERSION {
            push(
                "apiVersion",
                format!("must be {:?}", crate::config::API_VERSION),
            );
        }
        if self.kind != BUNDLE_KIND {
            push("kind", format!("must be {BUNDLE_KIND:?}"));
        }
        for (path, ca) in [
            ("osCA", &self.os_ca),
            ("kubernetesCA", &self.kubernetes_ca),
            ("etcdCA", &self.etcd_ca),
            ("frontProxyCA", &self.front_proxy_ca),
        ] {
            if let Err(e) = check_is_ca(path, &ca.crt) {
                push(&format!("{path}.crt"), e.reason());
            } else if let Err(e) = check_key_matches(path, &ca.crt, &ca.key) {
                push(&format!("{path}.key"), e.reason());
            }
        }
        if rcgen::KeyPair::from_pem(&self.service_account_key).is_err() {
            push(
                "serviceAccountKey",
                "not a PEM private key (PKCS#8 expected)".into(),
            );
        }
        if !is_bootstrap_token(&self.bootstrap_token) {
            push(
                "bootstrapToken",
                "must match [a-z0-9]{6}.[a-z0-9]{16}".into(),
            );
        }
        if !is_encryption_secret(&self.secretbox_encryption_secret) {
            push(
                "secretboxEncryptionSecret",
                "must be base64 of exactly 32 bytes".into(),
            );
        }
        if !is_machine_token(&self.machine_token) {
            push(
                "machineToken",
                "must be at least 32 characters of [a-z0-9]".into(),
            );
        }
        out
    }

    /// The secrets a node with `roles` needs, and nothing more.
    ///
    /// - every node: OS API CA certificate, machine token;
    /// - `etcd`: OS API CA key (to mint its API certificate), etcd CA key;
    /// - `controlplane`: OS API CA key, Kubernetes, etcd and front-proxy CA
    ///   keys, service-account key, bootstrap token, encryption secret;
    /// - `worker`: Kubernetes CA certificate and the bootstrap token.
    pub fn for_roles(&self, roles: &[Role]) -> Secrets {
        let cp = roles.contains(&Role::Controlplane);
        let etcd = roles.contains(&Role::Etcd);
        let worker = roles.contains(&Role::Worker);
        Secrets {
            os_ca: if cp || etcd {
                self.os_ca.with_key()
            } else {
                self.os_ca.cert_only()
            },
            machine_token: self.machine_token.clone(),
            kubernetes_ca: if cp {
                Some(self.kubernetes_ca.with_key())
            } else if worker {
                Some(self.kubernetes_ca.cert_only())
            } else {
                None
            },
            etcd_ca: (cp || etcd).then(|| self.etcd_ca.with_key()),
            front_proxy_ca: cp.then(|| self.front_proxy_ca.with_key()),
            service_account_key: cp.then(|| self.service_account_key.clone()),
            bootstrap_token: (cp || worker).then(|| self.bootstrap_token.clone()),
            secretbox_encryption_secret: cp.then(|| self.secretbox_encryption_secret.clone()),
        }
    }
}

/// The OS API roles, carried in a client certificate's Organization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OsRole {
    /// Everything.
    Admin,
    /// Restart services, reboot; no config changes, no secrets.
    Operator,
    /// Read only.
    Reader,
}

impl OsRole {
    pub fn organization(self) -> &'static str {
        match self {
            OsRole::Admin => "os:admin",
            OsRole::Operator => "os:operator",
            OsRole::Reader => "os:reader",
        }
    }

    pub fn from_organization(o: &str) -> Option<Self> {
        match o {
            "os:admin" => Some(OsRole::Admin),
            "os:operator" => Some(OsRole::Operator),
            "os:reader" => Some(OsRole::Reader),
            _ => None,
        }
    }
}

impl std::str::FromStr for OsRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("os:").unwrap_or(s) {
            "admin" => Ok(OsRole::Admin),
            "operator" => Ok(OsRole::Operator),
            "reader" => Ok(OsRole::Reader),
            _ => Err(format!(
                "unknown OS API role {s:?}: use admin, operator or reader"
            )),
        }
    }
}

/// Mints an OS API client certificate for `role` from the bundle's OS CA.
pub fn os_client_cert(
    bundle: &SecretsBundle,
    name: &str,
    role: OsRole,
) -> Result<super::CertKeyPem, PkiError> {
    bundle
        .os_ca
        .authority("osCA")?
        .issue(&LeafSpec::new(name, Usage::Client).org(role.organization()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_bundle_is_valid() {
        let b = SecretsBundle::generate().unwrap();
        assert_eq!(b.problems(), vec![]);
        assert!(is_bootstrap_token(&b.bootstrap_token));
    }

    #[test]
    fn worker_secrets_hold_no_private_keys() {
        let b = SecretsBundle::generate().unwrap();
        let s = b.for_roles(&[Role::Worker]);
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(s.kubernetes_ca.is_some());
        assert!(s.etcd_ca.is_none());
    }

    #[test]
    fn etcd_only_secrets_have_no_kubernetes_ca() {
        let b = SecretsBundle::generate().unwrap();
        let s = b.for_roles(&[Role::Etcd]);
        assert!(s.kubernetes_ca.is_none());
        assert!(s.etcd_ca.as_ref().unwrap().key.is_some());
        assert!(s.service_account_key.is_none());
    }

    #[test]
    fn tampered_bundle_is_reported() {
        let mut b = SecretsBundle::generate().unwrap();
        let other = SecretsBundle::generate().unwrap();
        b.etcd_ca.key = other.etcd_ca.key;
        b.bootstrap_token = "nope".into();
        let paths: Vec<String> = b.problems().into_iter().map(|p| p.path).collect();
        assert_eq!(paths, vec!["etcdCA.key", "bootstrapToken"]);
    }
}
