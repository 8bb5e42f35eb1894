//! What the supervisor reports about a service.

use std::fmt;
use std::time::SystemTime;

/// Lifecycle state of a supervised service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceState {
    /// Not started because a dependency is not Healthy yet.
    Waiting,
    /// Running its pre-start step / being spawned.
    Starting,
    /// The process runs; the health check has not passed (yet / any more).
    Running,
    /// The process runs and its health check passes.
    Healthy,
    /// The process exited or could not be started; a restart is pending
    /// unless the service has no spec (adopted, not reconciled yet).
    Failed,
    /// Stopped on purpose (operator, shutdown); not restarted automatically.
    Stopped,
}

impl ServiceState {
    /// Lowercase name, as shown by the API and the console.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Healthy => "healthy",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of one service, as returned by `list`/`status` and sent to
/// subscribers on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    /// Health or failure reason, or "waiting for X"; empty when there is
    /// nothing to say.
    pub message: String,
    /// Automatic restarts so far; survives machined restarts.
    pub restarts: u32,
    pub pid: Option<i32>,
    /// When `state` last changed.
    pub since: SystemTime,
    pub depends_on: Vec<String>,
    /// The process was started by a previous machined and adopted.
    pub adopted: bool,
    /// Filled by `list`/`status` only (not in subscription events).
    pub memory_bytes: Option<u64>,
    /// Filled by `list`/`status` only (not in subscription events).
    pub cpu_usec: Option<u64>,
}

impl ServiceStatus {
    pub(crate) fn new(name: &str, state: ServiceState, depends_on: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            state,
            message: String::new(),
            restarts: 0,
            pid: None,
            since: SystemTime::now(),
            depends_on,
            adopted: false,
            memory_bytes: None,
            cpu_usec: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_lowercase() {
        let all = [
            ServiceState::Waiting,
            ServiceState::Starting,
            ServiceState::Running,
            ServiceState::Healthy,
            ServiceState::Failed,
            ServiceState::Stopped,
        ];
        for s in all {
            assert_eq!(s.to_string(), s.to_string().to_lowercase());
        }
        assert_eq!(ServiceState::Healthy.to_string(), "healthy");
    }
}
