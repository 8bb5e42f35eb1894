//! etcd backup and restore in host mode, with real etcd and etcdctl as the
//! independent checker: `osctl etcd snapshot` saves a snapshot etcdctl
//! reads; scheduled snapshots appear with a `sha256sum` file; after the
//! node is wiped, `osctl bootstrap --recover-from` brings back a key
//! written before the snapshot (and not one written after it); a changed
//! or cut-short upload is refused by the node, not only by osctl.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use machine_api::proto::etcd_service_client::EtcdServiceClient;
use machine_api::proto::EtcdRecoverRequest;
use node_tests::{require, run, wait_until, ClusterFiles, Machined};

const IP: &str = "127.0.11.1";

fn sha256_of(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// Uploads `data` as a recovery, announcing `size` and `sha256`.
async fn upload(
    files: &ClusterFiles,
    data: Vec<u8>,
    size: u64,
    sha256: String,
) -> Result<String, tonic::Status> {
    let ch = files.channel(IP).await;
    let mut msgs: Vec<EtcdRecoverRequest> = data
        .chunks(4096)
        .map(|c| EtcdRecoverRequest {
            data: c.to_vec(),
            ..Default::default()
        })
        .collect();
    msgs[0].size = size;
    msgs[0].sha256 = sha256;
    EtcdServiceClient::new(ch)
        .recover(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner().message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_wipe_and_recover_brings_back_the_keyspace() {
    require!("etcd", "etcdctl", "containerd", "runc");
    let tmp = tempfile::tempdir().unwrap();
    let files = ClusterFiles::generate(&tmp.path().join("cluster"), IP);
    // Snapshots every 5 minutes, keeping 2: the first is taken once the
    // member has data.
    let cfg = files.node_config(
        "n.yaml",
        "n1",
        r#"{"cluster": {"etcd": {"snapshots": {"intervalMinutes": 5, "keep": 2}}}}"#,
    );
    let node = Machined::start(&tmp.path().join("node"), IP);
    node.apply_insecure(&cfg).expect_ok();
    node.wait_configured();
    files.osctl(&[IP], &["bootstrap"]).expect_ok();
    files.osctl(&[IP], &["health", "--wait", "60"]).expect_ok();
    node.etcdctl(&["put", "before", "kept"]).expect_ok();

    // On demand, checked by etcdctl and sha256.
    let snap = tmp.path().join("backup.db");
    let out = files
        .osctl(&[IP], &["etcd", "snapshot", snap.to_str().unwrap()])
        .expect_ok();
    let sha = sha256_of(&snap);
    assert!(out.stdout.contains(&sha), "{}", out.text());
    assert!(!tmp.path().join("backup.db.part").exists());
    let status = run(Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(&snap))
    .expect_ok();
    let st: serde_json::Value = serde_json::from_str(status.stdout.trim()).unwrap();
    assert!(st["totalKey"].as_u64().unwrap() >= 1, "{}", status.text());

    // Scheduled: one appears, with a checksum file sha256sum accepts.
    let dir = node.root.join("var/lib/etcd-snapshots");
    wait_until(Duration::from_secs(60), "a scheduled snapshot", || {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".db.sha256"))
            })
            .unwrap_or(false)
    });
    run(Command::new("sh")
        .current_dir(&dir)
        .args(["-c", "sha256sum --check --strict *.sha256"]))
    .expect_ok();

    // Written after the snapshot: must not come back.
    node.etcdctl(&["put", "after", "lost"]).expect_ok();

    // Maintenance on etcd.
    let d = files.osctl(&[IP], &["etcd", "defrag"]).expect_ok();
    assert!(d.stdout.contains("defragmented"), "{}", d.text());
    let a = files.osctl(&[IP], &["etcd", "alarm", "list"]).expect_ok();
    assert!(a.stdout.contains("none"), "{}", a.text());
    files
        .osctl(&[IP], &["etcd", "forfeit-leadership"])
        .expect_err("no other started voting member");

    // A node with data refuses a recovery before taking the upload.
    files
        .osctl(
            &[IP],
            &["bootstrap", "--recover-from", snap.to_str().unwrap()],
        )
        .expect_err("etcd already has data");

    // Quorum lost for good: wipe the node and give it its config again.
    files.osctl(&[IP], &["reset", "--force"]).expect_ok();
    wait_until(Duration::from_secs(30), "maintenance mode", || {
        node.log_text().matches("state:       maintenance").count() >= 2
    });
    node.apply_insecure(&cfg).expect_ok();
    node.wait_configured();
    wait_until(Duration::from_secs(60), "the configured API", || {
        files.osctl(&[IP], &["version"]).ok
    });

    // osctl refuses a changed file itself; the node refuses a changed,
    // cut-short or mislabelled upload.
    let data = std::fs::read(&snap).unwrap();
    let mut changed = data.clone();
    changed[100] ^= 1;
    let bad = tmp.path().join("changed.db");
    std::fs::write(&bad, &changed).unwrap();
    files
        .osctl(
            &[IP],
            &["bootstrap", "--recover-from", bad.to_str().unwrap()],
        )
        .expect_err("does not end with etcd's hash");
    let e = upload(
        &files,
        changed.clone(),
        changed.len() as u64,
        sha256_of(&bad),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("etcd's hash"), "{e:?}");
    let e = upload(
        &files,
        data[..data.len() / 2].to_vec(),
        data.len() as u64,
        sha.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("cut short"), "{e:?}");
    let e = upload(&files, data.clone(), data.len() as u64, "0".repeat(64))
        .await
        .unwrap_err();
    assert!(e.message().contains("changed on the way"), "{e:?}");
    assert!(
        !node.root.join("var/lib/etcd/member").exists(),
        "a refused upload must leave no etcd data"
    );

    // The real recovery.
    let r = files
        .osctl(
            &[IP],
            &["bootstrap", "--recover-from", snap.to_str().unwrap()],
        )
        .expect_ok();
    assert!(r.stdout.contains("restored"), "{}", r.text());
    files.osctl(&[IP], &["health", "--wait", "60"]).expect_ok();
    let get = |k: &str| {
        node.etcdctl(&["get", k, "--print-value-only"])
            .expect_ok()
            .stdout
            .trim()
            .to_owned()
    };
    assert_eq!(get("before"), "kept");
    assert_eq!(get("after"), "");
    let m = files.osctl(&[IP], &["etcd", "members"]).expect_ok();
    assert_eq!(m.stdout.lines().count(), 2, "one member:\n{}", m.text());
    // The node's event log tells the story, in order.
    let ev = files.osctl(&[IP], &["events"]).expect_ok();
    let pos = |needle: &str| {
        ev.stdout
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in the events:\n{}", ev.text()))
    };
    let order = [
        "request  config applied",
        "request  etcd bootstrap",
        "service  etcd healthy",
        "request  reset",
        "note     etcd was recovered from a snapshot",
    ];
    for w in order.windows(2) {
        assert!(
            pos(w[0]) < pos(w[1]),
            "{} before {}:\n{}",
            w[0],
            w[1],
            ev.stdout
        );
    }
    let last = files.osctl(&[IP], &["events", "--tail", "1"]).expect_ok();
    assert_eq!(last.stdout.lines().count(), 1, "{}", last.text());
    // A second recovery on a node that now has data is refused.
    files
        .osctl(
            &[IP],
            &["bootstrap", "--recover-from", snap.to_str().unwrap()],
        )
        .expect_err("etcd already has data");
}
