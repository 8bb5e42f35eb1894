//! A service's cgroup v2 directory: where its whole process tree lives, so
//! that stopping it leaves nothing behind (daemonizing grandchildren
//! included) and its CPU and memory use can be read.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::procfs;

/// How long processes get to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often to look at `cgroup.procs` while waiting for it to drain.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// One cgroup v2 directory owned by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn create(&self) -> io::Result<()> {
        fs::create_dir_all(&self.path)
    }

    /// `cgroup.procs` as a C string, built before fork so that the child
    /// can join the cgroup without allocating.
    pub(crate) fn procs_file_cstring(&self) -> io::Result<CString> {
        CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    /// Pids in the cgroup. A cgroup that no longer exists is empty.
    pub(crate) fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pids().is_empty()
    }

    /// SIGKILLs every process in the cgroup at once (kernel ≥ 5.14).
    fn kill(&self) -> io::Result<()> {
        fs::write(self.path.join("cgroup.kill"), b"1")
    }

    /// SIGKILLs everything in the cgroup: at once through `cgroup.kill`
    /// (kernel ≥ 5.14), else pid by pid.
    pub(crate) fn kill_all(&self) {
        if let Err(e) = self.kill() {
            tracing::debug!(cgroup = %self.path.display(), error = %e, "cgroup.kill unavailable");
            for pid in self.pids() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// Creates the cgroup and kills anything an earlier run left in it, so
    /// that a new process starts alone.
    pub(crate) async fn prepare(&self) -> io::Result<()> {
        self.create()?;
        if self.is_empty() {
            return Ok(());
        }
        tracing::warn!(cgroup = %self.path.display(), "killing leftovers of a previous run");
        let deadline = Instant::now() + KILL_WAIT;
        while !self.is_empty() {
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "processes in {} survive SIGKILL",
                    self.path.display()
                )));
            }
            self.kill_all();
            tokio::time::sleep(DRAIN_POLL).await;
        }
        Ok(())
    }

    /// Sets `cpu.weight` once the cgroup exists. Without the cpu controller
    /// enabled above it the file is absent: the service then runs with the
    /// default share, which is logged, not fatal.
    pub(crate) fn set_cpu_weight(&self, weight: u32) {
        let _ = self.create();
        if let Err(e) = fs::write(
            self.path.join("cpu.weight"),
            weight.clamp(1, 10000).to_string(),
        ) {
            tracing::debug!(cgroup = %self.path.display(), "cpu.weight not set: {e}");
        }
    }

    /// Total CPU time of everything that ever ran in the cgroup.
    pub(crate) fn cpu_usec(&self) -> Option<u64> {
        parse_usage_usec(&fs::read_to_string(self.path.join("cpu.stat")).ok()?)
    }

    /// `memory.current` when the memory controller is enabled here, else
    /// the sum of the resident memory of the cgroup's processes.
    pub(crate) fn memory_bytes(&self) -> Option<u64> {
        if let Ok(s) = fs::read_to_string(self.path.join("memory.current")) {
            if let Ok(v) = s.trim().parse() {
                return Some(v);
            }
        }
        let pids = self.pids();
        if pids.is_empty() {
            return None;
        }
        Some(pids.into_iter().filter_map(procfs::rss_bytes).sum())
    }

    /// Removes the (empty) cgroup directory; failure is only logged, the
    /// directory is reused by the next start.
    pub(crate) fn remove(&self) {
        match fs::remove_dir(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(cgroup = %self.path.display(), error = %e, "cannot remove cgroup")
            }
        }
    }
}

fn parse_usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_stat() {
        let s = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(parse_usage_usec(s), Some(1500));
        assert_eq!(parse_usage_usec("user_usec 3\n"), None);
    }

    #[test]
    fn missing_cgroup_is_empty() {
        let cg = Cgroup::new("/nonexistent/cgroup/x".into());
        assert!(cg.is_empty());
        assert_eq!(cg.memory_bytes(), None);
        assert_eq!(cg.cpu_usec(), None);
        assert!(cg.procs_file_cstring().is_ok());
    }
}
