//! `osctl docs`: reference material generated from the types, so the
//! published docs cannot drift from the code.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Docs {
    /// The machine config's JSON Schema.
    Schema,
    /// The machine config field reference, as Markdown.
    ConfigReference,
}

impl Docs {
    pub fn run(self) -> Result<ExitCode> {
        let text = match self {
            Docs::Schema => {
                serde_json::to_string_pretty(&machine_api::config::json_schema())? + "\n"
            }
            Docs::ConfigReference => machine_api::config::reference::markdown(),
        };
        use std::io::Write;
        match std::io::stdout().write_all(text.as_bytes()) {
            // `osctl docs schema | head` closes the pipe early: not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
            other => other.map(|()| ExitCode::SUCCESS).map_err(Into::into),
        }
    }
}
