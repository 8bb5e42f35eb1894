//! The same commit, checked out in two different directories (as two
//! people's homes would hold it), gives byte-identical images: imager in
//! the first checkout builds machined, init and pause itself (paths
//! remapped) and the image; `imager verify --rebuild` in the second
//! rebuilds everything from that manifest and must report every output
//! identical: kernel, initramfs, boot initramfs, root squashfs, the disk
//! (and so its ESP), the tree listing and the SBOM.
//!
//! Each checkout compiles our binaries from scratch in release mode (a
//! few minutes on 2 cores), so this is one test doing both builds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use machine_api::testing::skip;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Runs imager in `dir`; (success, stdout + stderr).
fn imager_in(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imager"))
        .args(args)
        .current_dir(dir)
        // Each checkout builds into its own target directory.
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn output_sha(manifest: &Path, kind: &str) -> String {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} output"))["sha256"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn two_checkouts_in_different_directories_build_the_same_image() {
    let ws = root().canonicalize().unwrap();
    let Some(head) = git(&ws, &["rev-parse", "HEAD"]) else {
        skip("the workspace is not a git checkout");
        return;
    };
    if git(&ws, &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
        eprintln!("note: the work tree has uncommitted changes; the checkouts build HEAD {head}");
    }
    let tmp = tempfile::tempdir().unwrap();
    // Different depths and names, so no path is a prefix-length accident.
    let a = tmp.path().join("alice/src/node-os");
    let b = tmp.path().join("home-of-bob/w/os");
    for d in [&a, &b] {
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
        let ok = Command::new("git")
            .args(["clone", "--quiet", "--shared"])
            .arg(&ws)
            .arg(d)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git clone into {}", d.display());
    }
    let out_a = tmp.path().join("out-a");
    let (ok, text) = imager_in(
        &a,
        &[
            "build",
            "profiles/qemu.yaml",
            "-o",
            out_a.to_str().unwrap(),
            "--no-kubernetes",
        ],
    );
    if !ok && (text.contains("cannot fetch") || text.contains("connect")) {
        skip(format!("the package mirror is unreachable: {text}"));
        return;
    }
    assert!(ok, "build in {}:\n{text}", a.display());
    let manifest_a = out_a.join("manifest.json");
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_a).unwrap()).unwrap();
    assert_eq!(recorded["ourBuild"]["builtBy"], "workspace");
    assert_eq!(recorded["ourBuild"]["commit"], head.as_str());
    assert!(recorded["ourBuild"]["rustc"]
        .as_str()
        .is_some_and(|r| r.starts_with("rustc ")));

    // Nothing of the first checkout's location is in its binaries.
    let machined = std::fs::read(a.join("target/image/release/machined")).unwrap();
    for needle in [a.to_str().unwrap(), tmp.path().to_str().unwrap()] {
        assert!(
            !machined
                .windows(needle.len())
                .any(|w| w == needle.as_bytes()),
            "machined embeds {needle}"
        );
    }

    let out_b = tmp.path().join("out-b");
    let (ok, text) = imager_in(
        &b,
        &[
            "verify",
            manifest_a.to_str().unwrap(),
            "--rebuild",
            "-o",
            out_b.to_str().unwrap(),
        ],
    );
    assert!(ok, "verify --rebuild in {}:\n{text}", b.display());
    assert!(text.contains("reproduced: all"), "{text}");
    let manifest_b = out_b.join("manifest.json");
    for kind in [
        "kernel",
        "initramfs",
        "boot-initrd",
        "root",
        "disk",
        "tree",
        "sbom",
    ] {
        assert_eq!(
            output_sha(&manifest_a, kind),
            output_sha(&manifest_b, kind),
            "{kind} differs between the checkouts"
        );
    }
    eprintln!("{text}");
}
