//! The one error type of the supervisor.

use std::io;
use std::path::PathBuf;

/// Why a supervisor operation failed.
///
/// Failures of a *service* (its process exiting, its pre-start step or
/// health check failing) are not errors of the supervisor: they show up as
/// [`ServiceState::Failed`](super::ServiceState::Failed) with a message.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// No service of that name is supervised.
    #[error("unknown service {0:?}")]
    UnknownService(String),

    /// The spec cannot be run: a bad name or an empty argv.
    #[error("invalid spec for service {name:?}: {reason}")]
    InvalidSpec { name: String, reason: String },

    /// The service was adopted from a previous machined and no spec has been
    /// given for it yet, so there is nothing to (re)start it with.
    #[error("service {0:?} has no spec yet (adopted; waiting for reconcile)")]
    NotConfigured(String),

    /// The task supervising the service has ended (the supervisor is being
    /// dropped or detached).
    #[error("the supervisor of service {0:?} is no longer running")]
    RunnerGone(String),

    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// A state file could not be encoded or decoded.
    #[error("state file {}: {source}", path.display())]
    StateFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl SupervisorError {
    /// Wraps an I/O error with what was being done, e.g. "open /var/log/x".
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
