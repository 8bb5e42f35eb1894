//! The "newc" cpio format (magic `070701`), as the kernel unpacks an
//! initramfs.
//!
//! Entries are written in tree order with inode numbers 1, 2, ... in that
//! order, owner 0:0, device 0, one fixed mtime, names without a leading
//! `/`, and each header+name and each body padded to 4 bytes. The archive
//! ends with the `TRAILER!!!` entry and no block padding.

use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;

use super::{FormatError, S_IFDIR, S_IFLNK, S_IFREG};
use crate::tree::{Entry, Tree};

/// Magic of the newc format without checksums.
pub const MAGIC_NEWC: &[u8; 6] = b"070701";
/// Magic of the newc format with checksums (read only).
pub const MAGIC_CRC: &[u8; 6] = b"070702";
/// Name of the last entry.
pub const TRAILER: &str = "TRAILER!!!";

const HEADER_LEN: usize = 110;
const ZEROS: [u8; 4] = [0; 4];

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

struct Header<'a> {
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    name: &'a [u8],
    data: &'a [u8],
}

/// Writes one entry; returns the bytes written.
fn write_entry(w: &mut impl Write, h: &Header<'_>) -> io::Result<u64> {
    let filesize = u32::try_from(h.data.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: {} bytes do not fit the newc header's 32-bit size",
                String::from_utf8_lossy(h.name),
                h.data.len()
            ),
        )
    })?;
    let namesize = h.name.len() + 1;
    let namesize32 = u32::try_from(namesize)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry name too long"))?;
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    let header = format!(
        "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        h.ino, h.mode, 0, 0, h.nlink, h.mtime, filesize, 0, 0, 0, 0, namesize32, 0
    );
    debug_assert_eq!(header.len(), HEADER_LEN);
    w.write_all(header.as_bytes())?;
    w.write_all(h.name)?;
    let name_pad = pad4(HEADER_LEN + namesize);
    // The NUL ending the name, then the padding.
    w.write_all(&ZEROS[..1])?;
    w.write_all(&ZEROS[..name_pad])?;
    w.write_all(h.data)?;
    let data_pad = pad4(h.data.len());
    w.write_all(&ZEROS[..data_pad])?;
    Ok((HEADER_LEN + namesize + name_pad + h.data.len() + data_pad) as u64)
}

/// Writes `tree` as a newc archive to `out`, every entry with `mtime`.
/// Returns the number of bytes written.
pub fn write_newc(tree: &Tree, mtime: u64, out: &mut impl Write) -> io::Result<u64> {
    let mtime = u32::try_from(mtime).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("mtime {mtime} does not fit the newc header's 32 bits"),
        )
    })?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    let mut written = 0u64;
    let mut ino = 0u32;
    for (path, entry) in tree.iter() {
        ino = ino
            .checked_add(1)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many cpio entries"))?;
        let name = path.as_os_str().as_bytes();
        let (mode, nlink, data): (u32, u32, &[u8]) = match entry {
            Entry::Dir { mode } => (S_IFDIR | (mode & 0o7777), 2, &[]),
            Entry::File { mode, data } => (S_IFREG | (mode & 0o7777), 1, data.as_slice()),
            Entry::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_os_str().as_bytes()),
        };
        written += write_entry(
            &mut w,
            &Header {
                ino,
                mode,
                nlink,
                mtime,
                name,
                data,
            },
        )?;
    }
    written += write_entry(
        &mut w,
        &Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            mtime: 0,
            name: TRAILER.as_bytes(),
            data: &[],
        },
    )?;
    w.flush()?;
    Ok(written)
}

fn hex_field(header: &[u8], index: usize, offset: usize) -> Result<u32, FormatError> {
    let start = 6 + index * 8;
    let field = &header[start..start + 8];
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or_else(|| {
            FormatError::Cpio(format!(
                "bad header field {index} at offset {}: {:?}",
                offset + start,
                String::from_utf8_lossy(field)
            ))
        })
}

/// Lists a newc archive: `(path, mode, size)` for each entry, in archive
/// order, without the trailer. Concatenated archives (as the kernel
/// accepts, e.g. early microcode before the main initramfs) are listed one
/// after the other; NUL padding between them is skipped. The archive must
/// be uncompressed.
pub fn list_newc(data: &[u8]) -> Result<Vec<(String, u32, u64)>, FormatError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        // Between archives: skip NUL padding; stop at the end.
        while pos < data.len() && data[pos] == 0 {
            pos += 1;
        }
        if pos >= data.len() {
            if out.is_empty() && data.is_empty() {
                return Err(FormatError::Cpio("empty archive".into()));
            }
            return Ok(out);
        }
        // One archive, up to its trailer.
        loop {
            let header = data
                .get(pos..pos + HEADER_LEN)
                .ok_or_else(|| FormatError::Cpio(format!("truncated header at offset {pos}")))?;
            let magic = &header[..6];
            if magic != MAGIC_NEWC && magic != MAGIC_CRC {
                return Err(FormatError::Cpio(format!(
                    "bad magic {:?} at offset {pos} (only newc archives are read)",
                    String::from_utf8_lossy(magic)
                )));
            }
            let mode = hex_field(header, 1, pos)?;
            let filesize = hex_field(header, 6, pos)? as usize;
            let namesize = hex_field(header, 11, pos)? as usize;
            if namesize == 0 {
                return Err(FormatError::Cpio(format!("empty name at offset {pos}")));
            }
            let name_start = pos + HEADER_LEN;
            let name_bytes = data
                .get(name_start..name_start + namesize)
                .ok_or_else(|| FormatError::Cpio(format!("truncated name at offset {pos}")))?;
            let name_bytes = name_bytes.strip_suffix(&[0]).unwrap_or(name_bytes);
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            let data_start = name_start + namesize + pad4(HEADER_LEN + namesize);
            let data_end = data_start + filesize;
            if data_end > data.len() {
                return Err(FormatError::Cpio(format!(
                    "{name}: truncated body ({filesize} bytes at offset {data_start})"
                )));
            }
            pos = data_end + pad4(filesize);
            if name == TRAILER {
                break;
            }
            out.push((name, mode, filesize as u64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn layout_and_round_trip() {
        let mut t = Tree::new();
        t.insert(Path::new("a/b"), Entry::file(0o644, b"hello".to_vec()))
            .unwrap();
        let mut buf = Vec::new();
        let n = write_newc(&t, 1, &mut buf).unwrap();
        assert_eq!(n as usize, buf.len());
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"07070100000001000041ed"));
        let list = list_newc(&buf).unwrap();
        assert_eq!(
            list,
            vec![
                ("a".to_string(), 0o40755, 0),
                ("a/b".to_string(), 0o100644, 5)
            ]
        );
        // Concatenation with padding lists both.
        let mut two = buf.clone();
        two.extend_from_slice(&[0; 512]);
        two.extend_from_slice(&buf);
        assert_eq!(list_newc(&two).unwrap().len(), 4);
        assert!(list_newc(&buf[..buf.len() - 8]).is_err());
        assert!(write_newc(&t, 1 << 33, &mut Vec::new()).is_err());
    }
}
