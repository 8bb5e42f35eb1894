//! machined: the node agent beside PID 1.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "machined", version, about = "Node agent (not yet available)")]
struct Cli {}

fn main() -> std::process::ExitCode {
    Cli::parse();
    eprintln!("error: machined has no functionality in this release yet; the node agent is tracked as its own issue");
    std::process::ExitCode::FAILURE
}
