//! The machine's config state on disk: one record, `machine-state.json`
//! under the state directory, holding the running config, the one before it
//! (last-known-good), a staged config, a pending `try`, and whether a reset
//! is under way.
//!
//! Why one file: every transition (apply, try, confirm, rollback, stage,
//! reset) changes several of these together. Written as separate files, a
//! crash between two writes left combinations no transition produces (a
//! trial config without the record that rolls it back). One record written
//! with [`write_atomic`] (temp file, fsync, rename, fsync of the directory)
//! makes each transition a single rename: after a crash the node finds the
//! record before the transition or after it, never between.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use machine_api::atomic::StagedFile;
use serde::{Deserialize, Serialize};

/// The record's file name.
pub const RECORD: &str = "machine-state.json";
/// Files of the earlier layout (one per part), migrated on first load.
const LEGACY_CURRENT: &str = "config.yaml";
const LEGACY_LKG: &str = "config.lkg.yaml";
const LEGACY_STAGED: &str = "config.staged.yaml";
const LEGACY_TRY: &str = "try.json";
/// A record bigger than this is not ours (four configs of at most 1 MiB).
const MAX_RECORD_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("config store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "config store {path} is damaged ({reason}); reset the node (osctl reset) to start over"
    )]
    Damaged { path: PathBuf, reason: String },
}

/// A `try` apply waiting for confirmation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TryState {
    pub deadline_unix_ms: u64,
    /// The boot the try began in: a reboot during a try rolls it back.
    #[serde(default)]
    pub boot_id: String,
}

impl TryState {
    pub fn new(timeout: Duration, boot_id: String) -> Self {
        TryState {
            deadline_unix_ms: unix_ms(SystemTime::now() + timeout),
            boot_id,
        }
    }
    pub fn remaining(&self) -> Duration {
        let now = unix_ms(SystemTime::now());
        Duration::from_millis(self.deadline_unix_ms.saturating_sub(now))
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything the node keeps about its config, as one value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Bumped by every transition; a `try` watcher names the generation it
    /// watches, so a stale one cannot roll back a newer config.
    pub generation: u64,
    /// The running config (canonical YAML); none in maintenance mode.
    pub current: Option<String>,
    /// The config before it: what a `try` or a refused config goes back to.
    pub previous: Option<String>,
    /// Applied with `staged`: becomes current at the next boot.
    pub staged: Option<String>,
    /// `current` is on trial and rolls back to `previous` unless confirmed.
    pub trial: Option<TryState>,
    /// A reset began and has not finished: the next start finishes it.
    #[serde(default)]
    pub resetting: bool,
    /// What the unfinished reset wipes, so a start after a crash finishes
    /// the same reset. Written only while a reset other than `all` is under
    /// way: records without it (every record of a machined from before wipe
    /// modes, and every record outside a reset) mean `all`, and an older
    /// machined still reads them.
    #[serde(default, skip_serializing_if = "Wipe::is_all")]
    pub wipe: Wipe,
    /// With an `ephemeral` wipe: remove the etcd bootstrap mark too. Set when
    /// other etcd members remain (or etcd could not tell): a member that
    /// founded its cluster would otherwise found a second, empty cluster of
    /// its own once its data is gone. Left unset when the member was the
    /// last one: then etcd founds a new, empty cluster here again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forget_etcd_bootstrap: bool,
}

/// What `osctl reset` wipes.
///
/// | | config, secrets, kept certificates, bootstrap mark (STATE) | etcd data | containerd, kubelet, CNI data (EPHEMERAL) | etcd snapshots | logs |
/// |---|---|---|---|---|---|
/// | `all` | wiped | wiped | wiped | wiped | kept |
/// | `state` | wiped | wiped | kept | kept | kept |
/// | `ephemeral` | kept | wiped | wiped | kept | kept |
///
/// Why `state` wipes etcd data although it lives on EPHEMERAL: the data
/// *is* a member identity (member ID, cluster ID, raft log) of the cluster
/// whose config and certificates the reset forgets. Kept, it is either
/// useless (a node configured for another cluster: etcd refuses to start
/// on another cluster's data) or harmful (configured for the same cluster:
/// etcd starts from raft state the cluster may have moved past, or the
/// member was removed meanwhile, and it crash-loops); and it holds the old
/// cluster's keys and every Kubernetes Secret on a node that has just
/// forgotten who may read them. So every mode destroys etcd data, and every
/// mode needs `--force` on the last member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wipe {
    /// The config and all data: the node returns to maintenance mode.
    #[default]
    All,
    /// The config and the node's identity (what STATE holds) and etcd
    /// data; /var data stays. The node returns to maintenance mode.
    State,
    /// The data on EPHEMERAL (/var); the config stays and the services
    /// start afresh with it.
    Ephemeral,
}

impl Wipe {
    /// The wire form (`ResetRequest.wipe`); empty means `all`.
    pub fn parse(s: &str) -> Option<Wipe> {
        match s {
            "" | "all" => Some(Wipe::All),
            "state" => Some(Wipe::State),
            "ephemeral" => Some(Wipe::Ephemeral),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Wipe::All => "all",
            Wipe::State => "state",
            Wipe::Ephemeral => "ephemeral",
        }
    }

    pub fn is_all(&self) -> bool {
        *self == Wipe::All
    }

    /// Whether the config goes (and the node returns to maintenance mode).
    pub fn forgets_config(self) -> bool {
        self != Wipe::Ephemeral
    }
}

impl std::fmt::Display for Wipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a record write can be interrupted; fault-injection tests stop the
/// write (or the process) at each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePoint {
    /// Before the temp file exists.
    Begin,
    /// The temp file is written and fsynced, not yet renamed.
    Staged,
    /// Renamed into place, directory not yet fsynced.
    Renamed,
}

/// A hook called at each [`WritePoint`]: an error stops the write there,
/// as a crash would (tests only; production stores have none).
pub type FaultHook = Arc<dyn Fn(WritePoint) -> io::Result<()> + Send + Sync>;

/// The record store.
#[derive(Clone)]
pub struct ConfigStore {
    dir: PathBuf,
    fault: Option<FaultHook>,
}

impl std::fmt::Debug for ConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ConfigStore {
    pub fn new(dir: PathBuf) -> Self {
        ConfigStore { dir, fault: None }
    }

    /// A store whose writes call `hook` at each write point.
    pub fn with_fault_hook(mut self, hook: FaultHook) -> Self {
        self.fault = Some(hook);
        self
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(RECORD)
    }

    fn io_err(&self, name: &str, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.dir.join(name),
            source,
        }
    }

    fn read_opt(&self, name: &str) -> Result<Option<String>, StoreError> {
        match fs::read_to_string(self.dir.join(name)) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err(name, e)),
        }
    }

    /// Reads the record (an empty one when there is none), migrating the
    /// earlier one-file-per-part layout once.
    pub fn load(&self) -> Result<Record, StoreError> {
        self.remove_stale_temp_files();
        let path = self.path();
        match fs::metadata(&path) {
            Ok(m) if m.len() > MAX_RECORD_BYTES => {
                return Err(StoreError::Damaged {
                    path,
                    reason: format!("{} bytes, more than a record holds", m.len()),
                })
            }
            _ => {}
        }
        if let Some(text) = self.read_opt(RECORD)? {
            let record = serde_json::from_str(&text).map_err(|e| StoreError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            self.remove_legacy();
            return Ok(record);
        }
        let legacy = Record {
            generation: 0,
            current: self.read_opt(LEGACY_CURRENT)?,
            previous: self.read_opt(LEGACY_LKG)?,
            staged: self.read_opt(LEGACY_STAGED)?,
            trial: self
                .read_opt(LEGACY_TRY)?
                .and_then(|t| serde_json::from_str(&t).ok()),
            ..Record::default()
        };
        if legacy != Record::default() {
            // The record first, then the old files: a crash in between
            // leaves the record, which wins at the next load.
            self.commit(&legacy)?;
            self.remove_legacy();
        }
        Ok(legacy)
    }

    fn remove_legacy(&self) {
        for f in [LEGACY_TRY, LEGACY_STAGED, LEGACY_CURRENT, LEGACY_LKG] {
            let _ = fs::remove_file(self.dir.join(f));
        }
    }

    /// Makes `record` the node's state in one atomic step.
    pub fn commit(&self, record: &Record) -> Result<(), StoreError> {
        let hook = |p: WritePoint| match &self.fault {
            Some(h) => h(p).map_err(|e| self.io_err(RECORD, e)),
            None => Ok(()),
        };
        let json = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Damaged {
            path: self.path(),
            reason: e.to_string(),
        })?;
        hook(WritePoint::Begin)?;
        let staged =
            StagedFile::write(&self.path(), &json, 0o600).map_err(|e| self.io_err(RECORD, e))?;
        if let Err(e) = hook(WritePoint::Staged) {
            // A crash here leaves the temp file; a later load removes it.
            std::mem::forget(staged);
            return Err(e);
        }
        staged
            .commit_then(|| hook(WritePoint::Renamed).map_err(io::Error::other))
            .map_err(|e| self.io_err(RECORD, e))
    }

    /// Removes temp files of writes interrupted by a crash: they were never
    /// renamed into place, so they hold nothing the node relies on.
    fn remove_stale_temp_files(&self) {
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(".tmp-") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(current: &str) -> Record {
        Record {
            generation: 1,
            current: Some(current.into()),
            ..Default::default()
        }
    }

    #[test]
    fn commit_and_load_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = ConfigStore::new(d.path().to_owned());
        assert_eq!(s.load().unwrap(), Record::default());
        s.commit(&rec("a")).unwrap();
        assert_eq!(s.load().unwrap(), rec("a"));
    }

    #[test]
    fn an_interrupted_write_leaves_the_old_record_or_the_new() {
        for point in [WritePoint::Begin, WritePoint::Staged, WritePoint::Renamed] {
            let d = tempfile::tempdir().unwrap();
            let clean = ConfigStore::new(d.path().to_owned());
            clean.commit(&rec("old")).unwrap();
            let crashing = clean.clone().with_fault_hook(Arc::new(move |p| {
                if p == point {
                    Err(io::Error::other("injected crash"))
                } else {
                    Ok(())
                }
            }));
            assert!(crashing.commit(&rec("new")).is_err());
            let after = clean.load().unwrap();
            let expected = if point == WritePoint::Renamed {
                "new"
            } else {
                "old"
            };
            assert_eq!(after.current.as_deref(), Some(expected), "{point:?}");
            let leftovers: Vec<_> = fs::read_dir(d.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert_eq!(leftovers.len(), 1, "{point:?}: {leftovers:?}");
        }
    }

    #[test]
    fn the_legacy_layout_is_migrated_once() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(LEGACY_CURRENT), "b").unwrap();
        fs::write(d.path().join(LEGACY_LKG), "a").unwrap();
        fs::write(
            d.path().join(LEGACY_TRY),
            r#"{"deadline_unix_ms": 5, "boot_id": "x"}"#,
        )
        .unwrap();
        let s = ConfigStore::new(d.path().to_owned());
        let r = s.load().unwrap();
        assert_eq!(r.current.as_deref(), Some("b"));
        assert_eq!(r.previous.as_deref(), Some("a"));
        assert_eq!(r.trial.unwrap().deadline_unix_ms, 5);
        assert!(!d.path().join(LEGACY_CURRENT).exists());
        assert!(d.path().join(RECORD).exists());
    }

    #[test]
    fn the_wipe_mode_is_kept_only_while_a_reset_needs_it() {
        // A record of a machined from before wipe modes: a reset of all.
        let old: Record =
            serde_json::from_str(r#"{"generation": 4, "current": "c", "previous": null, "staged": null, "trial": null, "resetting": true}"#)
                .unwrap();
        assert!(old.resetting);
        assert_eq!(old.wipe, Wipe::All);
        assert!(!old.forget_etcd_bootstrap);
        // Outside a non-`all` reset the record has the old shape, so an
        // older machined (which refuses unknown fields) still reads it.
        let json = serde_json::to_value(&old).unwrap();
        assert!(json.get("wipe").is_none(), "{json}");
        assert!(json.get("forget_etcd_bootstrap").is_none(), "{json}");
        let eph = Record {
            wipe: Wipe::Ephemeral,
            forget_etcd_bootstrap: true,
            ..old
        };
        let json = serde_json::to_value(&eph).unwrap();
        assert_eq!(json["wipe"], "ephemeral");
        assert_eq!(json["forget_etcd_bootstrap"], true);
        let d = tempfile::tempdir().unwrap();
        let s = ConfigStore::new(d.path().to_owned());
        s.commit(&eph).unwrap();
        assert_eq!(s.load().unwrap(), eph);
        for w in [Wipe::All, Wipe::State, Wipe::Ephemeral] {
            assert_eq!(Wipe::parse(w.as_str()), Some(w));
        }
        assert_eq!(Wipe::parse(""), Some(Wipe::All));
        assert_eq!(Wipe::parse("everything"), None);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_an_empty_node() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(RECORD), "{\"generation\": ").unwrap();
        let s = ConfigStore::new(d.path().to_owned());
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
    }
}
