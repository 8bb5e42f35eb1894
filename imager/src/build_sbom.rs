//! The bill of materials of one build: which component put each file of
//! the image there ([`crate::sbom`] writes it as CycloneDX).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::build::OursProvenance;
use crate::container_images::ManifestContainerImage;
use crate::kubernetes::ManifestKubernetes;
use crate::listing::Line;
use crate::lock::Lock;
use crate::sbom::{self, DebPackage, ImageFile, Origin, OurComponent, SbomInput};
use crate::tree::{Entry, Tree};

/// What the build knows when it writes the SBOM.
#[derive(Debug)]
pub struct Parts<'a> {
    pub name: &'a str,
    pub epoch: u64,
    pub lock: &'a Lock,
    /// Which package (index into the lock) last wrote each unpacked path.
    pub unpacked_by: &'a BTreeMap<PathBuf, usize>,
    pub image: &'a Tree,
    pub lines: &'a [Line],
    /// machined, init, pause: (name, image path or archive, sha256).
    pub ours: Vec<(&'static str, String, String)>,
    pub provenance: &'a OursProvenance,
    pub kubernetes: &'a ManifestKubernetes,
    pub container_images: &'a [ManifestContainerImage],
    /// The CoreDNS binary (inside its container image), for its modules.
    pub coredns: Option<&'a [u8]>,
}

/// The workspace's Cargo.lock, for the crates of machined (None when
/// our binaries were given, not built from the workspace).
fn cargo_lock(p: &OursProvenance) -> Option<String> {
    if p.built_by != "workspace" {
        return None;
    }
    let ws = crate::our_binaries::workspace_root(&std::env::current_dir().ok()?)?;
    std::fs::read_to_string(ws.join("Cargo.lock")).ok()
}

pub fn input(p: &Parts) -> anyhow::Result<SbomInput> {
    let debian: Vec<DebPackage> = p
        .lock
        .packages
        .iter()
        .map(|l| DebPackage {
            name: l.name.clone(),
            version: l.version.clone(),
            architecture: l.architecture.clone(),
            sha256: l.sha256.clone(),
            suite: p.lock.suite_of(l).to_owned(),
            filename: l.filename.clone(),
        })
        .collect();
    let version = env!("CARGO_PKG_VERSION").to_owned();
    let mut ours: Vec<OurComponent> = Vec::new();
    // Image path (no leading slash) → index into `ours`.
    let mut ours_at: BTreeMap<String, usize> = BTreeMap::new();
    for (name, path, sha) in &p.ours {
        ours_at.insert(path.trim_start_matches('/').to_owned(), ours.len());
        ours.push(OurComponent {
            name: (*name).to_owned(),
            version: version.clone(),
            sha256: sha.clone(),
            description: format!("{name}, built by {}", p.provenance.built_by),
        });
    }
    let kube_version = p.kubernetes.version.clone().unwrap_or_default();
    for b in &p.kubernetes.binaries {
        let name = b.path.rsplit('/').next().unwrap_or(&b.path).to_owned();
        ours_at.insert(b.path.trim_start_matches('/').to_owned(), ours.len());
        ours.push(OurComponent {
            name,
            version: b.version.clone().unwrap_or_else(|| kube_version.clone()),
            sha256: b.sha256.clone(),
            description: format!(
                "Kubernetes ({}: {})",
                p.kubernetes.source, p.kubernetes.from
            ),
        });
    }
    // The container image archives: pause and CoreDNS are ours, busybox
    // is Debian's busybox-static.
    let busybox = p
        .lock
        .packages
        .iter()
        .position(|l| l.name == "busybox-static");
    let mut archive_origin: BTreeMap<String, Origin> = BTreeMap::new();
    for i in p.container_images {
        let file = i.file.trim_start_matches('/').to_owned();
        let origin = if i.reference.contains("/busybox:") {
            busybox.map(Origin::Debian).unwrap_or(Origin::Imager)
        } else {
            let name = if i.reference.contains("/coredns:") {
                "coredns"
            } else {
                "pause"
            };
            let tag = i.reference.rsplit(':').next().unwrap_or("").to_owned();
            let idx = match ours.iter().position(|o| o.name == name) {
                Some(idx) if name == "pause" => idx,
                _ => {
                    ours.push(OurComponent {
                        name: name.to_owned(),
                        version: tag,
                        sha256: i.sha256.clone(),
                        description: format!("container image {} ({})", i.reference, i.from),
                    });
                    ours.len() - 1
                }
            };
            Origin::Ours(idx)
        };
        archive_origin.insert(file, origin);
    }
    let files = p
        .lines
        .iter()
        .filter(|l| l.kind == "file")
        .map(|l| {
            let rel = l.path.trim_start_matches('/').to_owned();
            let origin = if let Some(&i) = ours_at.get(&rel) {
                Origin::Ours(i)
            } else if let Some(o) = archive_origin.get(&rel) {
                *o
            } else if let Some(&i) = p.unpacked_by.get(Path::new(&rel)) {
                Origin::Debian(i)
            } else {
                Origin::Imager
            };
            ImageFile {
                path: l.path.clone(),
                size: l.size,
                sha256: l.what.clone(),
                origin,
            }
        })
        .collect();
    let mut go = Vec::new();
    for b in &p.kubernetes.binaries {
        let rel = b.path.trim_start_matches('/');
        if let Some(Entry::File { data, .. }) = p.image.get(Path::new(rel)) {
            if let Some(info) = crate::kubernetes::go_modinfo(data) {
                go.extend(sbom::go_modules_from_modinfo(&info, &b.path));
            }
        }
    }
    if let Some(info) = p.coredns.and_then(crate::kubernetes::go_modinfo) {
        go.extend(sbom::go_modules_from_modinfo(&info, "coredns"));
    }
    let rust_crates = match cargo_lock(p.provenance) {
        Some(text) => sbom::rust_crates_from_cargo_lock(&text, &["machined"])?,
        None => Vec::new(),
    };
    Ok(SbomInput {
        image_name: p.name.to_owned(),
        imager_version: version,
        source_date_epoch: p.epoch,
        debian,
        go_modules: sbom::merge_go_modules(go),
        rust_crates,
        ours,
        files,
    })
}
