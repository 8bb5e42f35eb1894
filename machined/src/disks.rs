//! The node's data partitions, found by GPT partition name:
//! - STATE (the machine config, last-known-good, try state) at /system/state;
//! - EPHEMERAL (etcd data, containerd, logs) at /var, grown on first boot to
//!   fill the disk, so an image flashed onto a bigger disk uses all of it.
//!
//! Both are ext4, made by the image's `mke2fs` on first boot (a blank
//! partition has no ext4 magic). A partition that fails to format or mount
//! is reported and the node runs from RAM instead: it stays reachable in
//! maintenance mode rather than bricked.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use tracing::{info, warn};

/// Errors of one partition step.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("formatting {0} failed: {1}")]
    Format(PathBuf, String),
    #[error("mounting {0} on {1}: {2}")]
    Mount(PathBuf, PathBuf, nix::errno::Errno),
    #[error("growing {0}: {1}")]
    Grow(PathBuf, String),
}

/// A partition the kernel knows about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// e.g. /dev/vda5
    pub dev: PathBuf,
    /// The whole disk, e.g. /dev/vda
    pub disk: PathBuf,
    /// 1-based partition number
    pub number: u32,
}

/// Reads `KEY=VALUE` lines of a sysfs uevent file.
fn uevent_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

/// Finds a partition by GPT name through sysfs.
pub fn find(sys_block: &Path, name: &str) -> Option<Partition> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(sys_block).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("uevent")) else {
            continue;
        };
        if uevent_value(&text, "PARTNAME").as_deref() != Some(name) {
            continue;
        }
        let (Some(dev), Some(number)) = (
            uevent_value(&text, "DEVNAME"),
            uevent_value(&text, "PARTN").and_then(|n| n.parse().ok()),
        ) else {
            continue;
        };
        // /sys/class/block/vda5 -> .../block/vda/vda5: the parent is the disk.
        let Some(disk) = std::fs::canonicalize(entry.path())
            .ok()
            .and_then(|p| p.parent()?.file_name().map(|n| n.to_owned()))
        else {
            continue;
        };
        found.push(Partition {
            dev: Path::new("/dev").join(dev),
            disk: Path::new("/dev").join(disk),
            number,
        });
    }
    // Deterministic when two disks carry the label: the first by name.
    found.sort_by(|a, b| a.dev.cmp(&b.dev));
    found.into_iter().next()
}

/// True when the device holds an ext2/3/4 superblock.
pub fn has_ext4(dev: &Path) -> Result<bool, DiskError> {
    let f = File::open(dev).map_err(|e| DiskError::Io(dev.to_owned(), e))?;
    let mut magic = [0u8; 2];
    match f.read_exact_at(&mut magic, 1024 + 56) {
        Ok(()) => Ok(magic == [0x53, 0xEF]),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(DiskError::Io(dev.to_owned(), e)),
    }
}

/// Makes an ext4 filesystem with the image's mke2fs.
pub fn format_ext4(dev: &Path, label: &str) -> Result<(), DiskError> {
    let mke2fs = crate::paths::find_binary(None, "mke2fs")
        .or_else(|| crate::paths::find_binary(None, "mkfs.ext4"))
        .ok_or_else(|| {
            DiskError::Format(
                dev.to_owned(),
                "no mke2fs in this image (add e2fsprogs to the image profile)".into(),
            )
        })?;
    let out = std::process::Command::new(mke2fs)
        .args(["-t", "ext4", "-F", "-q", "-m", "0", "-L", label])
        // Lazy init: the kernel zeroes inode tables in the background, so a
        // first boot does not wait for the whole partition to be written.
        // No discard: the partition of a fresh image is already zero, and
        // discarding a large disk can take seconds.
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(dev)
        .output()
        .map_err(|e| DiskError::Format(dev.to_owned(), e.to_string()))?;
    if !out.status.success() {
        return Err(DiskError::Format(
            dev.to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// True when something is mounted exactly at `target`.
pub fn is_mounted(target: &Path) -> bool {
    crate::mountinfo::current()
        .iter()
        .any(|m| m.mount_point == target)
}

fn mount_ext4(dev: &Path, target: &Path) -> Result<(), DiskError> {
    std::fs::create_dir_all(target).map_err(|e| DiskError::Io(target.to_owned(), e))?;
    mount(
        Some(dev),
        target,
        Some(machine_api::layout::DATA_FSTYPE),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|e| DiskError::Mount(dev.to_owned(), target.to_owned(), e))
}

/// Grows the last partition to the end of the disk: rewrites the GPT for
/// the disk's current size (same GUIDs, same partitions, the last one
/// longer) and tells the kernel the new size with BLKPG, which works while
/// other partitions of the disk (the root slot) are mounted.
/// Returns true when the partition grew.
pub fn grow_to_disk_end(part: &Partition) -> Result<bool, DiskError> {
    let grow = |m: String| DiskError::Grow(part.dev.clone(), m);
    let lb = gpt::disk::LogicalBlockSize::Lb512;
    let old = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(lb)
        .open(&part.disk)
        .map_err(|e| grow(e.to_string()))?;
    let mut parts = old.partitions().clone();
    let guid = *old.guid();
    drop(old);
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&part.disk)
        .map_err(|e| DiskError::Io(part.disk.clone(), e))?;
    let size = dev
        .seek(SeekFrom::End(0))
        .map_err(|e| DiskError::Io(part.disk.clone(), e))?;
    let total_lbs = size / 512;
    // The backup header and a 128-entry array take the last 33 sectors.
    let last_usable = total_lbs.saturating_sub(34);
    let Some(p) = parts.get_mut(&part.number) else {
        return Err(grow(format!("partition {} is not in the GPT", part.number)));
    };
    if p.last_lba >= last_usable {
        return Ok(false);
    }
    if parts
        .keys()
        .any(|&k| k != part.number && parts[&k].first_lba > parts[&part.number].first_lba)
    {
        return Err(grow("it is not the last partition".into()));
    }
    if let Some(p) = parts.get_mut(&part.number) {
        p.last_lba = last_usable;
    }
    dev.seek(SeekFrom::Start(0))
        .map_err(|e| DiskError::Io(part.disk.clone(), e))?;
    let mut fresh = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(dev, Some(guid))
        .map_err(|e| grow(e.to_string()))?;
    fresh
        .update_partitions(parts.clone())
        .map_err(|e| grow(e.to_string()))?;
    let mut dev = fresh.write().map_err(|e| grow(e.to_string()))?;
    // The protective MBR covers the whole (new) disk.
    let mbr =
        gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(total_lbs - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut dev)
        .map_err(|e| grow(e.to_string()))?;
    dev.sync_all()
        .map_err(|e| DiskError::Io(part.disk.clone(), e))?;
    let p = &parts[&part.number];
    blkpg_resize(
        &dev,
        part.number,
        p.first_lba * 512,
        (p.last_lba - p.first_lba + 1) * 512,
    )
    .map_err(|e| grow(format!("the kernel did not take the new size: {e}")))?;
    Ok(true)
}

/// BLKPG_RESIZE_PARTITION (linux/blkpg.h), which libc does not wrap.
fn blkpg_resize(disk: &File, number: u32, start: u64, length: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct BlkpgPartition {
        start: i64,
        length: i64,
        pno: libc::c_int,
        devname: [libc::c_char; 64],
        volname: [libc::c_char; 64],
    }
    #[repr(C)]
    struct BlkpgIoctlArg {
        op: libc::c_int,
        flags: libc::c_int,
        datalen: libc::c_int,
        data: *mut libc::c_void,
    }
    const BLKPG: libc::c_ulong = 0x1269;
    const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
    let mut part = BlkpgPartition {
        start: start as i64,
        length: length as i64,
        pno: number as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    // SAFETY: the fd is an open block device; arg and the partition it
    // points to are valid, correctly laid out (repr(C) after linux/blkpg.h)
    // and outlive the call.
    let rc = unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG, &mut arg) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Formats (first boot) and mounts one partition; returns what was done.
fn prepare_one(
    part: &Partition,
    label: &str,
    target: &Path,
    grow: bool,
) -> Result<String, DiskError> {
    if is_mounted(target) {
        return Ok(format!("{label} already mounted at {}", target.display()));
    }
    let mut did = Vec::new();
    let fresh = !has_ext4(&part.dev)?;
    // A disk made bigger since (a resized VM disk, an image written to a
    // larger drive after a first boot elsewhere) grows EPHEMERAL too.
    // Not growing is never a reason to leave the partition unused.
    if grow {
        match grow_to_disk_end(part) {
            Ok(true) => did.push("grew to the end of the disk".to_owned()),
            Ok(false) => {}
            Err(e) => {
                warn!("{e}; {label} keeps its size");
                did.push(format!("not grown ({e})"));
            }
        }
    }
    if fresh {
        format_ext4(&part.dev, label)?;
        did.push("formatted ext4".into());
    }
    mount_ext4(&part.dev, target)?;
    did.push("mounted".into());
    if grow && !fresh {
        // Also after a boot that grew the partition but stopped before the
        // filesystem followed.
        match grow_ext4_online(&part.dev) {
            Ok(Some(line)) => did.push(line),
            Ok(None) => {}
            Err(e) => {
                warn!("{e}; the filesystem keeps its size");
                did.push(format!("filesystem not grown ({e})"));
            }
        }
    }
    Ok(format!(
        "{label} ({}): {} at {}",
        part.dev.display(),
        did.join(", "),
        target.display()
    ))
}

/// Size of the ext4 filesystem on `dev` in bytes, from its superblock.
fn ext4_size(dev: &Path) -> Result<u64, DiskError> {
    let f = File::open(dev).map_err(|e| DiskError::Io(dev.to_owned(), e))?;
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024)
        .map_err(|e| DiskError::Io(dev.to_owned(), e))?;
    Ok(ext4_size_from_superblock(&sb))
}

/// Block count (low and, with the 64bit feature, high half) times the
/// block size, from a 1024-byte ext4 superblock.
fn ext4_size_from_superblock(sb: &[u8; 1024]) -> u64 {
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    const INCOMPAT_64BIT: u32 = 0x80;
    let mut blocks = u64::from(u32_at(0x04));
    if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    let block_size = 1024u64 << u32_at(0x18).min(16);
    blocks * block_size
}

/// Grows a mounted ext4 filesystem to fill its partition with the image's
/// resize2fs (online: the kernel does it, no fsck, /var stays in use).
/// Returns what was done, or None when it already fills the partition.
fn grow_ext4_online(dev: &Path) -> Result<Option<String>, DiskError> {
    let grow = |m: String| DiskError::Grow(dev.to_owned(), m);
    let part_size = File::open(dev)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| DiskError::Io(dev.to_owned(), e))?;
    let fs_size = ext4_size(dev)?;
    // Less than 64 MiB of slack is not worth a resize (and block-size
    // rounding always leaves a little).
    if part_size <= fs_size + (64 << 20) {
        return Ok(None);
    }
    let resize2fs = crate::paths::find_binary(None, "resize2fs").ok_or_else(|| {
        grow(
            "no resize2fs in this image (add usr/sbin/resize2fs to the image profile's paths)"
                .into(),
        )
    })?;
    let out = std::process::Command::new(resize2fs)
        .arg(dev)
        .output()
        .map_err(|e| grow(format!("resize2fs: {e}")))?;
    if !out.status.success() {
        return Err(grow(format!(
            "resize2fs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Ok(Some(format!(
        "ext4 resized from {:.1} to {:.1} GiB",
        gib(fs_size),
        gib(ext4_size(dev)?)
    )))
}

/// The STATE and EPHEMERAL steps of a node's boot. Returns one line per
/// partition for the console and timeline, and the errors to report. A
/// partition that is missing or fails gets a tmpfs in its place: the root
/// is read-only, and a node running from RAM stays reachable (maintenance
/// mode, `osctl`) where one without a writable /var would not start.
pub fn prepare(root: &Path) -> (Vec<String>, Vec<DiskError>) {
    let sys_block = Path::new("/sys/class/block");
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for (label, target, grow) in [
        (
            machine_api::layout::STATE_PARTITION,
            root.join("system/state"),
            false,
        ),
        (
            machine_api::layout::EPHEMERAL_PARTITION,
            root.join("var"),
            true,
        ),
    ] {
        let outcome = match find(sys_block, label) {
            None => Err(None),
            Some(p) => prepare_one(&p, label, &target, grow).map_err(Some),
        };
        match outcome {
            Ok(line) => {
                info!("{line}");
                done.push(line);
            }
            Err(e) => {
                let why = match &e {
                    None => "no partition with that name".to_owned(),
                    Some(e) => e.to_string(),
                };
                let line = format!(
                    "{label}: {why}; {} is in RAM and does not survive a reboot",
                    target.display()
                );
                warn!("{line}");
                done.push(line);
                if let Some(e) = e {
                    errors.push(e);
                }
                if !is_mounted(&target) {
                    let _ = std::fs::create_dir_all(&target);
                    if let Err(e) = mount(
                        Some("tmpfs"),
                        &target,
                        Some("tmpfs"),
                        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                        Some("mode=0755"),
                    ) {
                        errors.push(DiskError::Mount("tmpfs".into(), target.clone(), e));
                    }
                }
            }
        }
    }
    (done, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_partition_by_name_in_a_sysfs_tree() {
        let t = tempfile::tempdir().unwrap();
        let devices = t.path().join("devices/virtual/block/vda");
        for (n, name) in [(4u32, "STATE"), (5, "EPHEMERAL")] {
            let d = devices.join(format!("vda{n}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("uevent"),
                format!("MAJOR=254\nMINOR={n}\nDEVNAME=vda{n}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={name}\n"),
            )
            .unwrap();
        }
        let class = t.path().join("class/block");
        std::fs::create_dir_all(&class).unwrap();
        for n in [4, 5] {
            std::os::unix::fs::symlink(
                devices.join(format!("vda{n}")),
                class.join(format!("vda{n}")),
            )
            .unwrap();
        }
        let p = find(&class, "EPHEMERAL").unwrap();
        assert_eq!(p.dev, Path::new("/dev/vda5"));
        assert_eq!(p.disk, Path::new("/dev/vda"));
        assert_eq!(p.number, 5);
        assert!(find(&class, "B").is_none());
    }

    #[test]
    fn ext4_magic_is_recognised_in_a_file() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("blank");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        assert!(!has_ext4(&f).unwrap());
        let mut data = vec![0u8; 4096];
        data[1080] = 0x53;
        data[1081] = 0xEF;
        std::fs::write(&f, data).unwrap();
        assert!(has_ext4(&f).unwrap());
    }

    #[test]
    fn ext4_size_reads_block_count_and_size_from_the_superblock() {
        let mut sb = [0u8; 1024];
        sb[0x04..0x08].copy_from_slice(&262_144u32.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes()); // 4096-byte blocks
        assert_eq!(ext4_size_from_superblock(&sb), 1 << 30);
        // The high half counts only with the 64bit feature.
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(ext4_size_from_superblock(&sb), 1 << 30);
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(
            ext4_size_from_superblock(&sb),
            (1 << 30) + (1u64 << 32) * 4096
        );
    }

    #[test]
    fn ext4_size_matches_what_mke2fs_made() {
        let Some(mke2fs) = crate::paths::find_binary(None, "mke2fs") else {
            machine_api::skip_test!("no mke2fs on this host (apt-get install e2fsprogs)");
        };
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let ok = std::process::Command::new(mke2fs)
            .args(["-t", "ext4", "-F", "-q", "-b", "4096"])
            .arg(&img)
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(ext4_size(&img).unwrap(), 64 << 20);
    }
}
