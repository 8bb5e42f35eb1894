//! Checking machined's Prometheus metrics with independent tools: curl
//! over mutual TLS with the operator's certificate, and the Prometheus
//! project's own Python parsers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use machine_api::osconfig::OsConfig;

use crate::ClusterFiles;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Reads OpenMetrics text on stdin with both of prometheus_client's
/// parsers (either raising fails the check) and prints every sample of the
/// strict OpenMetrics parse as JSON: `[[name, labels, value], ...]`.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
from prometheus_client.parser import text_string_to_metric_families as classic
text = sys.stdin.read()
list(classic(text))
out = []
for family in om(text):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;

/// `$PYTHON_CHECKERS`, else the workspace's `target/pyenv` (both made by
/// scripts/test.sh), when it has prometheus_client.
pub fn python() -> Option<PathBuf> {
    std::env::var_os("PYTHON_CHECKERS")
        .map(PathBuf::from)
        .into_iter()
        .chain([workspace().join("target/pyenv/bin/python")])
        .find(|p| {
            Command::new(p)
                .args([
                    "-c",
                    "import prometheus_client.parser, prometheus_client.openmetrics.parser",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// The samples of `text`, as the parsers read them.
pub fn parse(python: &Path, text: &str) -> Vec<(String, serde_json::Value, f64)> {
    use std::io::Write;
    let mut child = Command::new(python)
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parsers refused the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, serde_json::Value, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    samples
}

/// curl with `args`; (success, stdout, stderr).
pub fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn has(
    samples: &[(String, serde_json::Value, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|(_, _, v)| *v)
}

/// The operator's identity (os:admin) from the cluster's osconfig as PEM
/// files in `dir`, for curl: `[ca, cert, key]` paths.
pub fn operator_curl_files(files: &ClusterFiles, dir: &Path) -> [String; 3] {
    let cfg = OsConfig::parse(&std::fs::read_to_string(files.path("osconfig")).unwrap()).unwrap();
    let ctx = &cfg.contexts[&cfg.context];
    std::fs::create_dir_all(dir).unwrap();
    for (name, pem) in [
        ("ca.crt", &ctx.ca),
        ("client.crt", &ctx.crt),
        ("client.key", &ctx.key),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    ["ca.crt", "client.crt", "client.key"].map(|n| dir.join(n).display().to_string())
}

/// The samples of a node whose etcd is healthy and has a leader (`text`
/// is the scrape, shown when it is not).
pub fn assert_healthy_etcd_node(samples: &[(String, serde_json::Value, f64)], text: &str) {
    assert_eq!(
        has(
            samples,
            "machined_service_state",
            &[("service", "etcd"), ("state", "healthy")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        has(samples, "machined_etcd_has_leader", &[]),
        Some(1.0),
        "{text}"
    );
}
