//! machined's own resource limits, and memory given back after load.
//!
//! - Open files: a node's init starts machined with the kernel's default
//!   RLIMIT_NOFILE of 1024 (soft) / 4096 (hard), which a few hundred
//!   connections and the service logs exhaust. [`raise_nofile`] lifts it
//!   at startup. Services never inherit it: the supervisor sets each one's
//!   limit from its spec ([`DEFAULT_SERVICE_NOFILE`] unless the spec says).
//! - Memory: glibc keeps what a burst of connections freed in its arenas,
//!   so RSS stays at the peak. [`tune_malloc`] caps the arenas at startup;
//!   the API listener calls [`release_free_memory`] when a peak drains.

use std::fmt;
use std::io;

/// The open-files limit machined raises itself to (soft and hard) when
/// allowed. The kernel's `fs.nr_open` default, and what container runtimes
/// and most distributions' units give daemons that hold many connections.
pub const NOFILE_CEILING: u64 = 1 << 20;

/// A service's open-files limit (soft = hard) when its spec names none:
/// containerd's upstream unit set `LimitNOFILE=1048576` from 2017 to 2023
/// (containerd/containerd `containerd.service`), as CRI-O's still does.
/// Containers inherit the runtime's limit unless their spec sets one, and
/// 1024 breaks common workloads (databases, JVMs): EKS reverted the move to
/// systemd's 1024:524288 default (awslabs/amazon-eks-ami#1551).
pub const DEFAULT_SERVICE_NOFILE: u64 = 1 << 20;

/// A soft / hard limit pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub soft: u64,
    pub hard: u64,
}

impl fmt::Display for Rlimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: u64| {
            if v == libc::RLIM_INFINITY {
                "unlimited".to_owned()
            } else {
                v.to_string()
            }
        };
        write!(f, "{}/{}", show(self.soft), show(self.hard))
    }
}

/// What [`raise_nofile`] found and left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileChange {
    pub before: Rlimit,
    pub after: Rlimit,
}

impl fmt::Display for NofileChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "open files limit (soft/hard) {} -> {}",
            self.before, self.after
        )
    }
}

/// This process's RLIMIT_NOFILE.
pub fn nofile() -> io::Result<Rlimit> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Rlimit {
        soft: rl.rlim_cur,
        hard: rl.rlim_max,
    })
}

fn set_nofile(l: Rlimit) -> io::Result<()> {
    let rl = libc::rlimit {
        rlim_cur: l.soft,
        rlim_max: l.hard,
    };
    // SAFETY: `rl` is a valid rlimit; setrlimit only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises machined's soft open-files limit to its hard limit, and the hard
/// limit to [`NOFILE_CEILING`] first when allowed (root under the node's
/// init; CAP_SYS_RESOURCE) and below the kernel's `fs.nr_open`. The soft
/// limit stops at the ceiling even when the hard limit is above it (a
/// systemd `infinity` can mean 2^30, and every fd table and fd-closing
/// loop then pays for it). Call once at startup; log the result.
pub fn raise_nofile() -> io::Result<NofileChange> {
    let before = nofile()?;
    let mut hard = before.hard;
    if hard < NOFILE_CEILING {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(NOFILE_CEILING);
        let want = NOFILE_CEILING.min(nr_open);
        // Not permitted without CAP_SYS_RESOURCE: keep the hard limit then.
        if want > hard
            && set_nofile(Rlimit {
                soft: before.soft.min(want),
                hard: want,
            })
            .is_ok()
        {
            hard = want;
        }
    }
    let after = Rlimit {
        soft: hard.min(NOFILE_CEILING),
        hard,
    };
    set_nofile(after)?;
    Ok(NofileChange {
        before,
        after: nofile()?,
    })
}

/// The open-files limit a service asking for `want` gets: `want`, or
/// machined's own hard limit if that is lower (a process cannot give its
/// child more than it may have itself, unless privileged; machined raised
/// its own to [`NOFILE_CEILING`] where it could).
pub fn grantable_nofile(want: u64) -> u64 {
    match nofile() {
        Ok(l) => want.min(l.hard),
        Err(_) => want,
    }
}

/// How many malloc arenas machined keeps. glibc's default is 8 per core,
/// each one growing to its own peak and keeping it; machined's work is
/// I/O-bound on a handful of threads, so two arenas cost it no measurable
/// contention and bound the memory a burst leaves behind.
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`]. Call first thing in
/// `main`, before any thread starts (arenas made before it stay).
pub fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX with a
    // positive value is a documented use, safe at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// Hands memory that the allocator holds but nobody uses back to the
/// kernel (glibc `malloc_trim`): after a flood of connections drains, RSS
/// falls back instead of staying at the peak. Takes a few milliseconds
/// with arenas locked: call from a blocking thread, after load, not per
/// request. A no-op off glibc (musl returns freed memory by itself).
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only walks the
    // allocator's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_never_lowers_and_reaches_the_hard_limit() {
        let before = nofile().unwrap();
        let change = raise_nofile().unwrap();
        assert_eq!(change.before, before);
        assert!(change.after.hard >= before.hard);
        assert!(change.after.soft >= before.soft.min(NOFILE_CEILING));
        assert_eq!(change.after.soft, change.after.hard.min(NOFILE_CEILING));
        // Idempotent.
        assert_eq!(raise_nofile().unwrap().after, change.after);
        assert!(change.to_string().contains(" -> "));
    }

    #[test]
    fn services_get_at_most_our_hard_limit() {
        let hard = nofile().unwrap().hard;
        assert_eq!(grantable_nofile(7), 7.min(hard));
        assert_eq!(grantable_nofile(u64::MAX), hard);
    }

    #[test]
    fn memory_calls_are_harmless() {
        tune_malloc();
        release_free_memory();
    }
}
