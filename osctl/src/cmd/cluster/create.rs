//! `osctl cluster create`: image, VMs, configs; then [`super::drive`]
//! applies, bootstraps and waits, in this process.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use machine_api::config::generate::{machine_config, ClusterInput, DEFAULT_KUBERNETES_VERSION};
use machine_api::config::{DnsName, Endpoint, Role};
use machine_api::layout::{artifact, Slot};
use machine_api::osconfig::{Context as OsContext, OsConfig};
use machine_api::pki::bundle::{os_client_cert, OsRole, SecretsBundle};
use sha2::{Digest, Sha256};

use super::qemu::{self, Accel, VmSpec};
use super::{ClusterState, NodeState, StateDir};
use crate::files::{self, OutFile, SECRET};

#[derive(Debug, Args)]
pub struct Create {
    #[command(flatten)]
    pub dir: StateDir,
    /// Control-plane nodes (each runs etcd; the first bootstraps it).
    #[arg(long, default_value_t = 1)]
    pub controlplanes: u32,
    /// Worker nodes (no CA keys: their OS API certificate comes from the
    /// first control-plane node's trust endpoint).
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// A built image directory (with *-vmlinuz, *-initramfs.cpio.zst and
    /// *-disk.raw), used as is.
    #[arg(long, value_name = "DIR", conflicts_with = "profile")]
    pub image: Option<PathBuf>,
    /// Build the image from this profile with `imager` (default:
    /// profiles/qemu.yaml when it exists here).
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// The Kubernetes binaries to build the image with (`imager build
    /// --kubernetes-dir`, e.g. from `scripts/build-kubernetes.sh --coredns
    /// DIR`; without a `coredns` there the image has no CoreDNS image).
    /// Default: in the workspace, the source build of `kubernetes/` with
    /// CoreDNS (`imager build --kubernetes-source kubernetes`, cached);
    /// elsewhere imager's order (the official tarball when reachable, which
    /// has no CoreDNS, else the source build).
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    pub kubernetes_dir: Option<PathBuf>,
    /// Memory per control-plane VM in MiB (default: 2048 when the image
    /// has Kubernetes, for etcd, kube-apiserver, kube-controller-manager
    /// and kube-scheduler; else 1024).
    #[arg(long)]
    pub memory: Option<u32>,
    /// Memory per worker VM in MiB.
    #[arg(long, default_value_t = 1536)]
    pub memory_workers: u32,
    /// Virtual CPUs per VM.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Disk size per VM in GiB (EPHEMERAL grows into it on first boot).
    #[arg(long, default_value_t = 4)]
    pub disk_gib: u64,
    /// Accelerator: auto uses KVM only when it answers.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: Accel,
    /// osconfig file to add the cluster's context to (default: $OSCONFIG,
    /// then ~/.osctl/osconfig).
    #[arg(long, value_name = "FILE")]
    pub osconfig: Option<PathBuf>,
    /// Give up waiting for the cluster after this many seconds (3 control
    /// planes with Kubernetes take 4 to 15 minutes under TCG on 2 cores).
    #[arg(long, default_value_t = 1200)]
    pub wait: u64,
}

/// Progress lines with the time since `create` started.
pub(super) struct Progress(pub(super) Instant);

impl Progress {
    pub(super) fn step(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[{:>6.1}s] {}",
            self.0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

/// Default memory of a control-plane VM whose image has Kubernetes: etcd,
/// kube-apiserver, kube-controller-manager and kube-scheduler together.
const CP_MEMORY_KUBE: u32 = 2048;

/// The Kubernetes part of an image's manifest.json.
#[derive(Debug, Clone)]
struct ImageKubernetes {
    present: bool,
    version: Option<String>,
    note: String,
}

impl ImageKubernetes {
    /// None when the image directory has no (readable) manifest.
    fn of(image: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(image.join("manifest.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let k = &v["kubernetes"];
        Some(ImageKubernetes {
            present: k["present"].as_bool().unwrap_or(false),
            version: k["version"].as_str().map(str::to_owned),
            note: k["note"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn random_token() -> String {
    use rand::RngExt;
    let mut rng = rand::rng();
    (0..20)
        .map(|_| char::from(b"abcdefghijkmnpqrstuvwxyz23456789"[rng.random_range(0..32)]))
        .collect()
}

/// A sibling binary (installed together), else one on PATH.
fn sibling_or_path(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The one file in `dir` whose name ends with `suffix`.
fn image_file(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--image {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "--image {}: no *{suffix} (build one with `imager build profiles/qemu.yaml -o DIR`)",
            dir.display()
        ),
        _ => bail!(
            "--image {}: several *{suffix}; keep one image per directory",
            dir.display()
        ),
    }
}

impl Create {
    pub fn run(self) -> Result<ExitCode> {
        let p = Progress(Instant::now());
        let name: DnsName = self.dir.name.parse().map_err(|e| anyhow!("--name: {e}"))?;
        if !name.is_label() || name.0.len() > 40 {
            bail!(
                "--name {:?} must be a single DNS label of at most 40 characters",
                name.0
            );
        }
        if self.controlplanes == 0 {
            bail!(
                "--controlplanes must be at least 1: the first control-plane node bootstraps etcd"
            );
        }
        if self.controlplanes + self.workers > 200 {
            bail!("at most 200 nodes fit the private network 10.5.0.0/24 as laid out");
        }
        qemu::preflight()?;
        let dir = self.dir.dir()?;
        if ClusterState::path(&dir).exists() {
            bail!(
                "cluster {} exists ({}): `osctl cluster show --name {}` or `osctl cluster destroy --name {}`",
                name.0,
                dir.display(),
                name.0,
                name.0
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        p.step(format!("cluster {} in {}", name.0, dir.display()));

        let image = self.image(&dir, &p)?;
        let kernel = image_file(&image, artifact::KERNEL_SUFFIX)?;
        // The disk's small initramfs with `slot=A` (root from the disk's
        // squashfs) boots faster than the full initramfs; older images
        // have only the latter.
        let (initrd, slot_arg) = match image_file(&image, artifact::BOOT_INITRD_SUFFIX) {
            Ok(small) => (small, format!(" {}", Slot::A.cmdline_arg())),
            Err(_) => (
                image_file(&image, artifact::INITRAMFS_SUFFIX)?,
                String::new(),
            ),
        };
        let disk = image_file(&image, artifact::DISK_SUFFIX)?;
        let kube = ImageKubernetes::of(&image);
        match &kube {
            Some(k) if k.present => p.step(format!("image: {}", k.note)),
            Some(k) => p.step(format!("image: {} (control planes run etcd only)", k.note)),
            None => p.step(format!(
                "image: {} has no manifest.json; assuming it carries Kubernetes",
                image.display()
            )),
        }
        let has_kube = kube.as_ref().is_none_or(|k| k.present);
        let cp_memory = self
            .memory
            .unwrap_or(if has_kube { CP_MEMORY_KUBE } else { 1024 });

        if self.accel == Accel::Auto {
            p.step("checking whether KVM runs a guest (cached per host boot)");
        }
        let accel = qemu::choose_accel(self.accel, &kernel, &initrd, &self.dir.root()?);
        p.step(format!(
            "accelerator: {}",
            match accel {
                Accel::Kvm => "KVM",
                _ => "TCG (software; KVM is unavailable or does not answer)",
            }
        ));

        // Secrets and one config per node.
        let bundle = SecretsBundle::generate()?;
        let first_ip = "10.5.0.10";
        let input = ClusterInput {
            name: name.clone(),
            endpoint: Endpoint(
                format!("https://{first_ip}:6443")
                    .parse()
                    .map_err(|e| anyhow!("endpoint: {e}"))?,
            ),
            // The image's release, so that the config says what runs.
            kubernetes_version: kube
                .as_ref()
                .filter(|k| k.present)
                .and_then(|k| k.version.clone())
                .unwrap_or_else(|| DEFAULT_KUBERNETES_VERSION.to_owned())
                .parse()
                .map_err(|e| anyhow!("kubernetes version: {e}"))?,
            install_disk: None,
        };
        let h = Sha256::digest(dir.display().to_string());
        let mcast = format!(
            "230.{}.{}.{}:{}",
            h[0],
            h[1],
            h[2].max(1),
            40000 + u16::from_be_bytes([h[3], h[4]]) % 20000
        );
        let mut out = vec![OutFile {
            path: dir.join("secrets.yaml"),
            contents: super::super::gen::bundle_yaml(&bundle),
            mode: SECRET,
        }];
        // Control-plane nodes first (10.5.0.10 bootstraps etcd; the others
        // join through it), then workers, which carry no CA key and get
        // their OS API certificate from 10.5.0.10's trust endpoint.
        let cp_roles = [Role::Controlplane, Role::Etcd];
        let plan = (0..self.controlplanes)
            .map(|i| (format!("{}-cp{}", name.0, i + 1), &cp_roles[..], i > 0))
            .chain(
                (0..self.workers)
                    .map(|j| (format!("{}-w{}", name.0, j + 1), &[Role::Worker][..], false)),
            );
        let mut nodes = Vec::new();
        for (i, (host, roles, joins)) in plan.enumerate() {
            let ip = format!("10.5.0.{}", 10 + i);
            let mut cfg = machine_config(&bundle, &input, roles);
            cfg.machine.hostname = Some(host.parse().map_err(|e| anyhow!("{host}: {e}"))?);
            if joins {
                cfg.cluster.etcd.endpoints = vec![Endpoint(
                    format!("https://{first_ip}:2379")
                        .parse()
                        .map_err(|e| anyhow!("etcd endpoint: {e}"))?,
                )];
            }
            let cfg_path = dir.join(format!("{host}.yaml"));
            out.push(OutFile {
                path: cfg_path.clone(),
                contents: cfg.to_yaml(),
                mode: SECRET,
            });
            let node_dir = dir.join(&host);
            let controlplane = roles.contains(&Role::Controlplane);
            nodes.push(NodeState {
                name: host,
                roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
                ip,
                api_port: free_port()?,
                etcd_port: free_port()?,
                k8s_port: if controlplane && has_kube {
                    Some(free_port()?)
                } else {
                    None
                },
                node_port: if roles.contains(&Role::Worker) && has_kube {
                    Some(free_port()?)
                } else {
                    None
                },
                memory_mib: if controlplane {
                    cp_memory
                } else {
                    self.memory_workers
                },
                config: cfg_path,
                console: node_dir.join("console.log"),
                disk: node_dir.join("disk.raw"),
                pidfile: node_dir.join("qemu.pid"),
                qemu: Vec::new(),
            });
        }
        let admin = os_client_cert(&bundle, "admin", OsRole::Admin)?;
        let context = OsContext {
            endpoints: nodes.iter().map(NodeState::endpoint).collect(),
            nodes: Vec::new(),
            ca: bundle.os_ca.crt.clone(),
            crt: admin.cert_pem,
            key: admin.key_pem,
            // The endpoint in the configs (10.5.0.10:6443) is on the
            // private network; this host reaches the first control plane's
            // API server through its forwarded port (127.0.0.1 is in every
            // API server certificate).
            kubernetes_endpoint: nodes.iter().find_map(NodeState::k8s_endpoint),
        };
        let cluster_osconfig = dir.join("osconfig");
        out.push(OutFile {
            path: cluster_osconfig.clone(),
            contents: OsConfig::single(&name.0, context.clone()).to_yaml(),
            mode: SECRET,
        });
        files::write_all(&out, false)?;
        p.step(format!(
            "generated the cluster PKI and {} machine configs ({} control-plane, {} worker)",
            nodes.len(),
            self.controlplanes,
            self.workers
        ));

        // VMs.
        let token = random_token();
        let mut specs = Vec::new();
        for (i, n) in nodes.iter_mut().enumerate() {
            std::fs::create_dir_all(n.console.parent().unwrap_or(&dir))?;
            qemu::sparse_copy(&disk, &n.disk, self.disk_gib << 30)
                .with_context(|| format!("copying the disk for {}", n.name))?;
            let spec = VmSpec {
                name: n.name.clone(),
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                disk: n.disk.clone(),
                cmdline: format!(
                    "console=ttyS0 panic=-1 quiet{slot_arg} ip={}:::255.255.255.0:{}:eth0:off ip=10.0.2.15:::255.255.255.0::eth1:off machined.token={token}",
                    n.ip, n.name
                ),
                memory_mib: n.memory_mib,
                cpus: self.cpus,
                accel,
                mcast: mcast.clone(),
                mac: format!("52:54:00:05:00:{:02x}", 10 + i),
                api_port: n.api_port,
                etcd_port: n.etcd_port,
                k8s_port: n.k8s_port,
                node_port: n.node_port,
                console: n.console.clone(),
                pidfile: n.pidfile.clone(),
            };
            n.qemu = std::iter::once(qemu::QEMU.to_owned())
                .chain(
                    spec.command()
                        .get_args()
                        .map(|a| a.to_string_lossy().into_owned()),
                )
                .collect();
            specs.push(spec);
        }
        let state = ClusterState {
            name: name.0.clone(),
            accel,
            image: image.clone(),
            network: "10.5.0.0/24".into(),
            mcast,
            osconfig: self
                .osconfig
                .clone()
                .or_else(crate::client::default_osconfig_path)
                .ok_or_else(|| anyhow!("no HOME: pass --osconfig"))?,
            kubernetes: kube.as_ref().map(|k| k.note.clone()),
            nodes: nodes.clone(),
        };
        state.save(&dir)?;
        for s in &specs {
            let pid = s.start()?;
            p.step(format!(
                "started VM {} (pid {pid}), console {}",
                s.name,
                s.console.display()
            ));
        }

        let limit = Duration::from_secs(self.wait);
        let kube_ca = has_kube.then_some(bundle.kubernetes_ca.crt.as_str());
        let result = super::drive::configure(&p, &state, &token, &context, kube_ca, limit);
        if let Err(e) = result {
            eprintln!("\ncluster {} did not come up: {e:#}", name.0);
            eprintln!("the VMs are left running for inspection; consoles:");
            for n in &state.nodes {
                eprintln!("  {}", n.console.display());
            }
            eprintln!("remove it with: osctl cluster destroy --name {}", name.0);
            return Ok(ExitCode::FAILURE);
        }

        // The operator's osconfig gains the context (and makes it current).
        let existing = std::fs::read_to_string(&state.osconfig).ok();
        let mut merged = match existing.as_deref().map(OsConfig::parse) {
            Some(Ok(c)) => c,
            Some(Err(p)) => bail!(
                "{} is not a valid osconfig, not adding the context to it:\n{p}\nthe cluster's own file is {}",
                state.osconfig.display(),
                cluster_osconfig.display()
            ),
            None => OsConfig::single(&name.0, context.clone()),
        };
        merged.merge(&name.0, context);
        files::write_all(
            &[OutFile {
                path: state.osconfig.clone(),
                contents: merged.to_yaml(),
                mode: SECRET,
            }],
            true,
        )?;
        p.step(format!(
            "cluster {} is healthy; context {} added to {}",
            name.0,
            name.0,
            state.osconfig.display()
        ));
        let file = if Some(&state.osconfig) == crate::client::default_osconfig_path().as_ref() {
            String::new()
        } else {
            format!(" --osconfig {}", state.osconfig.display())
        };
        let kubectl = if has_kube {
            let kubectl = self
                .kubernetes_dir
                .as_ref()
                .map(|d| d.join("kubectl").display().to_string())
                .unwrap_or_else(|| "kubectl".into());
            format!(
                "\n  osctl kubeconfig --context {n}{file} {kc}\n  {kubectl} --kubeconfig {kc} get --raw /readyz",
                n = name.0,
                kc = dir.join("kubeconfig").display()
            )
        } else {
            String::new()
        };
        println!(
            "\nTry:\n  osctl health --context {n}{file}\n  osctl etcd members --context {n}{file} -n {first}\n  osctl boot --context {n}{file}{kubectl}\n  osctl cluster show --name {n}\n  osctl cluster destroy --name {n}",
            n = name.0,
            first = state.nodes[0].endpoint()
        );
        Ok(ExitCode::SUCCESS)
    }

    fn image(&self, dir: &Path, p: &Progress) -> Result<PathBuf> {
        if let Some(i) = &self.image {
            return Ok(i.clone());
        }
        let profile = match &self.profile {
            Some(pr) => pr.clone(),
            None => {
                let default = PathBuf::from("profiles/qemu.yaml");
                if !default.is_file() {
                    bail!(
                        "no image: pass --image DIR (an `imager build` output) or --profile FILE"
                    );
                }
                default
            }
        };
        let out = dir.join("image");
        let imager = sibling_or_path("imager");
        p.step(format!(
            "building the image from {} with {}",
            profile.display(),
            imager.display()
        ));
        let mut cmd = Command::new(&imager);
        cmd.arg("build").arg(&profile).arg("-o").arg(&out);
        if let Some(k) = &self.kubernetes_dir {
            cmd.arg("--kubernetes-dir").arg(k);
        } else if Path::new("kubernetes/go.mod").is_file()
            && Path::new("scripts/build-kubernetes.sh").is_file()
        {
            // In the workspace: the source build (cached), which brings
            // CoreDNS for its baked image; the official tarball has none.
            cmd.arg("--kubernetes-source").arg("kubernetes");
        }
        let status = cmd.stdout(Stdio::null()).status().with_context(|| {
            format!(
                "running {} (install it beside osctl, or pass --image)",
                imager.display()
            )
        })?;
        if !status.success() {
            bail!("imager build {} failed (see above)", profile.display());
        }
        Ok(out)
    }
}
