//! The service supervisor: runs the node's services (containerd, etcd,
//! kubelet, …) as machined's children, restarts them when they die, orders
//! them by dependency and health, and survives its own restart.
//!
//! Design points, and why:
//!
//! - **Services outlive machined.** Each runs in its own session and
//!   cgroup, with its output going to a log file rather than a pipe to
//!   machined, so killing or upgrading machined does not take the control
//!   plane down. A state file per service lets the next machined adopt the
//!   still-running processes (matched by pid *and* start time, so a recycled
//!   pid is never adopted) instead of restarting them.
//! - **One task per service.** A runner task owns its service's whole
//!   lifecycle, so start, stop, restart, exit and health handling are
//!   sequential and need no locking; the API talks to it by message.
//! - **Stopping leaves nothing behind.** SIGTERM goes to the process group;
//!   after the grace period the whole cgroup is killed, which also catches
//!   processes that escaped the group.
//! - **Spec hash decides restarts.** Only what the process is launched with
//!   (argv, env, cwd) is hashed; reconciling an unchanged spec never
//!   restarts anything.

mod backoff;
mod cgroup;
mod control;
mod error;
mod health;
mod log_buffer;
mod log_tail;
mod order;
mod pidfd;
mod process;
mod procfs;
mod runner;
mod shared;
mod spawn;
mod spec;
mod state_file;
mod status;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

pub use control::Supervisor;
pub use error::SupervisorError;
pub use health::{AlwaysHealthy, TcpConnectCheck};
pub use spec::{HealthCheck, PreStart, Progress, ServiceSpec};
pub use status::{ServiceState, ServiceStatus};

/// Where the supervisor keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorPaths {
    /// Per-service state files (`{name}.json`), read at adoption.
    pub state_dir: PathBuf,
    /// Per-service logs (`{name}.log`, rotated to `{name}.log.1`).
    pub log_dir: PathBuf,
    /// A cgroup v2 directory this supervisor owns (e.g.
    /// `/sys/fs/cgroup/unified/machined-<id>`); each service gets a child
    /// `{name}`. `None`: no cgroups, stop by process group only.
    pub cgroup_base: Option<PathBuf>,
}

/// Tunables that only tests (and unusual nodes) change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorOptions {
    /// A log file larger than this is copied to `.1` and truncated.
    pub log_rotate_bytes: u64,
    /// Lines of each service's output kept in memory for `logs_tail`.
    pub log_ring_lines: usize,
}

impl SupervisorOptions {
    pub const DEFAULT_LOG_ROTATE_BYTES: u64 = 10 * 1024 * 1024;
    pub const DEFAULT_LOG_RING_LINES: usize = 2000;
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        Self {
            log_rotate_bytes: Self::DEFAULT_LOG_ROTATE_BYTES,
            log_ring_lines: Self::DEFAULT_LOG_RING_LINES,
        }
    }
}

/// Locks a std mutex, ignoring poisoning: the data behind these locks
/// (status records, log rings, handle maps) is consistent after every
/// single update, so a panic elsewhere does not make it unsafe to use.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
