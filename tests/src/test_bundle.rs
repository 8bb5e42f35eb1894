//! A small upgrade bundle (manifest, optional signature, three files) for
//! tests of the upgrade checks: host-mode nodes check it fully and then
//! refuse it only for having no slot to write.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use machine_api::image_signature::SigningKey;
use sha2::Digest;

const FILES: [(&str, &str, &[u8]); 3] = [
    ("t-vmlinuz", "kernel", b"a kernel"),
    ("t-boot-initrd.cpio.zst", "boot-initrd", b"a boot initramfs"),
    ("t-root.squashfs", "root", b"a root filesystem"),
];

fn manifest() -> Vec<u8> {
    let outputs: Vec<serde_json::Value> = FILES
        .iter()
        .map(|(path, kind, data)| {
            serde_json::json!({
                "path": path, "kind": kind, "size": data.len(),
                "sha256": hex::encode(sha2::Sha256::digest(data)),
            })
        })
        .collect();
    serde_json::to_vec_pretty(&serde_json::json!({
        "profile": {"name": "t", "sha256": "00"},
        "imagerVersion": "0.1.0",
        "kernel": {"version": "6.12", "cmdline": "console=ttyS0"},
        "outputs": outputs,
    }))
    .unwrap()
}

/// A bundle: the manifest, its signature by `key` (if any), the files.
/// `tamper` changes a byte of the root file after signing.
pub fn bundle(key: Option<&SigningKey>, tamper: bool) -> Vec<u8> {
    let m = manifest();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
    };
    add("manifest.json", &m);
    if let Some(k) = key {
        add("manifest.json.sig", &k.sign(&m));
    }
    for (name, kind, data) in FILES {
        let mut d = data.to_vec();
        if tamper && kind == "root" {
            d[0] ^= 1;
        }
        add(name, &d);
    }
    b.into_inner().unwrap()
}
