//! The operator's client file (`osconfig`): named contexts, each with the
//! endpoints to dial, the nodes to target, and an OS API client identity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{parse, Problems};

/// `kind` of the client file.
pub const OSCONFIG_KIND: &str = "OsConfig";
/// Environment variable naming the client file.
pub const OSCONFIG_ENV: &str = "OSCONFIG";

/// The client file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OsConfig {
    pub api_version: String,
    pub kind: String,
    /// The context used when `--context` is not given.
    pub context: String,
    pub contexts: BTreeMap<String, Context>,
}

/// One cluster as seen from the operator's machine.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Context {
    /// Addresses (`HOST` or `HOST:PORT`, default port 50000) to dial.
    pub endpoints: Vec<String>,
    /// Nodes to act on by default (through the endpoint). Empty means the
    /// endpoint itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// PEM OS API CA certificate: the only CA the client trusts.
    pub ca: String,
    /// PEM client certificate; its Organization is the role (`os:admin`...).
    pub crt: String,
    /// PEM client private key.
    pub key: String,
    /// The Kubernetes API server URL as seen from this machine, when it
    /// differs from the cluster's `controlPlane.endpoint` (a local cluster's
    /// forwarded port): `osctl kubeconfig` writes it as the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_endpoint: Option<String>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("endpoints", &self.endpoints)
            .field("nodes", &self.nodes)
            .field("kubernetes_endpoint", &self.kubernetes_endpoint)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl OsConfig {
    /// A client file with one context, made current.
    pub fn single(name: &str, context: Context) -> Self {
        OsConfig {
            api_version: crate::config::API_VERSION.into(),
            kind: OSCONFIG_KIND.into(),
            context: name.into(),
            contexts: BTreeMap::from([(name.to_owned(), context)]),
        }
    }

    /// Parses a client file, reporting every problem with its field path.
    pub fn parse(text: &str) -> Result<Self, Problems> {
        let parsed = parse::parse_yaml::<OsConfig>(text);
        let mut problems = parsed.problems;
        if let Some(c) = &parsed.value {
            let mut add = |path: &str, message: String| {
                problems.push(parse::Problem {
                    line: parsed.lines.line_of_path(path),
                    path: path.into(),
                    message,
                })
            };
            if c.kind != OSCONFIG_KIND {
                add("kind", format!("expected {OSCONFIG_KIND:?}"));
            }
            if !c.contexts.contains_key(&c.context) {
                add(
                    "context",
                    format!("no context named {:?} in contexts", c.context),
                );
            }
            for (name, ctx) in &c.contexts {
                if ctx.endpoints.is_empty() {
                    add(
                        &format!("contexts.{name}.endpoints"),
                        "at least one endpoint is required".into(),
                    );
                }
            }
        }
        match parsed.value {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(Problems(problems)),
        }
    }

    /// Adds or replaces a context and makes it current.
    pub fn merge(&mut self, name: &str, context: Context) {
        self.contexts.insert(name.to_owned(), context);
        self.context = name.to_owned();
    }

    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("osconfig always serializes")
    }
}
