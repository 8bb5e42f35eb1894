//! Verified Debian package inputs: the archive of each suite from the
//! host's apt configuration, the signed `InRelease` (refused past its
//! `Valid-Until`), the `Packages` index checked against it, dependency
//! closure over the union of the suites (highest version wins), `.deb`
//! downloads checked against the index, and unpacking a `.deb` into the
//! image [`Tree`](crate::tree::Tree).
//!
//! Everything is done in Rust: no dpkg, apt or gpg is run. The chain of
//! trust is the one apt uses: a keyring on the host verifies `InRelease`,
//! whose SHA256 lines pin `Packages.xz`, whose SHA256 fields pin every
//! `.deb`. Nothing enters the content-addressed [`Cache`] before its hash
//! matched.

mod archives;
mod cache;
mod deb;
mod deb822;
mod error;
mod fetch;
mod index;
mod mirror;
mod release;
mod resolve;
mod version;

pub use archives::{Archives, MirrorOverrides};
pub use cache::Cache;
pub use deb::{fetch_debs, fetch_debs_from, unpack_deb, unpack_deb_cached};
pub use error::SourceError;
pub use fetch::fetch;
pub use index::{fetch_index, parse_packages, PackageRecord};
pub use mirror::{is_security_suite, suite_kind, Mirror};
pub use release::{fetch_release, parse_release, rfc2822_to_epoch, Release};
pub use resolve::{newest_by_name, resolve};
pub use version::compare_versions;

/// Joins a mirror URI and a path relative to it ("dists/trixie/InRelease").
pub(crate) fn join_uri(base: &str, rel: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        rel.trim_start_matches('/')
    )
}

/// Lowercase hex SHA-256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Checks downloaded bytes against the signed size and SHA-256.
pub(crate) fn verify_bytes(
    data: &[u8],
    sha256: &str,
    size: u64,
    what: &str,
    listed_in: &str,
) -> Result<(), SourceError> {
    let got = sha256_hex(data);
    if got == sha256.to_ascii_lowercase() && data.len() as u64 == size {
        return Ok(());
    }
    Err(SourceError::Checksum {
        what: what.to_owned(),
        listed_in: listed_in.to_owned(),
        expected_sha256: sha256.to_owned(),
        expected_size: size,
        got_sha256: got,
        got_size: data.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_uri_handles_slashes() {
        assert_eq!(
            join_uri("file:///srv/debian/", "/dists/x/InRelease"),
            "file:///srv/debian/dists/x/InRelease"
        );
        assert_eq!(
            join_uri("http://m/debian", "pool/a.deb"),
            "http://m/debian/pool/a.deb"
        );
    }
}
