//! SquashFS 4.0 (little endian) through backhand's `FilesystemWriter`.
//!
//! Deterministic: every inode, the root included, and the superblock carry
//! the one `mtime`; owners are 0:0 (a single-entry id table); entries are
//! inserted in the tree's sorted order; no NFS export table is written.
//! File data is read straight from the tree, not copied.

use std::fs::File;
use std::io::{BufReader, BufWriter, Cursor, Seek, Write};
use std::path::Path;

use backhand::compression::Compressor;
use backhand::kind::{self, Kind};
use backhand::{
    FilesystemCompressor, FilesystemReader, FilesystemWriter, InnerNode, NodeHeader,
    DEFAULT_BLOCK_SIZE,
};

use super::{FormatError, S_IFDIR, S_IFLNK, S_IFREG};
use crate::tree::{Entry, Tree};

/// Compression of data and metadata blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// xz (LZMA2) at preset 6, dictionary = block size.
    Xz,
    /// zstd at level 3 (backhand's default).
    Zstd,
    /// zlib at level 9.
    Gzip,
}

impl Compression {
    fn compressor(self) -> Compressor {
        match self {
            Compression::Xz => Compressor::Xz,
            Compression::Zstd => Compressor::Zstd,
            Compression::Gzip => Compressor::Gzip,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xz" => Ok(Compression::Xz),
            "zstd" => Ok(Compression::Zstd),
            "gzip" | "zlib" => Ok(Compression::Gzip),
            other => Err(FormatError::Invalid(format!(
                "unknown squashfs compression {other:?} (xz, zstd or gzip)"
            ))),
        }
    }
}

/// Root directory permissions.
const ROOT_MODE: u16 = 0o755;

/// An empty image whose root inode carries `mtime`: backhand has no setter
/// for the root's mtime, but `FilesystemWriter::from_fs_reader` takes the
/// root's header from a reader, whose nodes are public. So an empty image
/// is written, read back, its root header set, and used as the base.
fn base_reader(mtime: u32) -> Result<FilesystemReader<'static>, FormatError> {
    let mut empty = FilesystemWriter::default();
    empty.set_no_padding();
    let mut buf = Cursor::new(Vec::new());
    empty
        .write(&mut buf)
        .map_err(FormatError::squashfs("writing the empty base image"))?;
    buf.set_position(0);
    let mut reader = FilesystemReader::from_reader(buf)
        .map_err(FormatError::squashfs("reading the empty base image"))?;
    let root =
        reader.root.nodes.first_mut().ok_or_else(|| {
            FormatError::Invalid("squashfs: the empty base image has no root".into())
        })?;
    root.header = NodeHeader::new(ROOT_MODE, 0, 0, mtime);
    Ok(reader)
}

/// Writes `tree` as a squashfs image to `out` (from its start). Returns
/// the image's size in bytes, padded to 4 KiB.
pub fn write(
    tree: &Tree,
    mtime: u32,
    compression: Compression,
    out: &mut (impl Write + Seek),
) -> Result<u64, FormatError> {
    let base = base_reader(mtime)?;
    let mut fs =
        FilesystemWriter::from_fs_reader(&base).map_err(FormatError::squashfs("base image"))?;
    let kind = Kind::from_const(kind::LE_V4_0)
        .map_err(|e| FormatError::Invalid(format!("squashfs kind: {e}")))?;
    fs.set_kind(kind);
    fs.set_block_size(DEFAULT_BLOCK_SIZE);
    fs.set_time(mtime);
    fs.set_only_root_id();
    fs.set_root_mode(ROOT_MODE);
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    fs.set_no_duplicate_files(true);
    fs.set_compressor(
        FilesystemCompressor::new(compression.compressor(), None)
            .map_err(FormatError::squashfs(format!("compressor {compression:?}")))?,
    );

    for (path, entry) in tree.iter() {
        let what = || format!("adding {:?}", path);
        match entry {
            Entry::Dir { mode } => fs.push_dir(path, header(*mode, mtime)),
            Entry::File { mode, data } => {
                fs.push_file(Cursor::new(data.as_slice()), path, header(*mode, mtime))
            }
            Entry::Symlink { target } => {
                fs.push_symlink(target.clone(), path, NodeHeader::new(0o777, 0, 0, mtime))
            }
        }
        .map_err(|e| {
            let parent_hint = match e {
                backhand::BackhandError::InvalidFilePath => {
                    " (its parent is not a directory in the tree, e.g. a symlink)"
                }
                _ => "",
            };
            FormatError::Squashfs {
                what: format!("{}{parent_hint}", what()),
                source: e,
            }
        })?;
    }

    let mut w = BufWriter::with_capacity(1 << 20, out);
    let (_superblock, written) = fs
        .write(&mut w)
        .map_err(FormatError::squashfs("writing the image"))?;
    w.flush()
        .map_err(FormatError::io("squashfs: flushing the image"))?;
    Ok(written)
}

fn header(mode: u32, mtime: u32) -> NodeHeader {
    // Permission bits only (setuid/setgid/sticky included); the inode type
    // carries the file type.
    NodeHeader::new((mode & 0o7777) as u16, 0, 0, mtime)
}

/// Lists the image at `path`: `(path, mode, size)` for every entry but
/// the root, in the image's (sorted) order. `mode` includes the file type
/// bits; `size` is the file length, the target length for symlinks, 0 for
/// the rest.
pub fn list(path: &Path) -> Result<Vec<(String, u32, u64)>, FormatError> {
    let file = File::open(path).map_err(FormatError::io(format!("opening {}", path.display())))?;
    let fs = FilesystemReader::from_reader(BufReader::new(file))
        .map_err(FormatError::squashfs(format!("reading {}", path.display())))?;
    let mut out = Vec::new();
    for node in fs.files() {
        let Ok(rel) = node.fullpath.strip_prefix("/") else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let perm = u32::from(node.header.permissions) & 0o7777;
        let (kind, size) = match &node.inner {
            InnerNode::File(f) => (S_IFREG, f.file_len() as u64),
            InnerNode::Dir(_) => (S_IFDIR, 0),
            InnerNode::Symlink(s) => (S_IFLNK, s.link.as_os_str().len() as u64),
            InnerNode::CharacterDevice(_) => (0o020000, 0),
            InnerNode::BlockDevice(_) => (0o060000, 0),
            InnerNode::NamedPipe => (0o010000, 0),
            InnerNode::Socket => (0o140000, 0),
        };
        out.push((rel.to_string_lossy().into_owned(), kind | perm, size));
    }
    Ok(out)
}
