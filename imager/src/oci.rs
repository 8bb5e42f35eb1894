//! OCI image archives, written from a [`Tree`]: an OCI image layout
//! (`oci-layout`, `index.json`, `blobs/sha256/...`) in a tar, one image
//! per archive, one uncompressed layer. `ctr images import` reads them.
//!
//! Everything is deterministic: entries in sorted order, every mtime the
//! build's SOURCE_DATE_EPOCH, owner 0:0 without user or group names, the
//! modes of the tree, JSON with a fixed key order and no whitespace. Two
//! writes of the same image are byte-identical.
//!
//! ```text
//! archive.tar
//!   blobs/sha256/<config>    application/vnd.oci.image.config.v1+json
//!   blobs/sha256/<layer>     application/vnd.oci.image.layer.v1.tar
//!   blobs/sha256/<manifest>  application/vnd.oci.image.manifest.v1+json
//!   index.json               one manifest, named by both annotations
//!   oci-layout               {"imageLayoutVersion":"1.0.0"}
//! ```

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::tree::{Entry, Tree};

pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// The tag, by the OCI image layout's convention.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The full reference: containerd's importer takes it as the image name.
pub const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";
/// `PATH` of every image.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An image to write.
#[derive(Debug, Clone)]
pub struct Image {
    /// Full reference, `name:tag` (e.g. `localhost/node-os/pause:1`).
    pub reference: String,
    /// The files of its only layer.
    pub layer: Tree,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// What made the layer, for the config's history.
    pub created_by: String,
}

/// A written archive.
#[derive(Debug, Clone)]
pub struct Archive {
    /// The archive (a tar).
    pub bytes: Vec<u8>,
    /// `sha256:...` of the manifest.
    pub manifest_digest: String,
    /// `sha256:...` of the config.
    pub config_digest: String,
    /// `sha256:...` of the (uncompressed) layer: its digest and diff_id.
    pub diff_id: String,
    /// Hex SHA-256 of the whole archive.
    pub sha256: String,
}

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The tag of `name:tag` (the text after a `:` that follows the last `/`).
pub fn tag_of(reference: &str) -> Option<&str> {
    let last = reference.rsplit('/').next()?;
    last.rsplit_once(':')
        .map(|(_, t)| t)
        .filter(|t| !t.is_empty())
}

/// `epoch` (seconds since 1970, UTC) as RFC 3339 (`2026-11-21T09:15:44Z`).
pub fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86400) as i64;
    let secs = epoch % 86400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A tar of `tree` in its (sorted) order: ustar headers, mtime `epoch`,
/// owner 0:0 without names, the tree's modes; directories end in `/`.
pub fn tar(tree: &Tree, epoch: u64) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, entry) in tree.iter() {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(epoch);
        h.set_uid(0);
        h.set_gid(0);
        match entry {
            Entry::Dir { mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                let mut name = path.to_string_lossy().into_owned();
                name.push('/');
                b.append_data(&mut h, name, std::io::empty())
            }
            Entry::File { mode, data } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())
            }
            Entry::Symlink { target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target)
            }
        }
        .with_context(|| format!("tar entry {}", path.display()))?;
    }
    Ok(b.into_inner()?)
}

/// Writes `image` as an OCI archive.
pub fn write(image: &Image, epoch: u64) -> Result<Archive> {
    let Some(tag) = tag_of(&image.reference) else {
        bail!("{}: an image reference needs a tag", image.reference);
    };
    let created = rfc3339(epoch);
    let layer = tar(&image.layer, epoch)?;
    let diff_id = digest(&layer);
    let mut run = serde_json::Map::new();
    run.insert("Env".into(), json!(image.env));
    if !image.entrypoint.is_empty() {
        run.insert("Entrypoint".into(), json!(image.entrypoint));
    }
    if !image.cmd.is_empty() {
        run.insert("Cmd".into(), json!(image.cmd));
    }
    run.insert("WorkingDir".into(), json!("/"));
    let config = serde_json::to_vec(&json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": created, "created_by": image.created_by }],
    }))?;
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": diff_id,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                CONTAINERD_NAME_ANNOTATION: image.reference,
                REF_NAME_ANNOTATION: tag,
            },
        }],
    }))?;
    let mut outer = Tree::new();
    for blob in [config, layer, manifest] {
        let name = digest(&blob);
        let hex = name.trim_start_matches("sha256:");
        outer.insert(
            &Path::new("blobs/sha256").join(hex),
            Entry::file(0o644, blob),
        )?;
    }
    outer.insert(Path::new("index.json"), Entry::file(0o644, index))?;
    outer.insert(
        Path::new("oci-layout"),
        Entry::file(0o644, br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
    )?;
    let bytes = tar(&outer, epoch)?;
    Ok(Archive {
        sha256: hex::encode(Sha256::digest(&bytes)),
        bytes,
        manifest_digest,
        config_digest,
        diff_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;

    fn sample() -> Image {
        let mut layer = Tree::new();
        layer
            .insert(
                Path::new("bin/tool"),
                Entry::file(0o755, b"#!tool".to_vec()),
            )
            .unwrap();
        layer
            .insert(
                Path::new("bin/sh"),
                Entry::Symlink {
                    target: "tool".into(),
                },
            )
            .unwrap();
        layer
            .insert(Path::new("tmp"), Entry::Dir { mode: 0o1777 })
            .unwrap();
        Image {
            reference: "localhost/node-os/sample:1".into(),
            layer,
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            env: vec![DEFAULT_PATH.into()],
            created_by: "a test".into(),
        }
    }

    /// Path -> (header, contents) of every entry of a tar.
    fn entries(tar_bytes: &[u8]) -> BTreeMap<String, (tar::Header, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut a = tar::Archive::new(tar_bytes);
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.insert(path, (e.header().clone(), data));
        }
        out
    }

    fn json(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn two_writes_are_byte_identical() {
        let a = write(&sample(), 1_700_000_000).unwrap();
        let b = write(&sample(), 1_700_000_000).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.manifest_digest, b.manifest_digest);
        // The epoch is the only time in it.
        let c = write(&sample(), 1_700_000_001).unwrap();
        assert_ne!(a.bytes, c.bytes);
    }

    #[test]
    fn the_index_and_manifest_name_blobs_by_their_contents() {
        let a = write(&sample(), 1_700_000_000).unwrap();
        let files = entries(&a.bytes);
        let blob = |d: &str| -> Vec<u8> {
            let hex = d.strip_prefix("sha256:").unwrap();
            let (_, data) = &files[&format!("blobs/sha256/{hex}")];
            assert_eq!(digest(data), d, "blob {hex} does not match its name");
            data.clone()
        };
        for (_, (_, data)) in files
            .iter()
            .filter(|(p, _)| p.len() > "blobs/sha256/".len() && p.starts_with("blobs/sha256/"))
        {
            let d = digest(data);
            assert!(files.contains_key(&format!("blobs/sha256/{}", &d[7..])));
        }
        assert_eq!(
            json(&files["oci-layout"].1),
            json!({"imageLayoutVersion": "1.0.0"})
        );
        let index = json(&files["index.json"].1);
        let m = &index["manifests"][0];
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(m["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(m["digest"], a.manifest_digest.as_str());
        assert_eq!(
            m["annotations"][CONTAINERD_NAME_ANNOTATION],
            "localhost/node-os/sample:1"
        );
        assert_eq!(m["annotations"][REF_NAME_ANNOTATION], "1");
        let manifest_bytes = blob(m["digest"].as_str().unwrap());
        assert_eq!(m["size"], manifest_bytes.len());
        let manifest = json(&manifest_bytes);
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(manifest["config"]["digest"], a.config_digest.as_str());
        let config_bytes = blob(manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(manifest["config"]["size"], config_bytes.len());
        let layer_desc = &manifest["layers"][0];
        assert_eq!(layer_desc["mediaType"], LAYER_MEDIA_TYPE);
        let layer = blob(layer_desc["digest"].as_str().unwrap());
        assert_eq!(layer_desc["size"], layer.len());

        // diff_id: the SHA-256 of the layer tar, which is uncompressed.
        let config = json(&config_bytes);
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["rootfs"]["diff_ids"][0], digest(&layer).as_str());
        assert_eq!(config["rootfs"]["diff_ids"][0], a.diff_id.as_str());
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["created"], "2023-11-14T22:13:20Z");
        assert_eq!(config["config"]["Cmd"], json!(["sh"]));
        assert_eq!(config["config"]["Env"][0], DEFAULT_PATH);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&a.bytes)));
    }

    #[test]
    fn layer_entries_are_sorted_owned_by_root_and_dated() {
        let layer = tar(&sample().layer, 1_700_000_000).unwrap();
        let mut a = tar::Archive::new(layer.as_slice());
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            assert_eq!(h.mtime().unwrap(), 1_700_000_000, "{path}");
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{path}");
            assert_eq!(h.username().unwrap(), Some(""), "{path}");
            assert_eq!(h.groupname().unwrap(), Some(""), "{path}");
            let mode = h.mode().unwrap();
            match path.as_str() {
                "bin/" => assert_eq!(mode, 0o755),
                "bin/tool" => assert_eq!(mode, 0o755),
                "tmp/" => assert_eq!(mode, 0o1777),
                "bin/sh" => assert_eq!(e.link_name().unwrap().unwrap().to_string_lossy(), "tool"),
                other => panic!("unexpected {other}"),
            }
            seen.push(path);
        }
        assert_eq!(seen, ["bin/", "bin/sh", "bin/tool", "tmp/"]);
    }

    #[test]
    fn dates_and_tags() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_252_544), "2026-11-21T09:15:44Z");
        assert_eq!(tag_of("localhost/node-os/coredns:v1.13.1"), Some("v1.13.1"));
        assert_eq!(tag_of("localhost:5000/x"), None);
        assert_eq!(tag_of("x:"), None);
        let mut bad = sample();
        bad.reference = "localhost/node-os/sample".into();
        assert!(write(&bad, 0).is_err());
    }
}
