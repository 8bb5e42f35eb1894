//! The SBOM checked by an independent implementation of CycloneDX: the
//! `cyclonedx-python-lib` package's strict JSON-schema validator for spec
//! 1.5, from the Python virtualenv `scripts/test.sh` makes
//! (`target/pyenv`; `PYTHON_CHECKERS` names its interpreter). Without it
//! the test prints "SKIPPED" and passes, except under CI, where it fails
//! ([`machine_api::testing`]).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use imager::sbom::{
    cyclonedx_json, go_modules_from_modinfo, merge_go_modules, rust_crates_from_cargo_lock,
    DebPackage, ImageFile, Origin, OurComponent, SbomInput,
};
use sha2::{Digest, Sha256};

/// Validates the file named by argv[1]; prints `VALID` and the versions of
/// the node's key packages, or `INVALID: why` and exits 1.
const CHECKER: &str = r#"
import json, sys
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

text = open(sys.argv[1], encoding="utf-8").read()
error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
if error is not None:
    print("INVALID:", error)
    sys.exit(1)
print("VALID")
for c in json.loads(text)["components"]:
    name = c["name"]
    if name in ("etcd-server", "containerd", "runc") or name.startswith("linux-image-"):
        print("component", name, c["version"])
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$PYTHON_CHECKERS`, else the workspace's `target/pyenv`, when it can
/// import the validator.
fn python() -> Option<PathBuf> {
    let candidates = std::env::var_os("PYTHON_CHECKERS")
        .map(PathBuf::from)
        .into_iter()
        .chain([workspace().join("target/pyenv/bin/python")]);
    candidates.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import cyclonedx.validation.json, jsonschema"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn check(python: &Path, sbom: &Path) -> Output {
    Command::new(python)
        .args(["-c", CHECKER])
        .arg(sbom)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()))
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn deb(name: &str, version: &str, pool: &str) -> DebPackage {
    DebPackage {
        name: name.into(),
        version: version.into(),
        architecture: "amd64".into(),
        sha256: sha(format!("{name} {version}").as_bytes()),
        suite: "trixie".into(),
        filename: format!("pool/main/{pool}/{name}_{version}_amd64.deb"),
    }
}

fn ours(name: &str, version: &str, description: &str) -> OurComponent {
    OurComponent {
        name: name.into(),
        version: version.into(),
        sha256: sha(name.as_bytes()),
        description: description.into(),
    }
}

fn file(path: &str, origin: Origin) -> ImageFile {
    ImageFile {
        path: path.into(),
        size: path.len() as u64 * 1000,
        sha256: sha(path.as_bytes()),
        origin,
    }
}

const KUBELET_MODINFO: &str = "path\tk8s.io/kubernetes/cmd/kubelet\n\
mod\tk8s.io/kubernetes\t(devel)\t\n\
dep\tgithub.com/google/cadvisor\tv0.52.1\th1:sC8SZ6jio9ds+P2dk51bgbeYeufxo55n0X3tmrpA9as=\n\
dep\tgithub.com/opencontainers/runc\tv1.2.5\th1:8KAkq3Wrem8bApgOHyhRI/8IeLXIfmZ6Qaw6DNSLnA4=\n\
dep\tgolang.org/x/sys\tv0.31.0\th1:ioabZlmFYtWhL+TRYpcnNlLwhyxaM9kWTDEmfnprqik=\n\
dep\tk8s.io/api\tv0.0.0\n\
=>\t./staging/src/k8s.io/api\n\
dep\tgithub.com/gogo/protobuf\tv1.3.2\n\
=>\tgithub.com/gogo/protobuf\tv1.3.3-0.20221024144010-f67b8970b736\th1:ZGGw1d+Yv5iNFbWvfVqkXwQJRyyHW7LNFmxqbULWxpg=\n\
build\t-trimpath=true\n\
build\tCGO_ENABLED=0\n";

const COREDNS_MODINFO: &str = "path\tgithub.com/coredns/coredns\n\
mod\tgithub.com/coredns/coredns\tv1.13.1\t\n\
dep\tgithub.com/miekg/dns\tv1.1.66\th1:FeZXOS3VCVsKnEAd+wBkjMC3D2K+ww66Cq3VnCINuJE=\n\
dep\tgolang.org/x/sys\tv0.31.0\th1:ioabZlmFYtWhL+TRYpcnNlLwhyxaM9kWTDEmfnprqik=\n";

/// A small image: a few Debian packages, our binaries with their Go
/// modules and machined's crates from this workspace's Cargo.lock, and
/// files of every origin.
fn input() -> SbomInput {
    let debian = vec![
        deb("etcd-server", "3.5.16-4", "e/etcd"),
        deb("containerd", "1.7.24~ds1-6+deb13u1", "c/containerd"),
        deb("runc", "1.1.15+ds1-2", "r/runc"),
        deb(
            "linux-image-6.12.38+deb13-amd64",
            "6.12.38-1",
            "l/linux-signed-amd64",
        ),
        deb("passwd", "1:4.17.4-2", "s/shadow"),
    ];
    let ours = vec![
        ours("machined", "0.1.0", "The node agent, PID 1's supervisor"),
        ours("init", "0.1.0", "The initramfs init"),
        ours("pause", "0.1.0", "The pod sandbox's pause process"),
        ours("kubelet", "v1.33.1", "The Kubernetes node agent"),
        ours("coredns", "v1.13.1", "Cluster DNS, in its container image"),
    ];
    let files = vec![
        file("/usr/bin/etcd", Origin::Debian(0)),
        file("/usr/share/doc/etcd-server/copyright", Origin::Debian(0)),
        file("/usr/bin/containerd", Origin::Debian(1)),
        file("/usr/bin/containerd-shim-runc-v2", Origin::Debian(1)),
        file("/usr/sbin/runc", Origin::Debian(2)),
        file("/boot/vmlinuz-6.12.38+deb13-amd64", Origin::Debian(3)),
        file("/usr/sbin/useradd", Origin::Debian(4)),
        file("/usr/bin/machined", Origin::Ours(0)),
        file("/usr/bin/pause", Origin::Ours(2)),
        file("/usr/bin/kubelet", Origin::Ours(3)),
        file(
            "/usr/lib/machined/images/coredns-v1.13.1.tar",
            Origin::Ours(4),
        ),
        file("/etc/os-release", Origin::Imager),
        file("/etc/containerd/config.toml", Origin::Imager),
        file("/usr/lib/node-os/manifest.json", Origin::Imager),
    ];
    let mut go = go_modules_from_modinfo(KUBELET_MODINFO, "/usr/bin/kubelet");
    go.extend(go_modules_from_modinfo(COREDNS_MODINFO, "/coredns"));
    let lock = std::fs::read_to_string(workspace().join("Cargo.lock")).unwrap();
    SbomInput {
        image_name: "controlplane".into(),
        imager_version: env!("CARGO_PKG_VERSION").into(),
        source_date_epoch: 1_735_689_600,
        debian,
        go_modules: merge_go_modules(go),
        rust_crates: rust_crates_from_cargo_lock(&lock, &["machined"]).unwrap(),
        ours,
        files,
    }
}

/// The top-level component named `name`: its version.
fn version_of<'a>(doc: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    doc["components"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)?["version"]
        .as_str()
}

#[test]
fn sbom_passes_the_cyclonedx_strict_schema() {
    let input = input();
    let json = cyclonedx_json(&input).unwrap();
    assert_eq!(json, cyclonedx_json(&input).unwrap());

    let doc: serde_json::Value = serde_json::from_slice(&json).unwrap();
    for d in &input.debian {
        assert_eq!(
            version_of(&doc, &d.name),
            Some(d.version.as_str()),
            "{}",
            d.name
        );
    }
    assert!(input.rust_crates.iter().any(|c| c.name == "tokio"));
    assert!(version_of(&doc, "machined").is_some());

    let Some(python) = python() else {
        machine_api::testing::skip(
            "no Python with cyclonedx-python-lib[json-validation] ($PYTHON_CHECKERS or target/pyenv; scripts/test.sh makes it)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sbom.cdx.json");
    std::fs::write(&path, &json).unwrap();
    let out = check(&python, &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().next() == Some("VALID"),
        "the validator refused the SBOM:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for d in input.debian.iter().filter(|d| d.name != "passwd") {
        let line = format!("component {} {}", d.name, d.version);
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in\n{stdout}"
        );
    }

    // The validator is not a no-op: it refuses a hash algorithm the spec
    // does not know.
    let broken = String::from_utf8(json)
        .unwrap()
        .replacen("\"SHA-256\"", "\"SHA256\"", 1);
    std::fs::write(&path, broken).unwrap();
    let out = check(&python, &path);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("INVALID"),
        "the validator took a broken SBOM"
    );
}
