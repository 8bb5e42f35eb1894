//! Launching a service process so that it outlives machined: its own
//! session, its own cgroup, output to a file (not a pipe to us), nothing
//! inherited from machined's environment, nor its open-files limit.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

use super::cgroup::Cgroup;
use super::error::SupervisorError;
use super::spec::ServiceSpec;

/// Log file permissions: readable by the log group, not by everyone.
const LOG_MODE: u32 = 0o640;

/// Starts `spec`'s process, writing to `log_path`, inside `cgroup` if any.
///
/// The caller must have made sure the cgroup exists and is empty.
pub(crate) fn spawn(
    spec: &ServiceSpec,
    log_path: &Path,
    cgroup: Option<&Cgroup>,
) -> Result<tokio::process::Child, SupervisorError> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(SupervisorError::InvalidSpec {
            name: spec.name.clone(),
            reason: "argv is empty".to_owned(),
        });
    };
    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(LOG_MODE)
        .open(log_path)
        .map_err(|e| SupervisorError::io(format!("open {}", log_path.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| SupervisorError::io(format!("dup {}", log_path.display()), e))?;
    // Everything the child needs after fork is prepared here: between fork
    // and exec only async-signal-safe calls are allowed, so no allocation.
    let cgroup_procs: Option<CString> = cgroup
        .map(|cg| {
            cg.procs_file_cstring()
                .map_err(|e| SupervisorError::io(format!("cgroup {}", cg.path().display()), e))
        })
        .transpose()?;
    // The service's own open-files limit, soft = hard, as a systemd
    // `LimitNOFILE=N` sets it: what machined raised for itself must not
    // leak into a service by accident.
    let nofile_limit = crate::limits::grantable_nofile(
        spec.nofile.unwrap_or(crate::limits::DEFAULT_SERVICE_NOFILE),
    );
    let nofile = libc::rlimit {
        rlim_cur: nofile_limit,
        rlim_max: nofile_limit,
    };

    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        // machined may die or be restarted; the service must not.
        .kill_on_drop(false);
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: the closure runs in the forked child before exec. It only
    // calls async-signal-safe functions (setsid, setrlimit, getpid, open,
    // write, close), allocates nothing, and reads `cgroup_procs` and
    // `nofile`, which were built before fork.
    unsafe {
        cmd.pre_exec(move || {
            // Own session and process group: not killed with machined's
            // group, and the whole group can be signalled at stop.
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            set_nofile(&nofile)?;
            if let Some(procs) = &cgroup_procs {
                join_cgroup(procs)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| SupervisorError::io(format!("spawn {program}"), e))
}

/// Sets the calling process's RLIMIT_NOFILE. Async-signal-safe: for use
/// between fork and exec (setrlimit is a bare system call; POSIX does not
/// list it, but glibc's is a prlimit64 syscall wrapper that takes no lock
/// and allocates nothing).
fn set_nofile(limit: &libc::rlimit) -> io::Result<()> {
    // SAFETY: `limit` points to a valid rlimit that setrlimit only reads.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is
/// `procs`. Async-signal-safe: for use between fork and exec.
fn join_cgroup(procs: &CString) -> io::Result<()> {
    let mut digits = [0u8; 20];
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let text = format_pid(pid, &mut digits);
    // SAFETY: `procs` is a valid NUL-terminated path; open has no other
    // preconditions. The fd is closed below on every path.
    let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `text` is a live byte slice; write reads at most its length.
    let written = unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
    let result = if written < 0 {
        Err(io::Error::last_os_error())
    } else if written.unsigned_abs() != text.len() {
        Err(io::Error::from(io::ErrorKind::WriteZero))
    } else {
        Ok(())
    };
    // SAFETY: `fd` was opened above and is not used afterwards.
    unsafe { libc::close(fd) };
    result
}

/// Decimal digits of `pid` in `buf`, without allocating.
fn format_pid(pid: i32, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = pid.unsigned_abs();
    let mut start = buf.len();
    loop {
        start -= 1;
        // `n % 10` is a single digit, so the cast is lossless.
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_child_gets_its_specs_open_files_limit_not_ours() {
        use crate::supervisor::AlwaysHealthy;
        use std::sync::Arc;
        use std::time::Duration;

        let dir = tempfile::tempdir().unwrap();
        let mut spec = ServiceSpec {
            name: "limits".into(),
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo $(ulimit -Sn) $(ulimit -Hn)".into(),
            ],
            env: vec![],
            cwd: None,
            depends_on: vec![],
            health: Arc::new(AlwaysHealthy),
            stop_timeout: Duration::from_secs(1),
            pre_start: None,
            cpu_weight: None,
            nofile: Some(777),
        };
        let run = |spec: &ServiceSpec, name: &str| {
            let log = dir.path().join(name);
            let mut child = spawn(spec, &log, None).unwrap();
            async move {
                assert!(child.wait().await.unwrap().success());
                std::fs::read_to_string(log).unwrap()
            }
        };
        assert_eq!(run(&spec, "a.log").await.trim(), "777 777");
        spec.nofile = None;
        // Another test may raise this process's hard limit meanwhile.
        let grantable = || crate::limits::grantable_nofile(crate::limits::DEFAULT_SERVICE_NOFILE);
        let low = grantable();
        let got = run(&spec, "b.log").await;
        let (soft, hard) = got.trim().split_once(' ').unwrap();
        assert_eq!(soft, hard);
        let got: u64 = soft.parse().unwrap();
        assert!((low..=grantable()).contains(&got), "{got}");
    }

    #[test]
    fn formats_pids_without_allocating() {
        let mut buf = [0u8; 20];
        assert_eq!(format_pid(0, &mut buf), b"0");
        assert_eq!(format_pid(7, &mut buf), b"7");
        assert_eq!(format_pid(4_194_304, &mut buf), b"4194304");
        assert_eq!(format_pid(i32::MAX, &mut buf), b"2147483647");
    }
}
