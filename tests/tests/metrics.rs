//! machined's Prometheus metrics on a real host-mode node with etcd and
//! containerd: scraped with curl over mutual TLS on port 50002 with the
//! operator's client certificate, parsed by the Prometheus project's own
//! Python parsers (OpenMetrics, and the classic text parser), and checked
//! for the services, etcd's re-exported metrics and a counted API call. A
//! client without a certificate gets no metrics. The config's plain-HTTP
//! port appears when a live config change asks for it.
//!
//! Also prints (no timed assertions) the median of 20 scrapes and
//! machined's RSS before and after them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use machine_api::pki::bundle::{os_client_cert, OsRole, SecretsBundle};
use machine_api::pki::{LeafSpec, Usage};
use node_tests::prometheus::{
    assert_healthy_etcd_node, curl, has, operator_curl_files, parse, python,
};
use node_tests::{bootstrapped_node, require, status_kib, wait_until};

#[test]
fn metrics_over_mutual_tls() {
    require!("etcd", "containerd", "runc", "curl");
    let Some(python) = python() else {
        machine_api::skip_test!(
            "no python with prometheus_client (scripts/test.sh makes target/pyenv with it)"
        );
    };
    let tmp = tempfile::tempdir().unwrap();
    // 127.0.13.x is reset_modes.rs's.
    let ip = "127.0.14.1";
    let (files, node) = bootstrapped_node(tmp.path(), ip);

    // The operator's identity (os:admin) as files for curl.
    let dir = tmp.path().join("curl");
    let [ca, crt, key] = operator_curl_files(&files, &dir);
    let url = format!("https://{ip}:50002/metrics");
    let scrape_args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["--cacert", &ca, "--cert", &crt, "--key", &key]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(url.clone());
        a
    };
    let scrape = |extra: &[&str]| {
        let a = scrape_args(extra);
        curl(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // A call to count.
    files.osctl(&[ip], &["version"]).expect_ok();

    let (ok, text, err) = scrape(&[]);
    assert!(ok, "scrape failed: {err}");
    let samples = parse(&python, &text);
    for service in ["etcd", "containerd"] {
        assert_eq!(
            has(&samples, "machined_service_state", &[("service", service)]),
            Some(1.0),
            "{service} has no state:\n{text}"
        );
    }
    assert_healthy_etcd_node(&samples, &text);
    assert!(
        has(&samples, "machined_etcd_db_total_size_bytes", &[]).is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert!(
        has(
            &samples,
            "machined_etcd_disk_wal_fsync_duration_seconds_count",
            &[]
        )
        .is_some(),
        "{text}"
    );
    let version = "/machine.v1alpha1.MachineService/Version";
    assert!(
        has(
            &samples,
            "machined_api_requests_total",
            &[("method", version), ("code", "OK")]
        )
        .is_some_and(|v| v >= 1.0),
        "the Version call is not counted:\n{text}"
    );
    assert!(
        has(
            &samples,
            "machined_api_request_duration_seconds_count",
            &[("method", version)]
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    for mount in ["STATE", "EPHEMERAL"] {
        assert!(
            has(
                &samples,
                "machined_filesystem_size_bytes",
                &[("mount", mount)]
            )
            .is_some_and(|v| v > 0.0),
            "{mount}:\n{text}"
        );
    }
    for name in ["os-api-server", "etcd-server", "etcd-peer", "etcd-client"] {
        let t = has(
            &samples,
            "machined_certificate_expiry_timestamp_seconds",
            &[("name", name)],
        );
        assert!(t.is_some_and(|t| t > 1.7e9), "{name}:\n{text}");
    }
    assert!(
        has(
            &samples,
            "machined_boot_phase_seconds",
            &[("phase", "API serving")]
        )
        .is_some(),
        "{text}"
    );

    // No client certificate: the handshake is refused, no metrics.
    let (ok, text, err) = curl(&["--cacert", &ca, &url]);
    assert!(!ok, "served without a client certificate: {text}");
    assert!(!text.contains("machined_"), "{text}");
    eprintln!("without a client certificate: {}", err.trim());

    // Any role reads metrics; a certificate from the OS CA without one
    // gets 403 (after the handshake).
    let bundle: SecretsBundle =
        serde_norway::from_str(&std::fs::read_to_string(files.path("secrets.yaml")).unwrap())
            .unwrap();
    let reader = os_client_cert(&bundle, "prometheus", OsRole::Reader).unwrap();
    let nobody = bundle
        .os_ca
        .authority("osCA")
        .unwrap()
        .issue(&LeafSpec::new("nobody", Usage::Client))
        .unwrap();
    for (who, id, want) in [("reader", &reader, "200"), ("nobody", &nobody, "403")] {
        let crt = dir.join(format!("{who}.crt"));
        let key = dir.join(format!("{who}.key"));
        std::fs::write(&crt, &id.cert_pem).unwrap();
        std::fs::write(&key, &id.key_pem).unwrap();
        let (_, code, err) = curl(&[
            "--cacert",
            &ca,
            "--cert",
            crt.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ]);
        assert_eq!(code, want, "{who}: {err}");
    }

    // Only GET: no other method, no request body.
    let (_, code, _) = scrape(&["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"]);
    assert_eq!(code, "405");
    let (_, code, _) = scrape(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "GET",
        "--data",
        "x",
    ]);
    assert_eq!(code, "413");

    // Figures: 20 scrapes (curl's own total, TLS handshake included) and
    // machined's RSS around them.
    let rss_before = status_kib(node.pid(), "VmRSS:");
    let mut times: Vec<f64> = (0..20)
        .map(|_| {
            let (ok, t, err) = scrape(&["-o", "/dev/null", "-w", "%{time_total}"]);
            assert!(ok, "{err}");
            t.trim().parse::<f64>().unwrap()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    // The same over one kept-alive connection: the server's share.
    let mut reused: Vec<String> = scrape_args(&["-o", "/dev/null", "-w", "%{time_total}\\n"]);
    for _ in 0..19 {
        reused.extend(["-o".to_string(), "/dev/null".to_string(), url.clone()]);
    }
    let (ok, out, err) = curl(&reused.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let mut kept: Vec<f64> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    kept.sort_by(f64::total_cmp);
    assert_eq!(kept.len(), 20, "{out}");
    let rss_after = status_kib(node.pid(), "VmRSS:");
    eprintln!(
        "scrape latency: median {:.1} ms, min {:.1} ms, max {:.1} ms (20 scrapes, with etcd's /metrics)",
        times[10] * 1000.0,
        times[0] * 1000.0,
        times[19] * 1000.0
    );
    eprintln!(
        "scrape latency over one kept-alive connection: median {:.1} ms, max {:.1} ms",
        kept[10] * 1000.0,
        kept[19] * 1000.0
    );
    eprintln!(
        "machined RSS: {rss_before} KiB before, {rss_after} KiB after 20 scrapes; reply {} bytes",
        scrape(&[]).1.len()
    );

    // The plain-HTTP port, asked for by a live config change.
    let plain = format!("http://{ip}:59102/metrics");
    let (ok, _, _) = curl(&[&plain]);
    assert!(!ok, "a plain port is served unasked");
    let n2 = files.node_config(
        "n2.yaml",
        "n1",
        "{machine: {metrics: {insecurePort: 59102}}}",
    );
    files
        .osctl(&[ip], &["apply-config", "-f", n2.to_str().unwrap()])
        .expect_ok();
    wait_until(Duration::from_secs(10), "the plain metrics port", || {
        curl(&[&plain]).1.contains("machined_service_state")
    });
    // A port the config may not take.
    let bad = files.node_config(
        "bad.yaml",
        "n1",
        "{machine: {metrics: {insecurePort: 50001}}}",
    );
    files
        .osctl(
            &[ip],
            &["apply-config", "-f", bad.to_str().unwrap(), "--dry-run"],
        )
        .expect_err("machine.metrics.insecurePort");
}
