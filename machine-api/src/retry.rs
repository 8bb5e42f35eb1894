//! Retrying with backoff, one way everywhere: machined's trust client,
//! config download, etcd join, service restarts and DHCP, init's machined
//! restarts, and osctl's waits all take their delays from a [`Backoff`].
//!
//! A `Backoff` hands out delays: `initial`, then each one `factor` times
//! the last, capped at `max`. It can also end the retrying: after a number
//! of attempts, or once a deadline has passed. The deadline ends the
//! *waiting*, it does not shorten it: a failure after the deadline is
//! final, and a wait that started before it runs its full length, so one
//! more attempt may start after the deadline.
//!
//! ```
//! use std::time::Duration;
//! use machine_api::retry::Backoff;
//!
//! let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(15));
//! let secs: Vec<u64> = (0..6).map(|_| b.next_delay().as_secs()).collect();
//! assert_eq!(secs, [1, 2, 4, 8, 15, 15]);
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

/// Delays between attempts, and when to stop making them.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    factor: u32,
    max: Duration,
    deadline: Option<Instant>,
    max_attempts: Option<u32>,
    /// The delay [`next_delay`](Self::next_delay) returns next.
    next: Duration,
    /// Delays handed out since the start or the last reset.
    waits: u32,
}

impl Backoff {
    /// `initial`, doubling after each attempt, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial: initial.min(max),
            factor: 2,
            max,
            deadline: None,
            max_attempts: None,
            next: initial.min(max),
            waits: 0,
        }
    }

    /// The same delay every time.
    pub fn constant(every: Duration) -> Self {
        Self::new(every, every).factor(1)
    }

    /// Each delay is `factor` times the one before (1 keeps it constant).
    pub fn factor(mut self, factor: u32) -> Self {
        self.factor = factor.max(1);
        self
    }

    /// No wait starts once `deadline` has passed.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// [`deadline`](Self::deadline) `limit` from now (none when that is
    /// too far to represent).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.deadline = Instant::now().checked_add(limit);
        self
    }

    /// At most `attempts` attempts in all (so `attempts - 1` waits).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts.max(1));
        self
    }

    /// The next delay; the one after it grows by the factor, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = delay.saturating_mul(self.factor).min(self.max);
        self.waits = self.waits.saturating_add(1);
        delay
    }

    /// Back to the initial delay and a fresh attempt count (the deadline
    /// stays).
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.waits = 0;
    }

    /// Attempts made so far, counting the one that just failed, when every
    /// failure is followed by [`next_delay`](Self::next_delay) or ends the
    /// retrying.
    pub fn attempts(&self) -> u32 {
        self.waits.saturating_add(1)
    }

    /// True when no further attempt should be made: the deadline has
    /// passed, or the attempts are used up.
    pub fn exhausted(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
            || self.max_attempts.is_some_and(|n| self.attempts() >= n)
    }

    /// After a failed attempt: the delay before the next one (counted as
    /// handed out), or None when the retrying is over, because the backoff
    /// is exhausted or `keep_trying` says no.
    fn after_failure<E>(
        &mut self,
        e: &E,
        keep_trying: &mut impl FnMut(&E, Duration) -> bool,
    ) -> Option<Duration> {
        if self.exhausted() || !keep_trying(e, self.next) {
            return None;
        }
        Some(self.next_delay())
    }

    /// Runs `attempt` until it succeeds, or fails for good: `keep_trying`
    /// (called with the error and the coming delay) says no, or the
    /// backoff is [`exhausted`](Self::exhausted). Returns the last error
    /// then.
    pub async fn retry<T, E, Fut>(
        &mut self,
        mut attempt: impl FnMut() -> Fut,
        mut keep_trying: impl FnMut(&E, Duration) -> bool,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        loop {
            let e = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            match self.after_failure(&e, &mut keep_trying) {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(e),
            }
        }
    }

    /// [`retry`](Self::retry) for blocking code: the waits block the
    /// thread.
    pub fn retry_blocking<T, E>(
        &mut self,
        mut attempt: impl FnMut() -> Result<T, E>,
        mut keep_trying: impl FnMut(&E, Duration) -> bool,
    ) -> Result<T, E> {
        loop {
            let e = match attempt() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            match self.after_failure(&e, &mut keep_trying) {
                Some(delay) => std::thread::sleep(delay),
                None => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn secs(b: &mut Backoff, n: usize) -> Vec<u64> {
        (0..n).map(|_| b.next_delay().as_secs()).collect()
    }

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        assert_eq!(secs(&mut b, 8), [1, 2, 4, 8, 16, 30, 30, 30]);
        for _ in 0..1000 {
            b.next_delay(); // never overflows
        }
        assert_eq!(b.next_delay(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn other_factors_and_constant_delays() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let ms: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 4000, 4000]);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(100)).factor(3);
        assert_eq!(secs(&mut b, 5), [1, 3, 9, 27, 81]);
        let mut b = Backoff::constant(Duration::from_secs(2));
        assert_eq!(secs(&mut b, 4), [2, 2, 2, 2]);
        // An initial delay above the cap is capped.
        let mut b = Backoff::new(Duration::from_secs(9), Duration::from_secs(5));
        assert_eq!(secs(&mut b, 2), [5, 5]);
    }

    #[test]
    fn attempts_are_counted_and_limited() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO).max_attempts(3);
        assert_eq!(b.attempts(), 1);
        assert!(!b.exhausted());
        b.next_delay();
        assert!(!b.exhausted());
        b.next_delay();
        assert_eq!(b.attempts(), 3);
        assert!(b.exhausted());
        b.reset();
        assert!(!b.exhausted());
    }

    #[test]
    fn blocking_retry_stops_at_success_refusal_or_limit() {
        let tries = Cell::new(0);
        let r: Result<u32, String> = Backoff::constant(Duration::ZERO).retry_blocking(
            || {
                tries.set(tries.get() + 1);
                if tries.get() < 4 {
                    Err(format!("try {}", tries.get()))
                } else {
                    Ok(tries.get())
                }
            },
            |_, _| true,
        );
        assert_eq!(r, Ok(4));

        // keep_trying says no: ends with that error, no more attempts.
        tries.set(0);
        let r: Result<(), String> = Backoff::constant(Duration::ZERO).retry_blocking(
            || {
                tries.set(tries.get() + 1);
                Err(if tries.get() == 2 { "fatal" } else { "again" }.to_owned())
            },
            |e, _| e != "fatal",
        );
        assert_eq!(r.unwrap_err(), "fatal");
        assert_eq!(tries.get(), 2);

        // attempts() counts the attempts made, however the retrying ended.
        let mut b = Backoff::constant(Duration::ZERO);
        let _: Result<(), &str> = b.retry_blocking(|| Err("no"), |_, _| false);
        assert_eq!(b.attempts(), 1);

        // Attempts used up: the last error.
        tries.set(0);
        let mut b = Backoff::constant(Duration::ZERO).max_attempts(5);
        let r: Result<(), u32> = b.retry_blocking(
            || {
                tries.set(tries.get() + 1);
                Err(tries.get())
            },
            |_, _| true,
        );
        assert_eq!(r, Err(5));
        assert_eq!(b.attempts(), 5);
    }

    #[test]
    fn keep_trying_sees_each_coming_delay() {
        let mut seen = Vec::new();
        let _: Result<(), ()> = Backoff::new(Duration::from_nanos(1), Duration::from_nanos(8))
            .max_attempts(6)
            .retry_blocking(
                || Err(()),
                |_, d| {
                    seen.push(d.as_nanos());
                    true
                },
            );
        assert_eq!(seen, [1, 2, 4, 8, 8]);
    }

    #[test]
    fn a_deadline_ends_the_waiting_but_does_not_shorten_a_wait() {
        // Deadline already passed: one attempt, no wait.
        let tries = Cell::new(0);
        let start = Instant::now();
        let r: Result<(), &str> = Backoff::constant(Duration::from_secs(60))
            .deadline(start)
            .retry_blocking(
                || {
                    tries.set(tries.get() + 1);
                    Err("down")
                },
                |_, _| true,
            );
        assert_eq!((r, tries.get()), (Err("down"), 1));
        assert!(start.elapsed() < Duration::from_secs(1));

        // A 50 ms wait that starts before a 20 ms deadline runs in full,
        // then the second failure is final.
        tries.set(0);
        let start = Instant::now();
        let r: Result<(), &str> = Backoff::constant(Duration::from_millis(50))
            .timeout(Duration::from_millis(20))
            .retry_blocking(
                || {
                    tries.set(tries.get() + 1);
                    Err("down")
                },
                |_, _| true,
            );
        assert_eq!((r, tries.get()), (Err("down"), 2));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn async_retry_waits_between_attempts() {
        let tries = Cell::new(0);
        let start = Instant::now();
        let r: Result<u32, String> =
            Backoff::new(Duration::from_millis(10), Duration::from_secs(1))
                .retry(
                    || {
                        tries.set(tries.get() + 1);
                        let n = tries.get();
                        async move {
                            if n < 3 {
                                Err(format!("not yet ({n})"))
                            } else {
                                Ok(n)
                            }
                        }
                    },
                    |_, _| true,
                )
                .await;
        assert_eq!(r, Ok(3));
        // 10 ms, then 20 ms.
        assert!(start.elapsed() >= Duration::from_millis(30));

        let r: Result<(), &str> = Backoff::constant(Duration::from_millis(1))
            .max_attempts(3)
            .retry(|| async { Err("refused") }, |e, _| *e != "refused")
            .await;
        assert_eq!(r, Err("refused"));
    }
}
