//! Lock files (`profiles/NAME.lock`): the exact inputs of a profile, like
//! Cargo.lock. `imager lock` writes one from the signed index; `imager
//! build` fetches exactly these files and refuses any that do not match.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Lock {
    /// Profile the lock was made for.
    pub profile: String,
    /// [`crate::profile::Profile::inputs_hash`] at lock time.
    pub profile_inputs_sha256: String,
    pub suite: String,
    /// `Date:` of the signed InRelease the packages were taken from; also
    /// the default SOURCE_DATE_EPOCH of builds from this lock.
    pub release_date: String,
    pub release_sha256: String,
    pub packages: Vec<LockedPackage>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// Path under the mirror (`pool/main/...`).
    pub filename: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("no lock file {0}: run `imager lock {1}` first")]
    Missing(String, String),
    #[error("lock file {0}: {1}")]
    Invalid(String, String),
    #[error(
        "lock file {0} is stale: the profile's source or packages changed; run `imager lock {1}`"
    )]
    Stale(String, String),
}

impl Lock {
    pub fn path_for(profile_path: &Path) -> std::path::PathBuf {
        profile_path.with_extension("lock")
    }

    pub fn load(path: &Path, profile_path: &Path, inputs_hash: &str) -> Result<Lock, LockError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|_| LockError::Missing(shown.clone(), profile_path.display().to_string()))?;
        let lock: Lock = serde_norway::from_str(&text)
            .map_err(|e| LockError::Invalid(shown.clone(), e.to_string()))?;
        if lock.profile_inputs_sha256 != inputs_hash {
            return Err(LockError::Stale(shown, profile_path.display().to_string()));
        }
        Ok(lock)
    }

    pub fn to_yaml(&self) -> String {
        format!(
            "# Exact inputs of profile {:?}. Written by `imager lock`; do not edit.\n{}",
            self.profile,
            serde_norway::to_string(self).unwrap_or_default()
        )
    }
}

/// Seconds since the epoch of an RFC 2822 `Date:` such as
/// `Sat, 08 Nov 2025 09:48:35 UTC`.
pub fn rfc2822_to_epoch(date: &str) -> Option<u64> {
    let parts: Vec<&str> = date.split_whitespace().collect();
    let (day, mon, year, hms) = match parts.as_slice() {
        [_, d, m, y, t, ..] => (*d, *m, *y, *t),
        [d, m, y, t, ..] => (*d, *m, *y, *t),
        _ => return None,
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| *x == mon)? as i64 + 1;
    let d: i64 = day.parse().ok()?;
    let y: i64 = year.parse().ok()?;
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_dates() {
        assert_eq!(rfc2822_to_epoch("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(
            rfc2822_to_epoch("Sat, 08 Nov 2025 09:48:35 UTC"),
            Some(1762595315)
        );
        assert_eq!(rfc2822_to_epoch("garbage"), None);
    }
}
