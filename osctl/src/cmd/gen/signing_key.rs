//! `osctl gen signing-key`: the ed25519 key pair that signs node images.
//!
//! The private half (`image-signing.key`) stays with whoever builds images
//! (`imager build --sign`); the public half (`image-signing.pub`) goes into
//! every machine config's `machine.upgrade.trustedImageKeys`, so nodes take
//! only images signed by it. Both are the PEM files openssl writes, so an
//! operator can check an image with openssl alone.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use machine_api::image_signature::SigningKey;

use crate::files::{self, OutFile, SECRET};

/// File name of the private key.
pub const KEY_FILE: &str = "image-signing.key";
/// File name of the public key.
pub const PUB_FILE: &str = "image-signing.pub";
/// Mode of the public key: anyone may read it.
const PUBLIC: u32 = 0o644;

#[derive(Debug, Args)]
pub struct GenSigningKey {
    /// Directory to write image-signing.key and image-signing.pub into.
    #[arg(long, short = 'o', alias = "output", default_value = ".")]
    pub output_dir: PathBuf,
    /// Replace an existing key. Nodes trusting the old public key will
    /// refuse images signed with the new one until their configs list it.
    #[arg(long)]
    pub force: bool,
}

impl GenSigningKey {
    pub fn run(self) -> Result<ExitCode> {
        let dir = &self.output_dir;
        let (key_path, pub_path) = (dir.join(KEY_FILE), dir.join(PUB_FILE));
        if !self.force && key_path.exists() {
            bail!(
                "refusing to overwrite {}: nodes may already trust its public key; pass --force to replace it",
                key_path.display()
            );
        }
        let key = SigningKey::generate()?;
        let public = key.public();
        files::write_all(
            &[
                OutFile {
                    path: key_path.clone(),
                    contents: key.to_pkcs8_pem(),
                    mode: SECRET,
                },
                OutFile {
                    path: pub_path.clone(),
                    contents: public.to_pem(),
                    mode: PUBLIC,
                },
            ],
            self.force,
        )?;
        print!("{}", report(&key_path, &pub_path, &public.id()));
        Ok(ExitCode::SUCCESS)
    }
}

/// What was written and what to do next.
fn report(key: &Path, public: &Path, id: &str) -> String {
    let (key, public) = (key.display(), public.display());
    format!(
        "wrote {key} (private: keep it with the image builder, never on a node)\n\
         wrote {public}\n\
         key id: {id}\n\
         next:\n  \
         sign images:   imager build --sign {key} ...\n  \
         trust them:    osctl gen config ... --image-key {public}\n                 \
         (or add the text of {public} to machine.upgrade.trustedImageKeys)\n  \
         check by hand: openssl pkeyutl -verify -pubin -inkey {public} -rawin -in manifest.json -sigfile manifest.json.sig\n"
    )
}
