//! `osctl validate`: check documents offline, reporting every problem with
//! its file, line and field path.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use machine_api::config::{parse, MachineConfig, Problem};
use machine_api::osconfig::{OsConfig, OSCONFIG_KIND};
use machine_api::pki::bundle::{SecretsBundle, BUNDLE_KIND};

#[derive(Debug, Args)]
pub struct Validate {
    /// Files to check: machine configs, secrets bundles or osconfig files
    /// (recognised by their `kind`). Repeatable.
    #[arg(long = "file", short = 'f', required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
}

/// Reads the `kind` field without validating anything else. A document
/// over the size or nesting limits has none: the machine config reader
/// reports the limit.
fn kind_of(text: &str) -> Option<String> {
    parse::check_limits(text).ok()?;
    let v: serde_norway::Value = serde_norway::from_str(text).ok()?;
    v.get("kind")?.as_str().map(str::to_owned)
}

fn check(text: &str) -> (String, Vec<Problem>) {
    match kind_of(text).as_deref() {
        Some(BUNDLE_KIND) => {
            let parsed = parse::parse_yaml::<SecretsBundle>(text);
            let mut problems = parsed.problems;
            if let Some(b) = &parsed.value {
                for mut p in b.problems() {
                    p.line = parsed.lines.line_of_path(&p.path);
                    problems.push(p);
                }
            }
            ("secrets bundle".into(), problems)
        }
        Some(OSCONFIG_KIND) => match OsConfig::parse(text) {
            Ok(_) => ("osconfig".into(), vec![]),
            Err(p) => ("osconfig".into(), p.0),
        },
        _ => match MachineConfig::parse(text) {
            Ok(cfg) => {
                let roles: Vec<&str> = cfg.machine.roles.iter().map(|r| r.as_str()).collect();
                (
                    format!("machine config, roles: {}", roles.join(", ")),
                    vec![],
                )
            }
            Err(p) => ("machine config".into(), p.0),
        },
    }
}

/// `FILE:LINE: path: message`, the one format every problem is shown in.
pub fn problem_line(file: &std::path::Path, p: &Problem) -> String {
    let loc = match p.line {
        Some(l) => format!("{}:{l}", file.display()),
        None => file.display().to_string(),
    };
    if p.path.is_empty() {
        format!("{loc}: {}", p.message)
    } else {
        format!("{loc}: {}: {}", p.path, p.message)
    }
}

impl Validate {
    pub fn run(self) -> Result<ExitCode> {
        let mut failed = false;
        for path in &self.files {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{}: cannot read: {e}", path.display());
                    failed = true;
                    continue;
                }
            };
            let (what, mut problems) = check(&text);
            // In file order, as an editor shows them.
            problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
            if problems.is_empty() {
                println!("{}: valid {what}", path.display());
                continue;
            }
            failed = true;
            for p in &problems {
                eprintln!("{}", problem_line(path, p));
            }
            eprintln!(
                "{}: invalid {what}: {} problem{}",
                path.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            );
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}
