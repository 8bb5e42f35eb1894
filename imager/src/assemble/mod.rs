//! From unpacked packages to the image tree: path filters, kernel and
//! modules, the ELF closure, our own binaries and the base layout.

pub mod elf;
pub mod modules;

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::profile::Profile;
use crate::tree::{Entry, Tree};

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("bad glob {0:?}: {1}")]
    Glob(String, String),
    #[error("{0}")]
    Tree(#[from] crate::tree::TreeError),
    #[error("no kernel: package {0:?} put no boot/vmlinuz-* in the tree")]
    NoKernel(String),
    #[error("{0}")]
    Modules(String),
    #[error("{0}")]
    Elf(String),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("the image has no /init to put in the disk's initramfs")]
    NoInit,
}

fn globs(list: &[String]) -> Result<GlobSet, AssembleError> {
    let mut b = GlobSetBuilder::new();
    for g in list {
        b.add(Glob::new(g).map_err(|e| AssembleError::Glob(g.clone(), e.to_string()))?);
    }
    b.build()
        .map_err(|e| AssembleError::Glob(list.join(","), e.to_string()))
}

/// Copies the entries of `staging` the profile's filters keep.
pub fn filter(staging: &Tree, profile: &Profile) -> Result<Tree, AssembleError> {
    let include = globs(&profile.paths.include)?;
    let exclude = globs(&profile.paths.exclude)?;
    let mut out = Tree::new();
    for (path, entry) in staging.iter() {
        if matches!(entry, Entry::Dir { .. }) {
            continue; // directories come with what they hold
        }
        if include.is_match(path) && !exclude.is_match(path) {
            out.insert(path, entry.clone())?;
        }
    }
    Ok(out)
}

/// The kernel image and its version, from `boot/vmlinuz-VERSION`.
pub fn kernel(staging: &Tree, profile: &Profile) -> Result<(String, Vec<u8>), AssembleError> {
    staging
        .iter()
        .filter_map(|(p, e)| {
            let name = p.strip_prefix("boot").ok()?.to_str()?;
            let version = name.strip_prefix("vmlinuz-")?;
            match e {
                Entry::File { data, .. } => Some((version.to_owned(), data.as_ref().clone())),
                _ => None,
            }
        })
        .last()
        .ok_or_else(|| AssembleError::NoKernel(profile.kernel.package.clone()))
}

/// The directories and files every image has. usr is merged: /bin, /sbin,
/// /lib and /lib64 point into /usr, as on a current Debian.
pub fn base_layout(tree: &mut Tree, profile: &Profile, version: &str) -> Result<(), AssembleError> {
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "var",
        "etc",
        "system",
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "var/lib",
        "var/log",
        "etc/cni/net.d",
        "opt/cni/bin",
    ] {
        tree.mkdir_all(Path::new(d))?;
    }
    usrmerge_links(tree)?;
    let os_release = format!(
        "NAME=\"Kubernetes node OS\"\nID=knos\nVERSION_ID={version}\nPRETTY_NAME=\"Kubernetes node OS {version} ({})\"\nVARIANT_ID={}\n",
        profile.source.suite, profile.name
    );
    tree.insert(
        Path::new("etc/os-release"),
        Entry::file(0o644, os_release.into_bytes()),
    )?;
    // The root is read-only: machined writes these at boot (from the
    // machine config, DHCP or `ip=`) into /system/etc, a tmpfs.
    for name in ["hosts", "resolv.conf", "hostname"] {
        tree.insert(
            &Path::new("etc").join(name),
            Entry::Symlink {
                target: Path::new("../system/etc").join(name),
            },
        )?;
    }
    tree.insert(
        Path::new("etc/passwd"),
        Entry::file(0o644, b"root:x:0:0:root:/:/usr/sbin/nologin\n".to_vec()),
    )?;
    tree.insert(
        Path::new("etc/group"),
        Entry::file(0o644, b"root:x:0:\n".to_vec()),
    )?;
    tree.insert(
        Path::new("etc/nsswitch.conf"),
        Entry::file(0o644, b"hosts: files dns\n".to_vec()),
    )?;
    Ok(())
}

/// The disk's initramfs: init, the kernel modules and their load list, and
/// the mount points init needs before it switches to slot A.
pub fn boot_initramfs(image: &Tree) -> Result<Tree, AssembleError> {
    let mut boot = Tree::new();
    for d in [
        "dev", "proc", "sys", "run", "tmp", "sysroot", "system", "etc",
    ] {
        boot.mkdir_all(Path::new(d))?;
    }
    usrmerge_links(&mut boot)?;
    for (path, entry) in image.iter() {
        let keep = path == Path::new("init")
            || path == Path::new("etc/modules-load.list")
            || path.starts_with("usr/lib/modules")
            || path.starts_with("lib/modules");
        if keep {
            if let Entry::Dir { .. } = entry {
                boot.mkdir_all(path)?;
            } else {
                boot.insert(path, entry.clone())?;
            }
        }
    }
    if boot.get(Path::new("init")).is_none() {
        return Err(AssembleError::NoInit);
    }
    Ok(boot)
}

/// The merged-/usr links (`lib64 -> usr/lib64`, ...) that base-files
/// provides on an installed system; the ELF interpreter path goes through
/// them.
pub fn usrmerge_links(tree: &mut Tree) -> Result<(), AssembleError> {
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        if tree.get(Path::new(link)).is_none() {
            tree.insert(
                Path::new(link),
                Entry::Symlink {
                    target: target.into(),
                },
            )?;
        }
    }
    Ok(())
}

/// Adds a file from the build host (our binaries).
pub fn add_host_file(
    tree: &mut Tree,
    from: &Path,
    to: &str,
    mode: u32,
) -> Result<(), AssembleError> {
    let data = std::fs::read(from).map_err(|e| AssembleError::Read(from.to_owned(), e))?;
    tree.insert(Path::new(to), Entry::file(mode, data))?;
    Ok(())
}
