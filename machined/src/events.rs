//! machined's event log for `osctl events`: what the node did and why, in
//! order: requests it carried out (config applied, reset, reboot,
//! bootstrap, upgrade), service state changes, and the notes it leaves for
//! the operator (rollbacks, renewals, failed snapshots).
//!
//! Kept in memory, the newest [`CAPACITY`] events, with a broadcast for
//! followers, and appended to a journal on EPHEMERAL (`/var/log/
//! machined-events.log`, one JSON object per line) so that what happened
//! before a machined restart or a reboot can still be read after it.
//!
//! The journal is append-only: each event is one `write` of one line, so a
//! SIGKILL leaves at most one cut last line, which the next load skips.
//! It rotates by rename (`.log` to `.log.1`, itself atomic) past
//! [`JOURNAL_MAX`], so it takes at most twice that on disk.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

/// Events kept for a late reader.
pub const CAPACITY: usize = 1000;
/// The journal rotates past this size.
pub const JOURNAL_MAX: u64 = 1 << 20;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Increases by one per event: a follower sees a gap when it lagged.
    pub seq: u64,
    pub unix_ms: u64,
    /// `request`, `service` or `note`.
    pub kind: &'static str,
    pub message: String,
}

/// The log.
#[derive(Debug)]
pub struct Events {
    kept: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
    journal: Mutex<Option<Journal>>,
}

/// The on-disk copy.
#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: File,
    len: u64,
}

/// One journal line.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line {
    seq: u64,
    unix_ms: u64,
    kind: String,
    message: String,
}

fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// The kinds an event may have, as the static strings the API sends.
fn known_kind(kind: &str) -> &'static str {
    match kind {
        "request" => "request",
        "service" => "service",
        _ => "note",
    }
}

/// The events of one journal file, oldest first; a line that does not
/// parse (cut by a crash, or not ours) is skipped. Reads at most the last
/// `2 * JOURNAL_MAX` bytes, whatever the file's size.
fn load_file(path: &Path) -> Vec<Event> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(2 * JOURNAL_MAX);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if f.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Line>(l).ok())
        .map(|l| Event {
            seq: l.seq,
            unix_ms: l.unix_ms,
            kind: known_kind(&l.kind),
            message: l.message,
        })
        .collect()
}

impl Journal {
    fn open(path: &Path) -> std::io::Result<Journal> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut len = file.metadata()?.len();
        // A line cut by a kill ends without a newline: end it, so the next
        // event starts a line of its own instead of joining the cut one.
        if len > 0 {
            let mut last = [0u8; 1];
            File::open(path)?.read_exact_at(&mut last, len - 1)?;
            if last[0] != b'\n' {
                (&file).write_all(b"\n")?;
                len += 1;
            }
        }
        Ok(Journal {
            path: path.to_owned(),
            file,
            len,
        })
    }

    fn append(&mut self, e: &Event) -> std::io::Result<()> {
        if self.len > JOURNAL_MAX {
            std::fs::rename(&self.path, rotated(&self.path))?;
            *self = Journal::open(&self.path)?;
        }
        let mut line = serde_json::to_vec(&Line {
            seq: e.seq,
            unix_ms: e.unix_ms,
            kind: e.kind.to_owned(),
            message: e.message.clone(),
        })
        .map_err(std::io::Error::other)?;
        line.push(b'\n');
        // One write of the whole line (O_APPEND): another line never lands
        // inside it, and a kill leaves it whole or cut at the end.
        self.file.write_all(&line)?;
        self.len += line.len() as u64;
        Ok(())
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(256);
        Events {
            kept: Mutex::new((0, VecDeque::new())),
            tx,
            journal: Mutex::new(None),
        }
    }

    /// Events kept in `path` (and its rotated `.1`) from earlier runs,
    /// then every new one appended there. Sequence numbers go on from the
    /// journal's last. A journal that cannot be opened is reported once
    /// and the log stays in memory: events are never a reason to fail.
    pub fn with_journal(path: &Path) -> Self {
        let ev = Events::new();
        let mut old = load_file(&rotated(path));
        old.extend(load_file(path));
        let skip = old.len().saturating_sub(CAPACITY);
        if let Ok(mut kept) = ev.kept.lock() {
            kept.0 = old.last().map(|e| e.seq).unwrap_or(0);
            kept.1 = old.into_iter().skip(skip).collect();
        }
        match Journal::open(path) {
            Ok(j) => {
                if let Ok(mut slot) = ev.journal.lock() {
                    *slot = Some(j);
                }
            }
            Err(e) => tracing::warn!(
                "events are kept in memory only: cannot open {}: {e}",
                path.display()
            ),
        }
        ev
    }

    /// Records an event and hands it to followers.
    pub fn record(&self, kind: &'static str, message: impl Into<String>) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        kept.0 += 1;
        let e = Event {
            seq: kept.0,
            unix_ms,
            kind,
            message: message.into(),
        };
        if kept.1.len() == CAPACITY {
            kept.1.pop_front();
        }
        kept.1.push_back(e.clone());
        if let Ok(mut journal) = self.journal.lock() {
            if let Some(j) = journal.as_mut() {
                if let Err(err) = j.append(&e) {
                    tracing::warn!(
                        "events are kept in memory only from now: {}: {err}",
                        j.path.display()
                    );
                    *journal = None;
                }
            }
        }
        // Sent under the lock, so a reader that took the backlog and then
        // subscribed (under the same lock) misses nothing and sees nothing
        // twice.
        let _ = self.tx.send(e);
    }

    /// The last `tail` events (all kept when 0) and a receiver for the
    /// ones after them.
    pub fn backlog_and_follow(&self, tail: usize) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let kept = match self.kept.lock() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        let skip = if tail == 0 {
            0
        } else {
            kept.1.len().saturating_sub(tail)
        };
        (
            kept.1.iter().skip(skip).cloned().collect(),
            self.tx.subscribe(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_then_followers_see_every_event_once_in_order() {
        let ev = Events::new();
        for i in 0..5 {
            ev.record("note", format!("n{i}"));
        }
        let (backlog, mut rx) = ev.backlog_and_follow(2);
        assert_eq!(
            backlog
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>(),
            ["n3", "n4"]
        );
        ev.record("service", "etcd: healthy");
        let next = rx.try_recv().unwrap();
        assert_eq!((next.seq, next.kind), (6, "service"));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn the_journal_brings_events_back_after_a_restart_and_skips_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machined-events.log");
        {
            let ev = Events::with_journal(&path);
            ev.record("request", "config applied");
            ev.record("service", "etcd healthy");
        }
        // A kill in the middle of the next line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":3,"unixMs":1,"kind":"no"#).unwrap();
        drop(f);
        let ev = Events::with_journal(&path);
        ev.record("note", "machined started");
        let (all, _) = ev.backlog_and_follow(0);
        let got: Vec<_> = all
            .iter()
            .map(|e| (e.seq, e.kind, e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, "request", "config applied"),
                (2, "service", "etcd healthy"),
                (3, "note", "machined started"),
            ]
        );
        // The event after the cut line is on a line of its own.
        let again = Events::with_journal(&path);
        let (all, _) = again.backlog_and_follow(0);
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].message, "machined started");
    }

    #[test]
    fn the_journal_rotates_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machined-events.log");
        let ev = Events::with_journal(&path);
        let big = "x".repeat(4096);
        let n = (2 * JOURNAL_MAX / 4096) as usize + 10;
        for i in 0..n {
            ev.record("note", format!("{i} {big}"));
        }
        let on_disk = std::fs::metadata(&path).unwrap().len()
            + std::fs::metadata(rotated(&path)).unwrap().len();
        assert!(on_disk <= 2 * JOURNAL_MAX + 2 * 4200, "{on_disk}");
        let again = Events::with_journal(&path);
        let (all, _) = again.backlog_and_follow(1);
        assert!(all[0].message.starts_with(&format!("{} ", n - 1)));
        assert_eq!(all[0].seq, n as u64);
    }

    #[test]
    fn only_the_newest_are_kept() {
        let ev = Events::new();
        for i in 0..(CAPACITY + 10) {
            ev.record("note", format!("n{i}"));
        }
        let (all, _) = ev.backlog_and_follow(0);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].seq, 11);
    }
}
