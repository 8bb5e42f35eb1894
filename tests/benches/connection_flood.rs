//! machined under a flood of idle connections, each figure beside the
//! unloaded one from the same run:
//! `cargo bench -p node-tests --bench connection_flood`.
//!
//! - connections held before the API degrades: idle TCP connections (one
//!   in ten stalled mid-ClientHello) opened in steps, held, and after each
//!   step 200 calls on new connections; degraded = a call failing (5 s
//!   deadline) or p99 above 5x the unloaded p99 plus 20 ms;
//! - machined's RSS and fds unloaded, under the largest flood, after it;
//! - `version` (new connection each call, and on one reused connection) and
//!   `apply-config` of the running config (reused connection) p50 / p99,
//!   unloaded and under the largest flood, with a bare TCP connect to the
//!   same port as the reference for the client side's own cost;
//! - 500 established mutual-TLS connections held idle: RSS while held and
//!   after they close (memory given back), and `version` meanwhile.
//!
//! `FLOOD_MAX` (default 20000) sets the largest step.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use machine_api::osconfig::OsConfig;
use machine_api::proto::machine_service_client::MachineServiceClient;
use machine_api::proto::{ApplyConfigurationRequest, ApplyMode, Empty};
use node_tests::{bootstrapped_node, fd_count, raise_own_nofile, status_kib, PARTIAL_CLIENT_HELLO};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// Established mutual-TLS connections held in the second phase (under the
/// OS API's cap of 512).
const ESTABLISHED: usize = 500;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[derive(Clone, Copy)]
struct Figures {
    p50: Duration,
    p99: Duration,
    failed: usize,
    calls: usize,
}

fn figures(mut d: Vec<Duration>, failed: usize) -> Figures {
    d.sort();
    let calls = d.len() + failed;
    if d.is_empty() {
        let inf = CALL_DEADLINE;
        return Figures {
            p50: inf,
            p99: inf,
            failed,
            calls,
        };
    }
    Figures {
        p50: percentile(&d, 0.5),
        p99: percentile(&d, 0.99),
        failed,
        calls,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn side_by_side(what: &str, unloaded: Figures, loaded: Figures, load: &str) {
    println!(
        "{what:<44} unloaded p50 {:>7.2} ms p99 {:>7.2} ms | {load}: p50 {:>7.2} ms p99 {:>7.2} ms, {} of {} failed",
        ms(unloaded.p50),
        ms(unloaded.p99),
        ms(loaded.p50),
        ms(loaded.p99),
        loaded.failed,
        loaded.calls,
    );
}

/// Connections waiting in the accept queue of the listener on `ip:port`
/// (`/proc/net/tcp`: a listening socket's rx_queue is its accept queue).
fn accept_queue(ip: std::net::Ipv4Addr, port: u16) -> usize {
    let local = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 4 && f[1] == local && f[3] == "0A")
        .and_then(|f| f[4].split_once(':'))
        .and_then(|(_, rx)| usize::from_str_radix(rx, 16).ok())
        .unwrap_or(0)
}

/// Waits (up to 30 s) until machined has taken in every connection queued
/// for it, so a figure is for connections held, not for the burst of
/// opening them.
fn settle(ip: &str) {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let start = Instant::now();
    while accept_queue(ip, 50000) > 0 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// Bare TCP connects to the same port: the client side's own cost, which
/// grows with the sockets this process holds (ephemeral port search).
fn tcp_connects(ip: &str, n: usize) -> Figures {
    let mut d = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        drop(TcpStream::connect((ip, 50000)).unwrap());
        d.push(t.elapsed());
    }
    figures(d, 0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    node_tests::require!("containerd", "etcd");
    let flood_max: usize = std::env::var("FLOOD_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let soft = raise_own_nofile(flood_max as u64 + 2048);
    let flood_max = flood_max.min(soft.saturating_sub(2048) as usize);

    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.9.5";
    let (files, node) = bootstrapped_node(tmp.path(), ip);
    let pid = node.pid();
    let config = std::fs::read(files.path("n.yaml")).unwrap();

    let osconfig = OsConfig::parse(&std::fs::read_to_string(files.osconfig()).unwrap()).unwrap();
    let ctx = osconfig.contexts[&osconfig.context].clone();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ctx.ca))
        .identity(Identity::from_pem(&ctx.crt, &ctx.key))
        .domain_name(ip);
    let endpoint = Endpoint::from_shared(format!("https://{ip}:50000"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(CALL_DEADLINE)
        .timeout(CALL_DEADLINE);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Calls on a new connection each: what a flood competes with.
    let fresh_version = |n: usize| {
        rt.block_on(async {
            let (mut ok, mut failed) = (Vec::with_capacity(n), 0);
            for _ in 0..n {
                let t = Instant::now();
                let r = tokio::time::timeout(CALL_DEADLINE, async {
                    let ch = endpoint.connect().await?;
                    MachineServiceClient::new(ch)
                        .version(Empty {})
                        .await
                        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                })
                .await;
                match r {
                    Ok(Ok(())) => ok.push(t.elapsed()),
                    _ => failed += 1,
                }
            }
            figures(ok, failed)
        })
    };
    // Calls on one reused connection: version and an unchanged apply.
    let reused = |n: usize| {
        rt.block_on(async {
            let ch = endpoint.connect().await.unwrap();
            let mut c = MachineServiceClient::new(ch);
            let (mut v, mut vf, mut a, mut af) = (vec![], 0, vec![], 0);
            for _ in 0..n {
                let t = Instant::now();
                match c.version(Empty {}).await {
                    Ok(_) => v.push(t.elapsed()),
                    Err(_) => vf += 1,
                }
                let t = Instant::now();
                let req = ApplyConfigurationRequest {
                    data: config.clone(),
                    mode: ApplyMode::NoReboot as i32,
                    ..Default::default()
                };
                match c.apply_configuration(req).await {
                    Ok(_) => a.push(t.elapsed()),
                    Err(_) => af += 1,
                }
            }
            (figures(v, vf), figures(a, af))
        })
    };

    // Warm up, then the unloaded figures.
    fresh_version(20);
    reused(20);
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = status_kib(pid, "VmRSS:");
    let fds_idle = fd_count(pid);
    let fresh0 = fresh_version(300);
    let tcp0 = tcp_connects(ip, 300);
    let (version0, apply0) = reused(300);
    let degraded_at =
        |f: &Figures| f.failed > 0 || f.p99 > fresh0.p99 * 5 + Duration::from_millis(20);

    // The ramp: hold more and more idle connections.
    let mut steps: Vec<usize> = [250, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000]
        .into_iter()
        .filter(|s| *s < flood_max)
        .collect();
    // The most this process can hold (its own open-files limit).
    steps.push(flood_max);
    let mut flood: Vec<TcpStream> = Vec::with_capacity(flood_max);
    let mut held_ok = 0;
    let mut degraded = None;
    println!(
        "{:<10} {:>12} {:>12} {:>8} {:>14}",
        "held", "p50 ms", "p99 ms", "failed", "machined fds"
    );
    for &step in &steps {
        while flood.len() < step {
            match TcpStream::connect((ip, 50000)) {
                Ok(mut s) => {
                    // One in ten stalls mid-ClientHello.
                    if flood.len() % 10 == 9 {
                        let _ = s.write_all(&PARTIAL_CLIENT_HELLO);
                    }
                    flood.push(s);
                }
                Err(e) => {
                    eprintln!("flood connect failed at {}: {e}", flood.len());
                    break;
                }
            }
        }
        settle(ip);
        let f = fresh_version(200);
        println!(
            "{:<10} {:>12.2} {:>12.2} {:>8} {:>14}",
            flood.len(),
            ms(f.p50),
            ms(f.p99),
            f.failed,
            fd_count(pid)
        );
        if degraded_at(&f) {
            degraded = Some(flood.len());
            break;
        }
        held_ok = flood.len();
    }

    // Under the largest flood held.
    let rss_under = status_kib(pid, "VmRSS:");
    let fds_under = fd_count(pid);
    settle(ip);
    let fresh1 = fresh_version(300);
    let tcp1 = tcp_connects(ip, 300);
    let (version1, apply1) = reused(300);
    let load = format!("{} idle held", flood.len());

    drop(flood);
    // Handshake deadline (10 s) and the trim after a drained peak (2 s).
    std::thread::sleep(Duration::from_secs(12));
    let rss_after = status_kib(pid, "VmRSS:");
    let fds_after = fd_count(pid);

    // Established connections: 500 mutual-TLS clients, each after a call,
    // held idle (what a fan-out or a buggy client leaves), then closed.
    let rss_before_tls = status_kib(pid, "VmRSS:");
    let channels = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..ESTABLISHED {
            let ch = endpoint.connect().await.unwrap();
            MachineServiceClient::new(ch.clone())
                .version(Empty {})
                .await
                .unwrap();
            held.push(ch);
        }
        held
    });
    std::thread::sleep(Duration::from_secs(1));
    let rss_tls = status_kib(pid, "VmRSS:");
    let fds_tls = fd_count(pid);
    let fresh2 = fresh_version(300);
    drop(channels);
    std::thread::sleep(Duration::from_secs(5));
    let rss_tls_after = status_kib(pid, "VmRSS:");

    println!();
    match degraded {
        None => println!(
            "{:<44} >= {held_ok} (the largest step; not degraded)",
            "connections held before the API degrades"
        ),
        Some(at) => println!(
            "{:<44} {held_ok} (degraded at {at})",
            "connections held before the API degrades"
        ),
    }
    side_by_side("version, new connection each call", fresh0, fresh1, &load);
    side_by_side("reference: bare TCP connect, same port", tcp0, tcp1, &load);
    side_by_side("version, reused connection", version0, version1, &load);
    side_by_side(
        "apply-config (unchanged), reused connection",
        apply0,
        apply1,
        &load,
    );
    println!(
        "{:<44} unloaded {:>6.1} MiB | under load {:>6.1} MiB | after load {:>6.1} MiB (peak {:.1} MiB)",
        "machined RSS",
        mib(rss_idle),
        mib(rss_under),
        mib(rss_after),
        mib(status_kib(pid, "VmHWM:"))
    );
    println!(
        "{:<44} unloaded {fds_idle:>6} | under load {fds_under:>6} | after load {fds_after:>6}",
        "machined open fds"
    );
    let load = format!("{ESTABLISHED} mTLS held");
    side_by_side("version, new connection each call", fresh0, fresh2, &load);
    println!(
        "{:<44} before {:>6.1} MiB | {ESTABLISHED} held {:>6.1} MiB ({fds_tls} fds) | closed {:>6.1} MiB",
        "machined RSS, established connections",
        mib(rss_before_tls),
        mib(rss_tls),
        mib(rss_tls_after),
    );
}
