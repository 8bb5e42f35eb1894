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
    // Defaults baked into the image; writing them from the machine config
    // at boot is the boot work's job (not built yet).
    tree.insert(
        Path::new("etc/hosts"),
        Entry::file(0o644, b"127.0.0.1 localhost\n::1 localhost\n".to_vec()),
    )?;
    tree.insert(Path::new("etc/resolv.conf"), Entry::file(0o644, Vec::new()))?;
    tree.insert(
        Path::new("etc/hostname"),
        Entry::file(0o644, b"node\n".to_vec()),
    )?;
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
