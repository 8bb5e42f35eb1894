//! Errors of the package source. Each message names the URL, file or
//! package concerned and says what to do about it.

use std::path::PathBuf;

use crate::tree::TreeError;

/// Why fetching, verifying, resolving or unpacking packages failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No usable mirror in the host's apt configuration or environment.
    #[error("{0}")]
    Config(String),

    /// A download failed (network, HTTP status, missing file).
    #[error("cannot fetch {url}: {reason}; check the mirror (--mirror, --mirror-for, the host's apt sources) and the network")]
    Fetch { url: String, reason: String },

    /// The keyring file cannot be read or holds no usable key.
    #[error(
        "keyring {path}: {reason}; point IMAGER_KEYRING at the distribution's archive keyring"
    )]
    Keyring { path: PathBuf, reason: String },

    /// `InRelease` is not a cleartext-signed message or its signature does
    /// not verify against any key of the keyring.
    #[error("InRelease of {suite} at {uri}: signature does not verify against {keyring}: refusing it ({reason})")]
    Signature {
        suite: String,
        uri: String,
        keyring: PathBuf,
        reason: String,
    },

    /// The signed Release text is malformed or is for another suite.
    #[error("InRelease of {suite} at {uri}: {reason}")]
    Release {
        suite: String,
        uri: String,
        reason: String,
    },

    /// The signed Release's `Valid-Until` has passed: the mirror is stale,
    /// or replays an old, validly signed index to hide newer packages.
    #[error("InRelease of {suite} at {uri} expired on {valid_until} (its Valid-Until): the mirror serves a stale or replayed index, which can hide security updates; refusing it. Try again later, or fetch {suite} from an up-to-date mirror (--mirror-for {suite}=URI)")]
    Expired {
        suite: String,
        uri: String,
        valid_until: String,
    },

    /// The Release file lists no index for this component and architecture.
    #[error("Release of {suite} lists no {path} (nor .gz or uncompressed): check the component and architecture names")]
    MissingIndex { suite: String, path: String },

    /// Downloaded bytes do not match the signed hash and size.
    #[error("{what}: sha256 {got_sha256} ({got_size} bytes) does not match {expected_sha256} ({expected_size} bytes) listed in {listed_in}: refusing it (mirror out of sync or tampered; try again later or another mirror)")]
    Checksum {
        what: String,
        listed_in: String,
        expected_sha256: String,
        expected_size: u64,
        got_sha256: String,
        got_size: u64,
    },

    /// A Packages index cannot be decompressed or parsed.
    #[error("index {url}: {reason}")]
    Index { url: String, reason: String },

    /// A wanted package is not in the index.
    #[error("package {name:?} is not in the index{}", suggest(.suggestions))]
    UnknownPackage {
        name: String,
        suggestions: Vec<String>,
    },

    /// A wanted virtual package has several providers.
    #[error("package {name:?} is virtual, provided by {providers:?}: name one of them")]
    AmbiguousVirtual {
        name: String,
        providers: Vec<String>,
    },

    /// No alternative of a dependency is in the index.
    #[error("{package} depends on {dependency:?}, which no package in the index provides: add the missing component or put the name in the skip list")]
    Unsatisfiable { package: String, dependency: String },

    /// A `.deb` is malformed or uses an unsupported feature.
    #[error("package file {path}: {reason}")]
    Deb { path: PathBuf, reason: String },

    /// Writing an unpacked entry into the tree failed.
    #[error("package file {deb}: cannot place {entry}: {source}")]
    Tree {
        deb: PathBuf,
        entry: String,
        #[source]
        source: TreeError,
    },

    /// A local file (cache, keyring, package) cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn suggest(names: &[String]) -> String {
    if names.is_empty() {
        "; check the name and the component".to_owned()
    } else {
        format!("; did you mean {}?", names.join(", "))
    }
}

impl SourceError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SourceError::Io {
            path: path.into(),
            source,
        }
    }
}
