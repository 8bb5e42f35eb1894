//! Config patches: RFC 6902 JSON patches (a list of operations) and RFC 7396
//! merge patches (a partial document), written in YAML or JSON, inline or
//! from a file with `@FILE`.

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

/// A parsed patch, with a label for error messages.
#[derive(Debug, Clone)]
pub struct ConfigPatch {
    label: String,
    body: Value,
}

impl ConfigPatch {
    /// Parses `@FILE` or inline YAML/JSON.
    pub fn parse(arg: &str) -> Result<Self> {
        let (label, text) = match arg.strip_prefix('@') {
            Some(path) => (
                path.to_owned(),
                crate::files::read(std::path::Path::new(path))?,
            ),
            None => ("inline patch".to_owned(), arg.to_owned()),
        };
        machine_api::config::check_limits(&text).map_err(|p| anyhow!("{label}: {p}"))?;
        let body: Value = serde_norway::from_str(&text)
            .with_context(|| format!("{label}: not valid YAML or JSON"))?;
        match &body {
            Value::Array(_) | Value::Object(_) => Ok(ConfigPatch { label, body }),
            _ => Err(anyhow!(
                "{label}: a patch is a list of RFC 6902 operations or a partial document (merge patch)"
            )),
        }
    }

    /// Applies the patch to `doc`.
    pub fn apply(&self, doc: &mut Value) -> Result<()> {
        match &self.body {
            Value::Array(_) => {
                let ops: json_patch::Patch = serde_json::from_value(self.body.clone())
                    .with_context(|| {
                        format!("{}: not a list of RFC 6902 operations", self.label)
                    })?;
                json_patch::patch(doc, &ops).map_err(|e| anyhow!("{}: {e}", self.label))
            }
            _ => {
                json_patch::merge(doc, &self.body);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_merge_patches() {
        let mut doc = serde_json::json!({"a": {"b": 1, "c": [1]}});
        ConfigPatch::parse("[{op: add, path: /a/c/-, value: 2}]")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        ConfigPatch::parse("a: {b: null, d: x}")
            .unwrap()
            .apply(&mut doc)
            .unwrap();
        assert_eq!(doc, serde_json::json!({"a": {"c": [1, 2], "d": "x"}}));
        let err = ConfigPatch::parse("[{op: remove, path: /nope}]")
            .unwrap()
            .apply(&mut doc)
            .unwrap_err();
        assert!(err.to_string().contains("inline patch"), "{err}");
        assert!(ConfigPatch::parse("42").is_err());
        let deep = format!("{}x", "- ".repeat(10_000));
        let err = ConfigPatch::parse(&deep).unwrap_err().to_string();
        assert!(err.contains("nested deeper than"), "{err}");
    }
}
