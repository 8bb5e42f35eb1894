//! API latency and machined's memory, with references measured in the same
//! run: `cargo bench -p node-tests --bench api_latency`.
//!
//! - `version` over mutual TLS on one reused connection, against a
//!   plaintext gRPC health check served in this process (the cost of a
//!   bare gRPC round trip here);
//! - `version` on a new connection each time (TCP + TLS 1.3 handshake with
//!   client certificate + HTTP/2), against a bare TCP connect;
//! - machined's resident memory when idle (configured, containerd running).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use machine_api::osconfig::OsConfig;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::Empty;
use node_tests::{ClusterFiles, Machined};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut d: Vec<Duration>) -> Duration {
    d.sort();
    let (p50, p99) = (percentile(&d, 0.5), percentile(&d, 0.99));
    println!(
        "{what:<58} p50 {:>7.3} ms   p99 {:>7.3} ms   ({} calls)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        d.len()
    );
    p50
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    node_tests::require!("containerd", "etcd");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.9.1";
    let files = ClusterFiles::generate(&tmp.path().join("cluster"), ip);
    let node = Machined::start(&tmp.path().join("node"), ip);
    node.apply_insecure(&files.node_config("n.yaml", "bench", ""))
        .expect_ok();
    node.wait_configured();
    files.osctl(&[ip], &["health", "--wait", "30"]);

    let osconfig = OsConfig::parse(&std::fs::read_to_string(files.osconfig()).unwrap()).unwrap();
    let ctx = osconfig.contexts[&osconfig.context].clone();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ctx.ca))
        .identity(Identity::from_pem(&ctx.crt, &ctx.key))
        .domain_name(ip);
    let endpoint = Endpoint::from_shared(format!("https://{ip}:50000"))
        .unwrap()
        .tls_config(tls)
        .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Reference server: plaintext gRPC health in this process.
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.9.9:0").await.unwrap();
        let ref_addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );

        // Warm up both.
        let ch: Channel = endpoint.connect().await.unwrap();
        let mut c = MachineServiceClient::new(ch);
        let ref_ch = Endpoint::from_shared(format!("http://{ref_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut r = tonic_health::pb::health_client::HealthClient::new(ref_ch);
        let req = || tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        for _ in 0..100 {
            c.version(Empty {}).await.unwrap();
            r.check(req()).await.unwrap();
        }

        let n = 2000;
        let mut ours = Vec::with_capacity(n);
        let mut base = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            c.version(Empty {}).await.unwrap();
            ours.push(t.elapsed());
            let t = Instant::now();
            r.check(req()).await.unwrap();
            base.push(t.elapsed());
        }
        let a = report("version, mTLS, reused connection", ours);
        let b = report("reference: plaintext gRPC health, in-process server", base);
        println!(
            "{:<58} {:.2}x",
            "ratio (ours / reference)",
            a.as_secs_f64() / b.as_secs_f64()
        );

        let n = 300;
        let mut fresh = Vec::with_capacity(n);
        let mut tcp = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let ch = endpoint.connect().await.unwrap();
            MachineServiceClient::new(ch)
                .version(Empty {})
                .await
                .unwrap();
            fresh.push(t.elapsed());
            let t = Instant::now();
            drop(
                tokio::net::TcpStream::connect(format!("{ip}:50000"))
                    .await
                    .unwrap(),
            );
            tcp.push(t.elapsed());
        }
        let a = report("version, mTLS, new connection each call", fresh);
        let b = report("reference: bare TCP connect to the same port", tcp);
        println!(
            "{:<58} {:.1}x",
            "ratio (ours / reference)",
            a.as_secs_f64() / b.as_secs_f64()
        );
    });

    std::thread::sleep(Duration::from_secs(3));
    let pid = node.pid();
    println!(
        "{:<58} {:.1} MiB (peak {:.1} MiB)",
        "machined RSS, idle, configured",
        rss_kib(pid, "VmRSS:") as f64 / 1024.0,
        rss_kib(pid, "VmHWM:") as f64 / 1024.0
    );
}
