//! osctl as an operator runs it: real binary, real files, openssl as the
//! independent checker.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use machine_api::config::MachineConfig;

fn osctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_osctl"))
        .args(args)
        .output()
        .expect("run osctl")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn gen(dir: &Path, extra: &[&str]) -> Output {
    let d = dir.to_str().unwrap();
    let mut args = vec!["gen", "config", "demo", "https://10.5.0.2:6443", "-o", d];
    args.extend_from_slice(extra);
    osctl(&args)
}

const FILES: [&str; 4] = [
    "secrets.yaml",
    "controlplane.yaml",
    "worker.yaml",
    "osconfig",
];

/// Pulls the PEM block under `key:` out of a YAML document.
fn yaml_field(path: &Path, pointer: &[&str]) -> String {
    let v: serde_norway::Value =
        serde_norway::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let mut cur = &v;
    for k in pointer {
        cur = cur
            .get(*k)
            .unwrap_or_else(|| panic!("{} has no {k}", path.display()));
    }
    cur.as_str().unwrap().to_owned()
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl installed");
    (out.status.success(), text(&out))
}

#[test]
fn gen_config_writes_private_files_that_validate() {
    let dir = tempfile::tempdir().unwrap();
    let out = gen(dir.path(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    for f in FILES {
        let p = dir.path().join(f);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let args: Vec<String> = FILES
        .iter()
        .flat_map(|f| ["-f".to_string(), dir.path().join(f).display().to_string()])
        .collect();
    let mut a = vec!["validate"];
    a.extend(args.iter().map(String::as_str));
    let out = osctl(&a);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches(": valid").count(), 4, "{}", text(&out));

    let worker = fs::read_to_string(dir.path().join("worker.yaml")).unwrap();
    assert!(
        !worker.contains("PRIVATE KEY"),
        "worker.yaml holds a private key"
    );
    let cp = fs::read_to_string(dir.path().join("controlplane.yaml")).unwrap();
    assert!(cp.contains("PRIVATE KEY"));
}

#[test]
fn osconfig_admin_certificate_chains_to_the_os_ca_with_admin_role() {
    let dir = tempfile::tempdir().unwrap();
    assert!(gen(dir.path(), &[]).status.success());
    let osconfig = dir.path().join("osconfig");
    let ca = dir.path().join("ca.pem");
    let crt = dir.path().join("crt.pem");
    let key = dir.path().join("key.pem");
    fs::write(&ca, yaml_field(&osconfig, &["contexts", "demo", "ca"])).unwrap();
    fs::write(&crt, yaml_field(&osconfig, &["contexts", "demo", "crt"])).unwrap();
    fs::write(&key, yaml_field(&osconfig, &["contexts", "demo", "key"])).unwrap();
    let (ca, crt, key) = (
        ca.to_str().unwrap(),
        crt.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let (ok, t) = openssl(&["verify", "-CAfile", ca, "-purpose", "sslclient", crt]);
    assert!(ok, "{t}");
    let (_, subj) = openssl(&[
        "x509", "-in", crt, "-noout", "-subject", "-nameopt", "RFC2253",
    ]);
    assert!(subj.contains("O=os:admin"), "{subj}");
    let (_, p1) = openssl(&["x509", "-in", crt, "-noout", "-pubkey"]);
    let (_, p2) = openssl(&["pkey", "-in", key, "-pubout"]);
    assert_eq!(p1, p2);
    // The OS CA in osconfig is the one in the bundle and the configs.
    let bundle_ca = yaml_field(&dir.path().join("secrets.yaml"), &["osCA", "crt"]);
    assert_eq!(fs::read_to_string(ca).unwrap(), bundle_ca);
    assert_eq!(
        yaml_field(&dir.path().join("worker.yaml"), &["secrets", "osCA", "crt"]),
        bundle_ca
    );
}

#[test]
fn existing_files_are_kept_without_force() {
    let dir = tempfile::tempdir().unwrap();
    assert!(gen(dir.path(), &[]).status.success());
    let before: Vec<Vec<u8>> = FILES
        .iter()
        .map(|f| fs::read(dir.path().join(f)).unwrap())
        .collect();
    let out = gen(dir.path(), &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--force"), "{}", text(&out));
    let after: Vec<Vec<u8>> = FILES
        .iter()
        .map(|f| fs::read(dir.path().join(f)).unwrap())
        .collect();
    assert_eq!(before, after);
    // --force never silently replaces the cluster's CAs …
    let out = gen(dir.path(), &["--force"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--with-secrets"), "{}", text(&out));
    assert_eq!(
        fs::read(dir.path().join("secrets.yaml")).unwrap(),
        before[0]
    );
    // … but regenerates the configs from the same bundle when told to.
    let secrets = dir.path().join("secrets.yaml");
    let out = gen(
        dir.path(),
        &["--force", "--with-secrets", secrets.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fs::read(&secrets).unwrap(), before[0]);
    assert_ne!(fs::read(dir.path().join("osconfig")).unwrap(), before[3]);
    // No temporary files left behind.
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

#[test]
fn with_secrets_reuses_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("s.yaml");
    let out = osctl(&["gen", "secrets", "-o", secrets.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fs::metadata(&secrets).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out_dir = dir.path().join("out");
    let out = gen(&out_dir, &["--with-secrets", secrets.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!out_dir.join("secrets.yaml").exists());
    assert_eq!(
        yaml_field(
            &out_dir.join("controlplane.yaml"),
            &["secrets", "etcdCA", "key"]
        ),
        yaml_field(&secrets, &["etcdCA", "key"])
    );
}

#[test]
fn a_bad_bundle_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("s.yaml");
    assert!(osctl(&["gen", "secrets", "-o", secrets.to_str().unwrap()])
        .status
        .success());
    let t = fs::read_to_string(&secrets).unwrap();
    let token = yaml_field(&secrets, &["bootstrapToken"]);
    fs::write(&secrets, t.replace(&token, "nope")).unwrap();
    let out_dir = dir.path().join("out");
    let out = gen(&out_dir, &["--with-secrets", secrets.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bootstrapToken"), "{}", text(&out));
    assert!(!out_dir.exists() || fs::read_dir(&out_dir).unwrap().count() == 0);
}

#[test]
fn patches_json6902_and_merge_apply_per_role() {
    let dir = tempfile::tempdir().unwrap();
    let patch_file = dir.path().join("p.yaml");
    fs::write(
        &patch_file,
        "- op: add\n  path: /machine/hostname\n  value: cp-1\n",
    )
    .unwrap();
    let patch_arg = format!("@{}", patch_file.display());
    let out_dir = dir.path().join("out");
    let out = gen(
        &out_dir,
        &[
            "--config-patch",
            "{cluster: {network: {dnsDomain: example.internal}}}",
            "--config-patch-controlplane",
            &patch_arg,
            "--config-patch-worker",
            "[{op: add, path: /machine/sysctls, value: {net.ipv4.ip_forward: 1}}]",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let cp = fs::read_to_string(out_dir.join("controlplane.yaml")).unwrap();
    let w = fs::read_to_string(out_dir.join("worker.yaml")).unwrap();
    assert!(cp.contains("hostname: cp-1") && !w.contains("hostname"));
    assert!(cp.contains("example.internal") && w.contains("example.internal"));
    assert!(w.contains("net.ipv4.ip_forward: '1'"), "{w}");
}

#[test]
fn a_patch_that_breaks_the_config_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = gen(
        dir.path(),
        &[
            "--config-patch",
            "{cluster: {network: {serviceCIDRs: [10.244.0.0/20]}}}",
        ],
    );
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("cluster.network.serviceCIDRs[0]") && t.contains("overlaps"),
        "{t}"
    );
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

    let out = gen(
        dir.path(),
        &["--config-patch", "[{op: remove, path: /nope}]"],
    );
    assert!(!out.status.success());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn bad_arguments_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (args, want) in [
        (
            vec!["gen", "config", "Demo", "https://a:6443"],
            "CLUSTER_NAME",
        ),
        (vec!["gen", "config", "demo", "http://a:6443"], "https://"),
        (vec!["gen", "config", "demo", "a:6443"], "ENDPOINT"),
        (vec!["gen", "config", "demo", "https://a"], "explicit port"),
        (
            vec![
                "gen",
                "config",
                "demo",
                "https://a:6443",
                "--kubernetes-version",
                "1.34",
            ],
            "--kubernetes-version",
        ),
    ] {
        let mut a = args.clone();
        let d = dir.path().to_str().unwrap();
        a.extend(["-o", d]);
        let out = osctl(&a);
        assert!(!out.status.success(), "{args:?} accepted");
        let t = text(&out);
        assert!(t.contains(want), "{args:?}: {t}");
        assert_eq!(t.trim().lines().count(), 1, "{args:?}: {t}");
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn validate_reports_every_problem_with_file_line_and_path() {
    let dir = tempfile::tempdir().unwrap();
    assert!(gen(dir.path(), &[]).status.success());
    let w = fs::read_to_string(dir.path().join("worker.yaml")).unwrap();
    let bad = w
        .replace("  - worker", "  - worker\n  - wrker\n  bogus: true")
        .replace("https://10.5.0.2:6443", "http://10.5.0.2:6443");
    let f = dir.path().join("bad.yaml");
    fs::write(&f, &bad).unwrap();
    let out = osctl(&["validate", "-f", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    let fname = f.display().to_string();
    for want in [
        "machine.roles[1]",
        "machine.bogus",
        "cluster.controlPlane.endpoint",
        "3 problems",
    ] {
        assert!(t.contains(want), "missing {want}: {t}");
    }
    let role_line = bad.lines().position(|l| l.contains("wrker")).unwrap() + 1;
    assert!(
        t.contains(&format!("{fname}:{role_line}: machine.roles[1]")),
        "{t}"
    );
}

#[test]
fn published_docs_match_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let schema = osctl(&["docs", "schema"]);
    let reference = osctl(&["docs", "config-reference"]);
    let on_disk_schema = fs::read(root.join("docs/machine-config.schema.json")).unwrap_or_default();
    let on_disk_ref = fs::read(root.join("docs/config-reference.md")).unwrap_or_default();
    assert!(
        schema.stdout == on_disk_schema && reference.stdout == on_disk_ref,
        "docs are stale: run `scripts/gen-docs.sh` and commit the result"
    );
}

#[test]
fn validate_takes_several_files_after_one_flag_and_sorts_by_line() {
    let dir = tempfile::tempdir().unwrap();
    assert!(gen(dir.path(), &[]).status.success());
    let w = dir.path().join("worker.yaml");
    let cp = dir.path().join("controlplane.yaml");
    let out = osctl(&["validate", "-f", w.to_str().unwrap(), cp.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // A missing kubernetesVersion is reported as missing, not as a type error.
    let t = fs::read_to_string(&w).unwrap();
    let bad: String = t
        .lines()
        .filter(|l| !l.contains("kubernetesVersion"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace("https://10.5.0.2:6443", "http://10.5.0.2:6443")
        .replacen("  - worker", "  - worker\n  bogus: 1", 1);
    let f = dir.path().join("bad.yaml");
    fs::write(&f, bad).unwrap();
    let out = osctl(&["validate", "-f", f.to_str().unwrap()]);
    let t = text(&out);
    assert!(
        t.contains("cluster.kubernetesVersion: required field is missing"),
        "{t}"
    );
    let lines: Vec<usize> = t
        .lines()
        .filter_map(|l| l.split(':').nth(1)?.parse().ok())
        .collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "{t}");
}

#[test]
fn gen_osconfig_merges_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s.yaml");
    assert!(osctl(&["gen", "secrets", "-o", s.to_str().unwrap()])
        .status
        .success());
    let o = dir.path().join("osconfig");
    for (ctx, role) in [("a", "admin"), ("b", "reader")] {
        let out = osctl(&[
            "gen",
            "osconfig",
            "--with-secrets",
            s.to_str().unwrap(),
            "--role",
            role,
            "--context",
            ctx,
            "-e",
            "10.0.0.1",
            "-o",
            o.to_str().unwrap(),
            "--merge",
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let cfg = machine_api::osconfig::OsConfig::parse(&fs::read_to_string(&o).unwrap()).unwrap();
    assert_eq!(cfg.contexts.len(), 2);
    assert_eq!(cfg.context, "b");
}

#[test]
fn docs_schema_into_a_closed_pipe_is_not_an_error() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_osctl"))
        .args(["docs", "schema"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// The process's umask, which narrows the modes files are created with.
fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn gen_signing_key_writes_a_pair_openssl_reads_and_keeps_it_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("keys");
    let d = out_dir.to_str().unwrap();
    let out = osctl(&["gen", "signing-key", "-o", d]);
    assert!(out.status.success(), "{}", text(&out));
    let (key, public) = (
        out_dir.join("image-signing.key"),
        out_dir.join("image-signing.pub"),
    );
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&public), 0o644 & !umask());
    let key_pem = fs::read_to_string(&key).unwrap();
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));

    // openssl reads both, and they are one pair.
    let (ok, t) = openssl(&["pkey", "-in", key.to_str().unwrap(), "-noout"]);
    assert!(ok, "{t}");
    let (ok, derived) = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
    assert!(ok, "{derived}");
    assert_eq!(derived, fs::read_to_string(&public).unwrap());

    // The id printed is the public key's, and the next steps are named.
    let id = machine_api::image_signature::TrustedKey::from_pem(&derived, "pub")
        .unwrap()
        .id();
    let t = text(&out);
    for want in [
        &format!("key id: {id}") as &str,
        "imager build --sign",
        "--image-key",
        "machine.upgrade.trustedImageKeys",
    ] {
        assert!(t.contains(want), "missing {want}: {t}");
    }

    // An existing key is kept without --force, replaced with it.
    let out = osctl(&["gen", "signing-key", "--output", d]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--force"), "{}", text(&out));
    assert_eq!(fs::read_to_string(&key).unwrap(), key_pem);
    let out = osctl(&["gen", "signing-key", "-o", d, "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(fs::read_to_string(&key).unwrap(), key_pem);
    assert_eq!(mode(&key), 0o600);
    assert_eq!(fs::read_dir(&out_dir).unwrap().count(), 2);
}

#[test]
fn gen_config_carries_image_keys_into_both_configs() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    assert!(osctl(&["gen", "signing-key", "-o", keys.to_str().unwrap()])
        .status
        .success());
    let public = keys.join("image-signing.pub");
    let p = public.to_str().unwrap();
    let out_dir = dir.path().join("out");
    let out = gen(&out_dir, &["--image-key", p]);
    assert!(out.status.success(), "{}", text(&out));
    let want = fs::read_to_string(&public).unwrap();
    for f in ["controlplane.yaml", "worker.yaml"] {
        let cfg = MachineConfig::parse(&fs::read_to_string(out_dir.join(f)).unwrap()).unwrap();
        assert_eq!(
            cfg.machine.upgrade.trusted_image_keys,
            vec![want.clone()],
            "{f}"
        );
    }

    // The same key twice, or a file that is not a public key, is refused
    // in one line, before anything is written.
    let key = keys.join("image-signing.key");
    for (args, what) in [
        (vec!["--image-key", p, "--image-key", p], "same key"),
        (vec!["--image-key", key.to_str().unwrap()], "private key"),
    ] {
        let empty = dir.path().join("empty");
        let out = gen(&empty, &args);
        assert!(!out.status.success(), "{args:?} accepted");
        let t = text(&out);
        assert!(t.contains(what) && t.contains("--image-key"), "{t}");
        assert_eq!(t.trim().lines().count(), 1, "{t}");
        assert!(!empty.exists());
    }
}
