//! The boot timeline: guest-uptime stamps of each boot phase, written by
//! init (kernel handoff, modules, root) and machined (start, disks, network,
//! config, each service healthy) to one file under /run, so it lasts for the
//! boot and survives a machined restart. `osctl boot` shows it.

use std::io::Write;
use std::path::{Path, PathBuf};

/// One phase reached.
#[derive(Clone, Debug, PartialEq)]
pub struct Mark {
    /// Seconds since the kernel started (CLOCK_BOOTTIME, as /proc/uptime).
    pub uptime: f64,
    pub phase: String,
    pub detail: String,
}

/// Seconds since the kernel started.
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The timeline file of a root.
#[derive(Clone, Debug)]
pub struct Timeline {
    file: PathBuf,
}

impl Timeline {
    pub fn new(file: impl Into<PathBuf>) -> Self {
        Timeline { file: file.into() }
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Appends a mark now. One line per write with O_APPEND, so init and
    /// machined never interleave inside a line.
    pub fn mark(&self, phase: &str, detail: &str) {
        self.mark_at(uptime(), phase, detail);
    }

    pub fn mark_at(&self, uptime: f64, phase: &str, detail: &str) {
        if let Some(dir) = self.file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let line = format!(
            "{uptime:.3}\t{}\t{}\n",
            phase.replace(['\t', '\n'], " "),
            detail.replace(['\t', '\n'], " ")
        );
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// Every mark, in the order written.
    pub fn read(&self) -> Vec<Mark> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, '\t');
                Some(Mark {
                    uptime: f.next()?.parse().ok()?,
                    phase: f.next()?.to_owned(),
                    detail: f.next().unwrap_or("").to_owned(),
                })
            })
            .collect()
    }

    /// True when a phase was already marked (e.g. a service's first healthy).
    pub fn has(&self, phase: &str) -> bool {
        self.read().iter().any(|m| m.phase == phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_tabs_cannot_break_lines() {
        let t = tempfile::tempdir().unwrap();
        let tl = Timeline::new(t.path().join("run/timeline"));
        tl.mark_at(0.5, "init", "started");
        tl.mark_at(1.25, "network", "eth0\t10.0.2.15/24\nx");
        let m = tl.read();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].uptime, 1.25);
        assert_eq!(m[1].detail, "eth0 10.0.2.15/24 x");
        assert!(tl.has("init") && !tl.has("etcd healthy"));
    }
}
