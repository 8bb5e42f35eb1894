//! osctl: the operator's CLI. One file per verb under `cmd/`.

mod cmd;
mod files;
mod patch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "osctl",
    version,
    about = "Operate nodes of the immutable Kubernetes OS",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate secrets, machine configs and client files.
    #[command(subcommand)]
    Gen(cmd::gen::Gen),
    /// Check machine configs (and secrets bundles, osconfig files) offline.
    Validate(cmd::validate::Validate),
    /// Print generated reference material (JSON Schema, field reference).
    #[command(subcommand)]
    Docs(cmd::docs::Docs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Gen(g) => g.run(),
        Command::Validate(v) => v.run(),
        Command::Docs(d) => d.run(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
