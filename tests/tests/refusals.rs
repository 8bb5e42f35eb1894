//! The refusal matrix: who may not call what, and configs that must not
//! land. Each refusal leaves the node as it was.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use machine_api::osconfig::{Context, OsConfig};
use machine_api::pki::bundle::SecretsBundle;
use machine_api::pki::{LeafSpec, Usage};
use node_tests::{bootstrapped_node, osctl, require, ClusterFiles};

fn write_osconfig(
    dir: &std::path::Path,
    name: &str,
    ca: &str,
    crt: &str,
    key: &str,
    ip: &str,
) -> String {
    let c = OsConfig::single(
        "t",
        Context {
            endpoints: vec![ip.into()],
            nodes: vec![],
            ca: ca.into(),
            crt: crt.into(),
            key: key.into(),
            kubernetes_endpoint: None,
        },
    );
    let p = dir.join(name);
    std::fs::write(&p, c.to_yaml()).unwrap();
    p.display().to_string()
}

#[test]
fn refusal_matrix() {
    require!("etcd", "containerd", "runc", "etcdctl");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.2.1";
    let (files, node) = bootstrapped_node(tmp.path(), ip);
    let secrets = files.path("secrets.yaml");
    let secrets = secrets.to_str().unwrap();
    let d = tmp.path();
    let gen = |role: &str| {
        let out = d.join(format!("{role}.osconfig"));
        osctl(&[
            "gen",
            "osconfig",
            "--with-secrets",
            secrets,
            "--role",
            role,
            "-e",
            ip,
            "-o",
            out.to_str().unwrap(),
        ])
        .expect_ok();
        out.display().to_string()
    };
    let (reader, operator) = (gen("reader"), gen("operator"));
    let cfg = files.node_config("n.yaml", "n1", "");
    let cfg = cfg.to_str().unwrap();

    // Reader: reads, nothing else.
    osctl(&["services", "--osconfig", &reader]).expect_ok();
    osctl(&["get", "config", "--osconfig", &reader]).expect_ok();
    osctl(&["apply-config", "-f", cfg, "--osconfig", &reader])
        .expect_err("role os:reader may not call ApplyConfiguration");
    osctl(&["service", "etcd", "restart", "--osconfig", &reader]).expect_err("permission denied");
    osctl(&["reboot", "--osconfig", &reader]).expect_err("permission denied");
    osctl(&["bootstrap", "--osconfig", &reader]).expect_err("permission denied");

    // Operator: restarts services, but no config changes and no reset.
    osctl(&["service", "containerd", "restart", "--osconfig", &operator]).expect_ok();
    osctl(&["apply-config", "-f", cfg, "--osconfig", &operator])
        .expect_err("role os:operator may not call ApplyConfiguration");
    osctl(&["reset", "--osconfig", &operator]).expect_err("permission denied");
    osctl(&["etcd", "remove-member", "n1", "--osconfig", &operator])
        .expect_err("permission denied");

    // A certificate from another cluster's CA: the TLS handshake fails.
    let other = SecretsBundle::generate().unwrap();
    let foreign = machine_api::pki::bundle::os_client_cert(
        &other,
        "mallory",
        machine_api::pki::bundle::OsRole::Admin,
    )
    .unwrap();
    let bundle: SecretsBundle =
        serde_norway::from_str(&std::fs::read_to_string(secrets).unwrap()).unwrap();
    let foreign_cfg = write_osconfig(
        d,
        "foreign",
        &bundle.os_ca.crt,
        &foreign.cert_pem,
        &foreign.key_pem,
        ip,
    );
    osctl(&["services", "--osconfig", &foreign_cfg]).expect_err("error: node");

    // An expired certificate from the right CA.
    let ca = bundle.os_ca.authority("osCA").unwrap();
    let expired = ca
        .issue_for(
            &LeafSpec::new("old", Usage::Client).org("os:admin"),
            time::Duration::minutes(-30),
        )
        .unwrap();
    let expired_cfg = write_osconfig(
        d,
        "expired",
        &bundle.os_ca.crt,
        &expired.cert_pem,
        &expired.key_pem,
        ip,
    );
    osctl(&["services", "--osconfig", &expired_cfg]).expect_err("error: node");

    // A certificate with no role.
    let nobody = ca.issue(&LeafSpec::new("nobody", Usage::Client)).unwrap();
    let nobody_cfg = write_osconfig(
        d,
        "nobody",
        &bundle.os_ca.crt,
        &nobody.cert_pem,
        &nobody.key_pem,
        ip,
    );
    osctl(&["services", "--osconfig", &nobody_cfg]).expect_err("names no role");

    // No client certificate at all (maintenance-style client on a configured node).
    osctl(&["version", "--insecure", "-n", ip]).expect_err("error: node");

    // The node is untouched and healthy after all that.
    files.osctl(&[ip], &["health", "--wait", "30"]).expect_ok();
    assert!(node.etcdctl(&["endpoint", "health"]).ok);
}

#[test]
fn invalid_configs_are_refused_by_the_node_and_change_nothing() {
    require!("etcd", "containerd", "runc");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.2.2";
    let (files, node) = bootstrapped_node(tmp.path(), ip);
    let before = node_tests::stored_config(&node.root).unwrap();

    // osctl checks locally first and names file and line …
    let bad = files.node_config(
        "bad.yaml",
        "n1",
        "{cluster: {network: {serviceCIDRs: [10.244.0.0/20]}}}",
    );
    files
        .osctl(&[ip], &["apply-config", "-f", bad.to_str().unwrap()])
        .expect_err("cluster.network.serviceCIDRs[0]");

    // … and the node checks again, whatever the client: send it raw.
    let text = std::fs::read_to_string(&bad).unwrap();
    let err = raw_apply(&files, ip, text.into_bytes());
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("cluster.network.serviceCIDRs[0]"),
        "{}",
        err.message()
    );
    let err = raw_apply(&files, ip, b"machine: [".to_vec());
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = raw_apply(&files, ip, vec![0xff, 0xfe]);
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    assert_eq!(node_tests::stored_config(&node.root).unwrap(), before);
    files.osctl(&[ip], &["health", "--wait", "10"]).expect_ok();
    std::thread::sleep(Duration::from_millis(10));
}

/// ApplyConfiguration through tonic's own TLS stack (not osctl's), so the
/// node's validation is tested without the client's.
fn raw_apply(files: &ClusterFiles, ip: &str, data: Vec<u8>) -> tonic::Status {
    use machine_api::proto::ApplyConfigurationRequest;
    with_client(files, ip, |mut c| async move {
        c.apply_configuration(ApplyConfigurationRequest {
            data,
            ..Default::default()
        })
        .await
        .expect_err("the node accepted an invalid config")
    })
}

/// Runs `f` with a MachineService client over mutual TLS with the
/// cluster's osconfig identity (no osctl in between).
fn with_client<T, F, Fut>(files: &ClusterFiles, ip: &str, f: F) -> T
where
    F: FnOnce(
        machine_api::proto::machine_service_client::MachineServiceClient<tonic::transport::Channel>,
    ) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    use machine_api::proto::machine_service_client::MachineServiceClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let osconfig = OsConfig::parse(&std::fs::read_to_string(files.osconfig()).unwrap()).unwrap();
    let ctx = &osconfig.contexts[&osconfig.context];
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ctx.ca))
        .identity(Identity::from_pem(&ctx.crt, &ctx.key))
        .domain_name(ip);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = Endpoint::from_shared(format!("https://{ip}:50000"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        f(MachineServiceClient::new(ch)).await
    })
}

/// 300 unknown fields: the error reply stays small enough for every gRPC
/// client (Python's grpcio refuses metadata over 8 KiB), and a dry run
/// carries the whole list in its body.
#[test]
fn a_long_problem_list_is_capped_in_the_status_and_whole_in_a_dry_run() {
    use machine_api::proto::ApplyConfigurationRequest;
    require!("etcd", "containerd", "runc");
    let tmp = tempfile::tempdir().unwrap();
    let ip = "127.0.2.5";
    let (files, _node) = bootstrapped_node(tmp.path(), ip);
    let base = std::fs::read_to_string(files.path("n.yaml")).unwrap();
    let mut unknown = String::from("machine:\n");
    for i in 0..300 {
        unknown.push_str(&format!("  unknownFieldNumber{i:03}: {i}\n"));
    }
    let text = base.replacen("machine:\n", &unknown, 1);
    assert_ne!(text, base);
    with_client(&files, ip, |mut c| async move {
        let err = c
            .apply_configuration(ApplyConfigurationRequest {
                data: text.clone().into_bytes(),
                ..Default::default()
            })
            .await
            .expect_err("accepted");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().len() <= 4096, "{} bytes", err.message().len());
        assert!(err.message().contains("more problem"), "{}", err.message());
        let dry = c
            .apply_configuration(ApplyConfigurationRequest {
                data: text.into_bytes(),
                dry_run: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(dry.outcome, machine_api::proto::APPLY_OUTCOME_INVALID);
        // Every problem up to the parser's cap, and a line saying it stopped.
        assert!(dry.problems.len() > 200, "{}", dry.problems.len());
        assert!(
            dry.problems
                .iter()
                .any(|p| p.contains("unknownFieldNumber299"))
                || dry.problems.iter().any(|p| p.contains("stopped after")),
            "{:?}",
            dry.problems.last()
        );
    });
}
