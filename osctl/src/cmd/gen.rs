//! `osctl gen`: the cluster's secrets bundle, machine configs, the
//! operator's client file, and the key that signs node images.

mod signing_key;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use machine_api::config::generate::{machine_config, ClusterInput, DEFAULT_KUBERNETES_VERSION};
use machine_api::config::{DnsName, KubernetesVersion, MachineConfig, Role};
use machine_api::image_signature::TrustedKey;
use machine_api::osconfig::{Context as OsContext, OsConfig};
use machine_api::pki::bundle::{os_client_cert, OsRole, SecretsBundle};
use url::Url;

use crate::files::{self, OutFile, SECRET};
use crate::patch::ConfigPatch;

#[derive(Debug, Subcommand)]
pub enum Gen {
    /// Generate secrets.yaml, controlplane.yaml, worker.yaml and osconfig.
    Config(GenConfig),
    /// Generate a secrets bundle alone.
    Secrets(GenSecrets),
    /// Generate a client file with a certificate of the given role.
    Osconfig(GenOsconfig),
    /// etcdctl's files (ca.crt, client.crt, client.key) from the cluster's
    /// etcd CA, for checking etcd directly.
    EtcdClient(GenEtcdClient),
    /// An ed25519 key pair that signs node images: image-signing.key
    /// (for `imager build --sign`) and image-signing.pub (for the machine
    /// configs' trusted image keys).
    SigningKey(signing_key::GenSigningKey),
}

impl Gen {
    pub fn run(self) -> Result<ExitCode> {
        match self {
            Gen::Config(c) => c.run(),
            Gen::Secrets(s) => s.run(),
            Gen::Osconfig(o) => o.run(),
            Gen::EtcdClient(e) => e.run(),
            Gen::SigningKey(k) => k.run(),
        }
    }
}

#[derive(Debug, Args)]
pub struct GenConfig {
    /// Cluster name (a DNS label).
    pub cluster_name: String,
    /// Kubernetes API endpoint, e.g. https://10.5.0.2:6443.
    pub endpoint: String,
    /// Directory to write the files to.
    #[arg(long, short = 'o', default_value = ".")]
    pub output_dir: PathBuf,
    /// Reuse this secrets bundle instead of generating one.
    #[arg(long, value_name = "FILE")]
    pub with_secrets: Option<PathBuf>,
    /// Kubernetes release to pin.
    #[arg(long, default_value = DEFAULT_KUBERNETES_VERSION)]
    pub kubernetes_version: String,
    /// Disk to install to, e.g. /dev/vda.
    #[arg(long)]
    pub install_disk: Option<String>,
    /// Patch for every generated config: RFC 6902 (list of ops) or merge
    /// patch (partial document), inline YAML/JSON or @FILE. Repeatable.
    #[arg(long, value_name = "PATCH")]
    pub config_patch: Vec<String>,
    /// Patch for controlplane.yaml only.
    #[arg(long, value_name = "PATCH")]
    pub config_patch_controlplane: Vec<String>,
    /// Patch for worker.yaml only.
    #[arg(long, value_name = "PATCH")]
    pub config_patch_worker: Vec<String>,
    /// Public key (PEM, e.g. image-signing.pub from `osctl gen
    /// signing-key`) whose signed images the nodes take: goes into
    /// machine.upgrade.trustedImageKeys of both configs. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub image_key: Vec<PathBuf>,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct GenSecrets {
    /// File to write.
    #[arg(long, short = 'o', default_value = "secrets.yaml")]
    pub output: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct GenOsconfig {
    /// The cluster's secrets bundle.
    #[arg(long, value_name = "FILE")]
    pub with_secrets: PathBuf,
    /// Role of the client certificate: admin, operator or reader.
    #[arg(long, default_value = "admin")]
    pub role: OsRole,
    /// Common name of the client certificate.
    #[arg(long, default_value = "osctl")]
    pub name: String,
    /// Context name.
    #[arg(long, default_value = "default")]
    pub context: String,
    /// OS API endpoints (HOST or HOST:PORT). Repeatable.
    #[arg(long = "endpoint", short = 'e', required = true)]
    pub endpoints: Vec<String>,
    /// File to write.
    #[arg(long, short = 'o', default_value = "osconfig")]
    pub output: PathBuf,
    /// Add the context to an existing file (replacing a context of the
    /// same name) and make it current, instead of writing a new file.
    #[arg(long, conflicts_with = "force")]
    pub merge: bool,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct GenEtcdClient {
    /// The cluster's secrets bundle (holds the etcd CA key).
    #[arg(long, value_name = "FILE")]
    pub with_secrets: PathBuf,
    /// Directory to write ca.crt, client.crt and client.key into.
    #[arg(long, short = 'o', default_value = "etcd-client")]
    pub output_dir: PathBuf,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

impl GenEtcdClient {
    fn run(self) -> Result<ExitCode> {
        let bundle = load_bundle(&self.with_secrets)?;
        let ca = bundle
            .etcd_ca
            .authority("etcdCA")
            .map_err(|e| anyhow!("{}: etcdCA: {e}", self.with_secrets.display()))?;
        let spec =
            machine_api::pki::LeafSpec::new("osctl-etcd-client", machine_api::pki::Usage::Client);
        let leaf = ca.issue(&spec)?;
        let d = &self.output_dir;
        let out = [
            ("ca.crt", bundle.etcd_ca.crt.clone(), 0o644),
            ("client.crt", leaf.cert_pem, 0o644),
            ("client.key", leaf.key_pem, SECRET),
        ]
        .map(|(n, contents, mode)| OutFile {
            path: d.join(n),
            contents,
            mode,
        });
        files::write_all(&out, self.force)?;
        println!("wrote {}/{{ca.crt,client.crt,client.key}}", d.display());
        Ok(ExitCode::SUCCESS)
    }
}

/// Loads and checks a secrets bundle.
pub fn load_bundle(path: &Path) -> Result<SecretsBundle> {
    let text = files::read(path)?;
    let parsed = machine_api::config::parse::parse_yaml::<SecretsBundle>(&text);
    let mut problems = parsed.problems;
    if let Some(b) = &parsed.value {
        problems.extend(b.problems());
    }
    match parsed.value {
        Some(b) if problems.is_empty() => Ok(b),
        _ => {
            let lines: Vec<String> = problems
                .iter()
                .map(|p| crate::cmd::validate::problem_line(path, p))
                .collect();
            bail!("invalid secrets bundle:\n{}", lines.join("\n"))
        }
    }
}

pub fn bundle_yaml(b: &SecretsBundle) -> String {
    serde_norway::to_string(b).expect("bundle serializes")
}

fn parse_endpoint(text: &str) -> Result<Url> {
    let url = Url::parse(text).map_err(|e| {
        anyhow!("ENDPOINT {text:?} is not a URL ({e}): write it as https://HOST:6443")
    })?;
    if url.scheme() != "https" {
        bail!("ENDPOINT {text:?} must start with https://");
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("ENDPOINT {text:?} has no host");
    }
    if url.port().is_none() {
        bail!("ENDPOINT {text:?} needs an explicit port, e.g. https://10.5.0.2:6443");
    }
    Ok(url)
}

fn osconfig_endpoint(url: &Url) -> String {
    url.host_str().unwrap_or_default().to_owned()
}

/// Reads the `--image-key` files, refusing one that is not an ed25519
/// public key or that repeats another.
fn load_image_keys(paths: &[PathBuf]) -> Result<Vec<TrustedKey>> {
    let mut keys: Vec<(TrustedKey, &Path)> = Vec::new();
    for path in paths {
        let key = TrustedKey::from_pem(&files::read(path)?, &path.display().to_string())
            .map_err(|e| anyhow!("--image-key {e}"))?;
        if let Some((_, first)) = keys.iter().find(|(k, _)| *k == key) {
            bail!(
                "--image-key {} is the same key ({}) as {}: give each key once",
                path.display(),
                key.id(),
                first.display()
            );
        }
        keys.push((key, path));
    }
    Ok(keys.into_iter().map(|(k, _)| k).collect())
}

/// Applies patches to a generated config and validates the result; on
/// failure returns the problems as lines naming the file.
fn patched(
    name: &str,
    cfg: &MachineConfig,
    patches: &[&ConfigPatch],
) -> Result<std::result::Result<String, Vec<String>>> {
    let mut doc = serde_json::to_value(cfg).context("serialize config")?;
    for p in patches {
        p.apply(&mut doc)
            .with_context(|| format!("cannot patch {name}"))?;
    }
    let yaml = serde_norway::to_string(&doc).context("serialize patched config")?;
    // Written back from the typed document, so the file is in canonical
    // form whatever shape the patch used (e.g. sysctl values as strings).
    Ok(match MachineConfig::parse(&yaml) {
        Ok(cfg) => Ok(cfg.to_yaml()),
        Err(problems) => Err(problems
            .0
            .iter()
            .map(|p| format!("  {name}: {}: {}", p.path, p.message))
            .collect()),
    })
}

fn header(what: &str) -> String {
    format!(
        "# {what}\n# Generated by osctl {}. Check with `osctl validate -f FILE`.\n",
        env!("CARGO_PKG_VERSION")
    )
}

impl GenConfig {
    fn run(self) -> Result<ExitCode> {
        let name: DnsName = self
            .cluster_name
            .parse()
            .map_err(|e| anyhow!("CLUSTER_NAME: {e}"))?;
        if !name.is_label() {
            bail!(
                "CLUSTER_NAME {:?} must be a single DNS label (no dots)",
                name.0
            );
        }
        let endpoint = parse_endpoint(&self.endpoint)?;
        let kubernetes_version: KubernetesVersion = self
            .kubernetes_version
            .parse()
            .map_err(|e| anyhow!("--kubernetes-version: {e}"))?;
        let parse_all = |v: &[String]| -> Result<Vec<ConfigPatch>> {
            v.iter().map(|p| ConfigPatch::parse(p)).collect()
        };
        let common = parse_all(&self.config_patch)?;
        let cp_patches = parse_all(&self.config_patch_controlplane)?;
        let worker_patches = parse_all(&self.config_patch_worker)?;
        let image_keys: Vec<String> = load_image_keys(&self.image_key)?
            .iter()
            .map(TrustedKey::to_pem)
            .collect();

        let (bundle, bundle_is_new) = match &self.with_secrets {
            Some(path) => (load_bundle(path)?, false),
            None => {
                let existing = self.output_dir.join("secrets.yaml");
                if self.force && existing.exists() {
                    // --force must not silently mint a new cluster: every
                    // node configured from the old bundle would be orphaned.
                    bail!(
                        "{} exists: pass --with-secrets {} to keep the cluster's CAs, or delete it to start a new cluster",
                        existing.display(),
                        existing.display()
                    );
                }
                (SecretsBundle::generate()?, true)
            }
        };
        let input = ClusterInput {
            name: name.clone(),
            endpoint: machine_api::config::Endpoint(endpoint.clone()),
            kubernetes_version,
            install_disk: self.install_disk.clone(),
        };
        let mut cp = machine_config(&bundle, &input, &[Role::Controlplane, Role::Etcd]);
        let mut worker = machine_config(&bundle, &input, &[Role::Worker]);
        for cfg in [&mut cp, &mut worker] {
            cfg.machine.upgrade.trusted_image_keys = image_keys.clone();
        }
        let cp_patches: Vec<&ConfigPatch> = common.iter().chain(&cp_patches).collect();
        let worker_patches: Vec<&ConfigPatch> = common.iter().chain(&worker_patches).collect();
        let cp_yaml = patched("controlplane.yaml", &cp, &cp_patches)?;
        let worker_yaml = patched("worker.yaml", &worker, &worker_patches)?;
        let (cp_yaml, worker_yaml) = match (cp_yaml, worker_yaml) {
            (Ok(c), Ok(w)) => (c, w),
            (c, w) => {
                let mut lines = c.err().unwrap_or_default();
                lines.extend(w.err().unwrap_or_default());
                let why = if cp_patches.is_empty() && worker_patches.is_empty() {
                    "the generated configs are invalid (check the flags)"
                } else {
                    "the configs are invalid after patching"
                };
                bail!("{why}; nothing was written:\n{}", lines.join("\n"));
            }
        };

        let admin = os_client_cert(&bundle, "admin", OsRole::Admin)?;
        let osconfig = OsConfig::single(
            &name.0,
            OsContext {
                endpoints: vec![osconfig_endpoint(&endpoint)],
                nodes: Vec::new(),
                ca: bundle.os_ca.crt.clone(),
                crt: admin.cert_pem,
                key: admin.key_pem,
                kubernetes_endpoint: None,
            },
        );

        let dir = &self.output_dir;
        let mut out = Vec::new();
        if bundle_is_new {
            out.push(OutFile {
                path: dir.join("secrets.yaml"),
                contents: header("Cluster secrets bundle: every CA key. Keep it offline.")
                    + &bundle_yaml(&bundle),
                mode: SECRET,
            });
        }
        out.push(OutFile {
            path: dir.join("controlplane.yaml"),
            contents: header("Machine config for control-plane nodes (holds CA keys).") + &cp_yaml,
            mode: SECRET,
        });
        out.push(OutFile {
            path: dir.join("worker.yaml"),
            contents: header("Machine config for worker nodes (no CA keys).") + &worker_yaml,
            mode: SECRET,
        });
        out.push(OutFile {
            path: dir.join("osconfig"),
            contents: header("osctl client file: admin certificate for this cluster.")
                + &osconfig.to_yaml(),
            mode: SECRET,
        });
        files::write_all(&out, self.force)?;
        for f in &out {
            println!("wrote {}", f.path.display());
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl GenSecrets {
    fn run(self) -> Result<ExitCode> {
        let bundle = SecretsBundle::generate()?;
        files::write_all(
            &[OutFile {
                path: self.output.clone(),
                contents: header("Cluster secrets bundle: every CA key. Keep it offline.")
                    + &bundle_yaml(&bundle),
                mode: SECRET,
            }],
            self.force,
        )?;
        println!("wrote {}", self.output.display());
        Ok(ExitCode::SUCCESS)
    }
}

impl GenOsconfig {
    fn run(self) -> Result<ExitCode> {
        let bundle = load_bundle(&self.with_secrets)?;
        let cert = os_client_cert(&bundle, &self.name, self.role)?;
        let context = OsContext {
            endpoints: self.endpoints.clone(),
            nodes: Vec::new(),
            ca: bundle.os_ca.crt.clone(),
            crt: cert.cert_pem,
            key: cert.key_pem,
            kubernetes_endpoint: None,
        };
        let osconfig = if self.merge && self.output.exists() {
            let text = files::read(&self.output)?;
            let mut existing = OsConfig::parse(&text).map_err(|p| {
                anyhow!(
                    "{} is not a valid osconfig, not merging into it:\n{p}",
                    self.output.display()
                )
            })?;
            existing.merge(&self.context, context);
            existing
        } else {
            OsConfig::single(&self.context, context)
        };
        files::write_all(
            &[OutFile {
                path: self.output.clone(),
                contents: header(&format!(
                    "osctl client file: {} certificate.",
                    self.role.organization()
                )) + &osconfig.to_yaml(),
                mode: SECRET,
            }],
            self.force || self.merge,
        )?;
        println!("wrote {}", self.output.display());
        Ok(ExitCode::SUCCESS)
    }
}
