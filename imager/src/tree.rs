//! The image's file tree, held in memory: sources write into it, filters
//! and the ELF check read it, format writers turn it into cpio, squashfs or
//! a FAT partition.
//!
//! Paths are relative ("usr/bin/etcd") and kept sorted, so every writer
//! emits entries in one deterministic order. Owners are always 0:0 and
//! timestamps come from the build's SOURCE_DATE_EPOCH, so they are not
//! stored per entry.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// One entry of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Arc<Vec<u8>> },
    Symlink { target: PathBuf },
}

impl Entry {
    pub fn file(mode: u32, data: Vec<u8>) -> Self {
        Entry::File {
            mode,
            data: Arc::new(data),
        }
    }
    pub fn size(&self) -> u64 {
        match self {
            Entry::File { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}

/// Errors of tree edits.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("path {0:?} escapes the image root")]
    Escapes(PathBuf),
    #[error("{0:?} is not a directory, cannot put {1:?} under it")]
    NotADirectory(PathBuf, PathBuf),
}

/// The file tree of an image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<PathBuf, Entry>,
}

/// Normalizes a path to the tree's form: relative, no `.`, no `..` that
/// would leave the root, no trailing slash.
pub fn normalize(path: &Path) -> Result<PathBuf, TreeError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err(TreeError::Escapes(path.to_owned()));
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

impl Tree {
    pub fn new() -> Self {
        Tree::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Creates `path` and its parents as directories (mode 0755) where
    /// missing.
    pub fn mkdir_all(&mut self, path: &Path) -> Result<(), TreeError> {
        let path = normalize(path)?;
        let mut cur = PathBuf::new();
        for c in path.components() {
            cur.push(c);
            match self.entries.get(&cur) {
                None => {
                    self.entries.insert(cur.clone(), Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                // A symlinked directory (usrmerge: bin -> usr/bin) is fine as
                // a parent; writers resolve it through `resolve`.
                Some(Entry::Symlink { .. }) => {}
                Some(Entry::File { .. }) => {
                    return Err(TreeError::NotADirectory(cur, path));
                }
            }
        }
        Ok(())
    }

    /// Inserts an entry, creating parent directories. A later insert at the
    /// same path replaces the earlier one (as unpacking packages in order
    /// does), except that an existing directory keeps its children.
    pub fn insert(&mut self, path: &Path, entry: Entry) -> Result<(), TreeError> {
        let path = normalize(path)?;
        if path.as_os_str().is_empty() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            self.mkdir_all(parent)?;
        }
        match (&entry, self.entries.get(&path)) {
            (Entry::Dir { mode }, Some(Entry::Dir { .. })) => {
                self.entries.insert(path, Entry::Dir { mode: *mode });
            }
            _ => {
                self.entries.insert(path, entry);
            }
        }
        Ok(())
    }

    pub fn get(&self, path: &Path) -> Option<&Entry> {
        normalize(path).ok().and_then(|p| self.entries.get(&p))
    }

    /// Removes `path` and, for a directory, everything under it.
    pub fn remove(&mut self, path: &Path) {
        let Ok(path) = normalize(path) else { return };
        let under: Vec<PathBuf> = self
            .entries
            .range(path.clone()..)
            .take_while(|(p, _)| p.starts_with(&path))
            .map(|(p, _)| p.clone())
            .collect();
        for p in under {
            self.entries.remove(&p);
        }
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&Path, &Entry) -> bool) {
        self.entries.retain(|p, e| keep(p, e));
    }

    /// Entries in sorted path order.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_path(), e))
    }

    /// Follows symlinks (absolute targets are relative to the image root)
    /// to the path of a real entry, at most 40 hops.
    pub fn resolve(&self, path: &Path) -> Option<PathBuf> {
        let mut cur = normalize(path).ok()?;
        for _ in 0..40 {
            // Resolve symlinks in parent components first.
            let mut built = PathBuf::new();
            let mut changed = false;
            let comps: Vec<_> = cur.components().collect();
            for (i, c) in comps.iter().enumerate() {
                built.push(c);
                if i + 1 < comps.len() {
                    if let Some(Entry::Symlink { target }) = self.entries.get(&built) {
                        let base = built.parent().map(Path::to_path_buf).unwrap_or_default();
                        let mut next = if target.is_absolute() {
                            target.clone()
                        } else {
                            base.join(target)
                        };
                        for rest in &comps[i + 1..] {
                            next.push(rest);
                        }
                        cur = normalize(&next).ok()?;
                        changed = true;
                        break;
                    }
                }
            }
            if changed {
                continue;
            }
            match self.entries.get(&cur)? {
                Entry::Symlink { target } => {
                    let base = cur.parent().map(Path::to_path_buf).unwrap_or_default();
                    let next = if target.is_absolute() {
                        target.clone()
                    } else {
                        base.join(target)
                    };
                    cur = normalize(&next).ok()?;
                }
                _ => return Some(cur),
            }
        }
        None
    }

    /// Total bytes of file data.
    pub fn data_size(&self) -> u64 {
        self.entries.values().map(Entry::size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_creates_parents_and_rejects_escapes() {
        let mut t = Tree::new();
        t.insert(
            Path::new("/usr/bin/etcd"),
            Entry::file(0o755, b"x".to_vec()),
        )
        .unwrap();
        assert!(matches!(t.get(Path::new("usr")), Some(Entry::Dir { .. })));
        assert!(t
            .insert(Path::new("../etc/x"), Entry::Dir { mode: 0o755 })
            .is_err());
        assert!(t
            .insert(Path::new("usr/bin/etcd/x"), Entry::Dir { mode: 0o755 })
            .is_err());
    }

    #[test]
    fn resolve_follows_usrmerge_links() {
        let mut t = Tree::new();
        t.insert(
            Path::new("lib"),
            Entry::Symlink {
                target: "usr/lib".into(),
            },
        )
        .unwrap();
        t.insert(
            Path::new("usr/lib/x86_64-linux-gnu/libc.so.6"),
            Entry::file(0o644, vec![]),
        )
        .unwrap();
        t.insert(
            Path::new("lib64/ld-linux-x86-64.so.2"),
            Entry::Symlink {
                target: "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".into(),
            },
        )
        .unwrap();
        assert_eq!(
            t.resolve(Path::new("/lib/x86_64-linux-gnu/libc.so.6")),
            Some(PathBuf::from("usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
        assert_eq!(t.resolve(Path::new("lib64/ld-linux-x86-64.so.2")), None);
    }

    #[test]
    fn remove_takes_the_subtree() {
        let mut t = Tree::new();
        t.insert(Path::new("usr/share/doc/a"), Entry::file(0o644, vec![1]))
            .unwrap();
        t.insert(Path::new("usr/sharex"), Entry::file(0o644, vec![1]))
            .unwrap();
        t.remove(Path::new("usr/share"));
        assert!(t.get(Path::new("usr/share/doc/a")).is_none());
        assert!(t.get(Path::new("usr/sharex")).is_some());
    }
}
