//! The in-memory view of a service's log: the last N lines for `logs_tail`
//! and a broadcast of new lines for `logs_follow`.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::lock;

/// Lines a follower may lag behind before it misses some.
const FOLLOW_CAPACITY: usize = 1024;

/// Bounded ring of recent log lines plus a channel of new ones.
#[derive(Debug)]
pub(crate) struct LogBuffer {
    capacity: usize,
    lines: Mutex<VecDeque<String>>,
    followers: broadcast::Sender<String>,
}

impl LogBuffer {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            lines: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            followers: broadcast::channel(FOLLOW_CAPACITY).0,
        }
    }

    /// Appends a line, dropping the oldest beyond capacity, and hands it to
    /// followers.
    pub(crate) fn push(&self, line: String) {
        {
            let mut lines = lock(&self.lines);
            if lines.len() == self.capacity {
                lines.pop_front();
            }
            lines.push_back(line.clone());
        }
        // No follower is not an error.
        let _ = self.followers.send(line);
    }

    /// The newest `n` lines, oldest first; `n == 0` means all kept.
    pub(crate) fn tail(&self, n: usize) -> Vec<String> {
        let lines = lock(&self.lines);
        let skip = if n == 0 {
            0
        } else {
            lines.len().saturating_sub(n)
        };
        lines.iter().skip(skip).cloned().collect()
    }

    pub(crate) fn follow(&self) -> broadcast::Receiver<String> {
        self.followers.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_lines_within_bounds() {
        let buf = LogBuffer::new(3);
        let mut rx = buf.follow();
        for i in 0..5 {
            buf.push(format!("l{i}"));
        }
        assert_eq!(buf.tail(0), ["l2", "l3", "l4"]);
        assert_eq!(buf.tail(2), ["l3", "l4"]);
        assert_eq!(buf.tail(10), ["l2", "l3", "l4"]);
        assert_eq!(rx.try_recv().expect("line"), "l0");
    }
}
