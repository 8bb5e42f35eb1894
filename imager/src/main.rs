//! imager: bakes bootable node images from a declarative profile.
//!
//! The image pipeline (verified Debian inputs, cpio/squashfs/GPT/FAT writers)
//! is not in this release yet; the binary exists so the workspace layout is
//! final and `imager --version` identifies the build.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "imager",
    version,
    about = "Build bootable node images from a profile (not yet available)"
)]
struct Cli {}

fn main() -> std::process::ExitCode {
    Cli::parse();
    eprintln!("error: imager has no commands in this release yet; image building is tracked as its own issue");
    std::process::ExitCode::FAILURE
}
