//! Restart delays: quick first retries, then capped so a crash-looping
//! service costs little but recovers within half a minute once it can.

use std::time::Duration;

/// First restart delay.
const INITIAL: Duration = Duration::from_secs(1);
/// Longest restart delay.
const CAP: Duration = Duration::from_secs(30);
/// How long a service must stay Healthy for its next failure to be treated
/// as a fresh one (delay back to [`INITIAL`]).
pub(crate) const RESET_AFTER_HEALTHY: Duration = Duration::from_secs(60);

/// Exponential backoff: 1 s, 2 s, 4 s, … capped at 30 s.
#[derive(Debug, Clone, Default)]
pub(crate) struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next restart; each call doubles the following
    /// one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        // 2^5 s already exceeds the cap; clamping the exponent keeps the
        // shift from overflowing however long the service keeps failing.
        let exp = self.failures.min(5);
        self.failures = self.failures.saturating_add(1);
        INITIAL.saturating_mul(1 << exp).min(CAP)
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_and_resets() {
        let mut b = Backoff::default();
        let secs: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), CAP);
        b.reset();
        assert_eq!(b.next_delay(), INITIAL);
    }
}
