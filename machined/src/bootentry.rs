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

/// On a disk boot (`slot=` on the kernel command line): mounts the ESP,
/// marks the entry and unmounts. None when not booted from a slot.
pub fn mark_good(cmdline: &str) -> Option<Result<String, BootEntryError>> {
    let slot = Slot::parse(crate::cmdline::Cmdline::parse(cmdline).get(layout::SLOT_PARAM)?)?;
    Some((|| {
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
        let r = mark_in(&target, slot);
        nix::unistd::sync();
        let _ = umount2(&target, MntFlags::empty());
        r
    })())
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

    #[test]
    fn only_a_known_slot_on_the_command_line_is_a_disk_boot() {
        assert!(mark_good("console=ttyS0 quiet").is_none());
        assert!(mark_good("console=ttyS0 slot=C").is_none());
    }
}
