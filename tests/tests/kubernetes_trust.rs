//! The trust endpoint's Kubernetes certificates, in host mode against a
//! real control-plane machined: a worker (no CA key) gets kubelet's serving
//! certificate and kube-proxy's client certificate signed by the cluster
//! CA with the machine token and a CSR; openssl checks the results. The
//! attacker's side: a wrong token, a serving certificate naming another
//! node or an API server name, an identity that is no node, and a missing
//! kind are refused with the reason, and kube-proxy's identity ignores
//! whatever the request names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use machine_api::pki::{server_certificate_request, LeafSpec, Usage};
use machine_api::proto::trust_service_client::TrustServiceClient;
use machine_api::proto::{KubernetesCertificateKind, SignKubernetesCertificateRequest};
use node_tests::{bootstrapped_node, require};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Code;

fn csr(cn: &str, sans: &[&str]) -> String {
    let mut spec = LeafSpec::new(cn, Usage::Client);
    for s in sans {
        spec = spec.san(s);
    }
    server_certificate_request(&spec).unwrap().0
}

fn openssl(args: &[&str], cert: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .arg(cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn workers_get_kubelet_and_kube_proxy_certificates_and_nothing_else() {
    require!("etcd", "containerd", "runc", "openssl");
    let tmp = tempfile::tempdir().unwrap();
    let cp = "127.0.19.11";
    let (files, _node) = bootstrapped_node(tmp.path(), cp);
    let bundle: machine_api::pki::bundle::SecretsBundle =
        serde_norway::from_str(&std::fs::read_to_string(files.path("secrets.yaml")).unwrap())
            .unwrap();
    let kube_ca = tmp.path().join("kube-ca.crt");
    std::fs::write(&kube_ca, &bundle.kubernetes_ca.crt).unwrap();
    let os_ca = bundle.os_ca.crt.clone();
    let token = bundle.machine_token.clone();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let ask = |token: &str, csr_pem: String, kind: KubernetesCertificateKind| {
        rt.block_on(async {
            let ch = Endpoint::from_shared(format!("https://{cp}:50001"))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&os_ca))
                        .domain_name(cp),
                )
                .unwrap()
                .connect()
                .await
                .unwrap();
            TrustServiceClient::new(ch)
                .sign_kubernetes_certificate(SignKubernetesCertificateRequest {
                    machine_token: token.to_owned(),
                    csr_pem,
                    kind: kind as i32,
                })
                .await
                .map(|r| r.into_inner().cert_pem)
        })
    };

    // kubelet's serving certificate: the node's name and address, signed
    // by the cluster CA for TLS server use.
    let pem = ask(
        &token,
        csr("system:node:w1", &["w1", "10.5.0.21"]),
        KubernetesCertificateKind::KubeletServing,
    )
    .unwrap();
    let serving = tmp.path().join("serving.crt");
    std::fs::write(&serving, &pem).unwrap();
    openssl(
        &[
            "verify",
            "-purpose",
            "sslserver",
            "-CAfile",
            kube_ca.to_str().unwrap(),
        ],
        &serving,
    );
    let text = openssl(
        &[
            "x509",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName",
            "-in",
        ],
        &serving,
    );
    assert!(
        text.contains("O=system:nodes") || text.contains("O = system:nodes"),
        "{text}"
    );
    assert!(text.contains("system:node:w1"), "{text}");
    assert!(
        text.contains("DNS:w1") && text.contains("IP Address:10.5.0.21"),
        "{text}"
    );

    // kube-proxy's identity, whatever the request asked to be.
    let pem = ask(
        &token,
        csr("system:masters", &["kubernetes"]),
        KubernetesCertificateKind::KubeProxy,
    )
    .unwrap();
    let proxy = tmp.path().join("proxy.crt");
    std::fs::write(&proxy, &pem).unwrap();
    openssl(
        &[
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            kube_ca.to_str().unwrap(),
        ],
        &proxy,
    );
    let text = openssl(&["x509", "-noout", "-subject", "-in"], &proxy);
    assert!(text.contains("system:kube-proxy"), "{text}");
    assert!(!text.contains("system:masters"), "{text}");

    // Refusals, each with its reason.
    let refused = |token: &str, csr_pem: String, kind, code: Code, says: &str| {
        let e = ask(token, csr_pem, kind).unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().contains(says),
            "{says:?} not in {:?}",
            e.message()
        );
    };
    refused(
        "wrong-token-wrong-token-wrong-token-x",
        csr("system:node:w1", &["w1"]),
        KubernetesCertificateKind::KubeletServing,
        Code::PermissionDenied,
        "wrong machine token",
    );
    refused(
        &token,
        csr("system:node:w1", &["w2"]),
        KubernetesCertificateKind::KubeletServing,
        Code::InvalidArgument,
        "names only its node",
    );
    refused(
        &token,
        csr("system:node:w1", &["kubernetes.default.svc"]),
        KubernetesCertificateKind::KubeletServing,
        Code::InvalidArgument,
        "names only its node",
    );
    refused(
        &token,
        csr("admin", &[]),
        KubernetesCertificateKind::KubeletServing,
        Code::InvalidArgument,
        "system:node:NAME",
    );
    refused(
        &token,
        csr("system:node:w1", &["w1"]),
        KubernetesCertificateKind::Unspecified,
        Code::InvalidArgument,
        "kind",
    );
    refused(
        &token,
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
        KubernetesCertificateKind::KubeProxy,
        Code::InvalidArgument,
        "",
    );
}
