//! Noticing the exit of a process machined did not start (adopted from a
//! previous machined): it is not our child, so it cannot be waited for. A
//! pidfd becomes readable when the process exits; where pidfds are not
//! available, /proc is polled.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::procfs;

/// How often /proc is polled when there is no pidfd.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Resolves once a given process (pid + start time) has exited.
#[derive(Debug)]
pub(crate) struct ExitWatch {
    pid: i32,
    starttime: u64,
    how: How,
}

#[derive(Debug)]
enum How {
    Pidfd(AsyncFd<OwnedFd>),
    Poll,
    Exited,
}

impl ExitWatch {
    /// Watches the process `pid` that started at `starttime`. Must be called
    /// inside a Tokio runtime.
    pub(crate) fn new(pid: i32, starttime: u64) -> Self {
        let how = match pidfd_open(pid) {
            // The pid may have been recycled before the pidfd was opened;
            // once open, the pidfd pins the process it refers to, so
            // checking identity now is race-free.
            Ok(_) if !procfs::is_same_live_process(pid, starttime) => How::Exited,
            // SAFETY: the OwnedFd is a valid open pidfd; the AsyncFd owns it
            // from here on, nothing else closes or replaces it, and
            // OwnedFd::as_raw_fd always returns that same descriptor.
            Ok(fd) => match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
                Ok(afd) => How::Pidfd(afd),
                Err(e) => {
                    tracing::debug!(pid, error = %e, "pidfd not pollable; polling /proc");
                    How::Poll
                }
            },
            Err(e) => {
                tracing::debug!(pid, error = %e, "pidfd_open failed; polling /proc");
                How::Poll
            }
        };
        Self {
            pid,
            starttime,
            how,
        }
    }

    #[cfg(test)]
    fn uses_pidfd(&self) -> bool {
        matches!(self.how, How::Pidfd(_))
    }

    /// Returns when the process has exited. Cancel-safe: may be called
    /// again after being dropped mid-way.
    pub(crate) async fn wait(&mut self) {
        loop {
            match &self.how {
                How::Exited => return,
                How::Pidfd(afd) => match afd.readable().await {
                    // Readiness is deliberately not cleared: an exited
                    // process stays exited, so later calls return at once.
                    Ok(_guard) => return,
                    Err(e) => {
                        tracing::warn!(pid = self.pid, error = %e, "pidfd wait failed; polling /proc");
                        self.how = How::Poll;
                    }
                },
                How::Poll => {
                    if !procfs::is_same_live_process(self.pid, self.starttime) {
                        self.how = How::Exited;
                        continue;
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
        }
    }
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags by value and touches no
    // memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` was just returned by pidfd_open, is valid and owned by
    // nobody else; OwnedFd becomes its sole owner (closes it on drop).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notices_exit_of_a_non_waited_process() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let starttime = procfs::read_stat(pid).expect("stat").starttime;
        let mut watch = ExitWatch::new(pid, starttime);
        assert!(watch.uses_pidfd(), "{watch:?}");
        let early = tokio::time::timeout(Duration::from_millis(200), watch.wait()).await;
        assert!(early.is_err(), "reported exit of a live process");
        child.kill().expect("kill");
        tokio::time::timeout(Duration::from_secs(5), watch.wait())
            .await
            .expect("exit noticed");
        child.wait().expect("reap");
        // A pid that no longer names the process is "already exited".
        let mut gone = ExitWatch::new(pid, starttime);
        tokio::time::timeout(Duration::from_secs(1), gone.wait())
            .await
            .expect("exited process reported at once");
    }
}
