//! Which archive serves each suite of a profile. A Debian release is read
//! from several suites (`trixie`, `trixie-updates`, `trixie-security`), and
//! they do not all live under one archive root: security updates come from
//! an archive of their own (`…/debian-security`). So each suite is looked
//! up on its own, in this order:
//!
//! 1. `--mirror-for SUITE=URI` (or `IMAGER_MIRROR_FOR`), for that suite;
//! 2. `--mirror` (or `IMAGER_MIRROR`), for every suite but `*-security`
//!    ones (`-updates` and `-backports` live in the main archive);
//! 3. the host's apt configuration: the `deb` source that lists the suite,
//!    else one that lists a suite of the same kind (the host's
//!    `bookworm-security` source says where `trixie-security` is);
//! 4. for a suite that is not `*-security`, the main archive of 2 or 3.
//!
//! The keyring is `IMAGER_KEYRING` when set, else the apt source's
//! `Signed-By`, else Debian's archive keyring (which also holds the
//! security archive's keys). No host name is built in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::mirror::{
    apt_sources, check_uri, is_security_suite, keyring_of, no_main_mirror, suite_kind, AptSource,
    DEFAULT_KEYRING,
};
use super::{Mirror, SourceError};

/// Mirrors given on the command line or in the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorOverrides {
    /// `--mirror` / `IMAGER_MIRROR`: the main archive.
    pub main: Option<String>,
    /// `--mirror-for SUITE=URI` / `IMAGER_MIRROR_FOR`.
    pub per_suite: BTreeMap<String, String>,
    /// `IMAGER_KEYRING`: the keyring for every suite.
    pub keyring: Option<PathBuf>,
}

/// Parses `SUITE=URI` values; a value may hold several, separated by
/// commas or white space (the form `IMAGER_MIRROR_FOR` takes).
fn parse_mirror_for(values: &[String]) -> Result<BTreeMap<String, String>, SourceError> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let items = values
        .iter()
        .flat_map(|v| v.split([',', ' ', '\t', '\n']))
        .filter(|s| !s.is_empty());
    for item in items {
        let Some((suite, uri)) = item.split_once('=').filter(|(s, _)| !s.trim().is_empty()) else {
            return Err(SourceError::Config(format!(
                "--mirror-for {item:?}: give SUITE=URI, e.g. trixie-security=file:///srv/debian-security"
            )));
        };
        let (suite, uri) = (
            suite.trim(),
            check_uri(uri, &format!("--mirror-for {suite}"))?,
        );
        if out.get(suite).is_some_and(|u| *u != uri) {
            return Err(SourceError::Config(format!(
                "--mirror-for names suite {suite} twice, with different URIs: give it once"
            )));
        }
        out.insert(suite.to_owned(), uri);
    }
    Ok(out)
}

impl MirrorOverrides {
    /// `--mirror`, the `--mirror-for` values and `keyring`.
    pub fn new(
        main: Option<&str>,
        mirror_for: &[String],
        keyring: Option<PathBuf>,
    ) -> Result<Self, SourceError> {
        Ok(MirrorOverrides {
            main: main
                .filter(|m| !m.trim().is_empty())
                .map(|m| check_uri(m, "--mirror"))
                .transpose()?,
            per_suite: parse_mirror_for(mirror_for)?,
            keyring,
        })
    }

    /// Like [`MirrorOverrides::new`] with `--mirror-for` and the keyring
    /// from `IMAGER_MIRROR_FOR` and `IMAGER_KEYRING` (for `imager build`,
    /// which takes no `--mirror-for`).
    pub fn from_env(main: Option<&str>) -> Result<Self, SourceError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let mirror_for: Vec<String> = var("IMAGER_MIRROR_FOR").into_iter().collect();
        MirrorOverrides::new(main, &mirror_for, var("IMAGER_KEYRING").map(PathBuf::from))
    }

    fn given(&self, uri: &str) -> Mirror {
        Mirror {
            uri: uri.to_owned(),
            keyring: self
                .keyring
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_KEYRING)),
        }
    }

    fn apt_mirror(&self, src: &AptSource, file: &Path) -> Result<Mirror, SourceError> {
        Ok(Mirror {
            uri: src.uri.clone(),
            keyring: match &self.keyring {
                Some(k) => k.clone(),
                None => keyring_of(src.signed_by.as_deref(), file)?,
            },
        })
    }
}

/// The apt source for `suite`: one that lists it, else one that lists a
/// suite of the same kind.
fn apt_match<'a>(
    suite: &str,
    sources: &'a [(AptSource, PathBuf)],
) -> Option<&'a (AptSource, PathBuf)> {
    let kind = suite_kind(suite);
    sources
        .iter()
        .find(|(s, _)| s.suites.iter().any(|x| x == suite))
        .or_else(|| {
            sources
                .iter()
                .find(|(s, _)| s.suites.iter().any(|x| suite_kind(x) == kind))
        })
}

fn no_security_archive(suite: &str, root: &Path) -> SourceError {
    SourceError::Config(format!(
        "no archive for suite {suite}: apt's configuration under {} lists neither it nor another *-security suite, \
         and Debian serves security updates from an archive of its own: add that `deb` source to apt's \
         configuration, or pass --mirror-for {suite}=URI (or set IMAGER_MIRROR_FOR)",
        root.display()
    ))
}

impl Mirror {
    /// The archive that serves `suite`, as the module documentation says,
    /// with apt's configuration read under `root`.
    pub fn for_suite(suite: &str, o: &MirrorOverrides, root: &Path) -> Result<Mirror, SourceError> {
        if let Some(uri) = o.per_suite.get(suite) {
            return Ok(o.given(uri));
        }
        let security = is_security_suite(suite);
        if let (false, Some(uri)) = (security, &o.main) {
            return Ok(o.given(uri));
        }
        let sources = apt_sources(root);
        if let Some((src, file)) = apt_match(suite, &sources) {
            return o.apt_mirror(src, file);
        }
        if security {
            return Err(no_security_archive(suite, root));
        }
        match apt_match("", &sources) {
            Some((src, file)) => o.apt_mirror(src, file),
            None => Err(no_main_mirror(root)),
        }
    }
}

/// The archive of each suite of a profile, in the profile's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archives {
    suites: Vec<(String, Mirror)>,
}

impl Archives {
    /// Looks up every suite with [`Mirror::for_suite`]. An override for a
    /// suite not in `suites` is refused (a typo would otherwise go
    /// unnoticed).
    pub fn new(suites: &[String], o: &MirrorOverrides, root: &Path) -> Result<Self, SourceError> {
        if let Some(extra) = o.per_suite.keys().find(|s| !suites.contains(s)) {
            return Err(SourceError::Config(format!(
                "--mirror-for (or IMAGER_MIRROR_FOR) names suite {extra}, which is not one of the profile's suites ({}): check its spelling",
                suites.join(", ")
            )));
        }
        let suites = suites
            .iter()
            .map(|s| Ok((s.clone(), Mirror::for_suite(s, o, root)?)))
            .collect::<Result<Vec<_>, SourceError>>()?;
        Ok(Archives { suites })
    }

    /// [`Archives::new`] with the host's apt configuration (`/etc/apt`).
    pub fn from_host(suites: &[String], o: &MirrorOverrides) -> Result<Self, SourceError> {
        Archives::new(suites, o, Path::new("/"))
    }

    /// One suite from one mirror.
    pub fn single(suite: &str, mirror: Mirror) -> Self {
        Archives {
            suites: vec![(suite.to_owned(), mirror)],
        }
    }

    /// The archive of `suite`; an empty suite (a record of an older lock)
    /// means the first suite.
    pub fn get(&self, suite: &str) -> Result<&Mirror, SourceError> {
        let found = if suite.is_empty() {
            self.suites.first()
        } else {
            self.suites.iter().find(|(s, _)| s == suite)
        };
        found.map(|(_, m)| m).ok_or_else(|| {
            SourceError::Config(format!(
                "suite {suite} is not one of the lock's suites ({}): run `imager lock` again",
                self.suites
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// The suites and their archives, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Mirror)> {
        self.suites.iter().map(|(s, m)| (s.as_str(), m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of a Debian host: main and updates in one archive,
    /// security in another, for an older release than the one wanted.
    const HOST: &str = "\
Types: deb
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main
Signed-By: /etc/apt/keyrings/security.gpg
";

    fn root_with(sources: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("etc/apt/sources.list.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("debian.sources"), sources).unwrap();
        root
    }

    fn suites(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn suite_kinds() {
        assert_eq!(suite_kind("trixie"), "");
        assert_eq!(suite_kind("trixie-security"), "-security");
        assert_eq!(suite_kind("bullseye/updates"), "-security");
        assert_eq!(suite_kind("trixie-proposed-updates"), "-proposed-updates");
        assert!(is_security_suite("stable-security"));
        assert!(!is_security_suite("trixie-updates"));
    }

    #[test]
    fn each_suite_from_the_archive_apt_uses_for_its_kind() {
        let root = root_with(HOST);
        let o = MirrorOverrides::default();
        let want = suites(&["trixie", "trixie-updates", "trixie-security"]);
        let a = Archives::new(&want, &o, root.path()).unwrap();
        let uris: Vec<(&str, &str)> = a.iter().map(|(s, m)| (s, m.uri.as_str())).collect();
        assert_eq!(
            uris,
            [
                ("trixie", "http://mirror.invalid/debian"),
                ("trixie-updates", "http://mirror.invalid/debian"),
                ("trixie-security", "http://mirror.invalid/debian-security"),
            ]
        );
        let sec = a.get("trixie-security").unwrap();
        assert_eq!(sec.keyring, PathBuf::from("/etc/apt/keyrings/security.gpg"));
        assert_eq!(a.get("").unwrap().uri, "http://mirror.invalid/debian");
        assert!(a.get("sid").unwrap_err().to_string().contains("sid"));
        // -backports has no source of its kind: the main archive serves it.
        let m = Mirror::for_suite("trixie-backports", &o, root.path()).unwrap();
        assert_eq!(m.uri, "http://mirror.invalid/debian");
    }

    #[test]
    fn overrides_win_and_security_never_falls_back_to_the_main_archive() {
        let root = root_with(HOST);
        let o = MirrorOverrides::new(
            Some("file:///srv/debian"),
            &["trixie-updates=file:///srv/upd, trixie-security=file:///srv/sec".to_owned()],
            Some("/k.gpg".into()),
        )
        .unwrap();
        let want = suites(&["trixie", "trixie-updates", "trixie-security"]);
        let a = Archives::new(&want, &o, root.path()).unwrap();
        let got: Vec<(&str, &str)> = a.iter().map(|(s, m)| (s, m.uri.as_str())).collect();
        assert_eq!(
            got,
            [
                ("trixie", "file:///srv/debian"),
                ("trixie-updates", "file:///srv/upd"),
                ("trixie-security", "file:///srv/sec"),
            ]
        );
        assert!(a.iter().all(|(_, m)| m.keyring == Path::new("/k.gpg")));
        // --mirror alone: security still from apt's security source.
        let o = MirrorOverrides::new(Some("file:///srv/debian"), &[], None).unwrap();
        let m = Mirror::for_suite("trixie-security", &o, root.path()).unwrap();
        assert_eq!(m.uri, "http://mirror.invalid/debian-security");
        // No security source at all: a clear error, not the main archive.
        let main_only = root_with(
            "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: trixie trixie-updates\n",
        );
        let e = Mirror::for_suite("trixie-security", &o, main_only.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no archive for suite trixie-security")
                && e.contains("--mirror-for trixie-security=URI"),
            "{e}"
        );
    }

    #[test]
    fn malformed_and_unused_overrides_are_refused() {
        let bad = |v: &str| MirrorOverrides::new(None, &[v.to_owned()], None).unwrap_err();
        assert!(bad("trixie-security").to_string().contains("SUITE=URI"));
        assert!(bad("=file:///x").to_string().contains("SUITE=URI"));
        assert!(bad("trixie-security=mirror.invalid")
            .to_string()
            .contains("not an http://"));
        assert!(bad("a=file:///x a=file:///y").to_string().contains("twice"));
        assert!(MirrorOverrides::new(Some("nope"), &[], None).is_err());
        let root = root_with(HOST);
        let o = MirrorOverrides::new(None, &["trixie-securty=file:///x".to_owned()], None).unwrap();
        let e = Archives::new(&suites(&["trixie", "trixie-security"]), &o, root.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("trixie-securty") && e.contains("spelling"),
            "{e}"
        );
    }
}
