//! Reading processes from /proc: identity (pid + start time, so a recycled
//! pid is never mistaken for our service) and resource usage when there is
//! no cgroup to ask.

use std::fs;

/// The fields of `/proc/PID/stat` the supervisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// One-letter state; `Z` (zombie) and `X` (dead) mean "has exited".
    pub state: char,
    /// utime + stime + cutime + cstime, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot, in clock ticks: with the pid, a unique process
    /// identity for the life of the boot.
    pub starttime: u64,
}

impl ProcStat {
    pub(crate) fn has_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses the content of `/proc/PID/stat`.
///
/// The command name (field 2) is in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the *last* `)`.
pub(crate) fn parse_stat(content: &str) -> Option<ProcStat> {
    let after = &content[content.rfind(')')? + 1..];
    // `fields[0]` is field 3 of proc(5) (state).
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied();
    let num = |n: usize| field(n)?.parse::<u64>().ok();
    let state = field(3)?.chars().next()?;
    // utime(14) stime(15) are unsigned; cutime(16) cstime(17) are signed
    // in the ABI but never negative in practice.
    let signed = |n: usize| {
        field(n)?
            .parse::<i64>()
            .ok()
            .map(|v| v.max(0).unsigned_abs())
    };
    let cpu_ticks = num(14)?
        .saturating_add(num(15)?)
        .saturating_add(signed(16)?)
        .saturating_add(signed(17)?);
    Some(ProcStat {
        state,
        cpu_ticks,
        starttime: num(22)?,
    })
}

/// Reads `/proc/PID/stat`; `None` if the process does not exist.
pub(crate) fn read_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether `pid` is still the live (not zombie) process that started at
/// `starttime`.
pub(crate) fn is_same_live_process(pid: i32, starttime: u64) -> bool {
    read_stat(pid).is_some_and(|s| s.starttime == starttime && !s.has_exited())
}

/// Resident memory of a process from `/proc/PID/status` (`VmRSS`), bytes.
pub(crate) fn rss_bytes(pid: i32) -> Option<u64> {
    parse_vmrss(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// CPU time of a process and its reaped children, in microseconds.
pub(crate) fn cpu_usec(pid: i32) -> Option<u64> {
    let ticks = read_stat(pid)?.cpu_ticks;
    Some(ticks.saturating_mul(1_000_000) / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a system constant; it has no memory-safety
    // preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_hostile_comm() {
        // comm "a) (b c" contains spaces and parentheses.
        let line = "4242 (a) (b c) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    7 3 2 1 20 0 1 0 987654 1000 200 18446744073709551615";
        let s = parse_stat(line).expect("parse");
        assert_eq!(s.state, 'S');
        assert_eq!(s.starttime, 987654);
        assert_eq!(s.cpu_ticks, 7 + 3 + 2 + 1);
        assert!(!s.has_exited());
        assert!(parse_stat("12 (x) Z").is_none());
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn reads_own_process() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let s = read_stat(me).expect("own stat");
        assert!(is_same_live_process(me, s.starttime));
        assert!(!is_same_live_process(me, s.starttime + 1));
        assert!(rss_bytes(me).is_some_and(|b| b > 0));
        assert!(cpu_usec(me).is_some());
    }

    #[test]
    fn parses_vmrss() {
        assert_eq!(
            parse_vmrss("Name:\tx\nVmRSS:\t  1234 kB\n"),
            Some(1234 * 1024)
        );
        assert_eq!(parse_vmrss("Name:\tkthreadd\n"), None);
    }
}
