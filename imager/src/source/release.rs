//! `dists/{suite}/InRelease`: verified against the mirror's keyring, then
//! parsed from the signed text only.
//!
//! A valid signature is not enough: an attacker (or a mirror that stopped
//! syncing) can serve an old, validly signed index that predates a
//! security fix. Suites that change often (`-security`, `-updates`) carry a
//! signed `Valid-Until`; like apt, an index past it is refused.

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
    /// The Release file's `Valid-Until`, when it has one (checked to be a
    /// date when parsed, against the clock by [`Release::check_fresh`]).
    pub valid_until: Option<String>,
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
    let valid_until = p.get("Valid-Until").map(str::to_owned);
    if let Some(v) = &valid_until {
        if rfc2822_to_epoch(v).is_none() {
            return Err(format!(
                "Valid-Until {v:?} is not an RFC 2822 date: refusing the index"
            ));
        }
    }
    Ok(Release {
        suite: suite.to_owned(),
        codename,
        date: field("Date"),
        valid_until,
        files,
        sha256,
    })
}

/// Seconds since the epoch now (0 if the clock is before 1970).
fn now_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Release {
    /// Refuses the Release when its `Valid-Until` is before `now` (seconds
    /// since the epoch). `uri` names the archive in the error.
    pub fn check_fresh(&self, uri: &str, now: u64) -> Result<(), SourceError> {
        let Some(v) = &self.valid_until else {
            return Ok(());
        };
        match rfc2822_to_epoch(v) {
            Some(until) if until >= now => Ok(()),
            _ => Err(SourceError::Expired {
                suite: self.suite.clone(),
                uri: uri.to_owned(),
                valid_until: v.clone(),
            }),
        }
    }
}

/// Seconds since the epoch of an RFC 2822 date as Release files write it
/// (`Sat, 08 Nov 2025 09:48:35 UTC`; the weekday is optional, the zone is
/// `UTC`, `GMT`, `Z` or `±HHMM`, none meaning UTC).
pub fn rfc2822_to_epoch(date: &str) -> Option<u64> {
    let parts: Vec<&str> = date.split_whitespace().collect();
    let parts = match parts.first() {
        Some(w) if w.ends_with(',') => &parts[1..],
        _ => &parts[..],
    };
    let (day, mon, year, hms, zone) = match parts {
        [d, m, y, t] => (*d, *m, *y, *t, "UTC"),
        [d, m, y, t, z] => (*d, *m, *y, *t, *z),
        _ => return None,
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| *x == mon)? as i64 + 1;
    let d: i64 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let y: i64 = year.parse().ok()?;
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if t.next().is_some() || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let offset = zone_offset(zone)?;
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss - offset).ok()
}

/// Seconds east of UTC of an RFC 2822 zone.
fn zone_offset(zone: &str) -> Option<i64> {
    if matches!(zone, "UTC" | "GMT" | "UT" | "Z") {
        return Some(0);
    }
    let (sign, digits) = match zone.as_bytes().first()? {
        b'+' => (1, &zone[1..]),
        b'-' => (-1, &zone[1..]),
        _ => return None,
    };
    if digits.len() != 4 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let hh: i64 = digits[..2].parse().ok()?;
    let mm: i64 = digits[2..].parse().ok()?;
    Some(sign * (hh * 3600 + mm * 60))
}

/// Fetches `dists/{suite}/InRelease`, verifies its signature against the
/// mirror's keyring, parses the signed Release and refuses it when its
/// `Valid-Until` has passed.
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
    let release = parse_release_text(&text, suite, sha256_hex(&bytes)).map_err(|reason| {
        SourceError::Release {
            suite: suite.to_owned(),
            uri: m.uri.clone(),
            reason,
        }
    })?;
    release.check_fresh(&m.uri, now_epoch())?;
    Ok(release)
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
        assert_eq!(r.valid_until, None);
        assert!(
            r.check_fresh("u", u64::MAX).is_ok(),
            "no Valid-Until: never stale"
        );
    }

    #[test]
    fn valid_until_is_parsed_and_enforced() {
        let h = "a".repeat(64);
        let rel = |valid_until: &str| {
            format!(
                "Suite: stable-security\nCodename: trixie-security\nDate: Mon, 30 Nov 2026 00:22:33 UTC\nValid-Until: {valid_until}\nSHA256:\n {h} 12 main/binary-amd64/Packages.xz\n"
            )
        };
        let r = parse_release(
            &rel("Mon, 07 Dec 2026 00:22:33 UTC"),
            "trixie-security",
            "x",
        )
        .unwrap();
        assert_eq!(
            r.valid_until.as_deref(),
            Some("Mon, 07 Dec 2026 00:22:33 UTC")
        );
        let until = rfc2822_to_epoch("Mon, 07 Dec 2026 00:22:33 UTC").unwrap();
        assert!(r.check_fresh("file:///m", until).is_ok());
        let e = r.check_fresh("file:///m", until + 1).unwrap_err();
        assert!(matches!(e, SourceError::Expired { .. }), "{e:?}");
        let msg = e.to_string();
        for want in [
            "trixie-security",
            "Mon, 07 Dec 2026 00:22:33 UTC",
            "stale or replayed",
            "--mirror-for trixie-security=URI",
        ] {
            assert!(msg.contains(want), "{want:?} missing from {msg}");
        }
        assert!(!msg.contains('\n'), "one line: {msg}");
        let e = parse_release(&rel("next week"), "trixie-security", "x").unwrap_err();
        assert!(e.to_string().contains("Valid-Until \"next week\""), "{e}");
    }

    #[test]
    fn rfc2822_dates() {
        assert_eq!(rfc2822_to_epoch("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(
            rfc2822_to_epoch("Sat, 08 Nov 2025 09:48:35 UTC"),
            Some(1762595315)
        );
        assert_eq!(rfc2822_to_epoch("08 Nov 2025 09:48:35"), Some(1762595315));
        assert_eq!(
            rfc2822_to_epoch("Sat, 08 Nov 2025 10:48:35 +0100"),
            Some(1762595315)
        );
        assert_eq!(
            rfc2822_to_epoch("Sat, 08 Nov 2025 08:48:35 -0100"),
            Some(1762595315)
        );
        for bad in [
            "garbage",
            "Sat, 08 Nov 2025 09:48:35 CEST",
            "Sat, 32 Nov 2025 09:48:35 UTC",
            "Sat, 08 Nov 2025 24:00:00 UTC",
            "Sat, 08 Foo 2025 09:48:35 UTC",
        ] {
            assert_eq!(rfc2822_to_epoch(bad), None, "{bad}");
        }
    }
}
