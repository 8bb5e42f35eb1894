//! The upgrade bundle: one file a node takes as an upgrade
//! ([`machine_api::image_bundle`] reads it). A tar whose first member is
//! the manifest, then its signature when the build was signed, then the
//! slot's files (kernel, boot initramfs, root), each named as the
//! manifest's outputs name them. Manifest and signature come first so a
//! node refuses a bundle from an untrusted builder before it reads the
//! hundreds of MiB behind them.

use std::path::Path;

use anyhow::{Context, Result};
use machine_api::image_bundle::SLOT_KINDS;
use machine_api::layout::artifact;

/// Writes the bundle of the build in `dir` (its manifest names the files)
/// to `dest`, deterministically: fixed order, owner 0:0, mode 0644, mtime
/// the build's SOURCE_DATE_EPOCH.
pub fn write(dest: &Path, dir: &Path, name: &str, epoch: u64) -> Result<()> {
    let manifest = std::fs::read(dir.join(artifact::MANIFEST))
        .with_context(|| format!("read {}", dir.join(artifact::MANIFEST).display()))?;
    let parsed = machine_api::image_bundle::BundleManifest::parse(&manifest)
        .with_context(|| format!("the manifest of {name}"))?;
    let mut members: Vec<(String, std::path::PathBuf)> = Vec::new();
    for kind in SLOT_KINDS {
        let out = parsed
            .output(kind)
            .with_context(|| format!("the manifest lists no {kind} output: no upgrade bundle"))?;
        members.push((out.path.clone(), dir.join(&out.path)));
    }
    let tmp = tempfile::NamedTempFile::new_in(dest.parent().unwrap_or(Path::new(".")))?;
    {
        let mut b = tar::Builder::new(std::io::BufWriter::new(tmp.as_file()));
        let mut append = |member: &str, size: u64, data: &mut dyn std::io::Read| -> Result<()> {
            let mut h = tar::Header::new_ustar();
            h.set_size(size);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(epoch);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, member, data)
                .with_context(|| format!("adding {member} to the upgrade bundle"))
        };
        append(
            artifact::MANIFEST,
            manifest.len() as u64,
            &mut manifest.as_slice(),
        )?;
        if let Ok(sig) = std::fs::read(dir.join(artifact::MANIFEST_SIGNATURE)) {
            append(
                artifact::MANIFEST_SIGNATURE,
                sig.len() as u64,
                &mut sig.as_slice(),
            )?;
        }
        for (member, path) in &members {
            let f =
                std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
            let size = f.metadata()?.len();
            append(member, size, &mut std::io::BufReader::new(f))?;
        }
        b.into_inner()?.into_inner().map_err(|e| e.into_error())?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(dest)
        .with_context(|| format!("write {}", dest.display()))?;
    Ok(())
}
