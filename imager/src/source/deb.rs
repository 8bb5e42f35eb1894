//! Downloading `.deb` files (verified by the index's hash and size before
//! they enter the cache) and unpacking their data into a [`Tree`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tar::EntryType;

use super::{fetch, join_uri, verify_bytes, Archives, Cache, Mirror, PackageRecord, SourceError};
use crate::tree::{normalize, Entry, Tree};

/// Returns the cached .deb of `rec`, downloading and verifying it first
/// when it is not cached. A cached file is hashed again before it is used
/// (a flipped bit on disk, or a hand-edited cache, must not reach an
/// image): one that does not match is reported, removed and downloaded
/// again.
fn fetch_deb(m: &Mirror, rec: &PackageRecord, cache: &Cache) -> Result<PathBuf, SourceError> {
    if let Some(p) = cache.get(&rec.sha256) {
        match cache.verify_file(&p, &rec.sha256, rec.size) {
            Ok(()) => return Ok(p),
            Err(why) => {
                eprintln!(
                    "warning: cached package {} {} ({}) {why}: discarded, downloading it again",
                    rec.name,
                    rec.version,
                    p.display()
                );
                let _ = std::fs::remove_file(&p);
            }
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
    fetch_all(|_| Ok(m), recs, cache, jobs)
}

/// [`fetch_debs`] with each record fetched from the archive of its suite
/// (a pool path is relative to its own archive's root: a security update
/// is not in the main archive).
pub fn fetch_debs_from(
    archives: &Archives,
    recs: &[PackageRecord],
    cache: &Cache,
    jobs: usize,
) -> Result<Vec<PathBuf>, SourceError> {
    fetch_all(|r| archives.get(&r.suite), recs, cache, jobs)
}

fn fetch_all<'m>(
    mirror_of: impl Fn(&PackageRecord) -> Result<&'m Mirror, SourceError> + Sync,
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
                let r = mirror_of(rec).and_then(|m| fetch_deb(m, rec, cache));
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
                    url: mirror_of(rec)
                        .map(|m| join_uri(&m.uri, &rec.filename))
                        .unwrap_or_else(|_| rec.filename.clone()),
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
/// pay it again.
///
/// An entry is `unpacked/{deb sha256}.data.tar`: a header line with the
/// SHA-256 of the tar that follows it, recorded when the entry was made,
/// then the tar. It is hashed while it is read and the tree it gave is
/// used only when the hash matches; an entry that does not match (or does
/// not parse) is reported, removed and made again from the .deb. SHA-256
/// rather than BLAKE3: with the CPU's SHA extensions it hashes the whole
/// cache in a fraction of a second, and it needs no other crate.
///
/// The entry is written to a temp file, synced and renamed, so a crash
/// never leaves a torn one.
pub fn unpack_deb_cached(
    deb: &Path,
    deb_sha256: &str,
    cache_dir: &Path,
    tree: &mut Tree,
) -> Result<(), SourceError> {
    let dir = cache_dir.join("unpacked");
    let key = deb_sha256.to_ascii_lowercase();
    let cached = dir.join(format!("{key}.data.tar"));
    // Entries of the first format (no recorded digest) are not trusted.
    let _ = std::fs::remove_file(dir.join(format!("{key}.tar")));
    if let Ok(f) = std::fs::File::open(&cached) {
        let mut t = Tree::new();
        match read_unpacked_entry(deb, f, &mut t) {
            Ok(()) if tree.is_empty() => {
                *tree = t;
                return Ok(());
            }
            Ok(()) => {
                for (p, e) in t.iter() {
                    tree.insert(p, e.clone())
                        .map_err(|source| SourceError::Tree {
                            deb: deb.to_owned(),
                            entry: p.display().to_string(),
                            source,
                        })?;
                }
                return Ok(());
            }
            Err(why) => {
                eprintln!(
                    "warning: cached unpacked tree {} {why}: discarded, unpacking {} again",
                    cached.display(),
                    deb.display()
                );
                let _ = std::fs::remove_file(&cached);
            }
        }
    }
    let mut raw = Vec::new();
    data_tar(deb)?
        .read_to_end(&mut raw)
        .map_err(|e| deb_err(deb, format!("cannot decompress data.tar: {e}")))?;
    std::fs::create_dir_all(&dir).map_err(|e| SourceError::io(&dir, e))?;
    let mut entry = unpacked_header(&super::sha256_hex(&raw)).into_bytes();
    entry.extend_from_slice(&raw);
    let tmp = dir.join(format!(".{key}.tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, &entry)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &cached));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(SourceError::io(&cached, e));
    }
    unpack_tar(deb, raw.as_slice(), tree)
}

/// The first line of an unpacked-tree cache entry, padded to
/// [`UNPACKED_HEADER_LEN`] bytes so the tar after it stays aligned.
const UNPACKED_HEADER_LEN: usize = 128;
const UNPACKED_MAGIC: &str = "imager-unpacked-data-tar v1 sha256=";

fn unpacked_header(sha256: &str) -> String {
    let line = format!("{UNPACKED_MAGIC}{sha256}");
    format!("{line:<width$}\n", width = UNPACKED_HEADER_LEN - 1)
}

/// Reads one unpacked-tree entry into `tree`, hashing the tar as it goes.
/// Err says why the entry cannot be used (the caller discards it).
fn read_unpacked_entry(deb: &Path, f: std::fs::File, tree: &mut Tree) -> Result<(), String> {
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut header = [0u8; UNPACKED_HEADER_LEN];
    r.read_exact(&mut header)
        .map_err(|e| format!("has no header ({e})"))?;
    let want = std::str::from_utf8(&header)
        .ok()
        .and_then(|h| h.strip_prefix(UNPACKED_MAGIC))
        .map(|h| h.trim_end().to_owned())
        .filter(|h| h.len() == 64)
        .ok_or("has no recorded digest")?;
    let mut hashing = HashingReader {
        inner: r,
        hash: sha2::Sha256::default(),
    };
    let parsed = unpack_tar(deb, &mut hashing, tree);
    // The tar reader stops at the end-of-archive blocks: the rest (padding,
    // or anything appended) is part of what the digest covers.
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(|e| format!("cannot be read ({e})"))?;
    let got = hex::encode(sha2::Digest::finalize(hashing.hash));
    if got != want {
        return Err(format!(
            "does not match the sha256 recorded when it was made (recorded {want}, now {got})"
        ));
    }
    parsed.map_err(|e| format!("does not parse ({e})"))
}

/// Feeds everything read through it to a SHA-256.
struct HashingReader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        Ok(n)
    }
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
