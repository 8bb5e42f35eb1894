//! Lock files (`profiles/NAME.lock`): the exact inputs of a profile, like
//! Cargo.lock. `imager lock` writes one from the signed indexes of the
//! profile's suites; `imager build` fetches exactly these files and refuses
//! any that do not match; `imager lock --check` says, without writing,
//! whether the suites now hold newer builds of what is locked.
//!
//! A Debian release is read from several suites (the release, its point
//! updates, its security updates, the last in an archive of its own). Each
//! package is taken at the highest version any suite has, and the lock
//! records that suite: a pool path is relative to its archive's root, so
//! the build needs it to know where to fetch the `.deb`. Locks written
//! before suites were a list (one `suite`, no `suites:`, no per-package
//! `suite`) still load: everything in them is from `suite`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::build::Progress;
use crate::profile::Profile;
pub use crate::source::rfc2822_to_epoch;
use crate::source::{
    self, compare_versions, is_security_suite, Archives, Cache, PackageRecord, Release, SourceError,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Lock {
    /// Profile the lock was made for.
    pub profile: String,
    /// [`crate::profile::Profile::inputs_hash`] at lock time.
    pub profile_inputs_sha256: String,
    /// The main (first) suite; with `releaseDate` and `releaseSha256`, as
    /// one-suite locks always had them.
    pub suite: String,
    /// `Date:` of the main suite's signed InRelease.
    pub release_date: String,
    pub release_sha256: String,
    /// Every suite read, in the profile's order (absent in locks written
    /// before suites were a list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suites: Vec<LockedSuite>,
    pub packages: Vec<LockedPackage>,
}

/// One suite's signed InRelease, as verified at lock time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LockedSuite {
    pub name: String,
    /// Its `Date:`.
    pub date: String,
    /// SHA-256 of the InRelease bytes.
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    /// The suite whose index it was taken from; its archive serves
    /// `filename` (absent in older locks: the lock's `suite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    pub architecture: String,
    /// Path under the suite's archive root (`pool/main/...`,
    /// `pool/updates/main/...`).
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

/// Exit code of `imager lock --check`: every locked package is the newest.
pub const CHECK_CURRENT: u8 = 0;
/// Exit code of `imager lock --check`: newer builds exist (none from a
/// `*-security` suite), or a locked version left every suite.
pub const CHECK_NEWER: u8 = 1;
/// Exit code of `imager lock --check`: the check could not be made (no or
/// stale lock, unreachable mirror, a refused or expired index).
pub const CHECK_FAILED: u8 = 2;
/// Exit code of `imager lock --check`: a newer build comes from a
/// `*-security` suite.
pub const CHECK_SECURITY: u8 = 3;

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

    /// The lock of `profile` from its suites' verified Releases (in the
    /// profile's order) and the resolved records.
    pub fn new(
        profile: &Profile,
        releases: &[Release],
        recs: Vec<PackageRecord>,
    ) -> Result<Lock, LockError> {
        let Some(main) = releases.first() else {
            return Err(LockError::Invalid(
                profile.name.clone(),
                "no suite was read: list them in source.suites".into(),
            ));
        };
        Ok(Lock {
            profile: profile.name.clone(),
            profile_inputs_sha256: profile.inputs_hash(),
            suite: main.suite.clone(),
            release_date: main.date.clone(),
            release_sha256: main.sha256.clone(),
            suites: releases
                .iter()
                .map(|r| LockedSuite {
                    name: r.suite.clone(),
                    date: r.date.clone(),
                    sha256: r.sha256.clone(),
                })
                .collect(),
            packages: recs
                .into_iter()
                .map(|r| LockedPackage {
                    name: r.name,
                    version: r.version,
                    suite: Some(r.suite),
                    architecture: r.architecture,
                    filename: r.filename,
                    sha256: r.sha256,
                    size: r.size,
                })
                .collect(),
        })
    }

    /// The suites read, also for a lock written before suites were a list.
    pub fn locked_suites(&self) -> Vec<LockedSuite> {
        if !self.suites.is_empty() {
            return self.suites.clone();
        }
        vec![LockedSuite {
            name: self.suite.clone(),
            date: self.release_date.clone(),
            sha256: self.release_sha256.clone(),
        }]
    }

    /// The names of [`Lock::locked_suites`].
    pub fn suite_names(&self) -> Vec<String> {
        self.locked_suites().into_iter().map(|s| s.name).collect()
    }

    /// The suite a locked package was taken from.
    pub fn suite_of<'a>(&'a self, p: &'a LockedPackage) -> &'a str {
        p.suite.as_deref().unwrap_or(&self.suite)
    }

    /// The default SOURCE_DATE_EPOCH of builds from this lock: the newest
    /// of its suites' release dates, so no input is newer than the
    /// timestamps (a re-lock is a new input anyway). None when a date does
    /// not parse.
    pub fn source_date_epoch(&self) -> Option<u64> {
        self.locked_suites()
            .iter()
            .map(|s| rfc2822_to_epoch(&s.date))
            .collect::<Option<Vec<u64>>>()?
            .into_iter()
            .max()
    }

    /// The locked packages as index records (no relations), each naming
    /// its suite.
    pub fn records(&self) -> Vec<PackageRecord> {
        self.packages
            .iter()
            .map(|p| PackageRecord {
                name: p.name.clone(),
                version: p.version.clone(),
                architecture: p.architecture.clone(),
                filename: p.filename.clone(),
                sha256: p.sha256.clone(),
                size: p.size,
                depends: Vec::new(),
                pre_depends: Vec::new(),
                provides: Vec::new(),
                source: String::new(),
                suite: self.suite_of(p).to_owned(),
            })
            .collect()
    }

    pub fn to_yaml(&self) -> String {
        format!(
            "# Exact inputs of profile {:?}. Written by `imager lock`; do not edit.\n{}",
            self.profile,
            serde_norway::to_string(self).unwrap_or_default()
        )
    }
}

/// The verified indexes of a profile's suites.
#[derive(Clone, Debug)]
pub struct SuiteIndexes {
    /// Each suite's verified Release, in the profile's order.
    pub releases: Vec<Release>,
    /// The records of every suite, concatenated in the profile's order
    /// (so a version tie goes to the earlier suite).
    pub packages: Vec<PackageRecord>,
}

/// Fetches and verifies the InRelease (signature, `Valid-Until`) and the
/// `Packages` indexes of each of the profile's suites from its archive.
pub fn fetch_suites(
    profile: &Profile,
    archives: &Archives,
    cache: &Cache,
    progress: &Progress,
) -> Result<SuiteIndexes, SourceError> {
    let arch = &profile.source.architecture;
    let mut out = SuiteIndexes {
        releases: Vec::new(),
        packages: Vec::new(),
    };
    for suite in &profile.source.suites {
        let m = archives.get(suite)?;
        progress.step(format!(
            "fetching and verifying InRelease of {suite} from {}",
            m.uri
        ));
        let release = source::fetch_release(m, suite)?;
        for c in &profile.source.components {
            progress.step(format!("fetching {suite} {c}/binary-{arch} index"));
            out.packages
                .extend(source::fetch_index(m, &release, c, arch, cache)?);
        }
        out.releases.push(release);
    }
    Ok(out)
}

/// Fetches every locked `.deb` from its suite's archive (or the cache),
/// verified against the lock's SHA-256 and size; paths in lock order.
pub fn fetch_locked(
    lock: &Lock,
    archives: &Archives,
    cache: &Cache,
    jobs: usize,
) -> Result<Vec<PathBuf>, SourceError> {
    source::fetch_debs_from(archives, &lock.records(), cache, jobs)
}

/// What `imager lock --check` found for one locked package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A suite has a newer build.
    Newer {
        name: String,
        locked: String,
        locked_suite: String,
        version: String,
        suite: String,
    },
    /// No suite has the locked version any more, nor a newer one.
    Gone {
        name: String,
        locked: String,
        locked_suite: String,
    },
}

impl Change {
    fn is_security(&self) -> bool {
        matches!(self, Change::Newer { suite, .. } if is_security_suite(suite))
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        match self {
            Change::Newer {
                name,
                locked,
                locked_suite,
                version,
                suite,
            } => format!(
                "{name} {locked} ({locked_suite}) -> {version} ({suite}){}",
                if self.is_security() {
                    ", security update"
                } else {
                    ""
                }
            ),
            Change::Gone {
                name,
                locked,
                locked_suite,
            } => format!(
                "{name} {locked} ({locked_suite}): in none of the suites any more, nor a newer build"
            ),
        }
    }
}

/// The result of `imager lock --check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    /// How many packages the lock holds.
    pub locked: usize,
    /// The suites read.
    pub suites: Vec<String>,
    /// The locked packages that changed, in lock order.
    pub changes: Vec<Change>,
}

impl CheckReport {
    /// [`CHECK_CURRENT`], [`CHECK_NEWER`] or [`CHECK_SECURITY`].
    pub fn exit_code(&self) -> u8 {
        if self.changes.iter().any(Change::is_security) {
            CHECK_SECURITY
        } else if self.changes.is_empty() {
            CHECK_CURRENT
        } else {
            CHECK_NEWER
        }
    }

    /// The closing line; `profile` is the path to re-lock.
    pub fn summary(&self, profile: &Path) -> String {
        let suites = self.suites.join(", ");
        if self.changes.is_empty() {
            return format!(
                "all {} locked packages are the newest in {suites}",
                self.locked
            );
        }
        let security = self.changes.iter().filter(|c| c.is_security()).count();
        format!(
            "{} of {} locked packages changed in {suites} ({security} security updates): run `imager lock {}` to take them",
            self.changes.len(),
            self.locked,
            profile.display()
        )
    }
}

/// Compares each locked package with the newest build of its name in
/// `index` (the union of the suites, as [`fetch_suites`] returns it).
pub fn check(lock: &Lock, index: &[PackageRecord]) -> CheckReport {
    let newest = source::newest_by_name(index);
    let present: BTreeSet<(&str, &str)> = index
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect();
    let changes = lock
        .packages
        .iter()
        .filter_map(|p| {
            let locked_suite = lock.suite_of(p).to_owned();
            match newest.get(p.name.as_str()) {
                Some(r) if compare_versions(&r.version, &p.version).is_gt() => {
                    Some(Change::Newer {
                        name: p.name.clone(),
                        locked: p.version.clone(),
                        locked_suite,
                        version: r.version.clone(),
                        suite: r.suite.clone(),
                    })
                }
                _ if !present.contains(&(p.name.as_str(), p.version.as_str())) => {
                    Some(Change::Gone {
                        name: p.name.clone(),
                        locked: p.version.clone(),
                        locked_suite,
                    })
                }
                _ => None,
            }
        })
        .collect();
    CheckReport {
        locked: lock.packages.len(),
        suites: lock.suite_names(),
        changes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD_LOCK: &str = "\
profile: qemu
profileInputsSha256: abc
suite: trixie
releaseDate: Sat, 21 Nov 2026 09:15:44 UTC
releaseSha256: 00
packages:
- name: runc
  version: 1.1.15+ds1-2+b4
  architecture: amd64
  filename: pool/main/r/runc/runc_1.1.15+ds1-2+b4_amd64.deb
  sha256: '11'
  size: 3
";

    fn rec(name: &str, version: &str, suite: &str) -> PackageRecord {
        PackageRecord {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            filename: format!("pool/{name}.deb"),
            sha256: "0".repeat(64),
            size: 1,
            depends: vec![],
            pre_depends: vec![],
            provides: vec![],
            source: name.into(),
            suite: suite.into(),
        }
    }

    #[test]
    fn release_dates() {
        assert_eq!(rfc2822_to_epoch("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(
            rfc2822_to_epoch("Sat, 08 Nov 2025 09:48:35 UTC"),
            Some(1762595315)
        );
        assert_eq!(rfc2822_to_epoch("garbage"), None);
    }

    #[test]
    fn old_one_suite_locks_still_read() {
        let lock: Lock = serde_norway::from_str(OLD_LOCK).unwrap();
        assert_eq!(lock.suite_names(), ["trixie"]);
        assert_eq!(lock.suite_of(&lock.packages[0]), "trixie");
        assert_eq!(lock.records()[0].suite, "trixie");
        assert_eq!(lock.source_date_epoch(), Some(1795252544));
        // Written again, nothing is added.
        assert!(!lock.to_yaml().contains("suites:"));
    }

    #[test]
    fn epoch_is_the_newest_suite_date_and_package_suites_round_trip() {
        let mut lock: Lock = serde_norway::from_str(OLD_LOCK).unwrap();
        lock.suites = vec![
            LockedSuite {
                name: "trixie".into(),
                date: "Sat, 21 Nov 2026 09:15:44 UTC".into(),
                sha256: "00".into(),
            },
            LockedSuite {
                name: "trixie-security".into(),
                date: "Mon, 30 Nov 2026 00:22:33 UTC".into(),
                sha256: "01".into(),
            },
        ];
        lock.packages[0].suite = Some("trixie-security".into());
        assert_eq!(
            lock.source_date_epoch(),
            rfc2822_to_epoch("Mon, 30 Nov 2026 00:22:33 UTC")
        );
        let again: Lock = serde_norway::from_str(&lock.to_yaml()).unwrap();
        assert_eq!(again, lock);
        assert_eq!(again.records()[0].suite, "trixie-security");
        lock.suites[1].date = "yesterday".into();
        assert_eq!(lock.source_date_epoch(), None);
    }

    #[test]
    fn check_reports_newer_builds_and_their_exit_codes() {
        let lock: Lock = serde_norway::from_str(OLD_LOCK).unwrap();
        let same = vec![rec("runc", "1.1.15+ds1-2+b4", "trixie")];
        let r = check(&lock, &same);
        assert!(r.changes.is_empty());
        assert_eq!(r.exit_code(), CHECK_CURRENT);
        assert!(r
            .summary(Path::new("p.yaml"))
            .starts_with("all 1 locked packages"));

        let mut upd = same.clone();
        upd.push(rec("runc", "1.1.15+ds1-2+b5", "trixie-updates"));
        let r = check(&lock, &upd);
        assert_eq!(r.exit_code(), CHECK_NEWER);
        assert_eq!(
            r.changes[0].line(),
            "runc 1.1.15+ds1-2+b4 (trixie) -> 1.1.15+ds1-2+b5 (trixie-updates)"
        );

        upd.push(rec("runc", "1.1.15+ds1-2+deb13u1", "trixie-security"));
        let r = check(&lock, &upd);
        assert_eq!(r.exit_code(), CHECK_SECURITY);
        assert_eq!(
            r.changes[0].line(),
            "runc 1.1.15+ds1-2+b4 (trixie) -> 1.1.15+ds1-2+deb13u1 (trixie-security), security update"
        );
        assert!(r
            .summary(Path::new("p.yaml"))
            .contains("imager lock p.yaml"));

        let gone = vec![rec("runc", "1.0-1", "trixie")];
        let r = check(&lock, &gone);
        assert_eq!(r.exit_code(), CHECK_NEWER);
        assert!(r.changes[0].line().contains("in none of the suites"));
    }
}
