//! The container images baked into a node image. No registry is reachable
//! from a node, so every image it needs travels in the root filesystem as
//! an OCI archive ([`crate::oci`]) under [`images::DIR`], with an
//! [`images::INDEX`] that machined reads to import them into containerd.
//! Their names are under `localhost/`: these are our builds, not the
//! upstream registries' bytes.
//!
//! - [`images::PAUSE`]: machined's `pause` program (the pod sandbox) with
//!   its ELF closure from the image's packages;
//! - [`images::BUSYBOX`]: Debian's `busybox-static` and a curated set of
//!   applets, a test workload;
//! - [`images::COREDNS`]: the static `coredns` that came with the
//!   Kubernetes binaries ([`crate::kubernetes`]), when it did.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use machine_api::layout::images::{self, IndexEntry};
use serde::Serialize;

use crate::assemble::{self, elf};
use crate::oci;
use crate::tree::{Entry, Tree};

/// The busybox image's applets (symlinks to `/bin/busybox`).
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "sleep", "wget", "nc", "nslookup", "httpd", "ping", "ip",
    "hostname", "env", "ps", "true", "false", "date", "id", "mkdir", "uname", "grep", "head",
    "tail", "wc", "seq", "sync",
];

/// One baked image, as `manifest.json` records it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestContainerImage {
    #[serde(rename = "ref")]
    pub reference: String,
    /// The archive's path in the image.
    pub file: String,
    /// `sha256:...` of the image manifest.
    pub manifest_digest: String,
    /// SHA-256 of the archive.
    pub sha256: String,
    pub size: u64,
    /// What the layer was made from.
    pub from: String,
}

/// The pause image: `/pause` and its ELF closure (loader, libc, ...)
/// taken from `libs` (the unpacked packages).
pub fn pause(pause: &[u8], libs: &Tree) -> Result<oci::Image> {
    if elf::needs(pause).is_none() {
        bail!("the pause binary is not an ELF executable");
    }
    let mut layer = Tree::new();
    // The loader's path (/lib64/ld-linux-x86-64.so.2) goes through these.
    assemble::usrmerge_links(&mut layer)?;
    layer.insert(Path::new("pause"), Entry::file(0o755, pause.to_vec()))?;
    elf::close(&mut layer, libs).context("the pause image's libraries")?;
    Ok(oci::Image {
        reference: images::PAUSE.into(),
        layer,
        entrypoint: vec!["/pause".into()],
        cmd: vec![],
        env: vec![oci::DEFAULT_PATH.into()],
        created_by: "imager: machined's pause and its shared libraries".into(),
    })
}

/// True when `data` is an ELF executable that needs no loader or library.
fn is_static(data: &[u8]) -> bool {
    elf::needs(data).is_some_and(|n| n.interpreter.is_none() && n.libraries.is_empty())
}

/// `bin/busybox` of Debian's `busybox-static` in the unpacked packages.
pub fn find_busybox(staging: &Tree) -> Result<Vec<u8>> {
    ["usr/bin/busybox", "bin/busybox"]
        .iter()
        .find_map(|p| {
            let real = staging.resolve(Path::new(p))?;
            match staging.get(&real)? {
                Entry::File { data, .. } => Some(data.as_ref().clone()),
                _ => None,
            }
        })
        .ok_or_else(|| {
            anyhow!("no bin/busybox in the unpacked packages: add busybox-static to the profile's packages (not to paths.include) and run `imager lock`")
        })
}

/// The busybox image: `/bin/busybox`, a symlink per applet of
/// [`BUSYBOX_APPLETS`], `/tmp` (1777), `/etc/passwd` and `/etc/group`
/// with root and nobody. The binary must be static and have every applet.
pub fn busybox(busybox: &[u8]) -> Result<oci::Image> {
    if !is_static(busybox) {
        bail!("busybox is not a static executable (take Debian's busybox-static, not busybox)");
    }
    // The applet names are NUL-separated strings in the binary.
    let missing: Vec<&str> = BUSYBOX_APPLETS
        .iter()
        .filter(|a| {
            let needle = format!("\0{a}\0").into_bytes();
            !busybox.windows(needle.len()).any(|w| w == needle)
        })
        .copied()
        .collect();
    if !missing.is_empty() {
        bail!("busybox has no applet {}", missing.join(", "));
    }
    let mut layer = Tree::new();
    layer.insert(
        Path::new("bin/busybox"),
        Entry::file(0o755, busybox.to_vec()),
    )?;
    for a in BUSYBOX_APPLETS {
        layer.insert(
            &Path::new("bin").join(a),
            Entry::Symlink {
                target: "busybox".into(),
            },
        )?;
    }
    layer.insert(Path::new("tmp"), Entry::Dir { mode: 0o1777 })?;
    layer.insert(Path::new("root"), Entry::Dir { mode: 0o700 })?;
    layer.insert(
        Path::new("etc/passwd"),
        Entry::file(
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                .to_vec(),
        ),
    )?;
    layer.insert(
        Path::new("etc/group"),
        Entry::file(0o644, b"root:x:0:\nnobody:x:65534:\n".to_vec()),
    )?;
    Ok(oci::Image {
        reference: images::BUSYBOX.into(),
        layer,
        entrypoint: vec![],
        cmd: vec!["sh".into()],
        env: vec![oci::DEFAULT_PATH.into()],
        created_by: "imager: Debian's busybox-static with applet links".into(),
    })
}

/// The CoreDNS image: the static `/coredns` (its Corefile comes from the
/// cluster's ConfigMap, as `-conf`).
pub fn coredns(coredns: &[u8]) -> Result<oci::Image> {
    if !is_static(coredns) {
        bail!("coredns is not a static executable");
    }
    let mut layer = Tree::new();
    layer.insert(Path::new("coredns"), Entry::file(0o755, coredns.to_vec()))?;
    Ok(oci::Image {
        reference: images::COREDNS.into(),
        layer,
        entrypoint: vec!["/coredns".into()],
        cmd: vec![],
        env: vec![oci::DEFAULT_PATH.into()],
        created_by: format!(
            "imager: CoreDNS {} built from its Go module",
            images::COREDNS_VERSION
        ),
    })
}

/// Writes each image's archive into `root` under [`images::DIR`], with the
/// index machined reads; `from` says what each was made from.
pub fn add(
    root: &mut Tree,
    list: &[(oci::Image, String)],
    epoch: u64,
) -> Result<Vec<ManifestContainerImage>> {
    let dir = Path::new(images::DIR);
    let mut index = Vec::new();
    let mut out = Vec::new();
    for (image, from) in list {
        let archive = oci::write(image, epoch)
            .with_context(|| format!("writing the image {}", image.reference))?;
        let file = images::archive_file(&image.reference);
        let size = archive.bytes.len() as u64;
        index.push(IndexEntry {
            reference: image.reference.clone(),
            file: file.clone(),
            manifest_digest: archive.manifest_digest.clone(),
            size,
        });
        out.push(ManifestContainerImage {
            reference: image.reference.clone(),
            file: format!("/{}/{file}", images::DIR),
            manifest_digest: archive.manifest_digest,
            sha256: archive.sha256,
            size,
            from: from.clone(),
        });
        root.insert(&dir.join(&file), Entry::file(0o644, archive.bytes))?;
    }
    let text = serde_json::to_string_pretty(&index)? + "\n";
    root.insert(
        &dir.join(images::INDEX),
        Entry::file(0o644, text.into_bytes()),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// The host's busybox-static, when installed.
    fn host_busybox() -> Option<Vec<u8>> {
        let data = std::fs::read("/bin/busybox").ok()?;
        is_static(&data).then_some(data)
    }

    #[test]
    fn busybox_layer_has_the_applets_tmp_and_users() {
        let Some(bb) = host_busybox() else {
            machine_api::skip_test!(
                "no static /bin/busybox on this host (apt-get install busybox-static; scripts/test.sh installs it)"
            );
        };
        let image = busybox(&bb).unwrap();
        let l = &image.layer;
        assert!(matches!(
            l.get(Path::new("bin/busybox")),
            Some(Entry::File { mode: 0o755, .. })
        ));
        assert_eq!(l.resolve(Path::new("bin/sh")), Some("bin/busybox".into()));
        assert_eq!(l.get(Path::new("tmp")), Some(&Entry::Dir { mode: 0o1777 }));
        match l.get(Path::new("etc/passwd")) {
            Some(Entry::File { data, .. }) => {
                let t = String::from_utf8_lossy(data);
                assert!(
                    t.starts_with("root:x:0:0:") && t.contains("\nnobody:x:65534:"),
                    "{t}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(image.cmd, ["sh"]);
        // A dynamic binary is refused.
        let dynamic = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(busybox(&dynamic).is_err());
    }

    #[test]
    fn pause_layer_is_closed_over_its_libraries() {
        // This test binary stands in for pause: same toolchain, same needs.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let n = elf::needs(&exe).unwrap();
        let mut libs = Tree::new();
        assemble::usrmerge_links(&mut libs).unwrap();
        for lib in &n.libraries {
            let host =
                std::fs::canonicalize(Path::new("/usr/lib/x86_64-linux-gnu").join(lib)).unwrap();
            libs.insert(
                &Path::new("usr/lib/x86_64-linux-gnu").join(lib),
                Entry::file(0o644, std::fs::read(host).unwrap()),
            )
            .unwrap();
        }
        // /lib64 is a link to usr/lib64 in a merged-/usr tree.
        let interp = n.interpreter.clone().unwrap();
        libs.insert(
            &Path::new("usr").join(interp.trim_start_matches('/')),
            Entry::file(
                0o755,
                std::fs::read(std::fs::canonicalize(&interp).unwrap()).unwrap(),
            ),
        )
        .unwrap();
        let image = pause(&exe, &libs).unwrap();
        assert_eq!(image.entrypoint, ["/pause"]);
        assert!(image.layer.resolve(Path::new(&interp)).is_some());
        // Self-contained: closing it again needs nothing from anywhere.
        let mut again = image.layer.clone();
        assert_eq!(
            elf::close(&mut again, &Tree::new()).unwrap(),
            Vec::<String>::new()
        );
        assert!(image.layer.get(Path::new("pause")).is_some());
    }

    #[test]
    fn archives_and_their_index_go_under_the_images_dir() {
        let mut layer = Tree::new();
        layer
            .insert(Path::new("coredns"), Entry::file(0o755, b"x".to_vec()))
            .unwrap();
        let image = oci::Image {
            reference: images::COREDNS.into(),
            layer,
            entrypoint: vec!["/coredns".into()],
            cmd: vec![],
            env: vec![],
            created_by: "test".into(),
        };
        let mut root = Tree::new();
        let m = add(&mut root, &[(image, "here".into())], 0).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].file, "/usr/lib/machined/images/coredns-v1.13.1.tar");
        let index: Vec<IndexEntry> = match root.get(Path::new("usr/lib/machined/images/index.json"))
        {
            Some(Entry::File { data, .. }) => serde_json::from_slice(data).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(index[0].reference, images::COREDNS);
        assert_eq!(index[0].manifest_digest, m[0].manifest_digest);
        assert_eq!(index[0].size, m[0].size);
        match root.get(Path::new("usr/lib/machined/images/coredns-v1.13.1.tar")) {
            Some(Entry::File { data, .. }) => {
                assert_eq!(
                    hex::encode(sha2::Sha256::digest(data.as_slice())),
                    m[0].sha256
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
