//! The ELF closure: every executable and library in the image must find
//! the libraries it needs in the image. Missing ones are copied from the
//! unpacked packages; if no package has one, the build fails naming the
//! binary, the library and the package that would provide it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use goblin::elf::Elf;

use super::AssembleError;
use crate::tree::{Entry, Tree};

/// Where the dynamic linker looks on x86-64 Debian (usr merged).
const LIB_DIRS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "usr/lib",
    "usr/lib64",
    "lib/x86_64-linux-gnu",
    "lib",
    "lib64",
];

/// What one ELF file needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub interpreter: Option<String>,
    pub libraries: Vec<String>,
}

/// Reads DT_NEEDED and PT_INTERP; None for non-ELF data.
pub fn needs(data: &[u8]) -> Option<Needs> {
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        return None;
    }
    let elf = Elf::parse(data).ok()?;
    Some(Needs {
        interpreter: elf.interpreter.map(str::to_owned),
        libraries: elf.libraries.iter().map(|s| s.to_string()).collect(),
    })
}

/// Debian names library packages after the soname: libseccomp.so.2 is in
/// libseccomp2, libc.so.6 in libc6, libgcc_s.so.1 in libgcc-s1.
pub fn package_for_soname(soname: &str) -> String {
    let (base, ver) = match soname.split_once(".so.") {
        Some((b, v)) => (b, v.split('.').next().unwrap_or(v)),
        None => (soname.trim_end_matches(".so"), ""),
    };
    let base = base.replace('_', "-").to_lowercase();
    if ver.is_empty() {
        return base;
    }
    if base.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{base}-{ver}")
    } else {
        format!("{base}{ver}")
    }
}

/// Finds `name` in the library directories of `tree`; returns the path as
/// named (may be a symlink) and the resolved file.
fn find_lib(tree: &Tree, name: &str) -> Option<(PathBuf, PathBuf)> {
    LIB_DIRS.iter().find_map(|d| {
        let p = Path::new(d).join(name);
        let real = tree.resolve(&p)?;
        matches!(tree.get(&real), Some(Entry::File { .. })).then_some((p, real))
    })
}

/// Copies `path` from staging into the image, with every symlink on the
/// way, so the name the linker asks for resolves in the image too.
fn copy_with_links(image: &mut Tree, staging: &Tree, path: &Path) -> Result<(), AssembleError> {
    let mut cur = crate::tree::normalize(path).map_err(AssembleError::Tree)?;
    for _ in 0..40 {
        // Parent symlinks (lib -> usr/lib) are part of the base layout.
        let real_parent = cur
            .parent()
            .and_then(|p| staging.resolve(p).or_else(|| Some(p.to_path_buf())))
            .unwrap_or_default();
        let here = real_parent.join(cur.file_name().unwrap_or_default());
        match staging.get(&here) {
            Some(Entry::Symlink { target }) => {
                if image.get(&here).is_none() {
                    image.insert(
                        &here,
                        Entry::Symlink {
                            target: target.clone(),
                        },
                    )?;
                }
                cur = if target.is_absolute() {
                    target.clone()
                } else {
                    real_parent.join(target)
                };
            }
            Some(e @ Entry::File { .. }) => {
                if image.get(&here).is_none() {
                    image.insert(&here, e.clone())?;
                }
                return Ok(());
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// Closes the image over its ELF dependencies, taking libraries from
/// `staging`. Returns the libraries it added.
pub fn close(image: &mut Tree, staging: &Tree) -> Result<Vec<String>, AssembleError> {
    let mut added = Vec::new();
    let mut checked: BTreeSet<PathBuf> = BTreeSet::new();
    loop {
        let pending: Vec<(PathBuf, Needs)> = image
            .iter()
            .filter(|(p, _)| !checked.contains(*p))
            .filter_map(|(p, e)| match e {
                Entry::File { data, .. } => needs(data).map(|n| (p.to_path_buf(), n)),
                _ => None,
            })
            .collect();
        let mut missing = Vec::new();
        for (path, n) in &pending {
            checked.insert(path.clone());
            if let Some(interp) = &n.interpreter {
                if image.resolve(Path::new(interp)).is_none() {
                    if staging.resolve(Path::new(interp)).is_some() {
                        copy_with_links(image, staging, Path::new(interp))?;
                        added.push(interp.clone());
                    } else {
                        missing.push(format!(
                            "{} needs its interpreter {interp}, which no unpacked package provides: add libc6 to packages",
                            path.display()
                        ));
                    }
                }
            }
            for lib in &n.libraries {
                if find_lib(image, lib).is_some() {
                    continue;
                }
                match find_lib(staging, lib) {
                    Some((named, _)) => {
                        copy_with_links(image, staging, &named)?;
                        added.push(lib.clone());
                    }
                    None => missing.push(format!(
                        "{} needs {lib}, which no unpacked package provides: add {} to packages",
                        path.display(),
                        package_for_soname(lib)
                    )),
                }
            }
        }
        if !missing.is_empty() {
            missing.sort();
            missing.dedup();
            return Err(AssembleError::Elf(format!(
                "the image is not self-contained:\n  {}",
                missing.join("\n  ")
            )));
        }
        if pending.is_empty() {
            break;
        }
    }
    added.sort();
    added.dedup();
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soname_to_package() {
        assert_eq!(package_for_soname("libseccomp.so.2"), "libseccomp2");
        assert_eq!(package_for_soname("libc.so.6"), "libc6");
        assert_eq!(package_for_soname("libgcc_s.so.1"), "libgcc-s1");
        assert_eq!(package_for_soname("libssl.so.3"), "libssl3");
        assert_eq!(package_for_soname("libnss3.so"), "libnss3");
    }

    #[test]
    fn closure_over_real_binaries_of_this_host() {
        // The test binary itself is an ELF that needs libc: build a staging
        // tree from the host's own libraries and check the closure.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let n = needs(&exe).unwrap();
        assert!(
            n.libraries.iter().any(|l| l.starts_with("libc.so")),
            "{n:?}"
        );
        let mut staging = Tree::new();
        for lib in &n.libraries {
            let host = Path::new("/usr/lib/x86_64-linux-gnu").join(lib);
            let host = std::fs::canonicalize(&host).unwrap();
            staging
                .insert(
                    &Path::new("usr/lib/x86_64-linux-gnu").join(lib),
                    Entry::file(0o644, std::fs::read(&host).unwrap()),
                )
                .unwrap();
        }
        let interp = n.interpreter.clone().unwrap();
        staging
            .insert(
                Path::new(&interp),
                Entry::file(
                    0o755,
                    std::fs::read(std::fs::canonicalize(&interp).unwrap()).unwrap(),
                ),
            )
            .unwrap();
        let mut image = Tree::new();
        image
            .insert(Path::new("usr/bin/app"), Entry::file(0o755, exe))
            .unwrap();
        let added = close(&mut image, &staging).unwrap();
        assert!(added.iter().any(|l| l.starts_with("libc.so")), "{added:?}");

        // Without libc in staging, the error names binary, library and package.
        let mut image2 = Tree::new();
        image2
            .insert(
                Path::new("usr/bin/app"),
                image.get(Path::new("usr/bin/app")).unwrap().clone(),
            )
            .unwrap();
        let err = close(&mut image2, &Tree::new()).unwrap_err().to_string();
        assert!(
            err.contains("usr/bin/app needs libc.so.6") && err.contains("add libc6"),
            "{err}"
        );
    }
}
