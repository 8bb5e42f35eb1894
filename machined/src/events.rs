//! machined's event log for `osctl events`: what the node did and why, in
//! order: requests it carried out (config applied, reset, reboot,
//! bootstrap, upgrade), service state changes, and the notes it leaves for
//! the operator (rollbacks, renewals, failed snapshots).
//!
//! Kept in memory, the newest [`CAPACITY`] events, with a broadcast for
//! followers. Events describe this run of machined; what lasts across
//! reboots is in the service logs and the boot timeline.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

/// Events kept for a late reader.
pub const CAPACITY: usize = 1000;

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
        }
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
