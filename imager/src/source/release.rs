//! `dists/{suite}/InRelease`: verified against the mirror's keyring, then
//! parsed from the signed text only.

use std::collections::BTreeMap;
use std::path::Path;

use pgp::composed::{CleartextSignedMessage, Deserializable, SignedPublicKey};

use super::deb822::paragraphs;
use super::{fetch, join_uri, sha256_hex, Mirror, SourceError};

/// The verified Release of a suite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The suite as requested ("trixie", "stable"): the path under dists/.
    pub suite: String,
    /// The Release file's `Codename`.
    pub codename: String,
    /// The Release file's `Date`.
    pub date: String,
    /// Path under dists/{suite}/ → (sha256, size), from the SHA256 field.
    pub files: BTreeMap<String, (String, u64)>,
    /// SHA-256 of the InRelease bytes as fetched.
    pub sha256: String,
}

/// Reads the public keys of a keyring file: binary (several keys
/// concatenated, as Debian ships them) or ASCII-armored (one or several
/// blocks). Keys the OpenPGP library cannot parse are skipped.
pub(crate) fn load_keyring(path: &Path) -> Result<Vec<SignedPublicKey>, SourceError> {
    let err = |reason: String| SourceError::Keyring {
        path: path.to_owned(),
        reason,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let mut keys = Vec::new();
    let mut last_err = None;
    let start = data
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(0);
    if data[start..].starts_with(b"-----BEGIN") {
        let text = String::from_utf8_lossy(&data);
        const BEGIN: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
        for (i, _) in text.match_indices(BEGIN) {
            match SignedPublicKey::from_armor_many(std::io::Cursor::new(text[i..].as_bytes())) {
                Ok((iter, _)) => {
                    for k in iter {
                        match k {
                            Ok(k) => keys.push(k),
                            Err(e) => last_err = Some(e.to_string()),
                        }
                    }
                }
                Err(e) => last_err = Some(e.to_string()),
            }
        }
    } else {
        match SignedPublicKey::from_bytes_many(std::io::Cursor::new(&data[..])) {
            Ok(iter) => {
                for k in iter {
                    match k {
                        Ok(k) => keys.push(k),
                        Err(e) => last_err = Some(e.to_string()),
                    }
                }
            }
            Err(e) => last_err = Some(e.to_string()),
        }
    }
    if keys.is_empty() {
        return Err(err(format!(
            "holds no usable OpenPGP public key{}",
            last_err.map(|e| format!(" ({e})")).unwrap_or_default()
        )));
    }
    Ok(keys)
}

/// Verifies a cleartext-signed message against any key (primary or
/// subkey) of `keys` and returns the signed text with "\n" line ends.
pub(crate) fn verify_cleartext(bytes: &[u8], keys: &[SignedPublicKey]) -> Result<String, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    let (msg, _) = CleartextSignedMessage::from_string(text)
        .map_err(|e| format!("not a cleartext-signed message: {e}"))?;
    if msg.signatures().is_empty() {
        return Err("it carries no signature".to_owned());
    }
    let ok = keys
        .iter()
        .any(|k| msg.verify(k).is_ok() || k.public_subkeys.iter().any(|sk| msg.verify(sk).is_ok()));
    if !ok {
        return Err(format!(
            "none of its {} signature(s) is a valid signature by one of the keyring's {} key(s)",
            msg.signatures().len(),
            keys.len()
        ));
    }
    Ok(msg.signed_text().replace("\r\n", "\n"))
}

/// Parses the (already verified) text of a Release file.
fn parse_release_text(text: &str, suite: &str, sha256: String) -> Result<Release, String> {
    let ps = paragraphs(text);
    let p = ps.first().ok_or("the signed text is empty")?;
    let mut files = BTreeMap::new();
    let sums = p
        .get("SHA256")
        .ok_or("the signed Release has no SHA256 field")?;
    for line in sums.lines() {
        let mut f = line.split_whitespace();
        let (Some(h), Some(size), Some(path), None) = (f.next(), f.next(), f.next(), f.next())
        else {
            if line.trim().is_empty() {
                continue;
            }
            return Err(format!("malformed SHA256 line {line:?}"));
        };
        let size: u64 = size
            .parse()
            .map_err(|_| format!("malformed size in SHA256 line {line:?}"))?;
        if h.len() != 64 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("malformed hash in SHA256 line {line:?}"));
        }
        files.insert(path.to_owned(), (h.to_ascii_lowercase(), size));
    }
    let field = |n: &str| p.get(n).unwrap_or("").to_owned();
    let (rel_suite, codename) = (field("Suite"), field("Codename"));
    if suite != rel_suite && suite != codename {
        return Err(format!(
            "the signed Release is for suite {rel_suite:?} (codename {codename:?}), not {suite:?}: refusing it"
        ));
    }
    Ok(Release {
        suite: suite.to_owned(),
        codename,
        date: field("Date"),
        files,
        sha256,
    })
}

/// Fetches `dists/{suite}/InRelease`, verifies its signature against the
/// mirror's keyring and parses the signed Release.
pub fn fetch_release(m: &Mirror, suite: &str) -> Result<Release, SourceError> {
    let url = join_uri(&m.uri, &format!("dists/{suite}/InRelease"));
    let keys = load_keyring(&m.keyring)?;
    let bytes = fetch(&url)?;
    let text = verify_cleartext(&bytes, &keys).map_err(|reason| SourceError::Signature {
        suite: suite.to_owned(),
        uri: m.uri.clone(),
        keyring: m.keyring.clone(),
        reason,
    })?;
    parse_release_text(&text, suite, sha256_hex(&bytes)).map_err(|reason| SourceError::Release {
        suite: suite.to_owned(),
        uri: m.uri.clone(),
        reason,
    })
}

/// Parses the text of a Release file that the caller verified.
pub fn parse_release(text: &str, suite: &str, sha256: &str) -> Result<Release, SourceError> {
    parse_release_text(text, suite, sha256.to_owned()).map_err(|reason| SourceError::Release {
        suite: suite.to_owned(),
        uri: "<text>".to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_fields_and_suite_check() {
        let h = "a".repeat(64);
        let text = format!(
            "Origin: Debian\nSuite: stable\nCodename: trixie\nDate: Sat, 01 Jan 2025 00:00:00 UTC\nSHA256:\n {h} 12 main/binary-amd64/Packages.xz\n {h}   7 Release\n"
        );
        let r = parse_release(&text, "trixie", "x").unwrap();
        assert_eq!(r.codename, "trixie");
        assert_eq!(r.date, "Sat, 01 Jan 2025 00:00:00 UTC");
        assert_eq!(r.files["main/binary-amd64/Packages.xz"], (h.clone(), 12));
        assert_eq!(r.files.len(), 2);
        assert!(parse_release(&text, "stable", "x").is_ok());
        let e = parse_release(&text, "bookworm", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not \"bookworm\""), "{e}");
        assert!(parse_release("Suite: trixie\n", "trixie", "x").is_err());
    }
}
