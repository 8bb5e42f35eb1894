//! Fault injection for the config store's write points (tests only).
//!
//! `MACHINED_FAULT=commit:N:POINT` kills machined with SIGKILL at write
//! point POINT (`begin`, `staged`, `renamed`) of the N-th record commit of
//! this process (1-based). Honoured in host mode only: a node never reads
//! it. Integration tests use it to crash machined at every write of every
//! transition and check what the next start makes of the disk.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::state::{FaultHook, WritePoint};

/// The hook from `MACHINED_FAULT`, if set and well-formed.
pub fn hook() -> Option<FaultHook> {
    let spec = std::env::var("MACHINED_FAULT").ok()?;
    let (nth, point) = parse(&spec)?;
    let count = Arc::new(AtomicU32::new(0));
    Some(Arc::new(move |p: WritePoint| {
        if p == WritePoint::Begin {
            count.fetch_add(1, Ordering::SeqCst);
        }
        if p == point && count.load(Ordering::SeqCst) == nth {
            eprintln!("MACHINED_FAULT: killing machined at commit {nth} {p:?}");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        Ok(())
    }))
}

fn parse(spec: &str) -> Option<(u32, WritePoint)> {
    let mut parts = spec.split(':');
    if parts.next()? != "commit" {
        return None;
    }
    let nth = parts.next()?.parse().ok()?;
    let point = match parts.next()? {
        "begin" => WritePoint::Begin,
        "staged" => WritePoint::Staged,
        "renamed" => WritePoint::Renamed,
        _ => return None,
    };
    Some((nth, point))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse("commit:2:staged"), Some((2, WritePoint::Staged)));
        assert_eq!(parse("commit:x:staged"), None);
        assert_eq!(parse("write:1:begin"), None);
    }
}
