//! What every node verb shares: building the connection from the flags,
//! fanning out, and printing per-node results as a table, JSON or YAML.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rustls::ClientConfig;
use serde::Serialize;
use tonic::transport::Channel;

use crate::client::{self, ConnectArgs, Output, Trust};

/// Connections to the targeted nodes.
#[derive(Debug)]
pub struct Session {
    pub targets: Vec<String>,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    pub output: Output,
}

impl Session {
    /// Mutual TLS with the osconfig context.
    pub fn mutual(args: &ConnectArgs) -> Result<Self> {
        let ctx = args.context()?;
        let targets = args.targets(Some(&ctx))?;
        Self::with(args, targets, Trust::Mutual(Box::new(ctx)))
    }

    /// Maintenance mode: no client certificate; the node's certificate is
    /// pinned when a fingerprint is given.
    pub fn insecure(args: &ConnectArgs, fingerprint: Option<String>) -> Result<Self> {
        let fingerprint = fingerprint.as_deref().map(fingerprint_arg).transpose()?;
        let ctx = args.context().ok();
        let targets = args.targets(ctx.as_ref())?;
        if fingerprint.is_none() {
            eprintln!(
                "warning: --insecure without --cert-fingerprint: the node's identity is not checked"
            );
        }
        Self::with(args, targets, Trust::Insecure { fingerprint })
    }

    fn with(args: &ConnectArgs, targets: Vec<String>, trust: Trust) -> Result<Self> {
        Ok(Session {
            targets,
            tls: Arc::new(client::tls_config(&trust)?),
            timeout: Duration::from_secs(args.timeout),
            output: args.output,
        })
    }

    /// The same connection settings for one of the targets, with another
    /// per-call timeout: for verbs that go node by node.
    pub fn only(&self, target: &str, timeout: Duration) -> Session {
        Session {
            targets: vec![target.to_owned()],
            tls: self.tls.clone(),
            timeout,
            output: self.output,
        }
    }

    /// Calls every node at once.
    pub async fn call<T, F, Fut>(&self, f: F) -> Vec<(String, Result<T>)>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        client::fan_out(&self.targets, self.tls.clone(), self.timeout, |_, ch| f(ch)).await
    }

    /// Like [`call`](Self::call), telling the closure which node it talks to.
    pub async fn call_named<T, F, Fut>(&self, f: F) -> Vec<(String, Result<T>)>
    where
        F: Fn(String, Channel) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        client::fan_out(&self.targets, self.tls.clone(), self.timeout, f).await
    }
}

/// A certificate fingerprint as `--cert-fingerprint` takes it, copied from
/// a console: whitespace, CR and the `aa:bb:` form are tolerated.
pub fn fingerprint_arg(f: &str) -> Result<String> {
    let f = f
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_lowercase();
    if f.len() != 64 {
        anyhow::bail!(
            "--cert-fingerprint: expected 64 hex digits (SHA-256), got {}",
            f.len()
        );
    }
    Ok(f)
}

/// A node's gRPC status, shown as one line an operator can act on
/// ([`client::status_line`]); code that waits on nodes downcasts to it to
/// read the code.
#[derive(Debug)]
pub struct RpcError(pub tonic::Status);

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&client::status_line(&self.0))
    }
}

impl std::error::Error for RpcError {}

impl RpcError {
    /// The status code of a call's error, if a node answered with one.
    pub fn code_of(e: &anyhow::Error) -> Option<tonic::Code> {
        e.downcast_ref::<RpcError>().map(|r| r.0.code())
    }
}

/// Turns a gRPC status into an error an operator can act on.
pub fn rpc<T>(r: std::result::Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| anyhow::Error::new(RpcError(s)))
}

/// Prints every message of a server stream opened on each node (`logs`,
/// `dmesg`, `events`) as one line, prefixed with the node when there are
/// several, until each stream ends; failures go to stderr naming the node,
/// and the exit code is 1 when any node failed.
pub async fn print_streams<T, F, Fut>(
    s: &Session,
    open: F,
    line: impl Fn(&T) -> String + Copy,
) -> ExitCode
where
    F: Fn(Channel) -> Fut,
    Fut: Future<Output = Result<tonic::Streaming<T>>>,
{
    let multi = s.targets.len() > 1;
    let res = s
        .call_named(|node, ch| {
            let prefix = if multi {
                format!("{node}: ")
            } else {
                String::new()
            };
            let opened = open(ch);
            async move {
                let mut stream = opened.await?;
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => println!("{prefix}{}", line(&m)),
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(anyhow::anyhow!(client::status_line(&e))),
                    }
                }
            }
        })
        .await;
    let mut code = ExitCode::SUCCESS;
    for (node, r) in res {
        if let Err(e) = r {
            eprintln!("error: node {node}: {e:#}");
            code = ExitCode::FAILURE;
        }
    }
    code
}

#[derive(Serialize)]
struct NodeOutcome<'a, T: Serialize> {
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Prints per-node results. Table rows get a NODE column when several
/// nodes answered. Failures go to stderr naming the node; the exit code is
/// 1 when any node failed.
pub fn print<T: Serialize>(
    output: Output,
    results: &[(String, Result<T>)],
    header: &[&str],
    rows: impl Fn(&T) -> Vec<Vec<String>>,
) -> ExitCode {
    let failed = results.iter().any(|(_, r)| r.is_err());
    match output {
        Output::Json | Output::Yaml => {
            let list: Vec<NodeOutcome<'_, T>> = results
                .iter()
                .map(|(n, r)| NodeOutcome {
                    node: n,
                    result: r.as_ref().ok(),
                    error: r.as_ref().err().map(|e| format!("{e:#}")),
                })
                .collect();
            let text = if output == Output::Json {
                serde_json::to_string_pretty(&list).unwrap_or_default()
            } else {
                serde_norway::to_string(&list).unwrap_or_default()
            };
            println!("{text}");
        }
        Output::Table => {
            let multi = results.len() > 1;
            let mut table: Vec<Vec<String>> = Vec::new();
            let mut head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
            if multi {
                head.insert(0, "NODE".into());
            }
            for (node, r) in results {
                if let Ok(v) = r {
                    for mut row in rows(v) {
                        if multi {
                            row.insert(0, node.clone());
                        }
                        table.push(row);
                    }
                }
            }
            if !header.is_empty() && !table.is_empty() {
                print_table(&head, &table);
            } else {
                for row in table {
                    println!("{}", row.join(" "));
                }
            }
        }
    }
    for (node, r) in results {
        if let Err(e) = r {
            eprintln!("error: node {node}: {e:#}");
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print_table(head: &[String], rows: &[Vec<String>]) {
    let cols = head.len();
    let mut width = vec![0; cols];
    for r in std::iter::once(head).chain(rows.iter().map(|r| r.as_slice())) {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    for r in std::iter::once(head).chain(rows.iter().map(|r| r.as_slice())) {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .take(cols)
            .map(|(i, c)| {
                if i + 1 == cols {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = width[i])
                }
            })
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn human_age(since_unix_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(since_unix_ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}
