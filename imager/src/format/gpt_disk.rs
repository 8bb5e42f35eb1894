//! A GPT-partitioned disk image: a sparse file with a protective MBR, the
//! primary and backup GPT (128 entries, 512-byte sectors) and each
//! partition's contents copied at its offset.
//!
//! Deterministic: the disk GUID and every partition's unique GUID are UUID
//! v5 of a seed and the partition's name; partitions start on 1 MiB
//! boundaries, in the order given.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition::Partition;
use gpt::partition_types::{OperatingSystem, Type};
use gpt::GptConfig;
use machine_api::layout::type_guid;
use uuid::Uuid;

use super::FormatError;

/// EFI system partition (the image layout contract's,
/// [`machine_api::layout::type_guid`]).
pub const ESP: Uuid = Uuid::from_u128(type_guid::ESP);
/// Root partition (x86-64), Discoverable Partitions Specification.
pub const LINUX_ROOT_X86_64: Uuid = Uuid::from_u128(type_guid::ROOT_X86_64);
/// Linux filesystem data.
pub const LINUX_DATA: Uuid = Uuid::from_u128(type_guid::LINUX_DATA);

/// Sector (logical block) size.
pub const SECTOR: u64 = 512;
/// Partition start alignment: 1 MiB.
pub const ALIGN: u64 = 1 << 20;
/// Sectors at the end of the disk taken by the backup GPT: 32 of entries
/// and the header.
const BACKUP_GPT_SECTORS: u64 = 33;
/// Longest GPT partition name, in UTF-16 code units.
const MAX_NAME_UNITS: usize = 36;

/// One partition to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpec {
    /// GPT partition name, e.g. "EFI", "A", "B", "STATE", "EPHEMERAL".
    pub name: String,
    pub type_guid: Uuid,
    /// Size in bytes, rounded up to 1 MiB; 0 = the rest of the disk (last
    /// partition only).
    pub size_bytes: u64,
    /// File copied at the partition's start; None leaves it zeroed.
    pub contents: Option<PathBuf>,
}

/// One partition of a written or read disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub name: String,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    /// The partition's unique GUID.
    pub guid: Uuid,
    pub type_guid: Uuid,
}

impl PartitionInfo {
    /// Byte offset of the partition on the disk.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    /// Size of the partition in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

const GUID_NAMESPACE: Uuid = Uuid::from_u128(0x6d2b_9a3e_51c4_4f1e_9b7a_2c3d_4e5f_6a7b);

/// The disk GUID for `seed`.
pub fn disk_guid(seed: &str) -> Uuid {
    Uuid::new_v5(&GUID_NAMESPACE, format!("disk\0{seed}").as_bytes())
}

/// The unique GUID of partition `name` for `seed`.
pub fn partition_guid(seed: &str, name: &str) -> Uuid {
    Uuid::new_v5(
        &GUID_NAMESPACE,
        format!("partition\0{seed}\0{name}").as_bytes(),
    )
}

fn gpt_err(path: &Path) -> impl FnOnce(gpt::GptError) -> FormatError + '_ {
    move |e| FormatError::Gpt {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> FormatError {
    FormatError::Gpt {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn align_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

/// Lays the partitions out: (first_lba, last_lba) of each.
fn layout(
    path: &Path,
    disk_size: u64,
    parts: &[PartitionSpec],
) -> Result<Vec<(u64, u64)>, FormatError> {
    let total_lbas = disk_size / SECTOR;
    let last_usable = total_lbas
        .checked_sub(BACKUP_GPT_SECTORS + 1)
        .ok_or_else(|| invalid(path, format!("disk size {disk_size} is too small")))?;
    let align_lbas = ALIGN / SECTOR;
    let mut next = align_lbas;
    let mut out = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let first = next;
        let last = if p.size_bytes == 0 {
            if i + 1 != parts.len() {
                return Err(invalid(
                    path,
                    format!(
                        "partition {:?}: size 0 (rest of the disk) is allowed for the last partition only",
                        p.name
                    ),
                ));
            }
            last_usable
        } else {
            let size = align_up(p.size_bytes, ALIGN)
                .ok_or_else(|| invalid(path, format!("partition {:?}: size overflows", p.name)))?;
            first + size / SECTOR - 1
        };
        if last > last_usable || first > last {
            return Err(invalid(
                path,
                format!(
                    "partition {:?} ({} bytes at offset {}) does not fit a disk of {disk_size} bytes",
                    p.name,
                    p.size_bytes,
                    first * SECTOR
                ),
            ));
        }
        out.push((first, last));
        next = last + 1;
        next = align_up(next, align_lbas).unwrap_or(u64::MAX);
    }
    Ok(out)
}

/// Writes a disk image of `disk_size` bytes at `path` (replacing any file
/// there) with `parts` in order. Returns the partitions as written.
pub fn write_disk(
    path: &Path,
    disk_size: u64,
    seed: &str,
    parts: &[PartitionSpec],
) -> Result<Vec<PartitionInfo>, FormatError> {
    if disk_size & (SECTOR - 1) != 0 {
        return Err(invalid(
            path,
            format!("disk size {disk_size} is not a multiple of {SECTOR}"),
        ));
    }
    let mut names = BTreeSet::new();
    for p in parts {
        if p.name.is_empty() || p.name.encode_utf16().count() > MAX_NAME_UNITS {
            return Err(invalid(
                path,
                format!(
                    "partition name {:?}: 1 to {MAX_NAME_UNITS} UTF-16 units",
                    p.name
                ),
            ));
        }
        if !names.insert(p.name.as_str()) {
            return Err(invalid(
                path,
                format!("partition name {:?} given twice", p.name),
            ));
        }
    }
    if parts.len() > 128 {
        return Err(invalid(path, "more than 128 partitions"));
    }
    let lbas = layout(path, disk_size, parts)?;

    // Check every content's size before writing anything.
    let mut sources = Vec::with_capacity(parts.len());
    for (p, (first, last)) in parts.iter().zip(&lbas) {
        let capacity = (last + 1 - first) * SECTOR;
        let source = match &p.contents {
            None => None,
            Some(c) => {
                let f = File::open(c).map_err(FormatError::io(format!(
                    "opening contents {} of partition {:?}",
                    c.display(),
                    p.name
                )))?;
                let size = f
                    .metadata()
                    .map_err(FormatError::io(format!("stat {}", c.display())))?
                    .len();
                if size > capacity {
                    return Err(FormatError::ContentsTooLarge {
                        partition: p.name.clone(),
                        contents: c.display().to_string(),
                        size,
                        capacity,
                    });
                }
                Some((f, c))
            }
        };
        sources.push(source);
    }

    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(FormatError::io(format!("creating {}", path.display())))?;
    file.set_len(disk_size)
        .map_err(FormatError::io(format!("sizing {}", path.display())))?;

    let total_lbas = disk_size / SECTOR;
    let mbr = ProtectiveMBR::with_lb_size(u32::try_from(total_lbas - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut file)
        .map_err(|e| invalid(path, format!("writing the protective MBR: {e}")))?;

    let mut disk = GptConfig::new()
        .writable(true)
        .logical_block_size(LogicalBlockSize::Lb512)
        .create_from_device(file, Some(disk_guid(seed)))
        .map_err(gpt_err(path))?;
    let mut table = BTreeMap::new();
    let mut infos = Vec::with_capacity(parts.len());
    for (i, (p, (first, last))) in parts.iter().zip(&lbas).enumerate() {
        let guid = partition_guid(seed, &p.name);
        table.insert(
            (i + 1) as u32,
            Partition {
                part_type_guid: Type {
                    guid: p.type_guid,
                    os: OperatingSystem::None,
                },
                part_guid: guid,
                first_lba: *first,
                last_lba: *last,
                flags: 0,
                name: p.name.clone(),
            },
        );
        infos.push(PartitionInfo {
            name: p.name.clone(),
            first_lba: *first,
            last_lba: *last,
            guid,
            type_guid: p.type_guid,
        });
    }
    disk.update_partitions(table).map_err(gpt_err(path))?;
    let mut file = disk.write().map_err(gpt_err(path))?;

    for (info, source) in infos.iter().zip(sources) {
        if let Some((mut src, c)) = source {
            copy_sparse(&mut src, &mut file, info.offset()).map_err(FormatError::io(format!(
                "copying {} into partition {:?} of {}",
                c.display(),
                info.name,
                path.display()
            )))?;
        }
    }
    file.flush()
        .map_err(FormatError::io(format!("writing {}", path.display())))?;
    Ok(infos)
}

/// Copies `src` to `dst` at `offset`, leaving all-zero chunks unwritten
/// (the fresh file reads zero there and stays sparse).
fn copy_sparse(src: &mut File, dst: &mut File, offset: u64) -> std::io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = offset;
    loop {
        // Fill the chunk (short reads are fine, but keep chunks aligned).
        let mut n = 0;
        while n < CHUNK {
            let r = src.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            return Ok(());
        }
        let chunk = &buf[..n];
        if chunk.iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(pos))?;
            dst.write_all(chunk)?;
        }
        pos += n as u64;
        if n < CHUNK {
            return Ok(());
        }
    }
}

/// Reads the partition table of the disk image at `path`, in table order.
pub fn list(path: &Path) -> Result<Vec<PartitionInfo>, FormatError> {
    let disk = GptConfig::new()
        .writable(false)
        .logical_block_size(LogicalBlockSize::Lb512)
        .open(path)
        .map_err(gpt_err(path))?;
    Ok(disk
        .partitions()
        .values()
        .filter(|p| p.is_used())
        .map(|p| PartitionInfo {
            name: p.name.clone(),
            first_lba: p.first_lba,
            last_lba: p.last_lba,
            guid: p.part_guid,
            type_guid: p.part_type_guid.guid,
        })
        .collect())
}

/// The disk GUID of the image at `path`.
pub fn read_disk_guid(path: &Path) -> Result<Uuid, FormatError> {
    let disk = GptConfig::new()
        .writable(false)
        .logical_block_size(LogicalBlockSize::Lb512)
        .open(path)
        .map_err(gpt_err(path))?;
    Ok(*disk.guid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_and_fills() {
        let p = |name: &str, size| PartitionSpec {
            name: name.into(),
            type_guid: LINUX_DATA,
            size_bytes: size,
            contents: None,
        };
        let disk = 64 << 20;
        let l = layout(
            Path::new("x"),
            disk,
            &[p("A", 1), p("B", 3 << 20), p("C", 0)],
        )
        .unwrap();
        assert_eq!(l[0], (2048, 4095));
        assert_eq!(l[1], (4096, 4096 + 6144 - 1));
        assert_eq!(l[2].0, 10240);
        assert_eq!(l[2].1, disk / 512 - 34);
        assert!(layout(Path::new("x"), disk, &[p("A", 0), p("B", 1)]).is_err());
        assert!(layout(Path::new("x"), disk, &[p("A", 64 << 20)]).is_err());
        assert_ne!(partition_guid("s", "A"), partition_guid("s", "B"));
        assert_eq!(disk_guid("s"), disk_guid("s"));
    }
}
