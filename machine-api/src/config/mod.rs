//! The machine config document: types, parsing with every problem reported
//! at once, cross-field validation, and the published JSON Schema.

pub mod generate;
pub mod parse;
pub mod reference;
pub mod scalar;
mod types;
mod validate;

pub use parse::{
    check_limits, Problem, Problems, MAX_DOCUMENT_BYTES, MAX_NESTING_DEPTH,
    MAX_STATUS_MESSAGE_BYTES,
};
pub use scalar::{Cidr, DnsName, Endpoint, InterfaceAddress, Ip, KubernetesVersion};
pub use types::*;

impl MachineConfig {
    /// Parses and validates a YAML machine config. On failure, returns every
    /// problem found, each with its field path and line where known.
    pub fn parse(text: &str) -> Result<Self, Problems> {
        let parsed = parse::parse_yaml_with::<MachineConfig>(text, |root| {
            parse::control_characters(root, |key| validate::PEM_FIELDS.contains(&key))
        });
        let mut problems = parsed.problems;
        if let Some(cfg) = &parsed.value {
            for mut p in validate::validate(cfg) {
                // One problem per field: a control character is reported
                // before what it breaks.
                if problems.iter().any(|q| q.path == p.path) {
                    continue;
                }
                // A node removed to get past a structural problem shows up
                // here as "missing"; it is already reported.
                let caused_by_removal = parsed.removed.iter().any(|r| {
                    p.path == *r
                        || p.path.starts_with(&format!("{r}."))
                        || p.path.starts_with(&format!("{r}["))
                        // a list emptied by removing its bad items
                        || r.starts_with(&format!("{}[", p.path))
                });
                if caused_by_removal {
                    continue;
                }
                p.line = parsed.lines.line_of_path(&p.path);
                problems.push(p);
            }
        }
        match parsed.value {
            Some(cfg) if problems.is_empty() => Ok(cfg),
            _ => Err(Problems(problems)),
        }
    }

    /// Every cross-field problem of an already-typed config (no lines).
    pub fn problems(&self) -> Vec<Problem> {
        validate::validate(self)
    }

    /// The document as YAML.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a machine config always serializes")
    }

    /// A copy safe to show: every private key and token replaced by
    /// `<redacted>`. Certificates stay, they are public.
    pub fn redacted(&self) -> Self {
        const R: &str = "<redacted>";
        let mut c = self.clone();
        let s = &mut c.secrets;
        let red = |k: &mut Option<String>| {
            if k.is_some() {
                *k = Some(R.into())
            }
        };
        red(&mut s.os_ca.key);
        for ca in [&mut s.kubernetes_ca, &mut s.etcd_ca, &mut s.front_proxy_ca]
            .into_iter()
            .flatten()
        {
            red(&mut ca.key);
        }
        red(&mut s.service_account_key);
        red(&mut s.bootstrap_token);
        red(&mut s.secretbox_encryption_secret);
        s.machine_token = R.into();
        if let Some(ext) = &mut c.cluster.etcd.external {
            ext.client_key = R.into();
        }
        c
    }
}

/// The JSON Schema (draft 2020-12) of the machine config document.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(MachineConfig);
    serde_json::to_value(schema).expect("schema serializes")
}
