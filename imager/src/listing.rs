//! What is inside the image, file by file: the tree listing that
//! `imager verify --rebuild` compares to name the first file that differs,
//! and a `sha256sum -c` file a user checks an unpacked image with, using
//! nothing of ours.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::tree::{Entry, Tree};

/// One line of the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub path: String,
    /// `dir`, `file` or `link`.
    pub kind: &'static str,
    pub mode: u32,
    pub size: u64,
    /// A file's sha256, a link's target, `-` for a directory.
    pub what: String,
}

impl Line {
    fn render(&self) -> String {
        format!(
            "{}\t{}\t{:04o}\t{}\t{}",
            escape(&self.path),
            self.kind,
            self.mode,
            self.size,
            escape(&self.what)
        )
    }
}

/// Tabs, newlines and backslashes written as `\t`, `\n`, `\\`: one entry
/// per line whatever its name.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

/// The sha256 of every regular file, hashed on `jobs` threads (the image
/// holds hundreds of MiB).
pub fn file_digests(tree: &Tree, jobs: usize) -> BTreeMap<PathBuf, String> {
    let files: Vec<(&Path, &[u8])> = tree
        .iter()
        .filter_map(|(p, e)| match e {
            Entry::File { data, .. } => Some((p, data.as_slice())),
            _ => None,
        })
        .collect();
    let jobs = jobs.clamp(1, 16);
    let chunk = files.len().div_ceil(jobs).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(p, d)| (p.to_path_buf(), hex::encode(Sha256::digest(d))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// The listing's lines, in the tree's (sorted) order.
pub fn lines(tree: &Tree, digests: &BTreeMap<PathBuf, String>) -> Vec<Line> {
    tree.iter()
        .map(|(p, e)| {
            let path = format!("/{}", p.display());
            match e {
                Entry::Dir { mode } => Line {
                    path,
                    kind: "dir",
                    mode: *mode,
                    size: 0,
                    what: "-".into(),
                },
                Entry::File { mode, data } => Line {
                    path,
                    kind: "file",
                    mode: *mode,
                    size: data.len() as u64,
                    what: digests.get(p).cloned().unwrap_or_default(),
                },
                Entry::Symlink { target } => Line {
                    path,
                    kind: "link",
                    mode: 0o777,
                    size: 0,
                    what: target.display().to_string(),
                },
            }
        })
        .collect()
}

/// The listing file: a header naming the columns, then a line per entry.
pub fn render(lines: &[Line]) -> String {
    let mut out = String::from("# path\ttype\tmode\tsize\tsha256 (file) or target (link)\n");
    for l in lines {
        out.push_str(&l.render());
        out.push('\n');
    }
    out
}

/// The regular files in `sha256sum` format, paths relative to the root
/// (`./usr/bin/etcd`). A name with a backslash or newline gets GNU's
/// escaped form (a leading `\`).
pub fn render_sha256sums(lines: &[Line]) -> String {
    let mut out = String::new();
    for l in lines.iter().filter(|l| l.kind == "file") {
        let name = format!(".{}", l.path);
        if name.contains(['\\', '\n']) {
            let esc = name.replace('\\', "\\\\").replace('\n', "\\n");
            out.push_str(&format!("\\{}  {esc}\n", l.what));
        } else {
            out.push_str(&format!("{}  {name}\n", l.what));
        }
    }
    out
}

/// Where two listings first differ, in words: the first path whose entry
/// is not the same, or that only one of them has. None when they are
/// equal.
pub fn first_difference(expected: &str, got: &str) -> Option<String> {
    let parse = |text: &str| -> BTreeMap<String, String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| match l.split_once('\t') {
                Some((p, rest)) => (p.to_owned(), rest.to_owned()),
                None => (l.to_owned(), String::new()),
            })
            .collect()
    };
    let (a, b) = (parse(expected), parse(got));
    let mut paths: Vec<&String> = a.keys().chain(b.keys()).collect();
    paths.sort();
    paths.dedup();
    for p in paths {
        match (a.get(p), b.get(p)) {
            (Some(x), Some(y)) if x == y => continue,
            (Some(x), Some(y)) => {
                return Some(format!(
                    "{p}: expected {}, rebuilt {}",
                    x.replace('\t', " "),
                    y.replace('\t', " ")
                ))
            }
            (Some(_), None) => return Some(format!("{p}: only in the expected image")),
            (None, Some(_)) => return Some(format!("{p}: only in the rebuilt image")),
            (None, None) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Tree {
        let mut t = Tree::new();
        t.insert(
            Path::new("usr/bin/etcd"),
            Entry::file(0o755, b"etcd".to_vec()),
        )
        .unwrap();
        t.insert(
            Path::new("usr/bin/odd\tname"),
            Entry::file(0o644, b"x".to_vec()),
        )
        .unwrap();
        t.insert(
            Path::new("bin"),
            Entry::Symlink {
                target: "usr/bin".into(),
            },
        )
        .unwrap();
        t
    }

    #[test]
    fn listing_names_every_entry_once_per_line() {
        let t = tree();
        let d = file_digests(&t, 3);
        let text = render(&lines(&t, &d));
        assert!(text.contains(&format!(
            "/usr/bin/etcd\tfile\t0755\t4\t{}\n",
            hex::encode(Sha256::digest(b"etcd"))
        )));
        assert!(text.contains("/bin\tlink\t0777\t0\tusr/bin\n"));
        assert!(text.contains("/usr/bin/odd\\tname\tfile"));
        assert_eq!(text.lines().count(), 1 + t.len());
        let sums = render_sha256sums(&lines(&t, &d));
        assert!(sums.contains("  ./usr/bin/etcd\n"), "{sums}");
    }

    #[test]
    fn the_first_difference_names_the_path() {
        let t = tree();
        let d = file_digests(&t, 1);
        let a = render(&lines(&t, &d));
        assert_eq!(first_difference(&a, &a), None);
        let mut t2 = t.clone();
        t2.insert(
            Path::new("usr/bin/etcd"),
            Entry::file(0o755, b"etcD".to_vec()),
        )
        .unwrap();
        let b = render(&lines(&t2, &file_digests(&t2, 2)));
        let diff = first_difference(&a, &b).unwrap();
        assert!(
            diff.starts_with("/usr/bin/etcd: expected file 0755 4 "),
            "{diff}"
        );
        t2.insert(Path::new("etc/extra"), Entry::file(0o644, vec![]))
            .unwrap();
        let c = render(&lines(&t2, &file_digests(&t2, 2)));
        assert_eq!(
            first_difference(&a, &c).unwrap(),
            "/etc: only in the rebuilt image"
        );
    }

    /// GNU sha256sum accepts the file, as a user would run it.
    #[test]
    fn sha256sum_checks_the_unpacked_files() {
        let t = tree();
        let d = tempfile::tempdir().unwrap();
        for (p, e) in t.iter() {
            if let Entry::File { data, .. } = e {
                let full = d.path().join(p);
                std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                std::fs::write(full, data.as_slice()).unwrap();
            }
        }
        let sums = d.path().join("sums");
        std::fs::write(&sums, render_sha256sums(&lines(&t, &file_digests(&t, 1)))).unwrap();
        let out = std::process::Command::new("sha256sum")
            .args(["--check", "--strict", "--quiet"])
            .arg(&sums)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}
