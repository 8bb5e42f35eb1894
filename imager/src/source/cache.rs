//! A content-addressed download cache: `{dir}/sha256/{hex}`. A file is
//! only ever placed there (temp file + rename) after its SHA-256 matched
//! the name, so whatever the cache holds was verified.

use std::io::Write;
use std::path::PathBuf;

use super::{sha256_hex, SourceError};

/// The download cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cache {
    pub dir: PathBuf,
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: dir.into() }
    }

    /// `$IMAGER_CACHE`, else `$XDG_CACHE_HOME/imager`, else
    /// `~/.cache/imager` (the system temp dir when there is no home).
    pub fn default_dir() -> PathBuf {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(d) = var("IMAGER_CACHE") {
            return PathBuf::from(d);
        }
        if let Some(d) = var("XDG_CACHE_HOME") {
            return PathBuf::from(d).join("imager");
        }
        if let Some(h) = var("HOME") {
            return PathBuf::from(h).join(".cache").join("imager");
        }
        std::env::temp_dir().join("imager-cache")
    }

    /// The cache at [`Cache::default_dir`].
    pub fn open_default() -> Self {
        Cache::new(Cache::default_dir())
    }

    fn objects(&self) -> PathBuf {
        self.dir.join("sha256")
    }

    /// Where an object of this hash is (or would be) stored.
    pub fn path_of(&self, sha256: &str) -> Option<PathBuf> {
        let h = sha256.to_ascii_lowercase();
        is_sha256_hex(&h).then(|| self.objects().join(h))
    }

    /// The cached file with this SHA-256, if present.
    pub fn get(&self, sha256: &str) -> Option<PathBuf> {
        self.path_of(sha256).filter(|p| p.is_file())
    }

    /// Stores `data` under `sha256` after checking that it hashes to it.
    /// `what` names the data in the error (URL or file name). Nothing is
    /// written when the hash does not match.
    pub fn put(&self, sha256: &str, data: &[u8], what: &str) -> Result<PathBuf, SourceError> {
        let got = sha256_hex(data);
        let Some(dest) = self
            .path_of(sha256)
            .filter(|_| got == sha256.to_ascii_lowercase())
        else {
            return Err(SourceError::Checksum {
                what: what.to_owned(),
                listed_in: "the cache request".to_owned(),
                expected_sha256: sha256.to_owned(),
                expected_size: data.len() as u64,
                got_sha256: got,
                got_size: data.len() as u64,
            });
        };
        if dest.is_file() {
            return Ok(dest);
        }
        let objects = self.objects();
        std::fs::create_dir_all(&objects).map_err(|e| SourceError::io(&objects, e))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&objects)
            .map_err(|e| SourceError::io(&objects, e))?;
        tmp.write_all(data)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| SourceError::io(tmp.path(), e))?;
        tmp.persist(&dest)
            .map_err(|e| SourceError::io(&dest, e.error))?;
        Ok(dest)
    }

    /// Checks a cached file against the hash (and size) it is stored
    /// under, reading it in pieces. Err says what is wrong with it.
    pub fn verify_file(
        &self,
        path: &std::path::Path,
        sha256: &str,
        size: u64,
    ) -> Result<(), String> {
        use sha2::Digest;
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| format!("cannot be read ({e})"))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| format!("cannot be read ({e})"))?;
            if n == 0 {
                break;
            }
            len += n as u64;
            h.update(&buf[..n]);
        }
        let got = hex::encode(h.finalize());
        if got != sha256.to_ascii_lowercase() || len != size {
            return Err(format!(
                "does not match its sha256 (want {sha256}, {size} bytes; got {got}, {len} bytes)"
            ));
        }
        Ok(())
    }

    /// Reads the cached object with this hash, re-checking it; a corrupt
    /// object (disk damage, manual edits) is removed and `None` returned.
    pub fn read_verified(&self, sha256: &str) -> Option<Vec<u8>> {
        let p = self.get(sha256)?;
        let data = std::fs::read(&p).ok()?;
        if sha256_hex(&data) == sha256.to_ascii_lowercase() {
            Some(data)
        } else {
            let _ = std::fs::remove_file(&p);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_only_after_the_hash_matched() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::new(dir.path());
        let good = sha256_hex(b"abc");
        assert!(c.get(&good).is_none());
        assert!(c.put(&good, b"abd", "x").is_err());
        assert!(c.get(&good).is_none());
        let p = c.put(&good, b"abc", "x").unwrap();
        assert_eq!(c.get(&good), Some(p.clone()));
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        assert_eq!(c.read_verified(&good).unwrap(), b"abc");
        assert!(c.get("../../etc/passwd").is_none());
        // No temp files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sha256"))
            .unwrap()
            .collect();
        assert_eq!(names.len(), 1);
    }
}
