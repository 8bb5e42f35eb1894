//! Crash-safe file writes: a reader (or the next boot) sees the old content
//! or the new, never a torn file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A file staged next to its final path, not yet visible under its name.
#[derive(Debug)]
pub struct StagedFile {
    tmp: PathBuf,
    dest: PathBuf,
}

impl StagedFile {
    /// Writes `data` to a temporary file beside `dest` with `mode`, and
    /// fsyncs it. Nothing is visible at `dest` until [`commit`](Self::commit).
    pub fn write(dest: &Path, data: &[u8], mode: u32) -> io::Result<Self> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let staged = StagedFile {
            tmp,
            dest: dest.to_owned(),
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&staged.tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        Ok(staged)
    }

    /// Renames the staged file into place and fsyncs the directory, so the
    /// rename itself survives a power cut.
    pub fn commit(self) -> io::Result<()> {
        self.commit_then(|| Ok(()))
    }

    /// [`commit`](Self::commit), calling `between` after the rename and
    /// before the directory's fsync (a fault-injection point for tests:
    /// an error there stands for a crash right after the rename).
    pub fn commit_then(self, between: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        fs::rename(&self.tmp, &self.dest)?;
        if let Err(e) = between() {
            std::mem::forget(self);
            return Err(e);
        }
        let dir = self.dest.parent().unwrap_or(Path::new("."));
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()?;
        // Renamed: nothing left for Drop to remove.
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Writes `data` to `dest` atomically with permissions `mode`.
pub fn write_atomic(dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    StagedFile::write(dest, data, mode)?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn staged_file_is_invisible_until_commit_and_cleaned_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.yaml");
        let staged = StagedFile::write(&dest, b"x", 0o600).unwrap();
        assert!(!dest.exists());
        drop(staged);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomic(&dest, b"y", 0o600).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"y");
        let mode = fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
