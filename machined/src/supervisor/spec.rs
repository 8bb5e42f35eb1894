//! What a service is: the desired-state description the supervisor runs,
//! the hooks it calls, and the hash that tells "same process" from "must
//! restart".

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::error::SupervisorError;

/// Decides whether a running service is ready to serve (and so whether its
/// dependents may start).
///
/// Called every second while the service runs, with a 2 s timeout; an
/// `Err` carries the reason shown in the service status.
#[async_trait]
pub trait HealthCheck: Send + Sync {
    async fn check(&self) -> Result<(), String>;

    /// How long one check may take before it counts as failed.
    fn timeout(&self) -> std::time::Duration {
        crate::supervisor::health::DEFAULT_TIMEOUT
    }
}

/// A step run before every start and restart of a service, e.g. adding an
/// etcd member before the member's process is launched.
///
/// An `Err` marks the service Failed with that message; the start is then
/// retried with the usual backoff. A step that waits for something (not a
/// failure) says why through `progress`, which becomes the service's
/// status message while it stays Starting.
#[async_trait]
pub trait PreStart: Send + Sync {
    async fn run(&self, progress: &Progress) -> Result<(), String>;
}

/// How a [`PreStart`] step reports what it is waiting for.
pub type Progress = dyn Fn(String) + Send + Sync;

/// The desired state of one supervised service.
#[derive(Clone)]
pub struct ServiceSpec {
    /// Unique name; also names the log, state file and cgroup, so it must be
    /// a plain file name.
    pub name: String,
    /// `argv[0]` is the absolute path of the binary.
    pub argv: Vec<String>,
    /// The child's whole environment: nothing is inherited from machined.
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// Services that must be Healthy before this one starts.
    pub depends_on: Vec<String>,
    pub health: Arc<dyn HealthCheck>,
    /// Grace period between SIGTERM and killing the whole cgroup / process
    /// group.
    pub stop_timeout: Duration,
    pub pre_start: Option<Arc<dyn PreStart>>,
    /// cgroup v2 `cpu.weight` (1-10000; the kernel's default is 100): the
    /// service's share of CPU when services compete for it.
    pub cpu_weight: Option<u32>,
    /// RLIMIT_NOFILE (soft = hard) set in the child before exec; None means
    /// [`DEFAULT_SERVICE_NOFILE`](crate::limits::DEFAULT_SERVICE_NOFILE).
    /// Never machined's own limit by inheritance. Capped at machined's
    /// hard limit (which it raises at startup where allowed).
    pub nofile: Option<u64>,
}

impl fmt::Debug for ServiceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceSpec")
            .field("name", &self.name)
            .field("argv", &self.argv)
            .field("env", &self.env)
            .field("cwd", &self.cwd)
            .field("depends_on", &self.depends_on)
            .field("stop_timeout", &self.stop_timeout)
            .field("pre_start", &self.pre_start.is_some())
            .field("cpu_weight", &self.cpu_weight)
            .field("nofile", &self.nofile)
            .finish_non_exhaustive()
    }
}

impl ServiceSpec {
    /// Hash of what the process is launched with (argv, env, cwd, an
    /// explicit open-files limit), hex encoded.
    ///
    /// Two specs with the same hash would start an identical process, so a
    /// running (or adopted) process is kept as is. Dependencies, health
    /// check, stop timeout and pre-start are supervisor-side and may change
    /// without a restart. Env order is hashed as given: producers are
    /// expected to be deterministic, and order can matter for duplicates.
    pub fn spec_hash(&self) -> String {
        let mut h = Sha256::new();
        // Every field is length-prefixed so that no two different specs
        // encode to the same byte stream (["a b"] vs ["a", "b"]).
        let mut put = |tag: u8, bytes: &[u8]| {
            h.update([tag]);
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(b'v', b"1");
        for a in &self.argv {
            put(b'a', a.as_bytes());
        }
        for (k, v) in &self.env {
            put(b'k', k.as_bytes());
            put(b'e', v.as_bytes());
        }
        if let Some(cwd) = &self.cwd {
            put(b'c', cwd.as_os_str().as_encoded_bytes());
        }
        // Only when set: specs without one keep the hash they had before
        // the field existed, so an upgrade restarts nothing for it.
        if let Some(n) = self.nofile {
            put(b'n', &n.to_le_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Rejects specs that cannot be run or would escape the supervisor's
    /// directories through their name.
    pub(crate) fn validate(&self) -> Result<(), SupervisorError> {
        validate_name(&self.name)?;
        let invalid = |reason: &str| SupervisorError::InvalidSpec {
            name: self.name.clone(),
            reason: reason.to_owned(),
        };
        match self.argv.first() {
            None => return Err(invalid("argv is empty")),
            Some(bin) if !bin.starts_with('/') => {
                return Err(invalid("argv[0] must be an absolute path"))
            }
            Some(_) => {}
        }
        if self.depends_on.iter().any(|d| d == &self.name) {
            return Err(invalid("a service cannot depend on itself"));
        }
        Ok(())
    }
}

/// A service name becomes `{name}.log`, `{name}.json` and a cgroup
/// directory: keep it to a short, plain file name.
pub(crate) fn validate_name(name: &str) -> Result<(), SupervisorError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(SupervisorError::InvalidSpec {
            name: name.to_owned(),
            reason: "name must be 1-64 of [A-Za-z0-9._-] and not start with '.'".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::AlwaysHealthy;

    fn spec(argv: &[&str], env: &[(&str, &str)]) -> ServiceSpec {
        ServiceSpec {
            name: "svc".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cwd: None,
            depends_on: vec![],
            health: Arc::new(AlwaysHealthy),
            stop_timeout: Duration::from_secs(1),
            pre_start: None,
            cpu_weight: None,
            nofile: None,
        }
    }

    #[test]
    fn hash_is_stable_and_ignores_supervisor_side_fields() {
        let a = spec(&["/bin/sleep", "10"], &[("A", "1")]);
        // Pinned: a change in the encoding restarts every service of every
        // node on upgrade, so it must be deliberate.
        assert_eq!(
            a.spec_hash(),
            "b3ae5d8bf956614f7438431d32aeb6de1223214482621ef2cc0d64c141daefb1"
        );
        let mut b = a.clone();
        b.depends_on = vec!["etcd".into()];
        b.stop_timeout = Duration::from_secs(99);
        assert_eq!(a.spec_hash(), b.spec_hash());
    }

    #[test]
    fn hash_changes_with_argv_env_cwd_and_field_boundaries() {
        let base = spec(&["/bin/sh", "-c", "a b"], &[]);
        let split = spec(&["/bin/sh", "-c", "a", "b"], &[]);
        assert_ne!(base.spec_hash(), split.spec_hash());
        let env = spec(&["/bin/sh", "-c", "a b"], &[("X", "1")]);
        assert_ne!(base.spec_hash(), env.spec_hash());
        let mut cwd = base.clone();
        cwd.cwd = Some("/tmp".into());
        assert_ne!(base.spec_hash(), cwd.spec_hash());
        let mut nofile = base.clone();
        nofile.nofile = Some(1024);
        assert_ne!(base.spec_hash(), nofile.spec_hash());
        // An env value must not be confusable with an argv entry.
        let x = spec(&["/bin/x", "k"], &[]);
        let y = spec(&["/bin/x"], &[("k", "")]);
        assert_ne!(x.spec_hash(), y.spec_hash());
    }

    #[test]
    fn validation_rejects_unrunnable_specs() {
        assert!(spec(&["/bin/true"], &[]).validate().is_ok());
        assert!(spec(&[], &[]).validate().is_err());
        assert!(spec(&["true"], &[]).validate().is_err());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            let mut s = spec(&["/bin/true"], &[]);
            s.name = bad.into();
            assert!(s.validate().is_err(), "{bad:?} accepted");
        }
        let mut s = spec(&["/bin/true"], &[]);
        s.depends_on = vec!["svc".into()];
        assert!(s.validate().is_err());
    }
}
