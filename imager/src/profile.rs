//! Image profiles (`profiles/NAME.yaml`): what goes into an image and what
//! comes out. The mirror is deliberately not part of a profile: it comes
//! from the build host's apt configuration (or `--mirror`, `--mirror-for`),
//! so profiles are portable and name no host.
//!
//! `source.suites` lists the suites read, main suite first (`[trixie,
//! trixie-updates, trixie-security]`): a release alone misses its point and
//! security updates. `source.suite` (one) is still accepted, as older
//! profiles wrote it, and means a list of one.

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
    /// The main suite, e.g. `trixie`. In a profile: the older spelling of
    /// a one-suite `suites`. After [`Profile::load`]: the first suite.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub suite: String,
    /// The suites to read, main suite first, e.g. `[trixie,
    /// trixie-updates, trixie-security]`. After [`Profile::load`]: never
    /// empty (`[suite]` for a profile that gave `suite`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suites: Vec<String>,
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

impl Source {
    /// Checks `suite` / `suites` and fills both: `suites` the list,
    /// `suite` its first.
    fn normalize(&mut self) -> Result<(), String> {
        match (self.suite.trim().is_empty(), self.suites.is_empty()) {
            (false, false) => {
                return Err(
                    "source: give `suites` (a list, main suite first) or `suite` (one, as older profiles do), not both"
                        .into(),
                )
            }
            (true, true) => {
                return Err(
                    "source.suites: name the suites to read, main suite first, e.g. [trixie, trixie-updates, trixie-security]"
                        .into(),
                )
            }
            (false, true) => self.suites = vec![self.suite.trim().to_owned()],
            (true, false) => {}
        }
        for (i, s) in self.suites.iter().enumerate() {
            let name_ok = !s.is_empty()
                && s.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-._/".contains(&c));
            if !name_ok {
                return Err(format!("source.suites[{i}]: {s:?} is not a suite name"));
            }
            if self.suites[..i].contains(s) {
                return Err(format!("source.suites[{i}]: {s} is listed twice"));
            }
        }
        self.suite = self.suites[0].clone();
        Ok(())
    }

    /// The source as the lock's inputs hash sees it: a one-suite source
    /// hashes as older profiles' `suite: X` did, so their locks stay valid.
    fn hash_key(&self) -> serde_json::Value {
        if self.suites.len() <= 1 {
            serde_json::json!({
                "suite": self.suite,
                "components": self.components,
                "architecture": self.architecture,
            })
        } else {
            serde_json::json!({
                "suites": self.suites,
                "components": self.components,
                "architecture": self.architecture,
            })
        }
    }
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
        let mut p = parsed.value.ok_or_else(|| bad("empty profile".into()))?;
        p.source.normalize().map_err(bad)?;
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
            "source": self.source.hash_key(),
            "packages": self.packages,
            "skipDepends": self.skip_depends,
        });
        hex::encode(Sha256::digest(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(dir: &Path, source: &str) -> Result<Profile, String> {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/qemu.yaml"),
        )
        .unwrap();
        let start = text.find("source:\n").unwrap();
        let end = text[start..].find("packages:").unwrap() + start;
        let p = dir.join("p.yaml");
        std::fs::write(&p, format!("{}{source}{}", &text[..start], &text[end..])).unwrap();
        Profile::load(&p).map(|(p, _)| p).map_err(|e| e.to_string())
    }

    #[test]
    fn suite_or_suites() {
        let dir = tempfile::tempdir().unwrap();
        let old = load_with(dir.path(), "source:\n  suite: trixie\n").unwrap();
        assert_eq!(old.source.suites, ["trixie"]);
        assert_eq!(old.source.suite, "trixie");
        let one = load_with(dir.path(), "source:\n  suites: [trixie]\n").unwrap();
        assert_eq!(
            old.inputs_hash(),
            one.inputs_hash(),
            "a list of one is the old `suite`"
        );
        let three = load_with(
            dir.path(),
            "source:\n  suites: [trixie, trixie-updates, trixie-security]\n",
        )
        .unwrap();
        assert_eq!(three.source.suite, "trixie");
        assert_eq!(three.source.suites.len(), 3);
        assert_ne!(three.inputs_hash(), one.inputs_hash());
        let e =
            load_with(dir.path(), "source:\n  suite: trixie\n  suites: [trixie]\n").unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = load_with(dir.path(), "source:\n  components: [main]\n").unwrap_err();
        assert!(e.contains("source.suites"), "{e}");
        let e = load_with(dir.path(), "source:\n  suites: [trixie, trixie]\n").unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    /// The hash of a one-suite source is what older imagers computed, so
    /// their locks are not stale.
    #[test]
    fn one_suite_inputs_hash_is_unchanged() {
        let s = Source {
            suite: "trixie".into(),
            suites: vec!["trixie".into()],
            components: vec!["main".into()],
            architecture: "amd64".into(),
        };
        assert_eq!(
            s.hash_key().to_string(),
            r#"{"suite":"trixie","components":["main"],"architecture":"amd64"}"#
        );
    }
}
