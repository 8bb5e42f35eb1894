//! One running service process, started by us or adopted: waiting for its
//! exit and stopping it together with everything it spawned.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::cgroup::Cgroup;
use super::error::SupervisorError;
use super::pidfd::ExitWatch;
use super::procfs;

/// After SIGKILL, how long to wait for the processes to be gone before
/// giving up (they may be stuck in uninterruptible sleep).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Upper bound of a stop timeout, should one be absurdly large.
const MAX_GRACE: Duration = Duration::from_secs(24 * 3600);
/// How often to check whether a process group has emptied.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// How a service process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExitOutcome {
    /// Our own child: the real exit status.
    Status(ExitStatus),
    /// An adopted process: not our child, so its status is not ours to
    /// read.
    Unknown,
    /// Waiting failed; the process is assumed gone.
    WaitFailed(String),
}

impl ExitOutcome {
    /// Human-readable reason, for the service's status message.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Status(st) => {
                if let Some(code) = st.code() {
                    format!("exited with status {code}")
                } else if let Some(sig) = st.signal() {
                    match Signal::try_from(sig) {
                        Ok(s) => format!("killed by signal {sig} ({s})"),
                        Err(_) => format!("killed by signal {sig}"),
                    }
                } else {
                    format!("exited ({st})")
                }
            }
            Self::Unknown => "exited (adopted process, status unknown)".to_owned(),
            Self::WaitFailed(e) => format!("exited (wait failed: {e})"),
        }
    }
}

#[derive(Debug)]
enum Watch {
    Child(tokio::process::Child),
    Adopted(ExitWatch),
}

/// A live service process; it leads its own session and process group
/// (pgid == pid), and lives in `cgroup` if there is one.
#[derive(Debug)]
pub(crate) struct RunningProcess {
    pid: i32,
    starttime: u64,
    cgroup: Option<Cgroup>,
    watch: Watch,
    exited: Option<ExitOutcome>,
}

impl RunningProcess {
    /// Wraps a child we just spawned.
    pub(crate) fn from_child(
        child: tokio::process::Child,
        cgroup: Option<Cgroup>,
    ) -> Result<Self, SupervisorError> {
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| {
                SupervisorError::io(
                    "spawn",
                    std::io::Error::other("child exited before its pid was read"),
                )
            })?;
        // Our unreaped child cannot have been recycled, so this is its
        // identity even if it has already exited.
        let starttime = procfs::read_stat(pid).map_or(0, |s| s.starttime);
        Ok(Self {
            pid,
            starttime,
            cgroup,
            watch: Watch::Child(child),
            exited: None,
        })
    }

    /// Takes over a process started by a previous machined. The caller has
    /// checked that `pid` still has `starttime`.
    pub(crate) fn adopt(pid: i32, starttime: u64, cgroup: Option<Cgroup>) -> Self {
        Self {
            pid,
            starttime,
            cgroup,
            watch: Watch::Adopted(ExitWatch::new(pid, starttime)),
            exited: None,
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    pub(crate) fn starttime(&self) -> u64 {
        self.starttime
    }

    pub(crate) fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// Waits for the process (the group leader) to exit, reaping it if it
    /// is our child. Cancel-safe, and returns the same outcome when called
    /// again.
    pub(crate) async fn wait(&mut self) -> ExitOutcome {
        if let Some(done) = &self.exited {
            return done.clone();
        }
        let outcome = match &mut self.watch {
            Watch::Child(child) => match child.wait().await {
                Ok(st) => ExitOutcome::Status(st),
                Err(e) => ExitOutcome::WaitFailed(e.to_string()),
            },
            Watch::Adopted(w) => {
                w.wait().await;
                ExitOutcome::Unknown
            }
        };
        self.exited = Some(outcome.clone());
        outcome
    }

    /// Stops the service: SIGTERM to the process group, up to `grace` for
    /// the group to exit, then SIGKILL to the whole cgroup (or group).
    /// Returns how the main process ended.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> ExitOutcome {
        // Capped: an absurd stop timeout (Duration::MAX) must not overflow
        // the clock.
        let deadline = Instant::now() + grace.min(MAX_GRACE);
        if self.exited.is_none() || !self.group_is_empty() {
            self.signal_group(Signal::SIGTERM);
        }
        let mut outcome = tokio::time::timeout_at(deadline, self.wait()).await.ok();
        if outcome.is_some() {
            // The leader is gone; give the rest of the group what is left of
            // the grace period.
            while !self.group_is_empty() && Instant::now() < deadline {
                tokio::time::sleep(GROUP_POLL).await;
            }
        }
        if !self.group_is_empty() {
            tracing::info!(pid = self.pid, "stop timeout reached; killing");
            self.kill_all().await;
        }
        if outcome.is_none() {
            outcome = tokio::time::timeout(KILL_WAIT, self.wait()).await.ok();
        }
        outcome.unwrap_or_else(|| {
            tracing::error!(pid = self.pid, "process did not die after SIGKILL");
            ExitOutcome::WaitFailed("still running after SIGKILL".to_owned())
        })
    }

    /// After the main process exited on its own: kills whatever it left
    /// behind in its cgroup or process group, so the restart starts clean.
    pub(crate) async fn kill_leftovers(&mut self) {
        if !self.group_is_empty() {
            tracing::info!(
                pid = self.pid,
                "killing processes left behind by the service"
            );
            self.kill_all().await;
        }
    }

    fn signal_group(&self, sig: Signal) {
        match killpg(Pid::from_raw(self.pid), sig) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(pgid = self.pid, signal = %sig, error = %e, "killpg"),
        }
    }

    /// Whether nothing of the service is left: the cgroup is empty, or,
    /// without one, the process group has no member.
    fn group_is_empty(&self) -> bool {
        match &self.cgroup {
            Some(cg) => cg.is_empty(),
            // Signal 0 checks existence only. The pgid stays reserved while
            // any member lives, so it cannot name someone else's group.
            None => killpg(Pid::from_raw(self.pid), None) == Err(Errno::ESRCH),
        }
    }

    /// SIGKILLs everything: the cgroup via `cgroup.kill` (falling back to
    /// killing its pids one by one), then the process group.
    async fn kill_all(&mut self) {
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
        self.signal_group(Signal::SIGKILL);
        // Reap our own child first, or its zombie keeps the group alive.
        let _ = tokio::time::timeout(KILL_WAIT, self.wait()).await;
        let deadline = Instant::now() + KILL_WAIT;
        while !self.group_is_empty() && Instant::now() < deadline {
            tokio::time::sleep(GROUP_POLL).await;
        }
        let drained = self.group_is_empty();
        if !drained {
            tracing::error!(pid = self.pid, "processes of the service survive SIGKILL");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_exits() {
        assert_eq!(
            ExitOutcome::Status(ExitStatus::from_raw(3 << 8)).describe(),
            "exited with status 3"
        );
        assert_eq!(
            ExitOutcome::Status(ExitStatus::from_raw(9)).describe(),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            ExitOutcome::Unknown.describe(),
            "exited (adopted process, status unknown)"
        );
    }
}
