//! A node (machined in host mode) offered upgrade bundles: the one signed
//! by its trusted key passes every check (and, in host mode, is then
//! refused only because there is no slot to write); one signed by another
//! key, an unsigned one, one with a byte changed after signing, and junk
//! are each refused naming the check that failed. The bundles go over the
//! API with a plain gRPC client, so the node's checks are tested, not
//! osctl's (osctl checks a bundle before it sends it: tested too, as is
//! `--image URL` against a real HTTP server).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use machine_api::image_signature::SigningKey;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::UpgradeRequest;
use node_tests::test_bundle::bundle;
use node_tests::{osctl, require, ClusterFiles, Machined};
use sha2::Digest;

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
    let ip = "127.0.18.1";
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

    // The same bundles from a URL: downloaded once, then checked here and
    // by the node exactly as files are. A real HTTP server (Python's).
    let web = node_tests::HttpServer::start(tmp.path(), ip);
    let url = |name: &str| format!("http://{}/{name}", web.addr);
    let by_url = files
        .osctl(&[ip], &["upgrade", "--image", &url("good.tar")])
        .expect_err("host mode");
    assert!(by_url.stderr.contains("downloaded"), "{}", by_url.text());
    let good_sha = hex::encode(sha2::Sha256::digest(std::fs::read(&good).unwrap()));
    files
        .osctl(
            &[ip],
            &[
                "upgrade",
                "--image",
                &url("good.tar"),
                "--sha256",
                &good_sha,
            ],
        )
        .expect_err("host mode");
    files
        .osctl(&[ip], &["upgrade", "--image", &url("bad.tar")])
        .expect_err("file check failed: t-root.squashfs");
    files
        .osctl(&[ip], &["upgrade", "--image", &url("missing.tar")])
        .expect_err("the server answered HTTP 404");
    // A pin that does not match refuses the download, and a local file.
    let other_sha = "0".repeat(64);
    for image in [url("good.tar"), good.to_str().unwrap().to_owned()] {
        files
            .osctl(
                &[ip],
                &["upgrade", "--image", &image, "--sha256", &other_sha],
            )
            .expect_err("--sha256 says");
    }
    // The node is as it was.
    files.osctl(&[ip], &["version"]).expect_ok();
    drop(node);
}
