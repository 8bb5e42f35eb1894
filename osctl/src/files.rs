//! Writing a set of output files all-or-nothing: every file is staged first,
//! and only when all are staged are they renamed into place. A failure (or an
//! existing file without `--force`) leaves the directory as it was.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use machine_api::atomic::StagedFile;

/// Mode for files holding private keys or tokens.
pub const SECRET: u32 = 0o600;

/// A file to write and its permissions.
#[derive(Debug)]
pub struct OutFile {
    pub path: PathBuf,
    pub contents: String,
    pub mode: u32,
}

/// Writes every file or none.
pub fn write_all(files: &[OutFile], force: bool) -> Result<()> {
    if !force {
        let existing: Vec<String> = files
            .iter()
            .filter(|f| f.path.exists())
            .map(|f| f.path.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "refusing to overwrite {}: pass --force to replace {}",
                existing.join(", "),
                if existing.len() == 1 { "it" } else { "them" }
            );
        }
    }
    for f in files {
        if let Some(dir) = f.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
    }
    let mut staged = Vec::new();
    for f in files {
        staged.push(
            StagedFile::write(&f.path, f.contents.as_bytes(), f.mode)
                .with_context(|| format!("cannot write {}", f.path.display()))?,
        );
    }
    for (s, f) in staged.into_iter().zip(files) {
        s.commit()
            .with_context(|| format!("cannot write {}", f.path.display()))?;
    }
    Ok(())
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}
