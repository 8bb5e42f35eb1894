//! Which mirror to use and which keyring verifies it: the environment
//! (`IMAGER_MIRROR`, `IMAGER_KEYRING`) or the host's apt configuration.
//! No mirror host is ever built in.

use std::path::{Path, PathBuf};

use super::deb822::paragraphs;
use super::SourceError;

/// The keyring used when apt's configuration names none.
pub const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A Debian archive: its base URI (`http(s)://…/debian` or `file:///…`)
/// and the keyring (binary or ASCII-armored) that verifies its `InRelease`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub uri: String,
    pub keyring: PathBuf,
}

/// One usable `deb` entry of apt's configuration: its first http(s) or
/// file URI, its suites and its `Signed-By`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AptSource {
    pub(super) uri: String,
    pub(super) suites: Vec<String>,
    pub(super) signed_by: Option<String>,
}

fn usable_uri(uri: &str) -> bool {
    url::Url::parse(uri)
        .map(|u| matches!(u.scheme(), "http" | "https" | "file"))
        .unwrap_or(false)
}

/// Checks a URI given on the command line or in the environment.
pub(super) fn check_uri(uri: &str, what: &str) -> Result<String, SourceError> {
    let uri = uri.trim();
    if usable_uri(uri) {
        return Ok(uri.to_owned());
    }
    Err(SourceError::Config(format!(
        "{what}={uri:?} is not an http://, https:// or file:// URI of a Debian archive"
    )))
}

/// What a suite adds to its release: the part after the codename
/// (`-security`, `-updates`, `-backports`, ...), empty for a main suite.
/// The old security layout `CODENAME/updates` is `-security`.
pub fn suite_kind(suite: &str) -> &str {
    if suite.ends_with("/updates") {
        return "-security";
    }
    suite.find('-').map_or("", |i| &suite[i..])
}

/// Whether `suite` carries security updates (`trixie-security`).
pub fn is_security_suite(suite: &str) -> bool {
    suite_kind(suite) == "-security"
}

/// Suites that do not only complement a main suite.
fn is_main_suite(suite: &str) -> bool {
    suite_kind(suite).is_empty()
}

impl AptSource {
    fn has_main_suite(&self) -> bool {
        self.suites.iter().any(|s| is_main_suite(s))
    }
}

fn deb822_sources(text: &str) -> Vec<AptSource> {
    paragraphs(text)
        .into_iter()
        .filter_map(|p| {
            if p.get("Enabled")
                .is_some_and(|v| v.eq_ignore_ascii_case("no"))
            {
                return None;
            }
            if !p.get("Types")?.split_whitespace().any(|t| t == "deb") {
                return None;
            }
            let suites: Vec<String> = p
                .get("Suites")?
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            let uri = p.get("URIs")?.split_whitespace().find(|u| usable_uri(u))?;
            Some(AptSource {
                uri: uri.to_owned(),
                suites,
                signed_by: p.get("Signed-By").map(str::to_owned),
            })
        })
        .collect()
}

fn deb822_source(text: &str) -> Option<AptSource> {
    deb822_sources(text)
        .into_iter()
        .find(AptSource::has_main_suite)
}

fn one_line_entry(line: &str) -> Option<AptSource> {
    let line = line.split('#').next().unwrap_or("").trim();
    let mut toks = line.split_whitespace();
    if toks.next()? != "deb" {
        return None;
    }
    let mut signed_by = None;
    let mut next = toks.next()?;
    if let Some(first) = next.strip_prefix('[') {
        let mut opts = vec![first.to_owned()];
        let mut tok = first;
        while !tok.ends_with(']') {
            tok = toks.next()?;
            opts.push(tok.to_owned());
        }
        for opt in opts.join(" ").trim_end_matches(']').split_whitespace() {
            if let Some((k, v)) = opt.split_once('=') {
                if k.trim_end_matches(['+', '-']) == "signed-by" {
                    signed_by = Some(v.to_owned());
                }
            }
        }
        next = toks.next()?;
    }
    let uri = next;
    let suite = toks.next()?;
    usable_uri(uri).then(|| AptSource {
        uri: uri.to_owned(),
        suites: vec![suite.to_owned()],
        signed_by,
    })
}

fn one_line_sources(text: &str) -> Vec<AptSource> {
    text.lines().filter_map(one_line_entry).collect()
}

fn one_line_source(text: &str) -> Option<AptSource> {
    one_line_sources(text)
        .into_iter()
        .find(AptSource::has_main_suite)
}

/// The keyring that a `Signed-By` value names: its first absolute path
/// (fingerprint-only values fall back to the default keyring).
pub(super) fn keyring_of(signed_by: Option<&str>, origin: &Path) -> Result<PathBuf, SourceError> {
    let Some(v) = signed_by else {
        return Ok(PathBuf::from(DEFAULT_KEYRING));
    };
    if v.contains("BEGIN PGP") {
        return Err(SourceError::Config(format!(
            "{}: Signed-By holds an inline key, which imager cannot use; set IMAGER_KEYRING to a keyring file",
            origin.display()
        )));
    }
    Ok(v.split([',', ' ', '\t', '\n'])
        .find(|t| t.starts_with('/'))
        .map_or_else(|| PathBuf::from(DEFAULT_KEYRING), PathBuf::from))
}

fn sorted_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every usable `deb` entry of apt's configuration under `root`, with the
/// file that holds it, in the order they are searched:
/// `sources.list.d/*.sources`, then `sources.list`, then
/// `sources.list.d/*.list`.
pub(super) fn apt_sources(root: &Path) -> Vec<(AptSource, PathBuf)> {
    let apt = root.join("etc/apt");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut out = Vec::new();
    for f in sorted_files(&apt.join("sources.list.d"), "sources") {
        out.extend(
            deb822_sources(&read(&f))
                .into_iter()
                .map(|s| (s, f.clone())),
        );
    }
    let mut one_line = vec![apt.join("sources.list")];
    one_line.extend(sorted_files(&apt.join("sources.list.d"), "list"));
    for f in one_line {
        out.extend(
            one_line_sources(&read(&f))
                .into_iter()
                .map(|s| (s, f.clone())),
        );
    }
    out
}

/// The first source of a main suite in apt's configuration under `root`,
/// and the file that holds it.
fn apt_source(root: &Path) -> Option<(AptSource, PathBuf)> {
    apt_sources(root)
        .into_iter()
        .find(|(s, _)| s.has_main_suite())
}

/// The error when apt's configuration under `root` names no main suite.
pub(super) fn no_main_mirror(root: &Path) -> SourceError {
    SourceError::Config(format!(
        "no Debian mirror found in {0}/etc/apt/sources.list.d/*.sources or {0}/etc/apt/sources.list \
         (a `deb` source of a main suite over http, https or file): set IMAGER_MIRROR to the archive's URI \
         and IMAGER_KEYRING to its keyring",
        root.display().to_string().trim_end_matches('/')
    ))
}

impl Mirror {
    /// The mirror of this host: `IMAGER_MIRROR` / `IMAGER_KEYRING` when
    /// set, else the first main-suite `deb` source of apt's configuration
    /// (`/etc/apt/sources.list.d/*.sources`, then `/etc/apt/sources.list`).
    pub fn from_host() -> Result<Mirror, SourceError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Mirror::from_parts(var("IMAGER_MIRROR"), var("IMAGER_KEYRING"), Path::new("/"))
    }

    /// Like [`Mirror::from_host`] with the environment values given and
    /// apt's configuration read under `root`.
    pub fn from_parts(
        mirror: Option<String>,
        keyring: Option<String>,
        root: &Path,
    ) -> Result<Mirror, SourceError> {
        let keyring = keyring.map(PathBuf::from);
        if let Some(uri) = mirror {
            let uri = check_uri(&uri, "IMAGER_MIRROR")?;
            return Ok(Mirror {
                uri,
                keyring: keyring.unwrap_or_else(|| PathBuf::from(DEFAULT_KEYRING)),
            });
        }
        let Some((src, file)) = apt_source(root) else {
            return Err(no_main_mirror(root));
        };
        let keyring = match keyring {
            Some(k) => k,
            None => keyring_of(src.signed_by.as_deref(), &file)?,
        };
        Ok(Mirror {
            uri: src.uri,
            keyring,
        })
    }

    /// The mirror named by apt's configuration under `root`, ignoring the
    /// environment.
    pub fn from_apt_config(root: &Path) -> Result<Mirror, SourceError> {
        Mirror::from_parts(None, None, root)
    }

    /// The first usable source of a deb822 `.sources` text.
    pub fn from_deb822(text: &str) -> Result<Option<Mirror>, SourceError> {
        deb822_source(text)
            .map(|s| {
                Ok(Mirror {
                    keyring: keyring_of(s.signed_by.as_deref(), Path::new("<deb822>"))?,
                    uri: s.uri,
                })
            })
            .transpose()
    }

    /// The first usable source of a one-line `sources.list` text.
    pub fn from_sources_list(text: &str) -> Result<Option<Mirror>, SourceError> {
        one_line_source(text)
            .map(|s| {
                Ok(Mirror {
                    keyring: keyring_of(s.signed_by.as_deref(), Path::new("<sources.list>"))?,
                    uri: s.uri,
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
# security first, must be skipped
Types: deb
URIs: http://mirror.invalid/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.invalid/debian
Suites: trixie

Types: deb
# a comment between fields
URIs: cdrom:/x http://mirror.invalid/debian
Suites: trixie trixie-updates
Components: main contrib
Signed-By: /etc/apt/keyrings/custom.gpg
";

    const ONE_LINE: &str = "\
# comment
deb http://mirror.invalid/debian-security trixie-security main
deb-src http://src.invalid/debian trixie main
deb [ arch=amd64 signed-by=/etc/apt/keyrings/one.gpg ] http://mirror.invalid/debian trixie main # tail
";

    #[test]
    fn parses_deb822_sources() {
        let m = Mirror::from_deb822(DEB822).unwrap().unwrap();
        assert_eq!(m.uri, "http://mirror.invalid/debian");
        assert_eq!(m.keyring, PathBuf::from("/etc/apt/keyrings/custom.gpg"));
        let no_signed_by =
            "Types: deb\nURIs: file:///srv/debian\nSuites: trixie\nComponents: main\n";
        let m = Mirror::from_deb822(no_signed_by).unwrap().unwrap();
        assert_eq!(m.uri, "file:///srv/debian");
        assert_eq!(m.keyring, PathBuf::from(DEFAULT_KEYRING));
        let disabled = "Enabled: no\nTypes: deb\nURIs: file:///srv/debian\nSuites: trixie\n";
        assert_eq!(Mirror::from_deb822(disabled).unwrap(), None);
        let inline = "Types: deb\nURIs: file:///srv\nSuites: trixie\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n x\n";
        assert!(Mirror::from_deb822(inline).is_err());
    }

    #[test]
    fn parses_one_line_sources_list_with_signed_by() {
        let m = Mirror::from_sources_list(ONE_LINE).unwrap().unwrap();
        assert_eq!(m.uri, "http://mirror.invalid/debian");
        assert_eq!(m.keyring, PathBuf::from("/etc/apt/keyrings/one.gpg"));
        let compact = "deb [signed-by=/k.gpg,/other.gpg] https://m.invalid/debian bookworm main\n";
        let m = Mirror::from_sources_list(compact).unwrap().unwrap();
        assert_eq!(m.keyring, PathBuf::from("/k.gpg"));
        let plain = "deb https://m.invalid/debian bookworm main\n";
        let m = Mirror::from_sources_list(plain).unwrap().unwrap();
        assert_eq!(m.keyring, PathBuf::from(DEFAULT_KEYRING));
    }

    #[test]
    fn apt_config_under_a_root_and_overrides() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("etc/apt/sources.list.d");
        std::fs::create_dir_all(&d).unwrap();
        assert!(Mirror::from_apt_config(root.path()).is_err());
        std::fs::write(root.path().join("etc/apt/sources.list"), ONE_LINE).unwrap();
        assert_eq!(
            Mirror::from_apt_config(root.path()).unwrap().keyring,
            PathBuf::from("/etc/apt/keyrings/one.gpg")
        );
        std::fs::write(d.join("debian.sources"), DEB822).unwrap();
        let m = Mirror::from_apt_config(root.path()).unwrap();
        assert_eq!(m.keyring, PathBuf::from("/etc/apt/keyrings/custom.gpg"));
        let m = Mirror::from_parts(None, Some("/k".into()), root.path()).unwrap();
        assert_eq!(
            (m.uri.as_str(), m.keyring),
            ("http://mirror.invalid/debian", "/k".into())
        );
        let m = Mirror::from_parts(Some("file:///srv/d".into()), None, root.path()).unwrap();
        assert_eq!(m.keyring, PathBuf::from(DEFAULT_KEYRING));
        assert!(Mirror::from_parts(Some("mirror.invalid".into()), None, root.path()).is_err());
    }
}
