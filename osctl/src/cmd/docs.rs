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
        match self {
            Docs::Schema => println!(
                "{}",
                serde_json::to_string_pretty(&machine_api::config::json_schema())?
            ),
            Docs::ConfigReference => print!("{}", machine_api::config::reference::markdown()),
        }
        Ok(ExitCode::SUCCESS)
    }
}
