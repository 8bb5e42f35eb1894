//! Our binaries for the image (machined, init, pause), built from the
//! workspace so that the image does not depend on where it was built.
//!
//! A Rust binary records source paths: panic locations of every crate
//! (`$CARGO_HOME/registry/src/<registry>/tokio-1.x/...`), the generated
//! protobuf code under the target directory's `OUT_DIR`, and the toolchain's
//! sysroot. Two people building the same commit in different homes would
//! get different bytes, so nobody could reproduce our image. Each of those
//! prefixes is remapped to a fixed name with rustc's `--remap-path-prefix`
//! (cargo's `trim-paths` would do it too, but it is not stable in the
//! toolchain we pin). The build goes to its own target directory
//! (`target/image`), so these flags do not throw away the ordinary
//! release build's cache, and it replaces any RUSTFLAGS of the caller:
//! flags that change code would change the image.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build::OursProvenance;

/// What the image builder got.
#[derive(Debug, Clone)]
pub struct Built {
    pub machined: PathBuf,
    pub init: PathBuf,
    pub pause: PathBuf,
    /// `rustc -vV` of the toolchain that built them, first line and
    /// commit-hash line.
    pub rustc: String,
}

/// The workspace root when `dir` (or one of its parents) is our workspace.
pub fn workspace_root(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|d| d.join("Cargo.toml").is_file() && d.join("machined/Cargo.toml").is_file())
        .map(Path::to_path_buf)
}

/// The fixed names the build-specific prefixes are remapped to.
const WORKSPACE_AS: &str = "/node-os";
const TARGET_AS: &str = "/node-os/target";
const CRATES_AS: &str = "/cargo/registry/src/crates";
const CARGO_HOME_AS: &str = "/cargo";
const SYSROOT_AS: &str = "/rust/toolchain";

/// `$CARGO_HOME`, else `~/.cargo` (cargo's own rule).
fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

/// The `--remap-path-prefix` flags, most general first: rustc applies the
/// last mapping that matches, so the more specific ones come after.
pub fn remap_flags(workspace: &Path, target: &Path, sysroot: Option<&Path>) -> Vec<String> {
    let mut flags = Vec::new();
    let mut remap = |from: &Path, to: &str| {
        flags.push(format!("--remap-path-prefix={}={to}", from.display()));
    };
    if let Some(s) = sysroot {
        remap(s, SYSROOT_AS);
    }
    if let Some(home) = cargo_home() {
        remap(&home, CARGO_HOME_AS);
        // The registry's directory is named after the registry or the
        // mirror that replaces it (`<name>-<hash>`): one fixed name for
        // every one of them, so a mirror does not change the image.
        let src = home.join("registry/src");
        if let Ok(entries) = std::fs::read_dir(&src) {
            let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            dirs.sort();
            for d in dirs {
                remap(&d, CRATES_AS);
            }
        }
    }
    remap(workspace, WORKSPACE_AS);
    remap(target, TARGET_AS);
    flags
}

fn rustc_version(workspace: &Path) -> String {
    Command::new("rustc")
        .arg("-vV")
        .current_dir(workspace)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let first = text.lines().next().unwrap_or("").to_owned();
            match text.lines().find_map(|l| l.strip_prefix("commit-hash: ")) {
                Some(h) => format!("{first}; commit-hash {h}"),
                None => first,
            }
        })
        .unwrap_or_else(|| "unknown (rustc -vV failed)".to_owned())
}

fn sysroot(workspace: &Path) -> Option<PathBuf> {
    Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(workspace)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

/// Builds machined, init and pause (release, `--locked`) in `workspace`
/// with every build-specific path remapped. A warm build takes about a
/// second (cargo finds nothing to do).
pub fn build(workspace: &Path, quiet: bool) -> Result<Built> {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| {
            if d.is_absolute() {
                d
            } else {
                workspace.join(d)
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    let target = base.join("image");
    let flags = remap_flags(workspace, &target, sysroot(workspace).as_deref());
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace)
        .args(["build", "--release", "--locked", "-p", "machined", "--bins"])
        .arg("--target-dir")
        .arg(&target)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\u{1f}"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    if quiet {
        cmd.arg("--quiet");
    }
    let status = cmd
        .status()
        .with_context(|| format!("running cargo in {}", workspace.display()))?;
    if !status.success() {
        bail!(
            "building our binaries failed (cargo build --release -p machined --bins in {}, {status}); fix the build, or give --machined, --init and --pause",
            workspace.display()
        );
    }
    let release = target.join("release");
    Ok(Built {
        machined: release.join("machined"),
        init: release.join("init"),
        pause: release.join("pause"),
        rustc: rustc_version(workspace),
    })
}

/// machined, init and pause: the given files; else, inside the workspace,
/// built now from it with every build path remapped
/// ([`imager::our_binaries`]); else the ones beside this imager.
pub fn resolve(
    machined: Option<PathBuf>,
    init: Option<PathBuf>,
    pause: Option<PathBuf>,
    quiet: bool,
) -> Result<(PathBuf, PathBuf, PathBuf, OursProvenance)> {
    if let (Some(m), Some(i), Some(p)) = (&machined, &init, &pause) {
        let given = OursProvenance {
            built_by: "given".into(),
            ..Default::default()
        };
        return Ok((m.clone(), i.clone(), p.clone(), given));
    }
    let cwd = std::env::current_dir()?;
    if let Some(ws) = workspace_root(&cwd) {
        if !quiet {
            eprintln!(
                "building machined, init and pause from {} (release, paths remapped)",
                ws.display()
            );
        }
        let b = build(&ws, quiet)?;
        let prov = OursProvenance {
            built_by: "workspace".into(),
            rustc: Some(b.rustc),
            commit: git_commit(&ws),
        };
        return Ok((
            machined.unwrap_or(b.machined),
            init.unwrap_or(b.init),
            pause.unwrap_or(b.pause),
            prov,
        ));
    }
    let beside = |name: &str| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join(name)))
            .unwrap_or_else(|| PathBuf::from(name))
    };
    let given = OursProvenance {
        built_by: "given".into(),
        ..Default::default()
    };
    Ok((
        machined.unwrap_or_else(|| beside("machined")),
        init.unwrap_or_else(|| beside("init")),
        pause.unwrap_or_else(|| beside("pause")),
        given,
    ))
}

/// The workspace's git commit, `-dirty` when the work tree has changes;
/// None outside git.
pub fn git_commit(workspace: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}-dirty") } else { head })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specific_prefixes_come_after_general_ones() {
        let f = remap_flags(
            Path::new("/home/a/src/node-os"),
            Path::new("/home/a/src/node-os/target/image"),
            Some(Path::new("/home/a/.rustup/toolchains/x")),
        );
        let pos = |s: &str| f.iter().position(|x| x.contains(s)).unwrap();
        assert!(pos("=/rust/toolchain") < pos("=/node-os"));
        assert!(pos("src/node-os=/node-os") < pos("=/node-os/target"));
        assert!(f.iter().all(|x| x.starts_with("--remap-path-prefix=/")));
    }

    #[test]
    fn the_workspace_is_found_from_inside_it() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = workspace_root(here).unwrap();
        assert!(root.join("machined/Cargo.toml").is_file());
        assert_eq!(workspace_root(Path::new("/")), None);
    }
}
