//! Checks of an etcd snapshot as it streams past, shared by the node that
//! sends or receives one and by osctl that saves or uploads one.
//!
//! An etcd v3 snapshot (what `Maintenance/Snapshot` sends) is the member's
//! bbolt database followed by 32 bytes: the SHA-256 of everything before
//! them. `etcdctl snapshot restore` checks that trailer; checking it while
//! the bytes pass tells a truncated or altered file from a good one at
//! once, before anything acts on it. The SHA-256 of the whole file is what
//! the operator records and compares (`sha256sum`).

use sha2::{Digest, Sha256};

/// The trailer etcd appends: SHA-256 of the database before it.
pub const TRAILER: usize = 32;

/// Hashes a snapshot as it streams: the whole file, and the database part
/// (all but the last [`TRAILER`] bytes, held back until the end).
#[derive(Default)]
pub struct SnapshotCheck {
    whole: Sha256,
    database: Sha256,
    /// The last bytes seen; at the end they are the trailer.
    tail: Vec<u8>,
    size: u64,
}

impl std::fmt::Debug for SnapshotCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotCheck")
            .field("size", &self.size)
            .finish()
    }
}

/// A finished check.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Checked {
    pub size: u64,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
    /// The file ends with etcd's own hash of its database.
    pub trailer_matches: bool,
}

impl SnapshotCheck {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.whole.update(data);
        self.size += data.len() as u64;
        self.tail.extend_from_slice(data);
        if self.tail.len() > TRAILER {
            let spill = self.tail.len() - TRAILER;
            self.database.update(&self.tail[..spill]);
            self.tail.drain(..spill);
        }
    }

    pub fn finish(self) -> Checked {
        let trailer_matches =
            self.tail.len() == TRAILER && self.database.finalize().as_slice() == self.tail;
        Checked {
            size: self.size,
            sha256: hex::encode(self.whole.finalize()),
            trailer_matches,
        }
    }
}

impl Checked {
    /// One line for an operator: what is wrong with the snapshot, or None.
    pub fn problem(
        &self,
        expected_size: Option<u64>,
        expected_sha256: Option<&str>,
    ) -> Option<String> {
        if let Some(n) = expected_size.filter(|n| *n != self.size) {
            return Some(format!(
                "the snapshot is {} bytes, expected {n}: it was cut short or is another file",
                self.size
            ));
        }
        if let Some(h) = expected_sha256.filter(|h| !h.eq_ignore_ascii_case(&self.sha256)) {
            return Some(format!(
                "the snapshot's sha256 is {}, expected {h}: it changed on the way",
                self.sha256
            ));
        }
        if !self.trailer_matches {
            return Some(
                "the snapshot does not end with etcd's hash of its database: not an etcd snapshot, or truncated or altered".into(),
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(db: &[u8]) -> Vec<u8> {
        let mut v = db.to_vec();
        v.extend_from_slice(&Sha256::digest(db));
        v
    }

    #[test]
    fn the_trailer_is_checked_across_any_chunking() {
        let file = snapshot(&(0..100_000u32).map(|i| i as u8).collect::<Vec<_>>());
        for chunk in [1, 7, 31, 32, 33, 4096, file.len()] {
            let mut c = SnapshotCheck::new();
            for part in file.chunks(chunk) {
                c.update(part);
            }
            let got = c.finish();
            assert!(got.trailer_matches, "chunk {chunk}");
            assert_eq!(got.size, file.len() as u64);
            assert_eq!(got.sha256, hex::encode(Sha256::digest(&file)));
            assert_eq!(
                got.problem(Some(file.len() as u64), Some(&got.sha256.clone())),
                None
            );
        }
    }

    #[test]
    fn a_changed_short_or_foreign_file_is_named() {
        let mut file = snapshot(b"database");
        let mut c = SnapshotCheck::new();
        c.update(&file[..file.len() - 1]);
        let short = c.finish();
        assert!(!short.trailer_matches);
        assert!(short
            .problem(Some(file.len() as u64), None)
            .unwrap()
            .contains("cut short"));
        file[0] ^= 1;
        let mut c = SnapshotCheck::new();
        c.update(&file);
        let changed = c.finish();
        assert!(changed.problem(None, None).unwrap().contains("etcd's hash"));
        assert!(changed
            .problem(None, Some("00"))
            .unwrap()
            .contains("changed on the way"));
        let mut c = SnapshotCheck::new();
        c.update(b"tiny");
        assert!(!c.finish().trailer_matches);
    }
}
