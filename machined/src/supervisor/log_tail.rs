//! Tailing a service's log file into its [`LogBuffer`], and rotating it.
//!
//! The child writes straight to the file (not to a pipe of ours) so that it
//! survives machined being killed; machined reads the file behind it.
//! Rotation is copytruncate: the file is copied to `{name}.log.1` and
//! truncated in place, because the child's open O_APPEND descriptor cannot
//! be swapped for a new file; its next write lands at the new end (0).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::log_buffer::LogBuffer;

/// How often the file is looked at.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// A longer line is cut into pieces of this size, bounding memory when a
/// child writes without newlines.
const MAX_LINE: usize = 64 * 1024;
const READ_CHUNK: usize = 64 * 1024;

/// Follows one log file. Blocking I/O: run [`poll`](Self::poll) off the
/// async executor.
#[derive(Debug)]
pub(crate) struct Tailer {
    path: PathBuf,
    rotated: PathBuf,
    max_bytes: u64,
    buffer: Arc<LogBuffer>,
    file: Option<File>,
    /// Inode of `file`, to notice the file being replaced.
    ino: u64,
    offset: u64,
    partial: Vec<u8>,
}

impl Tailer {
    pub(crate) fn new(path: PathBuf, max_bytes: u64, buffer: Arc<LogBuffer>) -> Self {
        let mut rotated = path.clone().into_os_string();
        rotated.push(".1");
        Self {
            path,
            rotated: PathBuf::from(rotated),
            max_bytes,
            buffer,
            file: None,
            ino: 0,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Reads whatever was appended since the last call, and rotates the
    /// file when it has grown past the limit.
    pub(crate) fn poll(&mut self) {
        if let Err(e) = self.poll_inner() {
            tracing::debug!(path = %self.path.display(), error = %e, "log tail");
            // Start over (reopen) next time.
            self.file = None;
        }
    }

    fn poll_inner(&mut self) -> io::Result<()> {
        let meta = match fs::metadata(&self.path) {
            Ok(m) => m,
            // Not created yet (service never started) or deleted.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if self.file.is_none() || meta.ino() != self.ino {
            self.file = Some(File::open(&self.path)?);
            self.ino = meta.ino();
            self.offset = 0;
            self.partial.clear();
        }
        if meta.len() < self.offset {
            // Truncated behind our back (or by us): start from the top.
            self.offset = 0;
            self.partial.clear();
        }
        if meta.len() > self.offset {
            self.read_to_end()?;
        }
        if meta.len() > self.max_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Reads from `offset` to the current end of the file into the buffer.
    fn read_to_end(&mut self) -> io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            let n = match self.file.as_mut() {
                Some(file) => file.read(&mut chunk)?,
                None => 0,
            };
            if n == 0 {
                return Ok(());
            }
            self.offset += n as u64;
            self.feed(&chunk[..n]);
        }
    }

    /// Copies the file to `.1` and truncates it.
    ///
    /// The copy is written by reading the file ourselves, so bytes appended
    /// since the last read are fed to the buffer too: every line that ends
    /// up in `.1` has been seen. Only what the child writes between the end
    /// of the copy and the truncation is lost (inherent to copytruncate).
    fn rotate(&mut self) -> io::Result<()> {
        let mut tmp_name = self.rotated.clone().into_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut src = File::open(&self.path)?;
        let mut dst = File::create(&tmp)?;
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut pos: u64 = 0;
        loop {
            let n = src.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            dst.write_all(&chunk[..n])?;
            let end = pos + n as u64;
            if end > self.offset {
                let unseen_from = usize::try_from(self.offset.saturating_sub(pos)).unwrap_or(0);
                self.feed(&chunk[unseen_from..n]);
                self.offset = end;
            }
            pos = end;
        }
        // Truncate through a writable descriptor of the same file.
        fs::OpenOptions::new()
            .write(true)
            .open(&self.path)?
            .set_len(0)?;
        self.offset = 0;
        fs::rename(&tmp, &self.rotated)?;
        tracing::debug!(path = %self.path.display(), bytes = pos, "log rotated");
        Ok(())
    }

    /// Splits bytes into lines, keeping an unterminated tail for later.
    fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&bytes[..nl]);
            self.flush_partial();
            bytes = &bytes[nl + 1..];
        }
        self.partial.extend_from_slice(bytes);
        while self.partial.len() >= MAX_LINE {
            let rest = self.partial.split_off(MAX_LINE);
            self.flush_partial();
            self.partial = rest;
        }
    }

    fn flush_partial(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        self.buffer.push(line);
    }
}

/// Runs a [`Tailer`] forever; abort the task to stop it.
pub(crate) async fn run(mut tailer: Tailer) {
    loop {
        tailer = match tokio::task::spawn_blocking(move || {
            tailer.poll();
            tailer
        })
        .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "log tailer failed");
                return;
            }
        };
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Where a service's log file lives.
pub(crate) fn log_path(log_dir: &Path, name: &str) -> PathBuf {
    log_dir.join(format!("{name}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn append(path: &Path, data: &str) {
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .expect("open")
            .write_all(data.as_bytes())
            .expect("write");
    }

    #[test]
    fn tails_partial_lines_truncation_and_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("svc.log");
        let buf = Arc::new(LogBuffer::new(100));
        let mut t = Tailer::new(path.clone(), 64, buf.clone());
        t.poll(); // no file yet
        append(&path, "one\ntw");
        t.poll();
        assert_eq!(buf.tail(0), ["one"]);
        append(&path, "o\n");
        t.poll();
        assert_eq!(buf.tail(0), ["one", "two"]);

        // Someone truncates the file: reading resumes from the top.
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(0)
            .expect("truncate");
        append(&path, "three\n");
        t.poll();
        assert_eq!(buf.tail(1), ["three"]);

        // Past 64 bytes: copied to .1, truncated, every line seen once.
        let big: String = (0..10).map(|i| format!("line{i:02}\n")).collect();
        append(&path, &big);
        t.poll();
        let rotated = fs::read_to_string(dir.path().join("svc.log.1")).expect(".1");
        assert!(rotated.ends_with("line09\n"));
        assert_eq!(fs::metadata(&path).expect("meta").len(), 0);
        assert_eq!(buf.tail(1), ["line09"]);
        assert_eq!(buf.tail(0).len(), 3 + 10);
        append(&path, "after\n");
        t.poll();
        assert_eq!(buf.tail(1), ["after"]);
    }

    #[test]
    fn cuts_endless_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("svc.log");
        let buf = Arc::new(LogBuffer::new(10));
        let mut t = Tailer::new(path.clone(), u64::MAX, buf.clone());
        append(&path, &"x".repeat(MAX_LINE * 2 + 5));
        t.poll();
        assert_eq!(buf.tail(0).len(), 2);
        assert!(buf.tail(0).iter().all(|l| l.len() == MAX_LINE));
    }
}
