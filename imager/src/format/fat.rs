//! The EFI system partition: a FAT volume, written here directly.
//!
//! FAT32 from 64 MiB up, FAT16 below (down to about 2 MiB). The layout is
//! fixed by the input alone: objects are laid out depth first in name
//! order, each in contiguous clusters; the volume id and label are given;
//! every timestamp is SOURCE_DATE_EPOCH. So the same files give the same
//! bytes. Names that are not plain upper-case 8.3 get a VFAT long name and
//! a generated short alias ("A~1.CON"). The `fatfs` crate (0.3, whose own
//! writer emits entries fsck.fat rejects) serves only as the reader.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Seek, SeekFrom, Write};

use fatfs::{FileSystem, FsOptions, ReadWriteSeek};

use super::FormatError;

/// Volumes of this size and up are FAT32.
pub const FAT32_MIN_SIZE: u64 = 64 << 20;

const SECTOR: u64 = 512;
const DIR_ENTRY: usize = 32;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LFN: u8 = 0x0F;
/// Root directory entries of a FAT16 volume.
const FAT16_ROOT_ENTRIES: u32 = 512;
const MEDIA: u8 = 0xF8;

/// A DOS date and time: `(date, time)` as FAT stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DosTime {
    pub date: u16,
    pub time: u16,
}

/// Days since 1970-01-01 to a (year, month, day) civil date, proleptic
/// Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The UTC date and time of `epoch` (seconds since 1970) as FAT stores
/// them, clamped to what FAT holds (1980-01-01 to 2107-12-31); seconds are
/// rounded down to even.
pub fn dos_time(epoch: u64) -> DosTime {
    const MIN: u64 = 315_532_800; // 1980-01-01T00:00:00Z
    const MAX: u64 = 4_354_819_198; // 2107-12-31T23:59:58Z
    let t = epoch.clamp(MIN, MAX);
    let secs = t % 86_400;
    let (y, m, d) = civil_from_days((t / 86_400) as i64);
    DosTime {
        date: (((y - 1980) as u16) << 9) | ((m as u16) << 5) | d as u16,
        time: (((secs / 3600) as u16) << 11)
            | (((secs / 60 % 60) as u16) << 5)
            | ((secs % 60 / 2) as u16),
    }
}

/// A volume label as FAT stores it: 11 bytes, upper case, space padded.
fn label_bytes(label: &str) -> Result<[u8; 11], FormatError> {
    let ok = |b: u8| b == b' ' || (b.is_ascii_graphic() && !b"\"*+,./:;<=>?[\\]|".contains(&b));
    if label.len() > 11 || !label.bytes().all(ok) {
        return Err(FormatError::Invalid(format!(
            "FAT volume label {label:?}: at most 11 printable ASCII characters, no punctuation"
        )));
    }
    let mut out = [b' '; 11];
    for (o, b) in out.iter_mut().zip(label.bytes()) {
        *o = b.to_ascii_uppercase();
    }
    Ok(out)
}

fn bad_name(path: &str, why: &str) -> FormatError {
    FormatError::Invalid(format!("FAT: bad file path {path:?}: {why}"))
}

/// Checks one path component as a VFAT long name.
fn check_name(path: &str, name: &str) -> Result<(), FormatError> {
    if name == "." || name == ".." {
        return Err(bad_name(path, "\".\" and \"..\" are not allowed"));
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err(bad_name(path, "a name may not end with '.' or ' '"));
    }
    if name.encode_utf16().count() > 255 {
        return Err(bad_name(path, "a name is longer than 255 characters"));
    }
    if name
        .chars()
        .any(|c| (c as u32) < 0x20 || "\"*/:<>?\\|".contains(c))
    {
        return Err(bad_name(path, "a name has a character FAT does not allow"));
    }
    Ok(())
}

/// A character allowed in a short name as it is.
fn sfn_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'()-@^_`{}~".contains(&b)
}

/// `name` as an 8.3 short name if it is one exactly (upper case, base of
/// 1-8 and extension of 0-3 allowed characters): no long name needed.
fn exact_sfn(name: &str) -> Option<[u8; 11]> {
    let (base, ext) = match name.find('.') {
        Some(i) => (&name[..i], &name[i + 1..]),
        None => (name, ""),
    };
    if base.is_empty()
        || base.len() > 8
        || ext.len() > 3
        || (name.contains('.') && ext.is_empty())
        || !base.bytes().all(sfn_char)
        || !ext.bytes().all(sfn_char)
    {
        return None;
    }
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base.as_bytes());
    out[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(out)
}

/// Upper-cases and filters part of a long name for its short alias;
/// returns the bytes and whether anything was lost.
fn sfn_part(s: &str, max: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut lossy = false;
    for c in s.chars() {
        if c == ' ' || c == '.' {
            lossy = true;
            continue;
        }
        let u = c.to_ascii_uppercase();
        let b = if u.is_ascii() && sfn_char(u as u8) {
            u as u8
        } else {
            lossy = true;
            b'_'
        };
        if out.len() == max {
            lossy = true;
            break;
        }
        out.push(b);
    }
    (out, lossy)
}

/// A short alias for long name `name`, unique among `taken`, the way
/// Windows makes them: "loader" -> "LOADER", "a.conf" -> "A~1.CON".
fn alias_sfn(name: &str, taken: &BTreeSet<[u8; 11]>) -> Option<[u8; 11]> {
    let trimmed = name.trim_start_matches('.');
    let (base, ext) = match trimmed.rfind('.') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (trimmed, ""),
    };
    let (mut b, mut lossy) = sfn_part(base, 8);
    let (e, elossy) = sfn_part(ext, 3);
    lossy |= elossy || trimmed.len() != name.len();
    if b.is_empty() {
        b.push(b'_');
        lossy = true;
    }
    let build = |b: &[u8]| {
        let mut out = [b' '; 11];
        out[..b.len()].copy_from_slice(b);
        out[8..8 + e.len()].copy_from_slice(&e);
        out
    };
    if !lossy {
        let c = build(&b);
        if !taken.contains(&c) {
            return Some(c);
        }
    }
    (1..1_000_000u32).find_map(|n| {
        let tail = format!("~{n}");
        let keep = b.len().min(8 - tail.len());
        let mut bb = b[..keep].to_vec();
        bb.extend_from_slice(tail.as_bytes());
        let c = build(&bb);
        (!taken.contains(&c)).then_some(c)
    })
}

fn lfn_checksum(sfn: &[u8; 11]) -> u8 {
    sfn.iter().fold(0u8, |sum, &b| {
        ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(b)
    })
}

/// The long-name entries for `name`, in on-disk order (last part first).
fn lfn_entries(name: &str, sfn: &[u8; 11]) -> Vec<[u8; DIR_ENTRY]> {
    let mut units: Vec<u16> = name.encode_utf16().collect();
    let count = units.len().div_ceil(13);
    if units.len() < count * 13 {
        units.push(0);
        units.resize(count * 13, 0xFFFF);
    }
    let sum = lfn_checksum(sfn);
    let mut out = Vec::with_capacity(count);
    for i in (0..count).rev() {
        let part = &units[i * 13..i * 13 + 13];
        let mut e = [0u8; DIR_ENTRY];
        e[0] = (i as u8 + 1) | if i + 1 == count { 0x40 } else { 0 };
        let put = |e: &mut [u8; DIR_ENTRY], at: usize, u: &[u16]| {
            for (k, v) in u.iter().enumerate() {
                e[at + 2 * k..at + 2 * k + 2].copy_from_slice(&v.to_le_bytes());
            }
        };
        put(&mut e, 1, &part[..5]);
        e[11] = ATTR_LFN;
        e[13] = sum;
        put(&mut e, 14, &part[5..11]);
        put(&mut e, 28, &part[11..13]);
        out.push(e);
    }
    out
}

fn sfn_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32, t: DosTime) -> [u8; DIR_ENTRY] {
    let mut e = [0u8; DIR_ENTRY];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    e[14..16].copy_from_slice(&t.time.to_le_bytes()); // created
    e[16..18].copy_from_slice(&t.date.to_le_bytes());
    e[18..20].copy_from_slice(&t.date.to_le_bytes()); // accessed
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&t.time.to_le_bytes()); // written
    e[24..26].copy_from_slice(&t.date.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// The files to write, as a tree.
#[derive(Debug, Default)]
struct DirNode<'a> {
    children: BTreeMap<&'a str, Node<'a>>,
}

#[derive(Debug)]
enum Node<'a> {
    Dir(DirNode<'a>),
    File { path: &'a str, data: &'a [u8] },
}

fn build_tree(files: &[(String, Vec<u8>)]) -> Result<DirNode<'_>, FormatError> {
    let mut root = DirNode::default();
    let mut seen = BTreeSet::new();
    for (path, data) in files {
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let Some((name, parents)) = comps.split_last() else {
            return Err(bad_name(path, "empty"));
        };
        for c in &comps {
            check_name(path, c)?;
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FormatError::Invalid(format!(
                "FAT: {path} is {} bytes, over FAT's 4 GiB file size limit",
                data.len()
            )));
        }
        // Names are case-insensitive: no two may differ only in case.
        let mut key = String::new();
        for c in &comps {
            key.push_str(&c.to_uppercase());
            if !seen.insert((key.clone(), true)) && seen.contains(&(key.clone(), false)) {
                return Err(bad_name(path, "a file has this path as its directory"));
            }
            key.push('/');
        }
        key.pop();
        seen.remove(&(key.clone(), true));
        if !seen.insert((key.clone(), false)) {
            return Err(bad_name(
                path,
                "given twice (FAT names are case-insensitive)",
            ));
        }
        let mut dir = &mut root;
        for c in parents {
            let node = dir
                .children
                .entry(c)
                .or_insert_with(|| Node::Dir(DirNode::default()));
            dir = match node {
                Node::Dir(d) => d,
                Node::File { .. } => {
                    return Err(bad_name(path, "a parent is a file"));
                }
            };
        }
        if dir.children.contains_key(name) {
            return Err(bad_name(path, "a directory has this path"));
        }
        dir.children.insert(name, Node::File { path, data });
    }
    // Case-insensitive clashes between directories of differing case
    // (e.g. "EFI/a" and "efi/b") would give one FAT directory two entries.
    fn clash(dir: &DirNode<'_>) -> Option<String> {
        let mut names = BTreeSet::new();
        for (name, node) in &dir.children {
            if !names.insert(name.to_uppercase()) {
                return Some((*name).to_string());
            }
            if let Node::Dir(d) = node {
                if let Some(n) = clash(d) {
                    return Some(n);
                }
            }
        }
        None
    }
    if let Some(n) = clash(&root) {
        return Err(FormatError::Invalid(format!(
            "FAT: {n:?} is given in two cases (FAT names are case-insensitive)"
        )));
    }
    Ok(root)
}

/// Sizes and offsets of a volume.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    fat32: bool,
    sectors_per_cluster: u32,
    reserved: u32,
    fat_sectors: u32,
    root_sectors: u32,
    total_sectors: u32,
    /// Number of data clusters (numbered 2..clusters+2).
    clusters: u32,
}

impl Geometry {
    fn new(size_bytes: u64) -> Result<Self, FormatError> {
        let total_sectors = u32::try_from(size_bytes / SECTOR).map_err(|_| {
            FormatError::Invalid(format!("FAT volume size {size_bytes}: too large"))
        })?;
        let fat32 = size_bytes >= FAT32_MIN_SIZE;
        let (reserved, root_sectors, entry_bytes, min, max) = if fat32 {
            (32u32, 0u32, 4u64, 65_525u32, 0x0FFF_FFF5u32)
        } else {
            (
                4,
                FAT16_ROOT_ENTRIES * DIR_ENTRY as u32 / SECTOR as u32,
                2,
                4_085,
                65_524,
            )
        };
        // Cluster size: FAT32 as Microsoft's table (512 B up to 260 MiB,
        // 4 KiB up to 8 GiB, then larger); FAT16 the smallest that keeps
        // the cluster count in range.
        let mut spc: u32 = if fat32 {
            match size_bytes {
                s if s <= 260 << 20 => 1,
                s if s <= 8 << 30 => 8,
                s if s <= 16 << 30 => 16,
                s if s <= 32 << 30 => 32,
                _ => 64,
            }
        } else {
            1
        };
        loop {
            let g = Self::with_cluster(
                total_sectors,
                fat32,
                spc,
                reserved,
                root_sectors,
                entry_bytes,
            );
            if g.clusters > max && spc < 64 {
                spc *= 2;
                continue;
            }
            if g.clusters < min || g.clusters > max {
                return Err(FormatError::Invalid(format!(
                    "FAT volume size {size_bytes}: too small for {}",
                    if fat32 {
                        "FAT32"
                    } else {
                        "FAT16 (at least about 2.1 MiB)"
                    }
                )));
            }
            return Ok(g);
        }
    }

    fn with_cluster(
        total_sectors: u32,
        fat32: bool,
        spc: u32,
        reserved: u32,
        root_sectors: u32,
        entry_bytes: u64,
    ) -> Self {
        let total = u64::from(total_sectors);
        let fixed = u64::from(reserved) + u64::from(root_sectors);
        let mut fat_sectors = 0u64;
        let clusters = loop {
            let data = total.saturating_sub(fixed + 2 * fat_sectors);
            let clusters = data / u64::from(spc);
            let need = ((clusters + 2) * entry_bytes).div_ceil(SECTOR);
            if need <= fat_sectors {
                break clusters;
            }
            fat_sectors = need;
        };
        Geometry {
            fat32,
            sectors_per_cluster: spc,
            reserved,
            fat_sectors: fat_sectors as u32,
            root_sectors,
            total_sectors,
            clusters: clusters.min(u64::from(u32::MAX - 2)) as u32,
        }
    }

    fn cluster_bytes(&self) -> u64 {
        u64::from(self.sectors_per_cluster) * SECTOR
    }

    fn root_dir_offset(&self) -> u64 {
        u64::from(self.reserved + 2 * self.fat_sectors) * SECTOR
    }

    fn data_offset(&self) -> u64 {
        self.root_dir_offset() + u64::from(self.root_sectors) * SECTOR
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_offset() + u64::from(cluster - 2) * self.cluster_bytes()
    }
}

/// Lays the tree out and writes the data region.
struct Writer<'o, O> {
    g: Geometry,
    out: &'o mut O,
    /// FAT entries, indexed by cluster number.
    fat: Vec<u32>,
    next: u32,
    t: DosTime,
    label: Option<[u8; 11]>,
    size_bytes: u64,
}

impl<O: Write + Seek> Writer<'_, O> {
    fn eoc(&self) -> u32 {
        if self.g.fat32 {
            0x0FFF_FFFF
        } else {
            0xFFFF
        }
    }

    /// Allocates `bytes` worth of contiguous clusters; 0 for no bytes.
    fn alloc(&mut self, bytes: u64, what: &str) -> Result<u32, FormatError> {
        let n = bytes.div_ceil(self.g.cluster_bytes());
        if n == 0 {
            return Ok(0);
        }
        let first = self.next;
        let end = u64::from(first) + n;
        if end > u64::from(self.g.clusters) + 2 {
            return Err(FormatError::Invalid(format!(
                "FAT: {what} does not fit the volume of {} bytes",
                self.size_bytes
            )));
        }
        let end = end as u32;
        let eoc = self.eoc();
        for c in first..end {
            self.fat[c as usize] = if c + 1 == end { eoc } else { c + 1 };
        }
        self.next = end;
        Ok(first)
    }

    fn write_at(&mut self, offset: u64, data: &[u8], what: &str) -> Result<(), FormatError> {
        self.out
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.out.write_all(data))
            .map_err(FormatError::fat(format!("writing {what}")))
    }

    /// Writes directory `dir` and everything under it. `own` is its first
    /// cluster for the root of FAT32 (already placed), `parent` the first
    /// cluster of its parent (0 for the root). Returns its first cluster.
    fn dir(
        &mut self,
        dir: &DirNode<'_>,
        path: &str,
        is_root: bool,
        parent: u32,
    ) -> Result<u32, FormatError> {
        // Names first: they fix the directory's size.
        let mut taken = BTreeSet::new();
        let mut names = Vec::with_capacity(dir.children.len());
        for name in dir.children.keys() {
            let (sfn, long) = match exact_sfn(name) {
                Some(s) if !taken.contains(&s) => (s, false),
                _ => {
                    let s = alias_sfn(name, &taken).ok_or_else(|| {
                        FormatError::Invalid(format!("FAT: no short name left for {path}{name}"))
                    })?;
                    (s, true)
                }
            };
            taken.insert(sfn);
            names.push((sfn, long));
        }
        let entries = if is_root {
            usize::from(self.label.is_some())
        } else {
            2
        } + names
            .iter()
            .zip(dir.children.keys())
            .map(|((_, long), name)| {
                1 + if *long {
                    name.encode_utf16().count().div_ceil(13)
                } else {
                    0
                }
            })
            .sum::<usize>();
        let bytes = (entries * DIR_ENTRY) as u64;
        let what = if path.is_empty() {
            "/".to_string()
        } else {
            format!("/{path}")
        };

        let own = if is_root && !self.g.fat32 {
            if entries > FAT16_ROOT_ENTRIES as usize {
                return Err(FormatError::Invalid(format!(
                    "FAT: the root directory has {entries} entries, FAT16 holds {FAT16_ROOT_ENTRIES}"
                )));
            }
            0
        } else {
            self.alloc(bytes.max(1), &format!("directory {what}"))?
        };

        let mut buf = Vec::with_capacity(bytes as usize);
        if is_root {
            if let Some(label) = self.label {
                buf.extend_from_slice(&sfn_entry(&label, ATTR_VOLUME_ID, 0, 0, self.t));
            }
        } else {
            let mut dot = [b' '; 11];
            dot[0] = b'.';
            buf.extend_from_slice(&sfn_entry(&dot, ATTR_DIRECTORY, own, 0, self.t));
            dot[1] = b'.';
            buf.extend_from_slice(&sfn_entry(&dot, ATTR_DIRECTORY, parent, 0, self.t));
        }
        for ((name, node), (sfn, long)) in dir.children.iter().zip(&names) {
            let (attr, cluster, size) = match node {
                Node::File { path, data } => {
                    let c = self.alloc(data.len() as u64, path)?;
                    if c != 0 {
                        let off = self.g.cluster_offset(c);
                        self.write_at(off, data, path)?;
                    }
                    (ATTR_ARCHIVE, c, data.len() as u32)
                }
                Node::Dir(d) => {
                    let sub = format!("{path}{name}/");
                    // ".." of a directory in the root points to cluster 0.
                    let c = self.dir(d, &sub, false, if is_root { 0 } else { own })?;
                    (ATTR_DIRECTORY, c, 0)
                }
            };
            if *long {
                for e in lfn_entries(name, sfn) {
                    buf.extend_from_slice(&e);
                }
            }
            buf.extend_from_slice(&sfn_entry(sfn, attr, cluster, size, self.t));
        }
        let offset = if own == 0 {
            self.g.root_dir_offset()
        } else {
            self.g.cluster_offset(own)
        };
        self.write_at(offset, &buf, &format!("directory {what}"))?;
        Ok(own)
    }
}

fn boot_sector(g: &Geometry, volume_id: u32, label: &[u8; 11]) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[3..11].copy_from_slice(b"MSWIN4.1");
    b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
    b[13] = g.sectors_per_cluster as u8;
    b[14..16].copy_from_slice(&(g.reserved as u16).to_le_bytes());
    b[16] = 2;
    b[21] = MEDIA;
    b[24..26].copy_from_slice(&32u16.to_le_bytes()); // sectors per track
    b[26..28].copy_from_slice(&64u16.to_le_bytes()); // heads
    let ext = if g.fat32 {
        b[36..40].copy_from_slice(&g.fat_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&2u32.to_le_bytes()); // root cluster
        b[48..50].copy_from_slice(&1u16.to_le_bytes()); // FSInfo sector
        b[50..52].copy_from_slice(&6u16.to_le_bytes()); // backup boot sector
        64
    } else {
        b[17..19].copy_from_slice(&(FAT16_ROOT_ENTRIES as u16).to_le_bytes());
        b[22..24].copy_from_slice(&(g.fat_sectors as u16).to_le_bytes());
        36
    };
    if g.total_sectors < 0x10000 && !g.fat32 {
        b[19..21].copy_from_slice(&(g.total_sectors as u16).to_le_bytes());
    } else {
        b[32..36].copy_from_slice(&g.total_sectors.to_le_bytes());
    }
    b[ext] = 0x80; // drive number
    b[ext + 2] = 0x29; // extended boot signature
    b[ext + 3..ext + 7].copy_from_slice(&volume_id.to_le_bytes());
    b[ext + 7..ext + 18].copy_from_slice(label);
    b[ext + 18..ext + 26].copy_from_slice(if g.fat32 { b"FAT32   " } else { b"FAT16   " });
    // Jump over the BPB to a "halt forever" loop: not a BIOS-bootable
    // volume.
    let code = ext + 26;
    b[0] = 0xEB;
    b[1] = (code - 2) as u8;
    b[2] = 0x90;
    b[code..code + 4].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFD]); // cli; hlt; jmp hlt
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

fn fs_info(free: u32, next_free: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
    b[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
    b[488..492].copy_from_slice(&free.to_le_bytes());
    b[492..496].copy_from_slice(&next_free.to_le_bytes());
    b[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
    b
}

/// Writes a FAT volume of `size_bytes` holding `files` (paths relative to
/// the root, '/'-separated, parent directories created) to `out`, from its
/// start. Timestamps are all `epoch` (SOURCE_DATE_EPOCH). `out` should be
/// empty; whatever it held within the volume's size is zeroed first, so the
/// result does not depend on it.
pub fn write_esp(
    files: &[(String, Vec<u8>)],
    size_bytes: u64,
    volume_label: &str,
    volume_id: u32,
    epoch: u64,
    out: &mut (impl Read + Write + Seek),
) -> Result<(), FormatError> {
    if size_bytes & (SECTOR - 1) != 0 {
        return Err(FormatError::Invalid(format!(
            "FAT volume size {size_bytes}: not a multiple of {SECTOR}"
        )));
    }
    let g = Geometry::new(size_bytes)?;
    let label = if volume_label.trim().is_empty() {
        None
    } else {
        Some(label_bytes(volume_label)?)
    };
    let tree = build_tree(files)?;

    prepare(out, size_bytes).map_err(FormatError::fat("sizing the volume"))?;

    let mut w = Writer {
        g,
        out,
        fat: vec![0; g.clusters as usize + 2],
        next: 2,
        t: dos_time(epoch),
        label,
        size_bytes,
    };
    w.fat[0] = if g.fat32 { 0x0FFF_FF00 } else { 0xFF00 } | u32::from(MEDIA);
    w.fat[1] = w.eoc();
    w.dir(&tree, "", true, 0)?;

    // Reserved sectors (boot, FSInfo, backups), then both FATs.
    let used = w.next - 2;
    let mut meta = vec![0u8; w.g.root_dir_offset() as usize];
    let boot = boot_sector(&g, volume_id, &label.unwrap_or(*b"NO NAME    "));
    meta[..512].copy_from_slice(&boot);
    if g.fat32 {
        let next_free = if used < g.clusters {
            w.next
        } else {
            0xFFFF_FFFF
        };
        let info = fs_info(g.clusters - used, next_free);
        meta[512..1024].copy_from_slice(&info);
        meta[6 * 512..7 * 512].copy_from_slice(&boot);
        meta[7 * 512..8 * 512].copy_from_slice(&info);
    }
    let fat_bytes = g.fat_sectors as usize * SECTOR as usize;
    let fat_start = g.reserved as usize * SECTOR as usize;
    {
        let first = &mut meta[fat_start..fat_start + fat_bytes];
        if g.fat32 {
            for (i, v) in w.fat.iter().enumerate() {
                first[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
        } else {
            for (i, v) in w.fat.iter().enumerate() {
                first[2 * i..2 * i + 2].copy_from_slice(&(*v as u16).to_le_bytes());
            }
        }
    }
    meta.copy_within(fat_start..fat_start + fat_bytes, fat_start + fat_bytes);
    // The FAT16 root directory lies right after the FATs and is already
    // written; `meta` ends before it.
    w.write_at(0, &meta, "the boot sector and FATs")?;
    out_flush(w.out)
}

fn out_flush(out: &mut impl Write) -> Result<(), FormatError> {
    out.flush().map_err(FormatError::fat("flushing"))
}

/// Makes `out` exactly zero over `0..size`: zeroes what it held there and
/// extends it to `size`.
fn prepare(out: &mut (impl Write + Seek), size: u64) -> io::Result<()> {
    let existing = out.seek(SeekFrom::End(0))?;
    if existing > 0 {
        out.seek(SeekFrom::Start(0))?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = existing.min(size);
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            out.write_all(&zeros[..n])?;
            left -= n as u64;
        }
    }
    if existing < size {
        out.seek(SeekFrom::Start(size - 1))?;
        out.write_all(&[0])?;
    }
    Ok(())
}

/// A read-only view of a byte slice, as fatfs wants a read-write device.
#[derive(Debug)]
struct ReadOnly<'a>(io::Cursor<&'a [u8]>);

impl Read for ReadOnly<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Seek for ReadOnly<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

impl Write for ReadOnly<'_> {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "FAT image opened read-only",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Lists the files of a FAT volume image: `(path, size)`, paths
/// '/'-separated without a leading '/', sorted. Directories are not listed
/// themselves.
pub fn list(image: &[u8]) -> Result<Vec<(String, u64)>, FormatError> {
    let fs = FileSystem::new(ReadOnly(io::Cursor::new(image)), FsOptions::new())
        .map_err(FormatError::fat("opening the volume"))?;
    let mut out = Vec::new();
    walk(&fs.root_dir(), "", &mut out)?;
    out.sort();
    Ok(out)
}

fn walk<T: ReadWriteSeek>(
    dir: &fatfs::Dir<'_, T>,
    prefix: &str,
    out: &mut Vec<(String, u64)>,
) -> Result<(), FormatError> {
    for entry in dir.iter() {
        let entry = entry.map_err(FormatError::fat(format!("reading directory /{prefix}")))?;
        let name = entry.file_name();
        if name == "." || name == ".." {
            continue;
        }
        let path = format!("{prefix}{name}");
        if entry.is_dir() {
            walk(&entry.to_dir(), &format!("{path}/"), out)?;
        } else {
            out.push((path, entry.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_dates() {
        // 2023-11-14T22:13:20Z
        let t = dos_time(1_700_000_000);
        assert_eq!(t.date, (43 << 9) | (11 << 5) | 14);
        assert_eq!(t.time, (22 << 11) | (13 << 5) | 10);
        assert_eq!(dos_time(0).date, (1 << 5) | 1);
        // 2000-02-29
        assert_eq!(dos_time(951_782_400).date, (20 << 9) | (2 << 5) | 29);
    }

    #[test]
    fn labels_and_short_names() {
        assert_eq!(&label_bytes("esp").unwrap(), b"ESP        ");
        assert!(label_bytes("much-too-long-label").is_err());
        assert!(label_bytes("a/b").is_err());
        assert_eq!(exact_sfn("BOOTX64.EFI"), Some(*b"BOOTX64 EFI"));
        assert_eq!(exact_sfn("EFI"), Some(*b"EFI        "));
        assert_eq!(exact_sfn("loader"), None);
        assert_eq!(exact_sfn("A.B.C"), None);
        let mut taken = BTreeSet::new();
        assert_eq!(alias_sfn("loader", &taken), Some(*b"LOADER     "));
        assert_eq!(alias_sfn("a.conf", &taken), Some(*b"A~1     CON"));
        taken.insert(*b"A~1     CON");
        assert_eq!(alias_sfn("a.config", &taken), Some(*b"A~2     CON"));
        assert_eq!(
            alias_sfn("systemd-bootx64.efi", &taken),
            Some(*b"SYSTEM~1EFI")
        );
        let e = lfn_entries("a.conf", b"A~1     CON");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0][0], 0x41);
        assert_eq!(e[0][11], ATTR_LFN);
    }

    #[test]
    fn geometry() {
        let g = Geometry::new(128 << 20).unwrap();
        assert!(g.fat32 && g.sectors_per_cluster == 1 && g.clusters >= 65_525);
        let g = Geometry::new(16 << 20).unwrap();
        assert!(!g.fat32 && (4_085..65_525).contains(&g.clusters));
        let g = Geometry::new(48 << 20).unwrap();
        assert!(!g.fat32 && g.clusters < 65_525);
        assert!(Geometry::new(1 << 20).is_err());
        let g = Geometry::new(1 << 30).unwrap();
        assert_eq!(g.sectors_per_cluster, 8);
    }
}
