//! Restart delays: quick first retries, then capped so a crash-looping
//! service costs little but recovers within half a minute once it can.
//! The delays come from the workspace's one backoff
//! ([`machine_api::retry::Backoff`]).

use std::time::Duration;

pub(crate) use machine_api::retry::Backoff;

/// First restart delay.
const INITIAL: Duration = Duration::from_secs(1);
/// Longest restart delay.
const CAP: Duration = Duration::from_secs(30);
/// How long a service must stay Healthy for its next failure to be treated
/// as a fresh one (delay back to [`INITIAL`]).
pub(crate) const RESET_AFTER_HEALTHY: Duration = Duration::from_secs(60);

/// A service's restart delays: 1 s, 2 s, 4 s, … capped at 30 s.
pub(crate) fn restarts() -> Backoff {
    Backoff::new(INITIAL, CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_and_resets() {
        let mut b = restarts();
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
