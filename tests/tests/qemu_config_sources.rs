//! Config sources at boot, in QEMU: a node without a stored config takes
//! one baked into its image (`imager build --embed-config`), or fetches one
//! from an https URL on the kernel command line (`machined.config=`, pinned
//! by `machined.config.sha256=`) from a server of a private PKI whose CA
//! the image carries (`imager build --config-ca`). Either way it comes up
//! configured, with no apply, and serves the OS API over mutual TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use machine_api::pki::{CertificateAuthority, LeafSpec, Usage};
use node_tests::{
    build_qemu_image_with, console_value as banner, free_port, require, wait_until, ClusterFiles,
};
use sha2::{Digest, Sha256};

struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots `image`'s kernel and full initramfs with `append` added to the
/// command line; the OS API is forwarded to 127.0.0.1:`api`. The guest
/// reaches the host's loopback at 10.0.2.2.
fn boot(image: &Path, serial: &Path, api: u16, append: &str) -> Vm {
    Vm(Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1536", "-smp", "2", "-nographic"])
        .args(["-no-reboot", "-monitor", "none", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(image.join("qemu-vmlinuz"))
        .arg("-initrd")
        .arg(image.join("qemu-initramfs.cpio.zst"))
        .args([
            "-append",
            &format!(
                "console=ttyS0 panic=-1 ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off {append}"
            ),
        ])
        .args([
            "-netdev",
            &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{api}-:50000"),
        ])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .args(["-device", "virtio-rng-pci"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap())
}

/// Waits for the configured banner, then for mutual TLS through the
/// forwarded port, and returns `osctl boot`'s timeline.
fn wait_configured(files: &ClusterFiles, serial: &Path, node: &str) -> String {
    let log = || std::fs::read_to_string(serial).unwrap_or_default();
    wait_until(
        Duration::from_secs(180),
        "the configured banner on the console",
        || banner(&log(), "state:").as_deref() == Some("configured"),
    );
    assert!(
        banner(&log(), "token:").is_none(),
        "a node configured at boot never offers maintenance mode:\n{}",
        log()
    );
    wait_until(
        Duration::from_secs(60),
        "the OS API over mutual TLS",
        || files.osctl(&[node], &["version"]).ok,
    );
    files.osctl(&[node], &["boot"]).expect_ok().stdout
}

/// A one-file https server on 127.0.0.1 with `cert`; counts the requests
/// it answered.
fn serve_https(body: String, cert: &machine_api::pki::CertKeyPem) -> (u16, Arc<AtomicUsize>) {
    let chain = machine_api::pki::pem::certs_from_pem(&cert.cert_pem).unwrap();
    let key = machine_api::pki::pem::key_from_pem(&cert.key_pem).unwrap();
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, stream);
            let mut req = Vec::new();
            let mut buf = [0u8; 2048];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            if !req.starts_with(b"GET /vm.yaml ") {
                continue;
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(head.as_bytes());
            let _ = tls.write_all(body.as_bytes());
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (port, hits)
}

#[test]
fn embedded_and_https_url_configs_configure_a_node_without_apply() {
    require!("qemu-system-x86_64");
    let tmp = tempfile::tempdir().unwrap();
    let files = ClusterFiles::generate(&tmp.path().join("cluster"), "10.0.2.15");
    let cfg = files.node_config("vm.yaml", "vm-1", "");

    // 1. An https URL on the kernel command line, served with a
    //    certificate of a private CA that only the image trusts.
    let web_ca = CertificateAuthority::generate("config server CA").unwrap();
    let ca_file = tmp.path().join("config-ca.pem");
    std::fs::write(&ca_file, web_ca.cert_pem()).unwrap();
    let leaf = web_ca
        .issue(&LeafSpec::new("config server", Usage::Server).san("10.0.2.2"))
        .unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let pin = hex::encode(Sha256::digest(text.as_bytes()));
    let (port, hits) = serve_https(text, &leaf);
    let Some(image) = build_qemu_image_with(
        &tmp.path().join("image-ca"),
        &[OsStr::new("--config-ca"), ca_file.as_os_str()],
    ) else {
        return;
    };
    let api = free_port();
    let node = format!("127.0.0.1:{api}");
    let serial = tmp.path().join("serial-url.log");
    let vm = boot(
        &image,
        &serial,
        api,
        &format!("machined.config=https://10.0.2.2:{port}/vm.yaml machined.config.sha256={pin}"),
    );
    let timeline = wait_configured(&files, &serial, &node);
    assert!(
        timeline.contains("config acquired") && timeline.contains("url:https://10.0.2.2"),
        "{timeline}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let v = files.osctl(&[&node], &["version"]).expect_ok();
    assert!(v.stdout.contains("vm-1"), "{}", v.text());
    drop(vm);

    // 2. The same config baked into the image: no network source at all.
    let Some(image) = build_qemu_image_with(
        &tmp.path().join("image-embedded"),
        &[OsStr::new("--embed-config"), cfg.as_os_str()],
    ) else {
        return;
    };
    let api = free_port();
    let node = format!("127.0.0.1:{api}");
    let serial = tmp.path().join("serial-embedded.log");
    let _vm = boot(&image, &serial, api, "");
    let timeline = wait_configured(&files, &serial, &node);
    assert!(
        timeline.contains("config acquired")
            && timeline.contains("embedded:/usr/lib/machined/config.yaml"),
        "{timeline}"
    );
    // It is a working etcd node: bootstrap and health over mutual TLS.
    files.osctl(&[&node], &["bootstrap"]).expect_ok();
    files
        .osctl(&[&node], &["health", "--wait", "180"])
        .expect_ok();
}
