//! The kernel log, read from `/dev/kmsg` for `osctl dmesg`.
//!
//! Each `read(2)` of `/dev/kmsg` returns one record,
//! `PRIORITY,SEQUENCE,MICROSECONDS,FLAGS[,...];TEXT`, followed by
//! continuation lines (` KEY=VALUE`) that are device metadata. Every opener
//! gets its own cursor from the oldest record the kernel still keeps, so
//! readers never disturb each other or the console. `EAGAIN` (opened
//! non-blocking) means the end for now; `EPIPE` means records were
//! overwritten while we read, and the next read continues after the gap.
//! No crate wraps this; it is one open and a parse.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// Longest record the kernel writes (`PRINTK_MESSAGE_MAX` is 2048 plus
/// the prefix); a larger buffer costs nothing.
const RECORD_MAX: usize = 8192;

/// How often a follower looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

const LEVELS: [&str; 8] = [
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
];

/// One record as `dmesg` shows it: `[   12.345678] info: text`. None for a
/// record that is not of that form.
pub fn format_record(record: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(record);
    let first = text.lines().next()?;
    let (prefix, message) = first.split_once(';')?;
    let mut fields = prefix.split(',');
    let priority: u32 = fields.next()?.parse().ok()?;
    let _sequence: u64 = fields.next()?.parse().ok()?;
    let usec: u64 = fields.next()?.parse().ok()?;
    let level = LEVELS[(priority & 7) as usize];
    Some(format!(
        "[{:>5}.{:06}] {level}: {}",
        usec / 1_000_000,
        usec % 1_000_000,
        unescape(message)
    ))
}

/// The kernel writes non-printable bytes as `\xHH`; turn them back into
/// text where they are printable, keep the escape otherwise.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\\x") {
        out.push_str(&rest[..i]);
        let hex = rest.get(i + 2..i + 4);
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) if (0x20..0x7f).contains(&b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            _ => {
                out.push_str("\\x");
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Reads the kernel log at `path` (normally `/dev/kmsg`): every record
/// it keeps (the last `tail` of them when `tail` > 0), then, with
/// `follow`, new records as they come, handing each line to `send` until
/// it returns false. Blocking: run it on a blocking thread.
pub fn read(
    path: &Path,
    tail: usize,
    follow: bool,
    send: &mut dyn FnMut(String) -> bool,
) -> std::io::Result<()> {
    let mut f = File::options()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)?;
    let mut buf = vec![0u8; RECORD_MAX];
    let mut backlog: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut caught_up = false;
    loop {
        match f.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => {
                if let Some(line) = format_record(&buf[..n]) {
                    if caught_up {
                        if !send(line) {
                            return Ok(());
                        }
                    } else {
                        backlog.push_back(line);
                        if tail > 0 && backlog.len() > tail {
                            backlog.pop_front();
                        }
                    }
                }
                continue;
            }
            // Overwritten while we read: carry on after the gap.
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        // The end of what the kernel keeps for now.
        if !caught_up {
            caught_up = true;
            for line in backlog.drain(..) {
                if !send(line) {
                    return Ok(());
                }
            }
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
        // A follower whose client went away is noticed at the next send;
        // a quiet kernel is checked with an empty probe.
        if !send(String::new()) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_as_dmesg_shows_them() {
        assert_eq!(
            format_record(b"6,1234,12345678,-;virtio_net virtio0 eth0: up\n SUBSYSTEM=net\n")
                .as_deref(),
            Some("[   12.345678] info: virtio_net virtio0 eth0: up")
        );
        assert_eq!(
            format_record(b"3,1,5,-,caller=T1;disk \\x41 \\x07 fail").as_deref(),
            Some("[    0.000005] err: disk A \\x07 fail")
        );
        assert_eq!(format_record(b"not a record"), None);
        assert_eq!(format_record(b"x,1,2,-;text"), None);
    }

    #[test]
    fn the_kernel_log_is_read_and_bounded_by_tail() {
        let kmsg = Path::new("/dev/kmsg");
        if File::open(kmsg).is_err() {
            machine_api::skip_test!("/dev/kmsg is not readable here");
        }
        let mut all = Vec::new();
        read(kmsg, 0, false, &mut |l| {
            all.push(l);
            true
        })
        .unwrap();
        let mut last = Vec::new();
        read(kmsg, 3, false, &mut |l| {
            last.push(l);
            true
        })
        .unwrap();
        assert!(last.len() <= 3 && last.len() <= all.len().max(3));
        assert!(last.iter().all(|l| l.starts_with('[')), "{last:?}");
    }
}
