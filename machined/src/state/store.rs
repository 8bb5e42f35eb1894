//! Files of the config store, under the state directory:
//!
//! - `config.yaml`: the config the node runs;
//! - `config.lkg.yaml`: the one before it (last-known-good), for rollback;
//! - `config.staged.yaml`: applied with `staged`, promoted at next boot;
//! - `try.json`: a `try` apply waiting for confirmation.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use machine_api::atomic::write_atomic;
use machine_api::config::MachineConfig;
use serde::{Deserialize, Serialize};

const CURRENT: &str = "config.yaml";
const LKG: &str = "config.lkg.yaml";
const STAGED: &str = "config.staged.yaml";
const TRY: &str = "try.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("config store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no previous config to roll back to")]
    NoPrevious,
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

/// What the store found at boot, and what it did to get there.
#[derive(Debug)]
pub struct BootConfig {
    pub config: Option<MachineConfig>,
    /// Things worth telling the operator (staged config promoted, rollback).
    pub notes: Vec<String>,
}

/// The config store.
#[derive(Clone, Debug)]
pub struct ConfigStore {
    dir: PathBuf,
}

impl ConfigStore {
    pub fn new(dir: PathBuf) -> Self {
        ConfigStore { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn io<T>(&self, name: &str, r: io::Result<T>) -> Result<T, StoreError> {
        r.map_err(|source| StoreError::Io {
            path: self.path(name),
            source,
        })
    }

    fn read(&self, name: &str) -> Result<Option<String>, StoreError> {
        match fs::read_to_string(self.path(name)) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => self.io(name, Err(e)),
        }
    }

    fn write(&self, name: &str, text: &str) -> Result<(), StoreError> {
        self.io(name, write_atomic(&self.path(name), text.as_bytes(), 0o600))
    }

    fn remove(&self, name: &str) -> Result<(), StoreError> {
        match fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => self.io(name, Err(e)),
        }
    }

    /// Decides the config to boot with: promotes a staged config and falls
    /// back to last-known-good when the current file does not parse. (A
    /// pending try is the caller's to judge: it survives a machined restart
    /// but not a reboot.)
    pub fn load_at_boot(&self) -> Result<BootConfig, StoreError> {
        let mut notes = Vec::new();
        self.remove_stale_temp_files();
        if let Some(staged) = self.read(STAGED)? {
            match MachineConfig::parse(&staged) {
                Ok(_) => {
                    self.save(&staged)?;
                    notes.push("the staged config was applied".into());
                }
                Err(p) => notes.push(format!("the staged config is invalid and was dropped: {p}")),
            }
            self.remove(STAGED)?;
        }
        for name in [CURRENT, LKG] {
            if let Some(text) = self.read(name)? {
                match MachineConfig::parse(&text) {
                    Ok(cfg) => {
                        if name == LKG {
                            self.write(CURRENT, &text)?;
                            notes.push(
                                "config.yaml was unreadable; booted the last-known-good config"
                                    .into(),
                            );
                        }
                        return Ok(BootConfig {
                            config: Some(cfg),
                            notes,
                        });
                    }
                    Err(p) => notes.push(format!("{name} does not validate: {p}")),
                }
            }
        }
        Ok(BootConfig {
            config: None,
            notes,
        })
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

    /// Makes `text` the current config, keeping the previous one as
    /// last-known-good.
    pub fn save(&self, text: &str) -> Result<(), StoreError> {
        if let Some(prev) = self.read(CURRENT)? {
            if prev == text {
                return Ok(());
            }
            self.write(LKG, &prev)?;
        }
        self.write(CURRENT, text)
    }

    pub fn current(&self) -> Result<Option<String>, StoreError> {
        self.read(CURRENT)
    }

    pub fn stage(&self, text: &str) -> Result<(), StoreError> {
        self.write(STAGED, text)
    }

    /// Forgets a staged config: a newer live apply supersedes it, and it
    /// must not come back at the next boot.
    pub fn drop_staged(&self) -> Result<(), StoreError> {
        self.remove(STAGED)
    }

    pub fn staged_pending(&self) -> bool {
        self.path(STAGED).exists()
    }

    pub fn begin_try(&self, state: &TryState) -> Result<(), StoreError> {
        let json = serde_json::to_string(state).unwrap_or_default();
        self.write(TRY, &json)
    }

    pub fn pending_try(&self) -> Result<Option<TryState>, StoreError> {
        Ok(self
            .read(TRY)?
            .and_then(|t| serde_json::from_str::<TryState>(&t).ok()))
    }

    /// Keeps the tried config.
    pub fn confirm_try(&self) -> Result<(), StoreError> {
        self.remove(TRY)
    }

    /// Restores the last-known-good config as current and ends any try.
    pub fn rollback(&self) -> Result<(), StoreError> {
        let prev = self.read(LKG)?.ok_or(StoreError::NoPrevious)?;
        self.write(CURRENT, &prev)?;
        self.remove(TRY)
    }

    /// Forgets every config (reset).
    pub fn wipe(&self) -> Result<(), StoreError> {
        for f in [TRY, STAGED, CURRENT, LKG] {
            self.remove(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use machine_api::config::generate::{machine_config, ClusterInput};
    use machine_api::config::Role;
    use machine_api::pki::bundle::SecretsBundle;

    fn cfg_text(hostname: &str) -> String {
        let b = SecretsBundle::generate().unwrap();
        let input = ClusterInput {
            name: "t".parse().unwrap(),
            endpoint: "https://127.0.0.1:6443".parse().unwrap(),
            kubernetes_version: "1.34.2".parse().unwrap(),
            install_disk: None,
        };
        let mut c = machine_config(&b, &input, &[Role::Etcd]);
        c.machine.hostname = Some(hostname.parse().unwrap());
        c.to_yaml()
    }

    #[test]
    fn save_keeps_last_known_good_and_rollback_restores_it() {
        let d = tempfile::tempdir().unwrap();
        let s = ConfigStore::new(d.path().to_owned());
        let (a, b) = (cfg_text("a"), cfg_text("b"));
        s.save(&a).unwrap();
        s.save(&b).unwrap();
        s.begin_try(&TryState::new(Duration::from_secs(60), "b".into()))
            .unwrap();
        assert!(s.pending_try().unwrap().is_some());
        s.rollback().unwrap();
        assert_eq!(s.current().unwrap().unwrap(), a);
        assert!(s.pending_try().unwrap().is_none());
    }

    #[test]
    fn boot_promotes_staged() {
        let d = tempfile::tempdir().unwrap();
        let s = ConfigStore::new(d.path().to_owned());
        let (a, c) = (cfg_text("a"), cfg_text("c"));
        s.save(&a).unwrap();
        s.stage(&c).unwrap();
        let boot = s.load_at_boot().unwrap();
        assert_eq!(boot.config.unwrap().machine.hostname.unwrap().0, "c");
        assert!(!s.staged_pending());
    }

    #[test]
    fn a_corrupt_current_config_falls_back_to_last_known_good() {
        let d = tempfile::tempdir().unwrap();
        let s = ConfigStore::new(d.path().to_owned());
        s.save(&cfg_text("a")).unwrap();
        s.save(&cfg_text("b")).unwrap();
        std::fs::write(d.path().join(CURRENT), "machine: [").unwrap();
        let boot = s.load_at_boot().unwrap();
        assert_eq!(boot.config.unwrap().machine.hostname.unwrap().0, "a");
        assert!(boot.notes.iter().any(|n| n.contains("last-known-good")));
    }
}
