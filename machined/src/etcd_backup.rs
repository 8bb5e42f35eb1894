//! etcd snapshots on the node: scheduled ones kept on EPHEMERAL with
//! retention, and a one-member cluster rebuilt from a snapshot when quorum
//! is lost (`osctl bootstrap --recover-from`).
//!
//! Every file appears in one atomic step: a snapshot is written to a
//! hidden `.part` file, fsynced and renamed (its `.sha256` beside it, in
//! `sha256sum` format, is renamed first, so a listed snapshot always has
//! one); a restore is done in a work directory and its `member/` renamed
//! into etcd's data directory last. A crash at any point leaves either
//! nothing or the whole thing, and the leftovers are removed next time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use machine_api::etcd_snapshot::{Checked, SnapshotCheck};
use tokio::io::AsyncWriteExt;

use crate::paths::Paths;
use crate::roles::etcd_client::EtcdClient;

/// Scheduled snapshots (on EPHEMERAL, with etcd's data).
pub fn snapshot_dir(paths: &Paths) -> PathBuf {
    paths.root.join("var/lib/etcd-snapshots")
}

/// Where a recovery stages the uploaded snapshot and the restored data:
/// on the same filesystem as etcd's data, so the final step is a rename.
pub fn recovery_dir(paths: &Paths) -> PathBuf {
    paths.root.join("var/lib/etcd-recover")
}

/// The largest snapshot taken or accepted: etcd's largest supported
/// backend quota (8 GiB) plus its trailer and slack.
pub const MAX_SNAPSHOT: u64 = 8 * 1024 * 1024 * 1024 + 1024 * 1024;

/// How long `etcdctl snapshot restore` may take (it rewrites the whole
/// database once).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

const PREFIX: &str = "etcd-";
const SUFFIX: &str = ".db";

/// A snapshot written to disk.
#[derive(Clone, Debug)]
pub struct Saved {
    pub path: PathBuf,
    pub checked: Checked,
}

/// `etcd-YYYYMMDDTHHMMSSZ.db`: names sort by time.
fn file_name(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    format!(
        "{PREFIX}{:04}{:02}{:02}T{:02}{:02}{:02}Z{SUFFIX}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Snapshots in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// When the newest snapshot in `dir` was written.
pub fn newest(dir: &Path) -> Option<SystemTime> {
    let p = list(dir).pop()?;
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn sidecar(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Takes a snapshot of `client`'s member into `dir`. The file is checked
/// (etcd's trailer) before it is given its name.
pub async fn save(client: &EtcdClient, dir: &Path, at: SystemTime) -> Result<Saved, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    remove_partial(dir);
    let name = file_name(at);
    let part = dir.join(format!(".{name}.part"));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&part)
        .await
        .map_err(|e| format!("{}: {e}", part.display()))?;
    let mut check = SnapshotCheck::new();
    let result = async {
        let mut stream = client.snapshot().await.map_err(|e| e.to_string())?;
        let mut size = 0u64;
        while let Some(data) = stream.next_chunk().await.map_err(|e| e.to_string())? {
            size += data.len() as u64;
            if size > MAX_SNAPSHOT {
                return Err(format!("the snapshot is over {MAX_SNAPSHOT} bytes"));
            }
            check.update(&data);
            file.write_all(&data)
                .await
                .map_err(|e| format!("{}: {e}", part.display()))?;
        }
        Ok(())
    }
    .await;
    let done = async {
        result?;
        file.sync_all().await.map_err(|e| e.to_string())?;
        let checked = check.finish();
        if let Some(p) = checked.problem(None, None) {
            return Err(p);
        }
        let path = dir.join(&name);
        let sum = format!("{}  {name}\n", checked.sha256);
        machine_api::atomic::write_atomic(&sidecar(&path), sum.as_bytes(), 0o600)
            .map_err(|e| e.to_string())?;
        std::fs::rename(&part, &path).map_err(|e| e.to_string())?;
        fsync_dir(dir).map_err(|e| e.to_string())?;
        Ok(Saved { path, checked })
    }
    .await;
    if done.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    done
}

/// Removes what an interrupted save left.
fn remove_partial(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with('.') && n.ends_with(".part") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    // A checksum whose snapshot never got its name.
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if let Some(db) = p.to_str().and_then(|s| s.strip_suffix(".sha256")) {
            if !Path::new(db).exists() {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// Keeps the newest `keep` snapshots in `dir`; returns what was removed.
pub fn prune(dir: &Path, keep: usize) -> Vec<PathBuf> {
    let all = list(dir);
    let extra = all.len().saturating_sub(keep);
    let mut gone = Vec::new();
    for p in all.into_iter().take(extra) {
        if std::fs::remove_file(&p).is_ok() {
            let _ = std::fs::remove_file(sidecar(&p));
            gone.push(p);
        }
    }
    gone
}

/// An uploaded snapshot being received for a recovery.
#[derive(Debug)]
pub struct Upload {
    path: PathBuf,
    file: tokio::fs::File,
    check: SnapshotCheck,
    received: u64,
    expected_size: u64,
    expected_sha256: String,
}

impl Upload {
    /// Starts receiving a snapshot of `size` bytes with `sha256` into a
    /// fresh recovery directory.
    pub async fn start(paths: &Paths, size: u64, sha256: &str) -> Result<Self, String> {
        if size == 0 || size > MAX_SNAPSHOT {
            return Err(format!(
                "size: {size} bytes is not an etcd snapshot size (1 byte to {MAX_SNAPSHOT})"
            ));
        }
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("sha256: give the snapshot's SHA-256 as 64 hex digits".into());
        }
        let dir = recovery_dir(paths);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("snapshot.db");
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Upload {
            path,
            file,
            check: SnapshotCheck::new(),
            received: 0,
            expected_size: size,
            expected_sha256: sha256.to_ascii_lowercase(),
        })
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<(), String> {
        self.received += data.len() as u64;
        if self.received > self.expected_size {
            return Err(format!(
                "more than the announced {} bytes arrived",
                self.expected_size
            ));
        }
        self.check.update(data);
        self.file
            .write_all(data)
            .await
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// Checks size, sha256 and etcd's trailer; the snapshot's path.
    pub async fn finish(self) -> Result<PathBuf, String> {
        self.file.sync_all().await.map_err(|e| e.to_string())?;
        let checked = self.check.finish();
        if let Some(p) = checked.problem(Some(self.expected_size), Some(&self.expected_sha256)) {
            return Err(p);
        }
        Ok(self.path)
    }
}

/// Who the restored member is.
#[derive(Clone, Debug)]
pub struct RestoreAs {
    pub name: String,
    pub peer_url: String,
    pub cluster_token: String,
}

/// Restores `snapshot` with `etcdctl snapshot restore` into the recovery
/// directory, then moves the member into etcd's data directory (the one
/// step that makes it count). Blocking.
pub fn restore(
    etcdctl: &Path,
    snapshot: &Path,
    who: &RestoreAs,
    paths: &Paths,
) -> Result<(), String> {
    let work = recovery_dir(paths).join("data");
    let _ = std::fs::remove_dir_all(&work);
    crate::roles::images::run_bounded(
        Command::new(etcdctl)
            .env("ETCDCTL_API", "3")
            .arg("snapshot")
            .arg("restore")
            .arg(snapshot)
            .args(["--name", &who.name])
            .args([
                "--initial-cluster",
                &format!("{}={}", who.name, who.peer_url),
            ])
            .args(["--initial-cluster-token", &who.cluster_token])
            .args(["--initial-advertise-peer-urls", &who.peer_url])
            .arg("--data-dir")
            .arg(&work),
        RESTORE_TIMEOUT,
    )
    .map_err(|e| format!("etcdctl snapshot restore: {}", e.trim()))?;
    let restored = work.join("member");
    if !restored.join("wal").is_dir() {
        return Err(format!(
            "etcdctl snapshot restore left no {}",
            restored.join("wal").display()
        ));
    }
    if crate::roles::etcd::member_initialized(paths) {
        return Err("etcd already has data on this node: nothing was changed".into());
    }
    let data = paths.etcd_data();
    std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let member = data.join("member");
    // A `member/` without a WAL is what a failed first start leaves.
    let _ = std::fs::remove_dir_all(&member);
    std::fs::rename(&restored, &member)
        .map_err(|e| format!("moving the restored member into {}: {e}", data.display()))?;
    fsync_dir(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let _ = std::fs::remove_dir_all(recovery_dir(paths));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_prune_keeps_the_newest() {
        let t = tempfile::tempdir().unwrap();
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for i in 0..5u64 {
            let p = t
                .path()
                .join(file_name(base + Duration::from_secs(i * 3600)));
            std::fs::write(&p, b"x").unwrap();
            std::fs::write(sidecar(&p), b"y").unwrap();
        }
        assert_eq!(file_name(base), "etcd-20270115T080000Z.db", "UTC, sortable");
        let gone = prune(t.path(), 2);
        assert_eq!(gone.len(), 3);
        let left = list(t.path());
        assert_eq!(left.len(), 2);
        assert!(left[0].ends_with("etcd-20270115T110000Z.db"));
        assert!(left.iter().all(|p| sidecar(p).exists()));
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 4);
    }

    #[test]
    fn leftovers_of_an_interrupted_save_are_removed() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(".etcd-1.db.part"), b"x").unwrap();
        std::fs::write(t.path().join("etcd-1.db.sha256"), b"x").unwrap();
        std::fs::write(t.path().join("etcd-2.db"), b"x").unwrap();
        std::fs::write(t.path().join("etcd-2.db.sha256"), b"x").unwrap();
        remove_partial(t.path());
        let mut left: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["etcd-2.db", "etcd-2.db.sha256"]);
    }

    #[tokio::test]
    async fn an_upload_is_bounded_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(t.path());
        assert!(Upload::start(&paths, MAX_SNAPSHOT + 1, &"0".repeat(64))
            .await
            .unwrap_err()
            .contains("size"));
        assert!(Upload::start(&paths, 10, "abc")
            .await
            .unwrap_err()
            .contains("sha256"));
        let mut u = Upload::start(&paths, 4, &"0".repeat(64)).await.unwrap();
        assert!(u.write(b"12345").await.unwrap_err().contains("announced"));
        let mut u = Upload::start(&paths, 4, &"0".repeat(64)).await.unwrap();
        u.write(b"1234").await.unwrap();
        assert!(u.finish().await.unwrap_err().contains("changed on the way"));
    }
}
