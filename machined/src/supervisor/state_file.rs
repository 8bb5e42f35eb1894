//! Per-service state persisted across machined restarts, so a new machined
//! can adopt the processes the old one started instead of restarting the
//! node's control plane.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::SupervisorError;

/// Format version; a file with another version is treated as stale.
const VERSION: u32 = 1;

/// The content of `{state_dir}/{name}.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub version: u32,
    pub name: String,
    /// The running process, if any.
    pub pid: Option<i32>,
    /// `/proc/PID/stat` starttime of `pid`: guards against pid reuse.
    pub starttime: Option<u64>,
    pub spec_hash: String,
    pub restarts: u32,
    /// The cgroup the process runs in.
    pub cgroup: Option<PathBuf>,
    /// Stopped by the operator: stays stopped across machined restarts.
    pub operator_stopped: bool,
    /// Kept so that a service adopted before its spec is known can still be
    /// stopped in dependency order.
    #[serde(default)]
    pub depends_on: Vec<String>,
}

impl StateFile {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            version: VERSION,
            name: name.to_owned(),
            pid: None,
            starttime: None,
            spec_hash: String::new(),
            restarts: 0,
            cgroup: None,
            operator_stopped: false,
            depends_on: Vec::new(),
        }
    }

    pub(crate) fn path(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join(format!("{name}.json"))
    }

    /// Writes the file atomically (temp file, fsync, rename, fsync dir): a
    /// crash leaves the previous or the new state, never a torn one.
    pub(crate) fn save(&self, state_dir: &Path) -> Result<(), SupervisorError> {
        let path = Self::path(state_dir, &self.name);
        let json =
            serde_json::to_vec_pretty(self).map_err(|source| SupervisorError::StateFile {
                path: path.clone(),
                source,
            })?;
        machine_api::atomic::write_atomic(&path, &json, 0o600)
            .map_err(|e| SupervisorError::io(format!("write {}", path.display()), e))
    }

    pub(crate) fn load(path: &Path) -> Result<Self, SupervisorError> {
        let bytes = fs::read(path)
            .map_err(|e| SupervisorError::io(format!("read {}", path.display()), e))?;
        let state: Self =
            serde_json::from_slice(&bytes).map_err(|source| SupervisorError::StateFile {
                path: path.to_owned(),
                source,
            })?;
        if state.version != VERSION {
            return Err(SupervisorError::io(
                format!("read {}", path.display()),
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unsupported state file version {}", state.version),
                ),
            ));
        }
        Ok(state)
    }

    pub(crate) fn remove(state_dir: &Path, name: &str) {
        let path = Self::path(state_dir, name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove state file")
            }
        }
    }
}

/// Paths of all state files in `state_dir`. Temporary files left by an
/// interrupted write (dot files) are skipped.
pub(crate) fn list(state_dir: &Path) -> Vec<PathBuf> {
    let entries = match fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %state_dir.display(), error = %e, "cannot read state dir");
            return Vec::new();
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_listing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = StateFile::new("etcd");
        s.pid = Some(1234);
        s.starttime = Some(99);
        s.spec_hash = "ab".repeat(32);
        s.restarts = 3;
        s.cgroup = Some("/sys/fs/cgroup/x/etcd".into());
        s.operator_stopped = true;
        s.depends_on = vec!["containerd".into()];
        s.save(dir.path()).expect("save");
        let path = StateFile::path(dir.path(), "etcd");
        assert_eq!(StateFile::load(&path).expect("load"), s);

        fs::write(dir.path().join(".etcd.json.tmp-1"), b"{").expect("write tmp");
        fs::write(dir.path().join("notes.txt"), b"x").expect("write other");
        assert_eq!(list(dir.path()), vec![path.clone()]);

        StateFile::remove(dir.path(), "etcd");
        StateFile::remove(dir.path(), "etcd");
        assert!(list(dir.path()).is_empty());
    }

    #[test]
    fn rejects_garbage_and_other_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.json");
        fs::write(&p, b"not json").expect("write");
        assert!(StateFile::load(&p).is_err());
        let mut s = StateFile::new("x");
        s.version = 99;
        s.save(dir.path()).expect("save");
        assert!(StateFile::load(&p).is_err());
    }
}
