//! Marks this boot's systemd-boot entry good. The imager installs slot A's
//! entry with a boot counter (`slot-a+3.conf`): systemd-boot counts it down
//! on each try (`slot-a+2-1.conf`, ...) and prefers other entries once it
//! reaches +0. Once machined serves its API, the image has booted far
//! enough to be managed (config problems are handled by rollback, not by
//! falling back to another slot), so the counter is removed by renaming the
//! entry to `slot-a.conf`, as the Boot Loader Specification describes.
//! Entry names, the ESP's partition name and `slot=` are the image layout
//! contract's ([`machine_api::layout`]).

use std::path::{Path, PathBuf};

use machine_api::layout::{self, Slot};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Errors while marking the entry.
#[derive(Debug, thiserror::Error)]
pub enum BootEntryError {
    #[error("no partition named {}", layout::ESP_PARTITION)]
    NoEsp,
    #[error("mounting the ESP ({0}): {1}")]
    Mount(PathBuf, nix::errno::Errno),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Refused(String),
}

/// Renames counted entries of `slot` in an ESP tree; returns what was done.
pub fn mark_in(esp: &Path, slot: Slot) -> Result<String, BootEntryError> {
    let dir = esp.join(layout::ENTRIES_DIR);
    let entries = std::fs::read_dir(&dir).map_err(|e| BootEntryError::Io(dir.clone(), e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !slot.is_counted_entry(&name) {
            continue;
        }
        if let Some(good) = layout::entry_without_counter(&name) {
            let to = dir.join(&good);
            std::fs::rename(e.path(), &to).map_err(|err| BootEntryError::Io(to.clone(), err))?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            return Ok(format!("boot entry {name} marked good ({good})"));
        }
    }
    Ok(format!("boot entry of slot {slot} already good"))
}

/// The slot a disk boot runs (`slot=` on the kernel command line).
pub fn running_slot(cmdline: &str) -> Option<Slot> {
    Slot::parse(crate::cmdline::Cmdline::parse(cmdline).get(layout::SLOT_PARAM)?)
}

/// Serializes this process's mounts of the ESP (marking, listing,
/// rollback, upgrade): each mounts it, works, syncs and unmounts.
static ESP_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Mounts the ESP at `/run/machined/esp`, runs `f` on it, syncs and
/// unmounts.
pub fn with_esp<T>(
    f: impl FnOnce(&Path) -> Result<T, BootEntryError>,
) -> Result<T, BootEntryError> {
    let _held = ESP_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let part = crate::disks::find(Path::new("/sys/class/block"), layout::ESP_PARTITION)
        .ok_or(BootEntryError::NoEsp)?;
    let target = PathBuf::from("/run/machined/esp");
    std::fs::create_dir_all(&target).map_err(|e| BootEntryError::Io(target.clone(), e))?;
    mount(
        Some(&part.dev),
        &target,
        Some("vfat"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| BootEntryError::Mount(part.dev.clone(), e))?;
    let r = f(&target);
    nix::unistd::sync();
    let _ = umount2(&target, MntFlags::empty());
    r
}

/// On a disk boot (`slot=` on the kernel command line): mounts the ESP,
/// marks the entry and unmounts. None when not booted from a slot.
pub fn mark_good(cmdline: &str) -> Option<Result<String, BootEntryError>> {
    let slot = running_slot(cmdline)?;
    Some(with_esp(|esp| mark_in(esp, slot)))
}

/// This boot's entry (the slot's: a slot has one) and whether it still
/// counts tries (a first boot, or the first boots of an upgrade; `+0`
/// too: systemd-boot renames the entry before it boots it, so the last
/// try runs as `+0`). None when the slot has no entry.
pub fn this_boot_entry(esp: &Path, slot: Slot) -> Option<(layout::UpgradeEntry, bool)> {
    entries_in(esp)
        .ok()?
        .into_iter()
        .find(|e| e.parsed.slot == slot)
        .map(|e| (e.parsed, e.tries_left.is_some()))
}

/// Whether giving up this boot makes sense: its entry still counts tries
/// and the other slot has an entry that boots (good or with tries left).
/// Without one, a reboot would only start the same system again.
pub fn trial_with_fallback(esp: &Path, slot: Slot) -> bool {
    let counted = matches!(this_boot_entry(esp, slot), Some((_, true)));
    counted
        && entries_in(esp).is_ok_and(|all| {
            all.iter()
                .any(|e| e.parsed.slot == slot.other() && e.tries_left != Some(0))
        })
}

/// One boot entry on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    pub file: String,
    pub parsed: layout::UpgradeEntry,
    /// None: marked good (no counter).
    pub tries_left: Option<u32>,
    /// The entry's `version` line.
    pub version: String,
}

impl EntryView {
    pub fn state(&self) -> String {
        match self.tries_left {
            None => "good".into(),
            Some(0) => "failed (no tries left)".into(),
            Some(n) => format!("trying ({n} tries left)"),
        }
    }
}

/// Our entries in an ESP tree, in the order systemd-boot tries them:
/// entries with tries left (or none counted) first, newest generation
/// first ([`layout::UpgradeEntry`] explains why that is its order).
pub fn entries_in(esp: &Path) -> Result<Vec<EntryView>, BootEntryError> {
    let dir = esp.join(layout::ENTRIES_DIR);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir)
        .map_err(|e| BootEntryError::Io(dir.clone(), e))?
        .flatten()
    {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(parsed) = layout::UpgradeEntry::parse(&file) else {
            continue;
        };
        let tries_left = file
            .strip_suffix(".conf")
            .and_then(|s| s.split_once('+'))
            .and_then(|(_, c)| c.split('-').next()?.parse().ok());
        let version = std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("version "))
            .unwrap_or("")
            .trim()
            .to_owned();
        out.push(EntryView {
            file,
            parsed,
            tries_left,
            version,
        });
    }
    out.sort_by_key(|e| {
        (
            e.tries_left == Some(0),
            std::cmp::Reverse(e.parsed.generation),
        )
    });
    Ok(out)
}

/// `osctl rollback`: makes the other slot's entry the newest, so the next
/// boot starts it. Refused when the other slot has no entry, or its tries
/// ran out (it failed to boot). Returns what was done.
pub fn rollback_in(esp: &Path, running: Slot) -> Result<String, BootEntryError> {
    let entries = entries_in(esp)?;
    let other = running.other();
    let Some(target) = entries.iter().find(|e| e.parsed.slot == other) else {
        return Err(BootEntryError::Refused(format!(
            "slot {other} has no boot entry: there is nothing to roll back to"
        )));
    };
    if target.tries_left == Some(0) {
        return Err(BootEntryError::Refused(format!(
            "slot {other} failed to boot ({}: no tries left): not a rollback target",
            target.file
        )));
    }
    let names: Vec<&str> = entries.iter().map(|e| e.file.as_str()).collect();
    let newest = layout::UpgradeEntry {
        generation: layout::UpgradeEntry::next_generation(&names),
        slot: other,
    };
    // It booted before: it keeps its state (good, or its tries left).
    let name = match target.tries_left {
        None => format!("{}.conf", newest.stem()),
        Some(n) => newest.counted(n),
    };
    let dir = esp.join(layout::ENTRIES_DIR);
    std::fs::rename(dir.join(&target.file), dir.join(&name))
        .map_err(|e| BootEntryError::Io(dir.join(&name), e))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(format!(
        "slot {other} ({}, version {}) is the default again: {} -> {name}",
        target.state(),
        target.version,
        target.file
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marking_renames_only_this_slots_counted_entry() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("loader/entries");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("slot-a+2-1.conf"), "title A").unwrap();
        std::fs::write(d.join("slot-b+3.conf"), "title B").unwrap();
        let msg = mark_in(t.path(), Slot::A).unwrap();
        assert!(msg.contains("marked good"), "{msg}");
        assert!(d.join("slot-a.conf").exists());
        assert!(d.join("slot-b+3.conf").exists());
        assert!(mark_in(t.path(), Slot::A).unwrap().contains("already good"));
    }

    fn esp(files: &[(&str, &str)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("loader/entries");
        std::fs::create_dir_all(&d).unwrap();
        for (name, version) in files {
            std::fs::write(d.join(name), format!("title x\nversion {version}\n")).unwrap();
        }
        t
    }

    fn names(t: &Path) -> Vec<String> {
        entries_in(t).unwrap().into_iter().map(|e| e.file).collect()
    }

    /// The order is systemd-boot's for our names: entries whose tries ran
    /// out last, then the newest generation first.
    #[test]
    fn entries_list_in_boot_order_with_their_state() {
        let t = esp(&[("slot-a.conf", "1"), ("slot-1-b+2-1.conf", "2")]);
        let e = entries_in(t.path()).unwrap();
        assert_eq!(names(t.path()), ["slot-1-b+2-1.conf", "slot-a.conf"]);
        assert_eq!(e[0].state(), "trying (2 tries left)");
        assert_eq!(
            (e[1].state().as_str(), e[1].version.as_str()),
            ("good", "1")
        );
        let t = esp(&[("slot-a.conf", "1"), ("slot-1-b+0-3.conf", "2")]);
        assert_eq!(names(t.path()), ["slot-a.conf", "slot-1-b+0-3.conf"]);
        assert_eq!(
            entries_in(t.path()).unwrap()[1].state(),
            "failed (no tries left)"
        );
        // The last try runs as +0: still a counted (trial) boot.
        assert_eq!(
            this_boot_entry(t.path(), Slot::B).map(|(e, c)| (e.generation, c)),
            Some((1, true))
        );
        assert_eq!(
            this_boot_entry(t.path(), Slot::A).map(|(e, c)| (e.generation, c)),
            Some((0, false))
        );
        assert!(trial_with_fallback(t.path(), Slot::B));
        assert!(!trial_with_fallback(t.path(), Slot::A));
        // A fresh disk's only entry: nothing to fall back to.
        let t = esp(&[("slot-a+1-2.conf", "1")]);
        assert!(!trial_with_fallback(t.path(), Slot::A));
    }

    #[test]
    fn rollback_makes_the_other_slot_newest_and_refuses_a_failed_one() {
        let t = esp(&[("slot-a.conf", "1"), ("slot-1-b.conf", "2")]);
        let msg = rollback_in(t.path(), Slot::B).unwrap();
        assert!(msg.contains("slot A"), "{msg}");
        assert_eq!(names(t.path()), ["slot-2-a.conf", "slot-1-b.conf"]);
        // And forward again.
        rollback_in(t.path(), Slot::A).unwrap();
        assert_eq!(names(t.path()), ["slot-3-b.conf", "slot-2-a.conf"]);
        let t = esp(&[("slot-a.conf", "1"), ("slot-1-b+0-3.conf", "2")]);
        let e = rollback_in(t.path(), Slot::A).unwrap_err().to_string();
        assert!(e.contains("failed to boot"), "{e}");
        let t = esp(&[("slot-a.conf", "1")]);
        let e = rollback_in(t.path(), Slot::A).unwrap_err().to_string();
        assert!(e.contains("no boot entry"), "{e}");
    }

    #[test]
    fn only_a_known_slot_on_the_command_line_is_a_disk_boot() {
        assert!(mark_good("console=ttyS0 quiet").is_none());
        assert!(mark_good("console=ttyS0 slot=C").is_none());
    }
}
