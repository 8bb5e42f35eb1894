//! Image formats written in Rust, without shelling out: the initramfs
//! (`cpio`, newc), the root filesystem (`squashfs`), the EFI system
//! partition (`fat`) and the partitioned disk (`gpt_disk`).
//!
//! Every writer is deterministic: the same input and the same
//! SOURCE_DATE_EPOCH give byte-identical output, so images are
//! reproducible. Each module also has a reader used by `imager inspect`
//! and by the tests.

use std::io;

pub mod cpio;
pub mod fat;
pub mod gpt_disk;
pub mod squashfs;

/// Errors of the format writers and readers. Messages name the file,
/// entry or partition concerned.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("squashfs: {what}: {source}")]
    Squashfs {
        what: String,
        #[source]
        source: backhand::BackhandError,
    },
    #[error("FAT: {what}: {source}")]
    Fat {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("GPT disk {path}: {message}")]
    Gpt { path: String, message: String },
    #[error(
        "partition {partition:?}: contents {contents} are {size} bytes, larger than the partition ({capacity} bytes)"
    )]
    ContentsTooLarge {
        partition: String,
        contents: String,
        size: u64,
        capacity: u64,
    },
    #[error("cpio archive: {0}")]
    Cpio(String),
    #[error("{0}")]
    Invalid(String),
}

impl FormatError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> FormatError {
        let what = what.into();
        move |source| FormatError::Io { what, source }
    }

    pub(crate) fn fat(what: impl Into<String>) -> impl FnOnce(io::Error) -> FormatError {
        let what = what.into();
        move |source| FormatError::Fat { what, source }
    }

    pub(crate) fn squashfs(
        what: impl Into<String>,
    ) -> impl FnOnce(backhand::BackhandError) -> FormatError {
        let what = what.into();
        move |source| FormatError::Squashfs { what, source }
    }
}

/// File type bits of `st_mode`, shared by the cpio and squashfs listings.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
