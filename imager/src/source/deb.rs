//! Downloading `.deb` files (verified by the index's hash and size before
//! they enter the cache) and unpacking their data into a [`Tree`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tar::EntryType;

use super::{fetch, join_uri, verify_bytes, Cache, Mirror, PackageRecord, SourceError};
use crate::tree::{normalize, Entry, Tree};

/// Returns the cached .deb of `rec`, downloading and verifying it first
/// when it is not cached.
fn fetch_deb(m: &Mirror, rec: &PackageRecord, cache: &Cache) -> Result<PathBuf, SourceError> {
    if let Some(p) = cache.get(&rec.sha256) {
        if std::fs::metadata(&p).is_ok_and(|md| md.len() == rec.size) {
            return Ok(p);
        }
    }
    let url = join_uri(&m.uri, &rec.filename);
    let data = fetch(&url)?;
    verify_bytes(
        &data,
        &rec.sha256,
        rec.size,
        &format!("{} {} ({url})", rec.name, rec.version),
        "the Packages index",
    )?;
    cache.put(&rec.sha256, &data, &url)
}

/// Fetches the .deb of every record with `jobs` threads. Each is verified
/// by its SHA-256 and size before it enters the cache; cached ones are not
/// downloaded again. Returns the cached paths in the order of `recs`; on
/// failure the error of the first failing record (in input order).
pub fn fetch_debs(
    m: &Mirror,
    recs: &[PackageRecord],
    cache: &Cache,
    jobs: usize,
) -> Result<Vec<PathBuf>, SourceError> {
    let jobs = jobs.clamp(1, recs.len().max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<PathBuf, SourceError>>>> =
        Mutex::new((0..recs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(rec) = recs.get(i) else { break };
                let r = fetch_deb(m, rec, cache);
                let failed = r.is_err();
                if let Ok(mut v) = results.lock() {
                    v[i] = Some(r);
                }
                if failed {
                    // Let the other workers finish what they hold, start
                    // nothing new.
                    next.store(recs.len(), Ordering::Relaxed);
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| SourceError::Config("a download thread panicked".to_owned()))?;
    // Indices are handed out in order and none after a failure, so the
    // first record without a path in input order holds a real error.
    let mut out = Vec::with_capacity(recs.len());
    for (rec, r) in recs.iter().zip(results) {
        match r {
            Some(Ok(p)) => out.push(p),
            Some(Err(e)) => return Err(e),
            None => {
                return Err(SourceError::Fetch {
                    url: join_uri(&m.uri, &rec.filename),
                    reason: "not attempted after another download failed".to_owned(),
                })
            }
        }
    }
    Ok(out)
}

fn deb_err(deb: &Path, reason: impl Into<String>) -> SourceError {
    SourceError::Deb {
        path: deb.to_owned(),
        reason: reason.into(),
    }
}

/// Unpacks the data of a .deb into `tree`: directories, files and symlinks
/// with their permission bits (setuid/setgid/sticky kept); hard links
/// become copies of their target; device nodes and fifos are skipped.
/// A directory whose path is already a symlink in the tree keeps the
/// symlink (as dpkg does for usrmerge links).
pub fn unpack_deb(deb: &Path, tree: &mut Tree) -> Result<(), SourceError> {
    unpack_tar(deb, data_tar(deb)?, tree)
}

/// [`unpack_deb`] through a cache of the decompressed `data.tar`, keyed by
/// the (already verified) .deb's sha256: decompressing xz is most of the
/// cost of a build, and a rebuild that changes only our binaries should not
/// pay it again. The entry is written to a temp file and renamed, so a
/// crash never leaves a torn one.
pub fn unpack_deb_cached(
    deb: &Path,
    deb_sha256: &str,
    cache_dir: &Path,
    tree: &mut Tree,
) -> Result<(), SourceError> {
    let dir = cache_dir.join("unpacked");
    let cached = dir.join(format!("{}.tar", deb_sha256.to_ascii_lowercase()));
    if let Ok(f) = std::fs::File::open(&cached) {
        return unpack_tar(deb, std::io::BufReader::with_capacity(1 << 20, f), tree);
    }
    let mut raw = Vec::new();
    data_tar(deb)?
        .read_to_end(&mut raw)
        .map_err(|e| deb_err(deb, format!("cannot decompress data.tar: {e}")))?;
    std::fs::create_dir_all(&dir).map_err(|e| SourceError::io(&dir, e))?;
    let tmp = dir.join(format!(".{}.tmp-{}", deb_sha256, std::process::id()));
    std::fs::write(&tmp, &raw)
        .and_then(|()| std::fs::rename(&tmp, &cached))
        .map_err(|e| SourceError::io(&cached, e))?;
    unpack_tar(deb, raw.as_slice(), tree)
}

/// The decompressed `data.tar` stream of a .deb.
fn data_tar(deb: &Path) -> Result<Box<dyn Read + Send>, SourceError> {
    let file = std::fs::File::open(deb).map_err(|e| SourceError::io(deb, e))?;
    let mut ar = ar::Archive::new(std::io::BufReader::new(file));
    let mut saw_version = false;
    while let Some(entry) = ar.next_entry() {
        let mut entry = entry.map_err(|e| deb_err(deb, format!("not a valid ar archive: {e}")))?;
        let ident = String::from_utf8_lossy(entry.header().identifier())
            .trim_end_matches(['/', ' '])
            .to_owned();
        if ident == "debian-binary" {
            let mut v = String::new();
            entry
                .read_to_string(&mut v)
                .map_err(|e| deb_err(deb, format!("cannot read debian-binary: {e}")))?;
            if !v.starts_with("2.") {
                return Err(deb_err(
                    deb,
                    format!("unsupported .deb format {:?}", v.trim()),
                ));
            }
            saw_version = true;
            continue;
        }
        let Some(comp) = ident.strip_prefix("data.tar") else {
            continue;
        };
        if !saw_version {
            return Err(deb_err(deb, "data member before debian-binary: not a .deb"));
        }
        // The compressed member is read whole so the decoder owns its input.
        let mut member = Vec::new();
        entry
            .read_to_end(&mut member)
            .map_err(|e| deb_err(deb, format!("cannot read data.tar{comp}: {e}")))?;
        let input = std::io::Cursor::new(member);
        return Ok(match comp {
            ".xz" => Box::new(liblzma::read::XzDecoder::new_multi_decoder(input)),
            ".zst" => Box::new(
                zstd::stream::read::Decoder::new(input)
                    .map_err(|e| deb_err(deb, format!("cannot start zstd: {e}")))?,
            ),
            ".gz" => Box::new(flate2::read::GzDecoder::new(input)),
            "" => Box::new(input),
            other => {
                return Err(deb_err(
                    deb,
                    format!("data.tar{other} uses an unsupported compression"),
                ))
            }
        });
    }
    Err(deb_err(deb, "no data.tar member: not a .deb"))
}

fn unpack_tar(deb: &Path, reader: impl Read, tree: &mut Tree) -> Result<(), SourceError> {
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| deb_err(deb, format!("cannot read data.tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| deb_err(deb, format!("corrupt data.tar: {e}")))?;
        let raw_path = entry
            .path()
            .map_err(|e| deb_err(deb, format!("bad path in data.tar: {e}")))?
            .into_owned();
        let shown = raw_path.display().to_string();
        let tree_err = |source| SourceError::Tree {
            deb: deb.to_owned(),
            entry: shown.clone(),
            source,
        };
        let path = normalize(&raw_path).map_err(tree_err)?;
        if path.as_os_str().is_empty() {
            continue;
        }
        let mode = entry
            .header()
            .mode()
            .map_err(|e| deb_err(deb, format!("{shown}: bad mode: {e}")))?
            & 0o7777;
        let kind = entry.header().entry_type();
        let new = match kind {
            EntryType::Directory => {
                if matches!(tree.get(&path), Some(Entry::Symlink { .. })) {
                    continue;
                }
                Entry::Dir { mode }
            }
            EntryType::Regular | EntryType::Continuous => {
                // The header's size only sizes the first allocation (capped).
                let cap = entry.size().min(1 << 28);
                let mut data = Vec::with_capacity(usize::try_from(cap).unwrap_or(0));
                entry
                    .read_to_end(&mut data)
                    .map_err(|e| deb_err(deb, format!("{shown}: cannot read: {e}")))?;
                Entry::file(mode, data)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| deb_err(deb, format!("{shown}: bad link target: {e}")))?
                    .ok_or_else(|| deb_err(deb, format!("{shown}: symlink without a target")))?
                    .into_owned();
                Entry::Symlink { target }
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| deb_err(deb, format!("{shown}: bad link target: {e}")))?
                    .ok_or_else(|| deb_err(deb, format!("{shown}: hard link without a target")))?
                    .into_owned();
                let target = normalize(&target).map_err(tree_err)?;
                match tree.get(&target) {
                    Some(Entry::File { mode, data }) => Entry::File {
                        mode: *mode,
                        data: data.clone(),
                    },
                    _ => {
                        return Err(deb_err(
                            deb,
                            format!(
                                "{shown}: hard link to {}, which is not a file unpacked before it",
                                target.display()
                            ),
                        ))
                    }
                }
            }
            // Device nodes and fifos cannot exist in the image's formats;
            // extended headers are consumed by the tar reader.
            _ => continue,
        };
        tree.insert(&path, new).map_err(tree_err)?;
    }
    Ok(())
}
