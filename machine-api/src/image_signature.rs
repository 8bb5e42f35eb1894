//! Signed node images: an ed25519 signature over the exact bytes of an
//! image's `manifest.json`, and the keys that make and check it.
//!
//! `manifest.json` names every input and output of an image with its
//! SHA-256, so signing it covers the whole image: whoever holds a trusted
//! public key can check that an image came from a builder holding the
//! private key, and that nothing in it changed since. The signature is
//! detached (`manifest.json.sig`, the 64 raw bytes of the signature), so
//! the manifest stays byte-for-byte what `imager` wrote, and nothing has
//! to parse it before it is checked.
//!
//! Every format here is the plain one openssl reads and writes, so an
//! operator can check an image without any of our tools, and a key made
//! by openssl works with ours:
//!
//! - private key: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), what
//!   `openssl genpkey -algorithm ed25519` writes;
//! - public key: SPKI PEM (`-----BEGIN PUBLIC KEY-----`), what
//!   `openssl pkey -in KEY -pubout` writes;
//! - signature: raw 64 bytes, checked by
//!   `openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in manifest.json -sigfile manifest.json.sig`.
//!
//! Keys and signatures may come from strangers (a downloaded image, a
//! machine config sent to a node), so their sizes are bounded before they
//! are parsed, and every error says what failed and what to do: callers
//! show them to operators as they are.

use std::fmt;
use std::io;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::KeypairBytes;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use rand::TryRng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// What is appended to a signed file's name to name its signature:
/// `manifest.json` is signed by `manifest.json.sig`.
pub const SIGNATURE_SUFFIX: &str = ".sig";

/// Length of an ed25519 signature, and so of a `.sig` file. A caller
/// reading a signature file from a stranger need read no more than one
/// byte past this to tell a malformed one.
pub const SIGNATURE_LEN: usize = ed25519_dalek::SIGNATURE_LENGTH;

/// Most bytes of PEM text a key is read from. An ed25519 key's PEM is
/// about 120 bytes; the bound keeps a stranger's file or config entry from
/// costing more than a glance.
pub const MAX_PEM_BYTES: usize = 4096;

/// Most trusted keys a machine config may list (a few builders, plus the
/// next key of each while rotating). Every check tries each key in turn.
pub const MAX_TRUSTED_KEYS: usize = 16;

/// Why an image's signature, or a key, was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// There is no signature next to the manifest.
    #[error("the manifest is not signed (no manifest.json{SIGNATURE_SUFFIX}): sign the image with `imager build --sign KEY`")]
    Unsigned,
    /// The signature is not 64 bytes: it is not an ed25519 signature at all
    /// (truncated, or some other file).
    #[error("the signature (manifest.json{SIGNATURE_SUFFIX}) is {len} bytes, not the {SIGNATURE_LEN} of an ed25519 signature: it is damaged or not a signature; sign the image again with `imager build --sign KEY`")]
    Malformed {
        /// Length of what was found.
        len: usize,
    },
    /// The signature is well formed but made by none of the trusted keys,
    /// or the manifest changed after signing (the two look the same).
    #[error("the manifest's signature verifies with none of the {} ({}): it was signed by another key, or the manifest was changed after signing", count(trusted.len(), "trusted key"), trusted.join(", "))]
    UntrustedKey {
        /// Ids ([`TrustedKey::id`]) of the keys tried.
        trusted: Vec<String>,
    },
    /// Nothing to check against.
    #[error("no trusted image keys are configured, so no signature can be checked: add the builder's public key (image-signing.pub, from `osctl gen signing-key`) to machine.upgrade.trustedImageKeys")]
    NoTrustedKeys,
    /// A key file or config entry could not be read as a key.
    #[error("{what}: {reason}")]
    Key {
        /// Which key: a file name or a config field path.
        what: String,
        /// What is wrong with it and what to give instead.
        reason: String,
    },
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn key_error(what: &str, reason: impl Into<String>) -> SignatureError {
    SignatureError::Key {
        what: what.to_owned(),
        reason: reason.into(),
    }
}

/// Refuses PEM text over [`MAX_PEM_BYTES`] and returns it trimmed (a key
/// pasted into YAML or a file often carries surrounding blank lines).
fn bounded_pem<'a>(text: &'a str, what: &str) -> Result<&'a str, SignatureError> {
    if text.len() > MAX_PEM_BYTES {
        return Err(key_error(
            what,
            format!(
                "{} bytes, over the limit of {MAX_PEM_BYTES} bytes for a key: an ed25519 key in PEM is about 120 bytes; give the key file itself",
                text.len()
            ),
        ));
    }
    Ok(text.trim())
}

/// The PEM label of `text` (`PRIVATE KEY` for `-----BEGIN PRIVATE KEY-----`).
fn pem_label(text: &str) -> Option<&str> {
    text.strip_prefix("-----BEGIN ")?
        .split_once("-----")
        .map(|(label, _)| label)
}

/// A private key that signs images. Keep its file private (`osctl gen
/// signing-key` writes it with mode 0600): whoever holds it can make
/// images every node trusting its public key installs.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret: only which key it is.
        write!(f, "SigningKey({})", self.public().id())
    }
}

impl SigningKey {
    /// A new key from the operating system's random number generator.
    /// Fails only when the OS cannot give randomness.
    pub fn generate() -> io::Result<Self> {
        let mut seed = [0u8; ed25519_dalek::SECRET_KEY_LENGTH];
        rand::rngs::SysRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| io::Error::other(format!("no randomness from the OS: {e}")))?;
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(SigningKey(key))
    }

    /// Reads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`, as
    /// `openssl genpkey -algorithm ed25519` writes). `what` names the file
    /// in the error.
    pub fn from_pkcs8_pem(text: &str, what: &str) -> Result<Self, SignatureError> {
        let text = bounded_pem(text, what)?;
        match pem_label(text) {
            Some("PRIVATE KEY") => {}
            Some("PUBLIC KEY") => {
                return Err(key_error(
                    what,
                    "this is a public key: signing needs the private key (image-signing.key, `-----BEGIN PRIVATE KEY-----`)",
                ))
            }
            _ => {
                return Err(key_error(
                    what,
                    "not a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`): make one with `osctl gen signing-key` or `openssl genpkey -algorithm ed25519`",
                ))
            }
        }
        ed25519_dalek::SigningKey::from_pkcs8_pem(text)
            .map(SigningKey)
            .map_err(|e| {
                key_error(
                    what,
                    format!("not an ed25519 private key ({e}): make one with `osctl gen signing-key` or `openssl genpkey -algorithm ed25519`"),
                )
            })
    }

    /// The key as PKCS#8 PEM, the form `openssl genpkey -algorithm
    /// ed25519` writes (version 1: the private key alone).
    pub fn to_pkcs8_pem(&self) -> String {
        let bytes = KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        };
        match bytes.to_pkcs8_pem(LineEnding::LF) {
            Ok(pem) => pem.to_string(),
            // 32 bytes of key always encode.
            Err(e) => unreachable!("an ed25519 key encodes as PKCS#8: {e}"),
        }
    }

    /// The public key that checks this key's signatures.
    pub fn public(&self) -> TrustedKey {
        TrustedKey(self.0.verifying_key())
    }

    /// The signature of `manifest`: the content of `manifest.json.sig`.
    pub fn sign(&self, manifest: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(manifest).to_bytes()
    }
}

/// A public key whose signatures a node (or an operator) trusts.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TrustedKey(VerifyingKey);

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustedKey({})", self.id())
    }
}

impl TrustedKey {
    /// Reads an SPKI PEM public key (`-----BEGIN PUBLIC KEY-----`, as
    /// `openssl pkey -in KEY -pubout` writes). `what` names the file or
    /// config field in the error.
    pub fn from_pem(text: &str, what: &str) -> Result<Self, SignatureError> {
        let text = bounded_pem(text, what)?;
        match pem_label(text) {
            Some("PUBLIC KEY") => {}
            Some(label) if label.contains("PRIVATE KEY") => {
                return Err(key_error(
                    what,
                    "this is a private key, which must stay with the builder: give its public key (image-signing.pub, or `openssl pkey -in KEY -pubout`)",
                ))
            }
            _ => {
                return Err(key_error(
                    what,
                    "not a PEM public key (`-----BEGIN PUBLIC KEY-----`): give image-signing.pub from `osctl gen signing-key`, or `openssl pkey -in KEY -pubout`",
                ))
            }
        }
        let key = VerifyingKey::from_public_key_pem(text).map_err(|e| {
            key_error(
                what,
                format!("not an ed25519 public key ({e}): image keys are ed25519; make a pair with `osctl gen signing-key`"),
            )
        })?;
        if key.is_weak() {
            return Err(key_error(
                what,
                "a weak ed25519 key (of small order) that anyone could forge signatures for: make a real pair with `osctl gen signing-key`",
            ));
        }
        Ok(TrustedKey(key))
    }

    /// The key as SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn to_pem(&self) -> String {
        match self.0.to_public_key_pem(LineEnding::LF) {
            Ok(pem) => pem,
            // 32 bytes of key always encode.
            Err(e) => unreachable!("an ed25519 key encodes as SPKI: {e}"),
        }
    }

    /// A short, stable name for the key to show and compare: `ed25519:`
    /// and the first 16 hex digits of the SHA-256 of the raw 32-byte key.
    pub fn id(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        format!("ed25519:{}", &hex::encode(digest)[..16])
    }

    /// Whether `signature` is this key's signature of `manifest` (strict
    /// checking: no malleable or small-order forms).
    fn verifies(&self, manifest: &[u8], signature: &Signature) -> bool {
        self.0.verify_strict(manifest, signature).is_ok()
    }
}

impl Serialize for TrustedKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_pem())
    }
}

impl<'de> Deserialize<'de> for TrustedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        TrustedKey::from_pem(&text, "trusted image key").map_err(serde::de::Error::custom)
    }
}

/// Checks that `signature` (the content of `manifest.json.sig`, `None`
/// when there is none) is a signature of exactly `manifest` by one of
/// `trusted`, and returns that key's [`id`](TrustedKey::id).
///
/// Problems are reported in this order: no trusted keys, no signature, a
/// signature of the wrong size, no key verifies.
pub fn verify_manifest(
    manifest: &[u8],
    signature: Option<&[u8]>,
    trusted: &[TrustedKey],
) -> Result<String, SignatureError> {
    if trusted.is_empty() {
        return Err(SignatureError::NoTrustedKeys);
    }
    let bytes = signature.ok_or(SignatureError::Unsigned)?;
    let signature =
        Signature::from_slice(bytes).map_err(|_| SignatureError::Malformed { len: bytes.len() })?;
    trusted
        .iter()
        .find(|k| k.verifies(manifest, &signature))
        .map(TrustedKey::id)
        .ok_or_else(|| SignatureError::UntrustedKey {
            trusted: trusted.iter().map(TrustedKey::id).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::PublicKeyBytes;

    fn key() -> SigningKey {
        SigningKey::generate().expect("randomness")
    }

    const MANIFEST: &[u8] = br#"{"profile":"demo","outputs":[]}"#;

    #[test]
    fn a_signature_verifies_with_its_key() {
        let k = key();
        let sig = k.sign(MANIFEST);
        let trusted = [key().public(), k.public()];
        assert_eq!(
            verify_manifest(MANIFEST, Some(&sig), &trusted),
            Ok(k.public().id())
        );
    }

    #[test]
    fn a_changed_byte_fails() {
        let k = key();
        let sig = k.sign(MANIFEST);
        let mut changed = MANIFEST.to_vec();
        changed[3] ^= 1;
        let err = verify_manifest(&changed, Some(&sig), &[k.public()]).unwrap_err();
        assert!(matches!(err, SignatureError::UntrustedKey { .. }), "{err}");
        let mut bad_sig = sig;
        bad_sig[10] ^= 1;
        assert!(verify_manifest(MANIFEST, Some(&bad_sig), &[k.public()]).is_err());
    }

    #[test]
    fn another_key_is_untrusted_and_the_error_lists_the_trusted_ids() {
        let (signer, a, b) = (key(), key().public(), key().public());
        let sig = signer.sign(MANIFEST);
        let err = verify_manifest(MANIFEST, Some(&sig), &[a.clone(), b.clone()]).unwrap_err();
        assert_eq!(
            err,
            SignatureError::UntrustedKey {
                trusted: vec![a.id(), b.id()]
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("none of the 2 trusted keys"), "{msg}");
        assert!(msg.contains(&a.id()) && msg.contains(&b.id()), "{msg}");
        let one = verify_manifest(MANIFEST, Some(&sig), &[a]).unwrap_err();
        assert!(
            one.to_string().contains("none of the 1 trusted key ("),
            "{one}"
        );
    }

    #[test]
    fn unsigned_malformed_and_no_keys_are_told_apart() {
        let k = key();
        let trusted = [k.public()];
        assert_eq!(
            verify_manifest(MANIFEST, None, &trusted),
            Err(SignatureError::Unsigned)
        );
        assert!(SignatureError::Unsigned
            .to_string()
            .contains("imager build --sign"));
        let sig = k.sign(MANIFEST);
        for bad in [&sig[..63], &[0u8; 65][..], &[][..]] {
            assert_eq!(
                verify_manifest(MANIFEST, Some(bad), &trusted),
                Err(SignatureError::Malformed { len: bad.len() })
            );
        }
        assert_eq!(
            verify_manifest(MANIFEST, Some(&sig), &[]),
            Err(SignatureError::NoTrustedKeys)
        );
    }

    #[test]
    fn keys_roundtrip_through_pem() {
        let k = key();
        let pem = k.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let again = SigningKey::from_pkcs8_pem(&pem, "k").unwrap();
        assert_eq!(again.public(), k.public());
        assert_eq!(again.sign(MANIFEST), k.sign(MANIFEST));

        let public = k.public().to_pem();
        assert!(
            public.starts_with("-----BEGIN PUBLIC KEY-----\n"),
            "{public}"
        );
        let t = TrustedKey::from_pem(&format!("\n{public}\n"), "p").unwrap();
        assert_eq!(t, k.public());
        assert_eq!(t.to_pem(), public);

        let id = t.id();
        assert!(id.starts_with("ed25519:") && id.len() == 8 + 16, "{id}");
        assert_eq!(id, k.public().id());
        assert_ne!(id, key().public().id());

        let json = serde_json::to_string(&t).unwrap();
        let back: TrustedKey = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        assert!(serde_json::from_str::<TrustedKey>("\"nope\"").is_err());
    }

    #[test]
    fn key_errors_name_the_key_and_say_what_to_give() {
        let k = key();
        let private = k.to_pkcs8_pem();
        let public = k.public().to_pem();
        let err = TrustedKey::from_pem(&private, "keys[1]").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("keys[1]: ") && msg.contains("private key"),
            "{msg}"
        );
        let msg = SigningKey::from_pkcs8_pem(&public, "a.key")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("a.key: ") && msg.contains("public key"),
            "{msg}"
        );
        for junk in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            assert!(TrustedKey::from_pem(junk, "p").is_err(), "{junk:?}");
            assert!(SigningKey::from_pkcs8_pem(junk, "k").is_err(), "{junk:?}");
        }
        let garbled = public.replace('A', "B");
        if garbled != public {
            assert!(TrustedKey::from_pem(&garbled, "p").is_err());
        }
        let huge = format!("{public}{}", " ".repeat(MAX_PEM_BYTES));
        let msg = TrustedKey::from_pem(&huge, "p").unwrap_err().to_string();
        assert!(msg.contains("over the limit of 4096 bytes"), "{msg}");
        let msg = SigningKey::from_pkcs8_pem(&huge, "k")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("over the limit"), "{msg}");
    }

    #[test]
    fn a_weak_public_key_is_refused() {
        // The identity point: every signature "verifies" under it.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        let pem = PublicKeyBytes(weak)
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let msg = TrustedKey::from_pem(&pem, "p").unwrap_err().to_string();
        assert!(msg.contains("weak"), "{msg}");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = key();
        let shown = format!("{k:?}");
        assert_eq!(shown, format!("SigningKey({})", k.public().id()));
    }

    /// openssl as the independent checker: keys, signatures and formats
    /// cross between it and this module both ways.
    mod openssl {
        use super::*;
        use std::fs;
        use std::path::Path;
        use std::process::Command;

        fn run(args: &[&str]) {
            let out = Command::new("openssl").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        fn s(p: &Path) -> &str {
            p.to_str().unwrap()
        }

        #[test]
        fn openssl_keys_sign_for_us_and_openssl_checks_our_signatures() {
            crate::require_tools!("openssl");
            let dir = tempfile::tempdir().unwrap();
            let (key, public, manifest, sig) = (
                dir.path().join("k.pem"),
                dir.path().join("k.pub"),
                dir.path().join("manifest.json"),
                dir.path().join("manifest.json.sig"),
            );
            run(&["genpkey", "-algorithm", "ed25519", "-out", s(&key)]);
            run(&["pkey", "-in", s(&key), "-pubout", "-out", s(&public)]);
            fs::write(&manifest, MANIFEST).unwrap();

            let ours =
                SigningKey::from_pkcs8_pem(&fs::read_to_string(&key).unwrap(), "k.pem").unwrap();
            let theirs_pub =
                TrustedKey::from_pem(&fs::read_to_string(&public).unwrap(), "k.pub").unwrap();
            assert_eq!(ours.public(), theirs_pub);
            assert_eq!(ours.public().to_pem(), fs::read_to_string(&public).unwrap());
            // Our encoding of the private key is the one openssl writes.
            assert_eq!(ours.to_pkcs8_pem(), fs::read_to_string(&key).unwrap());

            // We sign; openssl verifies.
            fs::write(&sig, ours.sign(MANIFEST)).unwrap();
            run(&[
                "pkeyutl",
                "-verify",
                "-pubin",
                "-inkey",
                s(&public),
                "-rawin",
                "-in",
                s(&manifest),
                "-sigfile",
                s(&sig),
            ]);

            // openssl signs; we verify.
            fs::remove_file(&sig).unwrap();
            run(&[
                "pkeyutl",
                "-sign",
                "-inkey",
                s(&key),
                "-rawin",
                "-in",
                s(&manifest),
                "-out",
                s(&sig),
            ]);
            let theirs = fs::read(&sig).unwrap();
            assert_eq!(
                verify_manifest(MANIFEST, Some(&theirs), std::slice::from_ref(&theirs_pub)),
                Ok(theirs_pub.id())
            );
        }

        #[test]
        fn openssl_reads_our_keys_and_rejects_a_changed_manifest() {
            crate::require_tools!("openssl");
            let dir = tempfile::tempdir().unwrap();
            let (key, public, manifest, sig) = (
                dir.path().join("k.pem"),
                dir.path().join("k.pub"),
                dir.path().join("manifest.json"),
                dir.path().join("manifest.json.sig"),
            );
            let k = SigningKey::generate().unwrap();
            fs::write(&key, k.to_pkcs8_pem()).unwrap();
            fs::write(&public, k.public().to_pem()).unwrap();
            run(&["pkey", "-in", s(&key), "-noout"]);
            run(&["pkey", "-pubin", "-in", s(&public), "-noout"]);
            let mut changed = MANIFEST.to_vec();
            changed.push(b'\n');
            fs::write(&manifest, &changed).unwrap();
            fs::write(&sig, k.sign(MANIFEST)).unwrap();
            let out = Command::new("openssl")
                .args([
                    "pkeyutl",
                    "-verify",
                    "-pubin",
                    "-inkey",
                    s(&public),
                    "-rawin",
                    "-in",
                    s(&manifest),
                    "-sigfile",
                    s(&sig),
                ])
                .output()
                .unwrap();
            assert!(!out.status.success(), "openssl accepted a changed manifest");
        }
    }
}
