//! Harness for integration tests: real `machined` processes in host mode
//! (each on its own loopback address, so tests run in parallel), the real
//! `osctl`, and `etcdctl`/`openssl` as independent checkers.
//!
//! Binaries come from the workspace's target directory; `cargo nextest run
//! --workspace` (or `cargo build --workspace`) builds them first.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a harness fails loudly

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod prometheus;
pub mod test_bundle;

/// A workspace binary, next to the test executable's `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// True when a command is on PATH; and the skip that fails under CI.
pub use machine_api::testing::{have, skip};

/// Skips the test (with a visible note) when a real dependency is missing;
/// under CI it fails instead: CI installs them, so there a skip means the
/// install step broke. The workspace's one rule,
/// [`machine_api::require_tools!`].
pub use machine_api::require_tools as require;

/// The result of a command, with its text.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Run {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
    #[track_caller]
    pub fn expect_ok(self) -> Self {
        assert!(self.ok, "command failed:\n{}", self.text());
        self
    }
    #[track_caller]
    pub fn expect_err(self, needle: &str) -> Self {
        assert!(
            !self.ok,
            "command succeeded, expected failure with {needle:?}:\n{}",
            self.text()
        );
        assert!(
            self.text().contains(needle),
            "expected {needle:?} in:\n{}",
            self.text()
        );
        self
    }
}

/// Runs osctl.
pub fn osctl(args: &[&str]) -> Run {
    Run::from(Command::new(bin("osctl")).args(args).output().unwrap())
}

/// A cluster's generated files.
#[derive(Debug)]
pub struct ClusterFiles {
    pub dir: PathBuf,
}

impl ClusterFiles {
    /// `osctl gen config` with a control-plane endpoint on `endpoint_ip`.
    pub fn generate(dir: &Path, endpoint_ip: &str) -> Self {
        osctl(&[
            "gen",
            "config",
            "test",
            &format!("https://{endpoint_ip}:6443"),
            "-o",
            dir.to_str().unwrap(),
        ])
        .expect_ok();
        ClusterFiles {
            dir: dir.to_owned(),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn osconfig(&self) -> String {
        self.path("osconfig").display().to_string()
    }
    /// controlplane.yaml with a hostname and optional extra merge patch,
    /// written to `name`.
    pub fn node_config(&self, name: &str, hostname: &str, extra: &str) -> PathBuf {
        let base = std::fs::read_to_string(self.path("controlplane.yaml")).unwrap();
        let mut doc: serde_json::Value = serde_norway::from_str(&base).unwrap();
        doc["machine"]["hostname"] = serde_json::json!(hostname);
        if !extra.is_empty() {
            let patch: serde_json::Value = serde_norway::from_str(extra).unwrap();
            merge(&mut doc, &patch);
        }
        let out = self.dir.join(name);
        std::fs::write(&out, serde_norway::to_string(&doc).unwrap()).unwrap();
        out
    }
    /// A gRPC channel to `ip`'s API with the osconfig's admin identity,
    /// for tests that send what osctl would refuse to.
    pub async fn channel(&self, ip: &str) -> tonic::transport::Channel {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let cfg = machine_api::osconfig::OsConfig::parse(
            &std::fs::read_to_string(self.path("osconfig")).unwrap(),
        )
        .unwrap();
        let ctx = &cfg.contexts[&cfg.context];
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ctx.ca))
            .identity(Identity::from_pem(&ctx.crt, &ctx.key))
            .domain_name(ip);
        Endpoint::from_shared(format!("https://{ip}:50000"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .timeout(Duration::from_secs(60))
            .connect()
            .await
            .unwrap()
    }

    /// Runs osctl against `nodes` with this cluster's client file.
    pub fn osctl(&self, nodes: &[&str], args: &[&str]) -> Run {
        let mut a: Vec<&str> = args.to_vec();
        let osconfig = self.osconfig();
        let nodes = nodes.join(",");
        a.extend(["--osconfig", &osconfig, "-n", &nodes]);
        osctl(&a)
    }
}

/// RFC 7396 merge.
pub fn merge(doc: &mut serde_json::Value, patch: &serde_json::Value) {
    match (doc, patch) {
        (serde_json::Value::Object(d), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    d.remove(k);
                } else {
                    merge(d.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (d, p) => *d = p.clone(),
    }
}

/// One machined in host mode.
#[derive(Debug)]
pub struct Machined {
    pub root: PathBuf,
    pub ip: String,
    pub log: PathBuf,
    child: Option<Child>,
    starts: u32,
    env: Vec<(String, String)>,
}

impl Machined {
    /// Starts machined with state under `root`, serving on `ip:50000`.
    pub fn start(root: &Path, ip: &str) -> Self {
        Self::start_with_env(root, ip, &[])
    }

    /// [`start`](Self::start) with more environment (kept for restarts).
    pub fn start_with_env(root: &Path, ip: &str, env: &[(&str, &str)]) -> Self {
        let mut m = Machined {
            root: root.to_owned(),
            ip: ip.to_owned(),
            log: root.with_extension("log"),
            child: None,
            starts: 0,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.root).unwrap();
        self.starts += 1;
        let log = self.root.with_extension(format!("{}.log", self.starts));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin("machined"))
            .args(["--root", self.root.to_str().unwrap()])
            .args(["--listen", &format!("{}:50000", self.ip)])
            .args(["--hostname", &format!("node-{}", self.ip.replace('.', "-"))])
            .env("MACHINED_LOG", "info")
            // Workers whose trust endpoint never answers give up quickly.
            .env("MACHINED_TRUST_TIMEOUT", "8")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.log = log;
        self.wait_for_banner();
    }

    fn wait_for_banner(&self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if self.banner("fingerprint:").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("machined did not print its banner:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last banner value for `key` (e.g. `fingerprint:`, `token:`).
    pub fn banner(&self, key: &str) -> Option<String> {
        self.log_text()
            .lines()
            .rev()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_owned)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL machined only; its services keep running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts machined again on the same root (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// [`restart`](Self::restart) with `key` set to `value` in its
    /// environment (or removed when `None`), kept for later restarts.
    pub fn restart_with_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
        self.restart();
    }

    /// Waits until the banner shows configured mode (after the server restarts
    /// with the new identity).
    pub fn wait_configured(&self) {
        wait_until(Duration::from_secs(20), "machined configured", || {
            self.log_text().contains("state:       configured")
        });
    }

    /// etcdctl against this node's member with the node's own certificates.
    pub fn etcdctl(&self, args: &[&str]) -> Run {
        etcdctl(
            &format!("https://{}:2379", self.ip),
            &self.root.join("system/secrets/etcd"),
            args,
        )
    }

    /// Maintenance-mode apply with the banner's fingerprint and token.
    pub fn apply_insecure(&self, file: &Path) -> Run {
        apply_insecure(
            &self.ip,
            &self.banner("fingerprint:").unwrap(),
            &self.banner("token:").unwrap(),
            file,
        )
    }
}

/// etcdctl over mTLS with `ca.crt`, `client.crt` and `client.key` from
/// `certs`: the independent check that etcd really serves.
pub fn etcdctl(endpoint: &str, certs: &Path, args: &[&str]) -> Run {
    Run::from(
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg(format!("--cacert={}", certs.join("ca.crt").display()))
            .arg(format!("--cert={}", certs.join("client.crt").display()))
            .arg(format!("--key={}", certs.join("client.key").display()))
            .arg("--command-timeout=20s")
            .args(args)
            .output()
            .unwrap(),
    )
}

/// `osctl apply-config --insecure` to a node in maintenance mode.
pub fn apply_insecure(node: &str, fingerprint: &str, token: &str, file: &Path) -> Run {
    osctl(&[
        "apply-config",
        "--insecure",
        "--cert-fingerprint",
        fingerprint,
        "--token",
        token,
        "-n",
        node,
        "-f",
        file.to_str().unwrap(),
    ])
}

/// True while `pid` runs (a zombie waiting for a parent that does not reap
/// it counts as gone: in host mode an adopted service's parent is whatever
/// reaps orphans on this host).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Kills every process that names `root` on its command line: machined and
/// the services it left running (by design they outlive machined).
pub fn kill_all_under(root: &Path) {
    let needle = root.display().to_string();
    let me = std::process::id();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid as u32 == me {
                continue;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Machined {
    fn drop(&mut self) {
        self.kill();
        kill_all_under(&self.root);
    }
}

/// Polls `f` until it is true or `limit` passes (then panics naming `what`).
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// A configured, bootstrapped single etcd node.
pub fn bootstrapped_node(tmp: &Path, ip: &str) -> (ClusterFiles, Machined) {
    let files = ClusterFiles::generate(&tmp.join("cluster"), ip);
    let node = Machined::start(&tmp.join("node"), ip);
    let cfg = files.node_config("n.yaml", "n1", "");
    node.apply_insecure(&cfg).expect_ok();
    node.wait_configured();
    files.osctl(&[ip], &["bootstrap"]).expect_ok();
    files.osctl(&[ip], &["health", "--wait", "60"]).expect_ok();
    (files, node)
}

// ------------------------------------------------------------ QEMU helpers

/// Builds the qemu profile's image into `out` with the workspace's imager,
/// machined and init. None (after saying SKIPPED) when the package mirror
/// is unreachable; under CI that fails instead.
pub fn build_qemu_image(out: &Path) -> Option<PathBuf> {
    build_qemu_image_with(out, &[])
}

/// [`build_qemu_image`] with more `imager build` arguments. Without a
/// `--kubernetes-*` argument the image has no Kubernetes binaries
/// (`--no-kubernetes`): these boot tests are about the OS, and stay small.
pub fn build_qemu_image_with(out: &Path, extra: &[&std::ffi::OsStr]) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let kube_flag = extra
        .iter()
        .any(|a| a.to_string_lossy().starts_with("--kubernetes"));
    let has = |flag: &str| extra.iter().any(|a| a.to_string_lossy() == flag);
    let build = Command::new(bin("imager"))
        .current_dir(&root)
        .args(["build", "-q", "profiles/qemu.yaml", "-o"])
        .arg(out)
        .args(if has("--machined") {
            vec![]
        } else {
            vec![
                "--machined".to_owned(),
                bin("machined").display().to_string(),
            ]
        })
        .args(["--init", bin("init").to_str().unwrap()])
        .args(["--pause", bin("pause").to_str().unwrap()])
        .args(if kube_flag {
            None
        } else {
            Some("--no-kubernetes")
        })
        .args(extra)
        .output()
        .unwrap();
    if !build.status.success() {
        let err = String::from_utf8_lossy(&build.stderr);
        if err.contains("fetching the locked packages") {
            skip(format!("the package mirror is unreachable: {err}"));
            return None;
        }
        panic!("image build failed: {err}");
    }
    Some(out.to_owned())
}

/// A QEMU VM, killed when dropped.
#[derive(Debug)]
pub struct Vm(pub std::process::Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A VM booting a copy of an image's disk through OVMF and systemd-boot
/// (TCG, 1.5 GiB, 2 vCPUs, user networking with DHCP), with host ports
/// forwarded to guest ports. Without `-no-reboot`: reboots come back
/// through the firmware.
#[derive(Debug)]
pub struct UefiVm {
    pub vm: Vm,
    pub serial: PathBuf,
}

impl UefiVm {
    /// The OVMF firmware (code, vars template); None when not installed.
    pub fn firmware() -> Option<(PathBuf, PathBuf)> {
        let code = PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd");
        let vars = PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd");
        (code.exists() && vars.exists()).then_some((code, vars))
    }

    /// Boots `image`'s disk (copied sparse into `dir`, grown to `size`).
    pub fn boot(dir: &Path, image: &Path, size: u64, forwards: &[(u16, u16)]) -> Self {
        let (code, vars_template) = Self::firmware().expect("OVMF is installed");
        let disk = dir.join("disk.raw");
        let cp = Command::new("cp")
            .args(["--sparse=always"])
            .arg(image.join("qemu-disk.raw"))
            .arg(&disk)
            .status()
            .unwrap();
        assert!(cp.success());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap()
            .set_len(size)
            .unwrap();
        let vars = dir.join("vars.fd");
        std::fs::copy(vars_template, &vars).unwrap();
        let serial = dir.join("serial.log");
        let fwd: String = forwards
            .iter()
            .map(|(host, guest)| format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"))
            .collect();
        let vm = Vm(Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "1536", "-smp", "2"])
            .args(["-display", "none", "-monitor", "none", "-nodefaults"])
            .args(["-device", "virtio-rng-pci"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", disk.display()))
            .args([
                "-netdev",
                &format!("user,id=n0,restrict=on{fwd}"),
                "-device",
                "virtio-net-pci,netdev=n0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap());
        UefiVm { vm, serial }
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A banner value from a serial log (lines end with CR LF); the last one,
/// so a reboot's new banner wins.
pub fn console_value(log: &str, key: &str) -> Option<String> {
    log.lines()
        .rev()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|v| v.trim().to_owned())
}

/// etcdctl's `ca.crt`, `client.crt`, `client.key` in `dir`, minted from
/// the etcd CA of a secrets bundle (the cluster's, not the node's).
pub fn etcd_client_certs(secrets_yaml: &Path, dir: &Path) -> PathBuf {
    let bundle: machine_api::pki::bundle::SecretsBundle =
        serde_norway::from_str(&std::fs::read_to_string(secrets_yaml).unwrap()).unwrap();
    let ca = bundle.etcd_ca.authority("etcdCA").unwrap();
    let client = ca
        .issue(&machine_api::pki::kube::etcd_healthcheck_client())
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.crt"), &bundle.etcd_ca.crt).unwrap();
    std::fs::write(dir.join("client.crt"), &client.cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), &client.key_pem).unwrap();
    dir.to_owned()
}

/// A cluster made by `osctl cluster create` under a temp state dir;
/// destroyed (VMs stopped) on drop.
#[derive(Debug)]
pub struct LocalCluster {
    pub state_dir: PathBuf,
    pub name: String,
    pub osconfig: PathBuf,
    pub created: Run,
}

impl LocalCluster {
    pub fn create(tmp: &Path, name: &str, image: &Path, controlplanes: u32, workers: u32) -> Self {
        Self::create_waiting(tmp, name, image, controlplanes, workers, 400)
    }

    /// [`create`](Self::create) giving `osctl cluster create --wait` `wait`
    /// seconds.
    pub fn create_waiting(
        tmp: &Path,
        name: &str,
        image: &Path,
        controlplanes: u32,
        workers: u32,
        wait: u64,
    ) -> Self {
        let state_dir = tmp.join("clusters");
        let osconfig = tmp.join("osconfig");
        let created = osctl(&[
            "cluster",
            "create",
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--name",
            name,
            "--image",
            image.to_str().unwrap(),
            "--controlplanes",
            &controlplanes.to_string(),
            "--workers",
            &workers.to_string(),
            "--osconfig",
            osconfig.to_str().unwrap(),
            "--accel",
            "tcg",
            "--wait",
            &wait.to_string(),
        ]);
        let c = LocalCluster {
            state_dir,
            name: name.into(),
            osconfig,
            created,
        };
        if !c.created.ok {
            let mut consoles = String::new();
            for n in c.nodes() {
                let path = n["console"].as_str().unwrap_or_default();
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                consoles.push_str(&format!("\n--- {path}\n{tail}"));
            }
            panic!("cluster create failed:\n{}{consoles}", c.created.text());
        }
        c
    }
    pub fn dir(&self) -> PathBuf {
        self.state_dir.join(&self.name)
    }
    /// cluster.json's nodes.
    pub fn nodes(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir().join("cluster.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["nodes"].as_array().cloned())
            .unwrap_or_default()
    }
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes()[i]["api_port"])
    }
    pub fn etcd_endpoint(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.nodes()[i]["etcd_port"])
    }
    /// The forwarded Kubernetes API of control-plane node `i`.
    pub fn k8s_endpoint(&self, i: usize) -> String {
        let port = self.nodes()[i]["k8s_port"]
            .as_u64()
            .unwrap_or_else(|| panic!("node {i} has no forwarded Kubernetes API port"));
        format!("https://127.0.0.1:{port}")
    }
    pub fn pid(&self, i: usize) -> Option<i32> {
        let p = self.nodes()[i]["pidfile"].as_str()?.to_owned();
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    }
    /// Restarts a stopped VM with the exact command the cluster recorded.
    pub fn restart_vm(&self, i: usize) {
        let cmd: Vec<String> = self.nodes()[i]["qemu"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        let out = Command::new(&cmd[0]).args(&cmd[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    /// osctl with this cluster's context and nodes.
    pub fn osctl(&self, nodes: &[usize], args: &[&str]) -> Run {
        let nodes: Vec<String> = nodes.iter().map(|i| self.endpoint(*i)).collect();
        let nodes = nodes.join(",");
        let mut a: Vec<&str> = args.to_vec();
        let osconfig = self.osconfig.to_str().unwrap().to_owned();
        a.extend([
            "--osconfig",
            &osconfig,
            "--context",
            &self.name,
            "-n",
            &nodes,
        ]);
        osctl(&a)
    }
    pub fn console(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes()[i]["console"].as_str().unwrap()).unwrap_or_default()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = osctl(&[
            "cluster",
            "destroy",
            "--state-dir",
            self.state_dir.to_str().unwrap(),
            "--name",
            &self.name,
        ]);
    }
}

/// The running config a node keeps under `root` (the `current` of its
/// config record), if any.
pub fn stored_config(root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(root.join("system/state/machine-state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["current"].as_str().map(str::to_owned)
}

/// The config record file of a node under `root`.
pub fn state_record(root: &Path) -> PathBuf {
    root.join("system/state/machine-state.json")
}

// ------------------------------------------------- connection flood helpers

/// Open fds of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A `/proc/PID/status` memory field in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's open-files limit to at least `want` (soft and
/// hard; the hard limit only as far as allowed) and returns the soft limit
/// now in force: a flood test holds thousands of sockets itself.
pub fn raise_own_nofile(want: u64) -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if rl.rlim_max < want {
        let raised = libc::rlimit {
            rlim_cur: rl.rlim_cur,
            rlim_max: want,
        };
        // SAFETY: as above; fails harmlessly without CAP_SYS_RESOURCE.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            rl.rlim_max = want;
        }
    }
    rl.rlim_cur = rl.rlim_max.min(want.max(rl.rlim_cur));
    // SAFETY: as above; soft <= hard.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    rl.rlim_cur
}

/// The start of a TLS ClientHello that never finishes: a record header
/// announcing 512 bytes and the first few. A server waits for the rest.
pub const PARTIAL_CLIENT_HELLO: [u8; 9] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

/// The directory of the Kubernetes binaries built from the pinned Go
/// modules (`scripts/build-kubernetes.sh`; scripts/test.sh exports
/// `KUBE_BIN_DIR`). None when not built: tests then skip, except under
/// CI, where that fails.
pub fn kube_bin_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("KUBE_BIN_DIR")?);
    dir.join("kube-apiserver").is_file().then_some(dir)
}

/// [`kube_bin_dir`], or a skip (a failure under CI) naming what is missing.
pub fn require_kube_bin_dir() -> Option<PathBuf> {
    let dir = kube_bin_dir();
    if dir.is_none() {
        skip("no Kubernetes binaries: run scripts/build-kubernetes.sh DIR and set KUBE_BIN_DIR=DIR (scripts/test.sh does)");
    }
    dir
}

/// The qemu profile's image with the Kubernetes binaries of `kube_dir`.
pub fn build_qemu_image_with_kubernetes(out: &Path, kube_dir: &Path) -> Option<PathBuf> {
    build_qemu_image_with(
        out,
        &[
            std::ffi::OsStr::new("--kubernetes-dir"),
            kube_dir.as_os_str(),
        ],
    )
}

/// kubectl from `bins` with `kubeconfig` (and a bounded request time);
/// its discovery cache beside the kubeconfig, not under `$HOME`.
pub fn kubectl(bins: &Path, kubeconfig: &Path, args: &[&str]) -> Run {
    run(Command::new(bins.join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(kubeconfig.with_extension("kube-cache"))
        .args(["--request-timeout", "20s"])
        .args(args))
}

/// Runs a command and collects its output.
pub fn run(cmd: &mut Command) -> Run {
    Run::from(cmd.output().unwrap())
}

/// Sets process `pid`'s open-files limit (prlimit(2)): a test puts a host
/// machined under a node's limits.
pub fn set_nofile_of(pid: u32, soft: u64, hard: u64) {
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `new` is a valid rlimit that prlimit only reads; the old
    // value is not asked for (null).
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// `python3 -m http.server` serving a directory, stopped when dropped.
#[derive(Debug)]
pub struct HttpServer {
    child: std::process::Child,
    /// IP:PORT it listens on.
    pub addr: String,
}

impl HttpServer {
    pub fn start(dir: &std::path::Path, ip: &str) -> Self {
        let port = free_port();
        let child = std::process::Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", ip])
            .arg("--directory")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("{ip}:{port}");
        wait_until(
            std::time::Duration::from_secs(20),
            "the HTTP server",
            || std::net::TcpStream::connect(&addr).is_ok(),
        );
        HttpServer { child, addr }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
