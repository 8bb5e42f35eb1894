//! Marks this boot's systemd-boot entry good. The imager installs slot A's
//! entry with a boot counter (`slot-a+3.conf`): systemd-boot counts it down
//! on each try (`slot-a+2-1.conf`, ...) and prefers other entries once it
//! reaches +0. Once machined serves its API, the image has booted far
//! enough to be managed (config problems are handled by rollback, not by
//! falling back to another slot), so the counter is removed by renaming the
//! entry to `slot-a.conf`, as the Boot Loader Specification describes.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Errors while marking the entry.
#[derive(Debug, thiserror::Error)]
pub enum BootEntryError {
    #[error("no partition named EFI")]
    NoEsp,
    #[error("mounting the ESP ({0}): {1}")]
    Mount(PathBuf, nix::errno::Errno),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// The entry file name without its counter: `slot-a+2-1.conf` -> `slot-a.conf`.
pub fn without_counter(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".conf")?;
    let (base, counter) = stem.rsplit_once('+')?;
    let valid = counter
        .split('-')
        .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    (valid && counter.split('-').count() <= 2).then(|| format!("{base}.conf"))
}

/// Renames counted entries of `slot` in an ESP tree; returns what was done.
pub fn mark_in(esp: &Path, slot: &str) -> Result<String, BootEntryError> {
    let dir = esp.join("loader/entries");
    let prefix = format!("slot-{}", slot.to_lowercase());
    let entries = std::fs::read_dir(&dir).map_err(|e| BootEntryError::Io(dir.clone(), e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{prefix}+")) {
            continue;
        }
        if let Some(good) = without_counter(&name) {
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
    let slot = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("slot="))?
        .to_owned();
    Some((|| {
        let part = crate::disks::find(Path::new("/sys/class/block"), "EFI")
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
        let r = mark_in(&target, &slot);
        nix::unistd::sync();
        let _ = umount2(&target, MntFlags::empty());
        r
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_recognised() {
        assert_eq!(
            without_counter("slot-a+3.conf").as_deref(),
            Some("slot-a.conf")
        );
        assert_eq!(
            without_counter("slot-a+2-1.conf").as_deref(),
            Some("slot-a.conf")
        );
        assert_eq!(
            without_counter("slot-a+0-3.conf").as_deref(),
            Some("slot-a.conf")
        );
        assert_eq!(without_counter("slot-a.conf"), None);
        assert_eq!(without_counter("slot-a+x.conf"), None);
    }

    #[test]
    fn marking_renames_only_this_slots_counted_entry() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("loader/entries");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("slot-a+2-1.conf"), "title A").unwrap();
        std::fs::write(d.join("slot-b+3.conf"), "title B").unwrap();
        let msg = mark_in(t.path(), "A").unwrap();
        assert!(msg.contains("marked good"), "{msg}");
        assert!(d.join("slot-a.conf").exists());
        assert!(d.join("slot-b+3.conf").exists());
        assert!(mark_in(t.path(), "A").unwrap().contains("already good"));
    }
}
