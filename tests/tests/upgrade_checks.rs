//! A node (machined in host mode) offered upgrade bundles: the one signed
//! by its trusted key passes every check (and, in host mode, is then
//! refused only because there is no slot to write); one signed by another
//! key, an unsigned one, one with a byte changed after signing, and junk
//! are each refused naming the check that failed. The bundles go over the
//! API with a plain gRPC client, so the node's checks are tested, not
//! osctl's (osctl checks a bundle before it sends it: tested too).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use machine_api::image_signature::SigningKey;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::UpgradeRequest;
use node_tests::{osctl, require, ClusterFiles, Machined};
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
fn bundle(key: Option<&SigningKey>, tamper: bool) -> Vec<u8> {
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

/// Sends `data` as an upgrade in small chunks; the status message or Ok.
async fn offer(files: &ClusterFiles, ip: &str, data: Vec<u8>) -> Result<String, tonic::Status> {
    let ch = files.channel(ip).await;
    let chunks: Vec<UpgradeRequest> = data
        .chunks(7)
        .map(|c| UpgradeRequest {
            chunk: c.to_vec(),
            stage: true,
        })
        .collect();
    MachineServiceClient::new(ch)
        .upgrade(tokio_stream::iter(chunks))
        .await
        .map(|r| r.into_inner().message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_bundles_that_fail_a_check_and_names_the_check() {
    require!("etcd", "containerd", "runc");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.7.1";
    let keys = tmp.path().join("keys");
    osctl(&["gen", "signing-key", "-o", keys.to_str().unwrap()]).expect_ok();
    let trusted_pem = std::fs::read_to_string(keys.join("image-signing.pub")).unwrap();
    let key = SigningKey::from_pkcs8_pem(
        &std::fs::read_to_string(keys.join("image-signing.key")).unwrap(),
        "image-signing.key",
    )
    .unwrap();
    let stranger = SigningKey::generate().unwrap();

    let files = ClusterFiles::generate(&tmp.path().join("cluster"), ip);
    let patch = serde_json::json!({"machine": {"upgrade": {"trustedImageKeys": [trusted_pem]}}});
    let cfg = files.node_config("n.yaml", "n1", &serde_json::to_string(&patch).unwrap());
    let node = Machined::start(&tmp.path().join("node"), ip);
    node.apply_insecure(&cfg).expect_ok();
    node.wait_configured();

    // Signed by the trusted key: every check passes; host mode has no slot.
    let e = offer(&files, ip, bundle(Some(&key), false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("passed every check")
            && e.message().contains(&key.public().id())
            && e.message().contains("host mode"),
        "{e:?}"
    );
    // Signed by another key.
    let e = offer(&files, ip, bundle(Some(&stranger), false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().starts_with("signature check failed"), "{e:?}");
    // Unsigned.
    let e = offer(&files, ip, bundle(None, false)).await.unwrap_err();
    assert!(
        e.message().starts_with("signature check failed") && e.message().contains("not signed"),
        "{e:?}"
    );
    // One byte of a file changed after signing.
    let e = offer(&files, ip, bundle(Some(&key), true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .starts_with("file check failed: t-root.squashfs"),
        "{e:?}"
    );
    // Not a bundle.
    let e = offer(&files, ip, b"GET / HTTP/1.1\r\n\r\n".repeat(100))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not an upgrade bundle"), "{e:?}");

    // osctl checks a bundle before it sends it, and shows the node's answer.
    let good = tmp.path().join("good.tar");
    std::fs::write(&good, bundle(Some(&key), false)).unwrap();
    let bad = tmp.path().join("bad.tar");
    std::fs::write(&bad, bundle(Some(&key), true)).unwrap();
    files
        .osctl(&[ip], &["upgrade", "--image", bad.to_str().unwrap()])
        .expect_err("file check failed: t-root.squashfs");
    files
        .osctl(&[ip], &["upgrade", "--image", good.to_str().unwrap()])
        .expect_err("host mode");
    // The node is as it was.
    files.osctl(&[ip], &["version"]).expect_ok();
    drop(node);
}
