//! The upgrade bundle, as a node (or `imager verify`) reads it: one tar
//! whose first member is the build's `manifest.json`, then its detached
//! signature (`manifest.json.sig`) when the build was signed, then the
//! files of a slot, each named as the manifest's outputs name them:
//! the kernel, the boot initramfs and the root squashfs.
//!
//! The reader checks in the order that lets it stop early: the manifest
//! and its signature first (against the trusted image keys), then each
//! file's size and SHA-256 against the manifest while it is streamed to
//! wherever the caller stores it. A caller must use nothing it stored
//! until [`read`] returned Ok: a file is only known good at its end.
//! Every failure says which check failed.

use std::io::Read;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::image_signature::{self, SignatureError, TrustedKey};
use crate::layout::artifact;

/// The output kinds a slot is made of, in bundle order.
pub const SLOT_KINDS: [&str; 3] = ["kernel", "boot-initrd", "root"];
/// Largest manifest accepted (a real one is tens of KiB).
pub const MANIFEST_LIMIT: u64 = 4 << 20;
/// Largest slot file accepted (a slot partition is a few GiB at most).
pub const FILE_LIMIT: u64 = 8 << 30;

/// The parts of `manifest.json` a bundle reader needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleManifest {
    pub profile: ManifestProfile,
    pub imager_version: String,
    /// The image's version (absent in manifests before it was recorded).
    #[serde(default)]
    pub image_version: String,
    pub outputs: Vec<Output>,
    #[serde(default)]
    pub kernel: Option<ManifestKernel>,
    /// The Kubernetes binaries the image carries (absent: none).
    #[serde(default)]
    pub kubernetes: Option<ManifestKubernetes>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ManifestKubernetes {
    #[serde(default)]
    pub present: bool,
    /// The release, as `1.35.4`.
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestKernel {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestProfile {
    pub name: String,
}

/// One output of the build.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Output {
    pub path: String,
    pub kind: String,
    pub size: u64,
    pub sha256: String,
}

impl BundleManifest {
    pub fn parse(data: &[u8]) -> Result<Self, BundleError> {
        let m: BundleManifest = serde_json::from_slice(data)
            .map_err(|e| BundleError::ManifestInvalid(e.to_string()))?;
        for o in &m.outputs {
            let plain = !o.path.is_empty()
                && !o.path.contains('/')
                && o.path != "."
                && o.path != ".."
                && !o.path.chars().any(char::is_control);
            if !plain {
                return Err(BundleError::ManifestInvalid(format!(
                    "output path {:?} is not a plain file name",
                    o.path
                )));
            }
        }
        Ok(m)
    }

    /// The profile's kernel command line, when the manifest has one
    /// without control characters.
    pub fn kernel_cmdline(&self) -> Option<&str> {
        self.kernel
            .as_ref()
            .map(|k| k.cmdline.as_str())
            .filter(|c| !c.is_empty() && !c.chars().any(char::is_control))
    }

    /// The output of this kind, when there is exactly one.
    pub fn output(&self, kind: &str) -> Option<&Output> {
        let mut it = self.outputs.iter().filter(|o| o.kind == kind);
        match (it.next(), it.next()) {
            (Some(o), None) => Some(o),
            _ => None,
        }
    }
}

/// What a bundle that passed every check is.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: BundleManifest,
    /// The SHA-256 of the manifest's bytes: names the build.
    pub manifest_sha256: String,
    /// The trusted key that verified the signature; None when the reader
    /// was given no trusted keys (nothing to check it against).
    pub signed_by: Option<String>,
    /// Whether the bundle carried a signature at all.
    pub signed: bool,
}

/// Why a bundle was refused, one line each, naming the check.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not an upgrade bundle (a tar from `imager build`): {0}")]
    NotATar(String),
    #[error("the bundle's first member is {0:?}, not manifest.json: not an upgrade bundle from `imager build`")]
    NoManifestFirst(String),
    #[error("the bundle's manifest is over {MANIFEST_LIMIT} bytes: refused")]
    ManifestTooLarge,
    #[error("the bundle's manifest is not valid: {0}")]
    ManifestInvalid(String),
    #[error("signature check failed: {0}")]
    Signature(#[from] SignatureError),
    #[error("the bundle member {0:?} is not a slot file (kernel, boot-initrd, root) of its manifest: refused")]
    UnexpectedMember(String),
    #[error("the bundle holds {0:?} twice: refused")]
    Duplicate(String),
    #[error("size check failed: {member} is {got} bytes in the bundle, the manifest says {want}")]
    Size { member: String, want: u64, got: u64 },
    #[error("file check failed: {member} does not match the manifest (sha256 {got}, the manifest says {want}): the bundle was changed after it was built")]
    Digest {
        member: String,
        want: String,
        got: String,
    },
    #[error("the bundle has no {0} file: a slot needs kernel, boot-initrd and root")]
    Missing(&'static str),
    /// The node's own rule refused a bundle whose checks passed so far
    /// (before any slot file was written).
    #[error("{0}")]
    Refused(String),
    #[error("storing {member}: {source}")]
    Store {
        member: String,
        source: std::io::Error,
    },
}

/// Reads a bundle from `r`, checking it as it goes. Each slot file is
/// handed to `store` (with its manifest entry) as a stream that is hashed
/// as the callback reads it. `trusted` empty: the signature, if any, is
/// not checked ([`Verified::signed_by`] is None) and the caller decides
/// whether that is acceptable; otherwise a valid signature by one of the
/// keys is required.
pub fn read<R: Read>(
    r: R,
    trusted: &[TrustedKey],
    store: &mut dyn FnMut(&Output, &mut dyn Read) -> std::io::Result<()>,
) -> Result<Verified, BundleError> {
    read_accepting(r, trusted, &|_| Ok(()), store)
}

/// [`read`], asking `accept` about the signed manifest before the first
/// slot file is stored: a refusal (its text) stops the read with
/// [`BundleError::Refused`] before anything is written.
pub fn read_accepting<R: Read>(
    r: R,
    trusted: &[TrustedKey],
    accept: &dyn Fn(&BundleManifest) -> Result<(), String>,
    store: &mut dyn FnMut(&Output, &mut dyn Read) -> std::io::Result<()>,
) -> Result<Verified, BundleError> {
    let mut archive = tar::Archive::new(r);
    let mut entries = archive
        .entries()
        .map_err(|e| BundleError::NotATar(e.to_string()))?;
    // 1. The manifest.
    let mut first = entries
        .next()
        .ok_or_else(|| BundleError::NotATar("it is empty".into()))?
        .map_err(|e| BundleError::NotATar(e.to_string()))?;
    let name = member_name(&first)?;
    if name != artifact::MANIFEST {
        return Err(BundleError::NoManifestFirst(name));
    }
    if first.size() > MANIFEST_LIMIT {
        return Err(BundleError::ManifestTooLarge);
    }
    let mut manifest_bytes = Vec::new();
    (&mut first)
        .take(MANIFEST_LIMIT + 1)
        .read_to_end(&mut manifest_bytes)
        .map_err(|e| BundleError::NotATar(e.to_string()))?;
    drop(first);
    let manifest = BundleManifest::parse(&manifest_bytes)?;

    // 2. The signature, if it is there; then the slot files.
    let mut signature: Option<Vec<u8>> = None;
    let mut signature_checked = false;
    let mut signed_by = None;
    let mut seen: Vec<String> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| BundleError::NotATar(e.to_string()))?;
        let name = member_name(&entry)?;
        if name == artifact::MANIFEST_SIGNATURE && seen.is_empty() && signature.is_none() {
            let mut sig = Vec::new();
            (&mut entry)
                .take(1024)
                .read_to_end(&mut sig)
                .map_err(|e| BundleError::NotATar(e.to_string()))?;
            signature = Some(sig);
            continue;
        }
        if !signature_checked {
            signed_by = check_signature(&manifest_bytes, signature.as_deref(), trusted)?;
            signature_checked = true;
            accept(&manifest).map_err(BundleError::Refused)?;
        }
        let Some(out) = manifest
            .outputs
            .iter()
            .find(|o| o.path == name && SLOT_KINDS.contains(&o.kind.as_str()))
        else {
            return Err(BundleError::UnexpectedMember(name));
        };
        if seen.contains(&name) {
            return Err(BundleError::Duplicate(name));
        }
        let size = entry.size();
        if size != out.size || size > FILE_LIMIT {
            return Err(BundleError::Size {
                member: name,
                want: out.size,
                got: size,
            });
        }
        let mut hashing = Hashing {
            inner: &mut entry,
            hash: Sha256::new(),
        };
        let stored = store(out, &mut hashing)
            .and_then(|()| std::io::copy(&mut hashing, &mut std::io::sink()).map(|_| ()));
        stored.map_err(|source| BundleError::Store {
            member: name.clone(),
            source,
        })?;
        let got = hex::encode(hashing.hash.finalize());
        if got != out.sha256.to_ascii_lowercase() {
            return Err(BundleError::Digest {
                member: name,
                want: out.sha256.clone(),
                got,
            });
        }
        seen.push(name);
    }
    if !signature_checked {
        signed_by = check_signature(&manifest_bytes, signature.as_deref(), trusted)?;
    }
    for kind in SLOT_KINDS {
        let present = manifest
            .output(kind)
            .is_some_and(|o| seen.contains(&o.path));
        if !present {
            return Err(BundleError::Missing(kind));
        }
    }
    Ok(Verified {
        manifest_sha256: hex::encode(Sha256::digest(&manifest_bytes)),
        manifest,
        signed_by,
        signed: signature.is_some(),
    })
}

fn check_signature(
    manifest: &[u8],
    signature: Option<&[u8]>,
    trusted: &[TrustedKey],
) -> Result<Option<String>, BundleError> {
    if trusted.is_empty() {
        return Ok(None);
    }
    Ok(Some(image_signature::verify_manifest(
        manifest, signature, trusted,
    )?))
}

fn member_name<R: Read>(e: &tar::Entry<'_, R>) -> Result<String, BundleError> {
    let p = e
        .path()
        .map_err(|e| BundleError::NotATar(format!("bad member name: {e}")))?;
    Ok(p.to_string_lossy().into_owned())
}

struct Hashing<'a, R> {
    inner: &'a mut R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_signature::SigningKey;

    fn manifest(files: &[(&str, &str, &[u8])]) -> Vec<u8> {
        let outputs: Vec<serde_json::Value> = files
            .iter()
            .map(|(path, kind, data)| {
                serde_json::json!({
                    "path": path, "kind": kind, "size": data.len(),
                    "sha256": hex::encode(Sha256::digest(data)),
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "profile": {"name": "t", "sha256": "x"},
            "imagerVersion": "0",
            "outputs": outputs,
        }))
        .unwrap()
    }

    const FILES: [(&str, &str, &[u8]); 3] = [
        ("t-vmlinuz", "kernel", b"kernel bytes"),
        ("t-boot-initrd.cpio.zst", "boot-initrd", b"initrd bytes"),
        ("t-root.squashfs", "root", b"root bytes"),
    ];

    fn bundle(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn signed(key: &SigningKey, files: &[(&str, &str, &[u8])]) -> Vec<u8> {
        let m = manifest(files);
        let sig = key.sign(&m);
        let mut members: Vec<(&str, &[u8])> =
            vec![("manifest.json", &m), ("manifest.json.sig", &sig)];
        for (p, _, d) in files {
            members.push((p, d));
        }
        bundle(&members)
    }

    fn read_all(data: &[u8], keys: &[TrustedKey]) -> Result<(Verified, Vec<String>), BundleError> {
        let mut stored = Vec::new();
        let v = read(data, keys, &mut |o, r| {
            let mut s = String::new();
            r.read_to_string(&mut s)?;
            stored.push(format!("{}={s}", o.kind));
            Ok(())
        })?;
        Ok((v, stored))
    }

    #[test]
    fn a_bundle_signed_by_a_trusted_key_passes() {
        let key = SigningKey::generate().unwrap();
        let (v, stored) = read_all(&signed(&key, &FILES), &[key.public()]).unwrap();
        assert_eq!(v.signed_by, Some(key.public().id()));
        assert_eq!(
            stored,
            [
                "kernel=kernel bytes",
                "boot-initrd=initrd bytes",
                "root=root bytes"
            ]
        );
    }

    #[test]
    fn each_check_names_itself() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        // Another key.
        let e = read_all(&signed(&other, &FILES), &[key.public()]).unwrap_err();
        assert!(matches!(e, BundleError::Signature(_)), "{e}");
        assert!(e.to_string().starts_with("signature check failed"), "{e}");
        // Unsigned, with keys to check against.
        let m = manifest(&FILES);
        let unsigned = bundle(&[
            ("manifest.json", &m),
            ("t-vmlinuz", b"kernel bytes"),
            ("t-boot-initrd.cpio.zst", b"initrd bytes"),
            ("t-root.squashfs", b"root bytes"),
        ]);
        let e = read_all(&unsigned, &[key.public()]).unwrap_err();
        assert!(e.to_string().contains("not signed"), "{e}");
        // Without keys an unsigned bundle passes the file checks.
        let (v, _) = read_all(&unsigned, &[]).unwrap();
        assert!(!v.signed && v.signed_by.is_none());
        // One byte changed in a file after signing.
        let mut b = signed(&key, &FILES);
        let at = b.windows(10).position(|w| w == b"root bytes").unwrap();
        b[at] ^= 1;
        let e = read_all(&b, &[key.public()]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("file check failed: t-root.squashfs"),
            "{e}"
        );
        // One byte of the manifest changed after signing.
        let mut b = signed(&key, &FILES);
        let at = b
            .windows(6)
            .position(|w| w == b"\"t\",\"s")
            .unwrap_or_else(|| b.windows(3).position(|w| w == b"\"t\"").unwrap());
        b[at + 1] = b'u';
        let e = read_all(&b, &[key.public()]).unwrap_err();
        assert!(matches!(e, BundleError::Signature(_)), "{e}");
        // A member the manifest does not list.
        let m = manifest(&FILES);
        let sig = key.sign(&m);
        let extra = bundle(&[
            ("manifest.json", &m),
            ("manifest.json.sig", &sig),
            ("evil", b"x"),
        ]);
        let e = read_all(&extra, &[key.public()]).unwrap_err();
        assert!(matches!(e, BundleError::UnexpectedMember(_)), "{e}");
        // A missing slot file.
        let short = bundle(&[
            ("manifest.json", &m),
            ("manifest.json.sig", &sig),
            ("t-vmlinuz", b"kernel bytes"),
        ]);
        let e = read_all(&short, &[key.public()]).unwrap_err();
        assert!(matches!(e, BundleError::Missing("boot-initrd")), "{e}");
        // Not a bundle at all, and a manifest that is not first.
        assert!(matches!(
            read_all(b"junk", &[]).unwrap_err(),
            BundleError::NotATar(_)
        ));
        let e = read_all(&bundle(&[("t-vmlinuz", b"kernel bytes")]), &[]).unwrap_err();
        assert!(matches!(e, BundleError::NoManifestFirst(_)), "{e}");
    }

    #[test]
    fn output_paths_must_be_plain_names() {
        let m = manifest(&[("../etc/passwd", "root", b"x")]);
        assert!(BundleManifest::parse(&m).is_err());
    }
}
