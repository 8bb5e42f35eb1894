//! Image profiles (`profiles/NAME.yaml`): what goes into an image and what
//! comes out. The mirror is deliberately not part of a profile: it comes
//! from the build host's apt configuration (or `--mirror`), so profiles are
//! portable and name no host.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const PROFILE_KIND: &str = "ImageProfile";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    pub api_version: String,
    pub kind: String,
    /// Profile name; outputs and the lock file are named after it.
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub source: Source,
    /// Packages to take files from. Their Depends are followed unless
    /// `skipDepends` names them.
    pub packages: Vec<String>,
    /// Dependencies not to follow (maintainer-script tooling a read-only
    /// image without a package manager never runs).
    #[serde(default)]
    pub skip_depends: Vec<String>,
    pub paths: PathFilters,
    pub kernel: Kernel,
    #[serde(default)]
    pub kubernetes: Option<Kubernetes>,
    pub outputs: Vec<OutputKind>,
    #[serde(default)]
    pub disk: Disk,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Distribution suite, e.g. `trixie`.
    pub suite: String,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    #[serde(default = "default_arch")]
    pub architecture: String,
}

fn default_components() -> Vec<String> {
    vec!["main".into()]
}
fn default_arch() -> String {
    "amd64".into()
}

/// Which unpacked files enter the image. A path is kept when it matches an
/// `include` glob and no `exclude` glob; libraries the kept executables
/// need are added by the ELF closure whatever the globs say.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathFilters {
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Kernel {
    /// The package holding `boot/vmlinuz-*` and `lib/modules/*` (a
    /// metapackage is fine: its dependency brings the real one).
    pub package: String,
    /// Modules to include, closed over `modules.dep`.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Kernel command line for direct boot and boot entries.
    pub cmdline: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Kubernetes {
    /// Release, e.g. `1.34.2`.
    pub version: String,
    /// sha512 of `kubernetes-server-linux-amd64.tar.gz`, as published in
    /// the release CHANGELOG. Pins the tarball when it is downloaded.
    #[serde(default)]
    pub server_tarball_sha512: Option<String>,
    /// Binaries to install into /usr/bin.
    pub binaries: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputKind {
    /// Kernel + initramfs (cpio newc, zstd): QEMU direct boot, PXE.
    Initramfs,
    /// Raw GPT disk: ESP with systemd-boot, slots A/B, STATE, EPHEMERAL.
    Disk,
    /// The disk as qcow2 (needs qemu-img).
    Qcow2,
    /// `.zst` copies of the disk for download.
    Compressed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    /// Size of the raw disk in MiB (EPHEMERAL takes the rest; growing it
    /// to the real disk on first boot is planned machined work).
    #[serde(default = "default_disk_mib")]
    pub size_mib: u64,
    #[serde(default = "default_esp_mib")]
    pub esp_mib: u64,
    #[serde(default = "default_slot_mib")]
    pub slot_mib: u64,
    #[serde(default = "default_state_mib")]
    pub state_mib: u64,
}

impl Default for Disk {
    fn default() -> Self {
        Disk {
            size_mib: default_disk_mib(),
            esp_mib: default_esp_mib(),
            slot_mib: default_slot_mib(),
            state_mib: default_state_mib(),
        }
    }
}

fn default_disk_mib() -> u64 {
    2048
}
fn default_esp_mib() -> u64 {
    256
}
fn default_slot_mib() -> u64 {
    512
}
fn default_state_mib() -> u64 {
    64
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

impl Profile {
    pub fn load(path: &Path) -> Result<(Profile, String), ProfileError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ProfileError::Read(path.to_owned(), e))?;
        let parsed = machine_api::config::parse::parse_yaml::<Profile>(&text);
        let bad = |msg: String| ProfileError::Invalid(path.to_owned(), msg);
        if !parsed.problems.is_empty() {
            let lines: Vec<String> = parsed.problems.iter().map(|p| p.to_string()).collect();
            return Err(bad(lines.join("; ")));
        }
        let p = parsed.value.ok_or_else(|| bad("empty profile".into()))?;
        if p.kind != PROFILE_KIND {
            return Err(bad(format!("kind must be {PROFILE_KIND:?}")));
        }
        if p.packages.is_empty() {
            return Err(bad("packages: list at least the kernel package".into()));
        }
        if !p.packages.contains(&p.kernel.package) {
            return Err(bad(format!(
                "kernel.package {:?} must also be listed in packages",
                p.kernel.package
            )));
        }
        for g in p.paths.include.iter().chain(&p.paths.exclude) {
            globset::Glob::new(g).map_err(|e| bad(format!("paths: bad glob {g:?}: {e}")))?;
        }
        Ok((p, text))
    }

    /// Hash of what the lock depends on (source and package selection):
    /// when it changes, the lock is stale.
    pub fn inputs_hash(&self) -> String {
        let key = serde_json::json!({
            "source": self.source,
            "packages": self.packages,
            "skipDepends": self.skip_depends,
        });
        hex::encode(Sha256::digest(key.to_string()))
    }
}
