//! Upgrades: an upgrade bundle ([`machine_api::image_bundle`]) streamed
//! over the API is checked and written into the slot the node is not
//! running; the slot's boot entry is written last, only after every check
//! passed, so a bundle that fails half-way leaves the node exactly as it
//! was (the other slot's old contents are never booted without an entry).
//!
//! Checks, in the order they can fail: the stream is a bundle whose first
//! member is a manifest; the manifest is signed by one of the config's
//! `machine.upgrade.trustedImageKeys` (when it lists any); every slot file
//! has the manifest's size and SHA-256, checked while it is written.
//!
//! The entry is boot-counted (`+3`) and named to sort before the running
//! slot's ([`machine_api::layout::UpgradeEntry`]), so systemd-boot starts
//! the new version; if it never marks itself good, the counter runs out
//! and systemd-boot falls back to the old slot by itself.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use machine_api::image_bundle::{self, BundleError, Output, Verified};
use machine_api::image_signature::TrustedKey;
use machine_api::layout::{self, Slot};

/// Where an upgrade goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A disk boot: the slot to write, its partition, and the ESP's.
    Disk {
        running: Slot,
        into: Slot,
        partition: PathBuf,
    },
    /// Not booted from a disk slot (host mode, a diskless initramfs boot):
    /// a bundle is checked, nothing can be installed. The text says why.
    Nowhere(String),
}

/// The target of this node, from its kernel command line and partitions.
pub fn target(cmdline: &str, host_mode: bool) -> Target {
    if host_mode {
        return Target::Nowhere(
            "machined runs in host mode (--root): there is no slot to install into".into(),
        );
    }
    let Some(running) = crate::bootentry::running_slot(cmdline) else {
        return Target::Nowhere(
            "this node did not boot from a disk slot (no slot= on its kernel command line): boot it from the disk image to upgrade it".into(),
        );
    };
    let into = running.other();
    let sys = Path::new("/sys/class/block");
    match (
        crate::disks::find(sys, into.partition()),
        crate::disks::find(sys, layout::ESP_PARTITION),
    ) {
        (Some(p), Some(_)) => Target::Disk {
            running,
            into,
            partition: p.dev,
        },
        _ => Target::Nowhere(format!(
            "the boot disk has no partition {} or {}: not a disk from `imager build`",
            into.partition(),
            layout::ESP_PARTITION
        )),
    }
}

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// A check of the bundle failed (its text names the check).
    #[error("{0}")]
    Bundle(#[from] BundleError),
    /// The bundle passed every check but this node cannot install it.
    #[error("the bundle passed every check ({checked}), but {why}")]
    NoTarget { checked: String, why: String },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("the ESP: {0}")]
    Esp(#[from] crate::bootentry::BootEntryError),
}

/// What was installed.
#[derive(Debug, Clone)]
pub struct Installed {
    pub verified: Verified,
    pub into: Option<Slot>,
    pub running: Option<Slot>,
    pub entry: String,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpgradeError {
    let what = what.into();
    move |e| UpgradeError::Io(what, e)
}

/// Words for what passed, for replies and logs.
pub fn checked(v: &Verified) -> String {
    match (&v.signed_by, v.signed) {
        (Some(id), _) => format!("signed by trusted key {id}, every file's sha256 matches"),
        (None, true) => "every file's sha256 matches; signature not checked: machine.upgrade.trustedImageKeys is empty".into(),
        (None, false) => "every file's sha256 matches; unsigned, and machine.upgrade.trustedImageKeys is empty".into(),
    }
}

/// `(major, minor)` of a Kubernetes version as `1.35.4`, `v1.35.4` or
/// `Kubernetes v1.35.4` (what `kubelet --version` prints).
fn major_minor(v: &str) -> Option<(u32, u32)> {
    let v = v.trim();
    let v = v.rsplit(' ').next()?.trim_start_matches('v');
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Kubernetes' upgrade rule, which kubeadm enforces too: the control plane
/// and kubelets move one minor version at a time, and a minor version is
/// never downgraded (etcd's stored objects may already use the newer
/// version's schema). Either side unknown: no Kubernetes to protect.
pub fn kubernetes_skew(running: Option<&str>, new: Option<&str>) -> Result<(), String> {
    let (Some(running), Some(new)) = (running, new) else {
        return Ok(());
    };
    let (Some((rmaj, rmin)), Some((nmaj, nmin))) = (major_minor(running), major_minor(new)) else {
        return Ok(());
    };
    if rmaj != nmaj {
        return Err(format!(
            "Kubernetes skew check failed: the node runs {rmaj}.{rmin}, the image carries {nmaj}.{nmin}: another major version"
        ));
    }
    if nmin < rmin {
        return Err(format!(
            "Kubernetes skew check failed: the image carries Kubernetes {nmaj}.{nmin}, older than the {rmaj}.{rmin} the node runs: minor versions are never downgraded (`osctl rollback` returns to the slot that ran it)"
        ));
    }
    if nmin > rmin + 1 {
        return Err(format!(
            "Kubernetes skew check failed: the image carries Kubernetes {nmaj}.{nmin}, the node runs {rmaj}.{rmin}: upgrade through {rmaj}.{} first (one minor version at a time)",
            rmin + 1
        ));
    }
    Ok(())
}

/// The Kubernetes version of the node's own kubelet (`kubelet --version`),
/// when it has one.
pub fn running_kubernetes(kubelet: Option<&Path>) -> Option<String> {
    let out = crate::roles::images::run_bounded(
        std::process::Command::new(kubelet?).arg("--version"),
        std::time::Duration::from_secs(20),
    )
    .ok()?;
    major_minor(&out).map(|_| out.trim().to_owned())
}

/// Reads a bundle from `r` and installs it into `target`. Blocking: run
/// it on a blocking thread. `running_kubernetes` is the node's Kubernetes
/// version, for [`kubernetes_skew`].
pub fn install(
    r: impl Read,
    trusted: &[TrustedKey],
    target: &Target,
    running_kubernetes: Option<&str>,
) -> Result<Installed, UpgradeError> {
    let accept = |m: &image_bundle::BundleManifest| {
        let new = m.kubernetes.as_ref().and_then(|k| k.version.as_deref());
        kubernetes_skew(running_kubernetes, new)
    };
    match target {
        Target::Nowhere(why) => {
            let v = image_bundle::read_accepting(r, trusted, &accept, &mut |_, data| {
                std::io::copy(data, &mut std::io::sink()).map(drop)
            })?;
            Err(UpgradeError::NoTarget {
                checked: checked(&v),
                why: why.clone(),
            })
        }
        Target::Disk {
            running,
            into,
            partition,
        } => crate::bootentry::with_esp(|esp| {
            Ok(install_disk(
                r, trusted, &accept, *running, *into, partition, esp,
            ))
        })?,
    }
}

/// The size of a block device (or file), by seeking to its end.
fn device_size(p: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    std::fs::File::open(p)?.seek(std::io::SeekFrom::End(0))
}

fn install_disk(
    r: impl Read,
    trusted: &[TrustedKey],
    accept: &dyn Fn(&image_bundle::BundleManifest) -> Result<(), String>,
    running: Slot,
    into: Slot,
    partition: &Path,
    esp: &Path,
) -> Result<Installed, UpgradeError> {
    let slot_dir = esp.join(into.esp_dir());
    std::fs::create_dir_all(&slot_dir).map_err(io(slot_dir.display().to_string()))?;
    let staged = |name: &str| slot_dir.join(format!("{name}.new"));
    let part_size = device_size(partition).map_err(io(partition.display().to_string()))?;
    let mut store = |o: &Output, data: &mut dyn Read| -> std::io::Result<()> {
        match o.kind.as_str() {
            "root" => {
                if o.size > part_size {
                    return Err(std::io::Error::other(format!(
                        "the root filesystem is {} bytes, partition {} holds {part_size}",
                        o.size,
                        partition.display()
                    )));
                }
                let mut f = std::fs::OpenOptions::new().write(true).open(partition)?;
                std::io::copy(data, &mut f)?;
                f.flush()?;
                f.sync_all()
            }
            "kernel" | "boot-initrd" => {
                let name = if o.kind == "kernel" {
                    layout::KERNEL_FILE
                } else {
                    layout::INITRD_FILE
                };
                let mut f = std::fs::File::create(staged(name))?;
                std::io::copy(data, &mut f)?;
                f.sync_all()
            }
            other => Err(std::io::Error::other(format!(
                "unexpected slot file kind {other}"
            ))),
        }
    };
    let verified = image_bundle::read_accepting(r, trusted, accept, &mut store)?;
    // Every check passed: the files take their names, then the entry.
    for name in [layout::KERNEL_FILE, layout::INITRD_FILE] {
        let to = slot_dir.join(name);
        std::fs::rename(staged(name), &to).map_err(io(to.display().to_string()))?;
    }
    let entries = esp.join(layout::ENTRIES_DIR);
    let existing: Vec<String> = std::fs::read_dir(&entries)
        .map_err(io(entries.display().to_string()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let generation = layout::UpgradeEntry::next_generation(&existing);
    // The target slot's old entries go first: they would boot the new
    // files under the old command line.
    for name in &existing {
        if layout::UpgradeEntry::parse(name).is_some_and(|e| e.slot == into) {
            let _ = std::fs::remove_file(entries.join(name));
        }
    }
    let entry = layout::UpgradeEntry {
        generation,
        slot: into,
    };
    let name = entry.counted(layout::BOOT_TRIES);
    let cmdline = verified
        .manifest
        .kernel_cmdline()
        .unwrap_or("console=ttyS0 panic=-1 quiet");
    let text = format!(
        "title Kubernetes node OS {} (slot {into}, upgrade {generation})\nversion {}\nlinux /{}\ninitrd /{}\noptions {} {}\n",
        verified.manifest.profile.name,
        version_of(&verified.manifest),
        into.kernel_path(),
        into.initrd_path(),
        cmdline,
        into.cmdline_arg(),
    );
    let tmp = entries.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, entries.join(&name)))
        .map_err(io(entries.join(&name).display().to_string()))?;
    if let Ok(d) = std::fs::File::open(&entries) {
        let _ = d.sync_all();
    }
    Ok(Installed {
        verified,
        into: Some(into),
        running: Some(running),
        entry: name,
    })
}

/// The version an entry shows: the image's, else imager's (older
/// manifests), sanitized to one token.
fn version_of(m: &machine_api::image_bundle::BundleManifest) -> String {
    let v = if m.image_version.is_empty() {
        &m.imager_version
    } else {
        &m.image_version
    };
    v.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._+-~".contains(*c))
        .take(64)
        .collect()
}

/// A [`Read`] over chunks handed over from the async API: the gRPC stream
/// feeds it, a blocking thread reads the bundle from it.
#[derive(Debug)]
pub struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
    counters: UploadCounters,
}

/// How long the installer waited on the network for the chunks a
/// [`ChunkReader`] handed it, readable while it runs elsewhere.
/// The rest of an install's time is checking and writing, which run
/// interleaved with the upload, so this is how the two are told apart.
#[derive(Clone, Debug, Default)]
pub struct UploadCounters {
    waited_ns: Arc<AtomicU64>,
}

impl UploadCounters {
    pub fn waited(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed))
    }
}

impl ChunkReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>) -> Self {
        ChunkReader {
            rx,
            buf: Vec::new(),
            pos: 0,
            counters: UploadCounters::default(),
        }
    }

    pub fn counters(&self) -> UploadCounters {
        self.counters.clone()
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            let t = std::time::Instant::now();
            let next = self.rx.blocking_recv();
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.counters.waited_ns.fetch_add(ns, Ordering::Relaxed);
            match next {
                Some(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_moves_one_minor_at_a_time_and_never_down() {
        assert_eq!(
            kubernetes_skew(Some("Kubernetes v1.35.4"), Some("1.35.5")),
            Ok(())
        );
        assert_eq!(
            kubernetes_skew(Some("Kubernetes v1.35.4"), Some("1.36.0")),
            Ok(())
        );
        let skip = kubernetes_skew(Some("Kubernetes v1.35.4"), Some("1.37.1")).unwrap_err();
        assert!(skip.contains("upgrade through 1.36 first"), "{skip}");
        let down = kubernetes_skew(Some("v1.36.0"), Some("1.35.9")).unwrap_err();
        assert!(down.contains("never downgraded"), "{down}");
        assert!(kubernetes_skew(Some("v1.35.0"), Some("2.0.0")).is_err());
        // No Kubernetes on either side: nothing to check.
        assert_eq!(kubernetes_skew(None, Some("1.37.0")), Ok(()));
        assert_eq!(kubernetes_skew(Some("v1.35.0"), None), Ok(()));
        assert_eq!(major_minor("Kubernetes v1.35.4"), Some((1, 35)));
    }
}
