//! imager: bakes bootable node images from a declarative profile.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use imager::build::{self, BuildOptions, Progress};
use imager::kubernetes::KubeSource;
use imager::lock::Lock;
use imager::profile::Profile;

#[derive(Debug, Parser)]
#[command(
    name = "imager",
    version,
    about = "Build bootable node images from a profile and verified distribution packages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print only errors.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
}

// Parsed once per run: the size of the build variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Build the outputs of PROFILE from its lock file.
    Build {
        profile: PathBuf,
        /// Output directory.
        #[arg(long, short = 'o', default_value = "_out/image")]
        output: PathBuf,
        /// Package mirror URI (default: the host's apt configuration, or $IMAGER_MIRROR).
        #[arg(long, env = "IMAGER_MIRROR")]
        mirror: Option<String>,
        /// Our machined binary (default: target/release/machined, built with
        /// cargo when missing inside the workspace).
        #[arg(long)]
        machined: Option<PathBuf>,
        /// Our init binary (default: target/release/init, likewise).
        #[arg(long)]
        init: Option<PathBuf>,
        /// Our pause binary, the pod sandbox image's program (default:
        /// target/release/pause, likewise).
        #[arg(long)]
        pause: Option<PathBuf>,
        /// Directory with kube-apiserver, kubelet, ... for the image (e.g.
        /// `scripts/build-kubernetes.sh DIR`). Its SHA256SUMS and BUILDINFO,
        /// when present, and each binary's Go build information must agree
        /// with the profile's kubernetes.version.
        /// Without any --kubernetes-* flag: the official tarball of the
        /// profile's release from dl.k8s.io when reachable, else the source
        /// build, else an image without Kubernetes (the note says why).
        #[arg(long, value_name = "DIR", group = "kube")]
        kubernetes_dir: Option<PathBuf>,
        /// The official kubernetes-server-linux-amd64.tar.gz (file or URL),
        /// checked against the profile's serverTarballSha512.
        #[arg(long, value_name = "FILE|URL", group = "kube")]
        kubernetes_tarball: Option<String>,
        /// Build the binaries from this kubernetes/ Go module with the
        /// scripts/build-kubernetes.sh beside it (default when no other
        /// source answers: the workspace's).
        #[arg(long, value_name = "DIR", group = "kube")]
        kubernetes_source: Option<PathBuf>,
        /// No Kubernetes binaries in the image.
        #[arg(long, group = "kube")]
        no_kubernetes: bool,
        /// A machine config baked into the image (0600 at
        /// /usr/lib/machined/config.yaml): nodes booted from it configure
        /// themselves on first boot instead of waiting in maintenance mode.
        /// Holds secrets: keep such an image as private as the config.
        #[arg(long, value_name = "FILE")]
        embed_config: Option<PathBuf>,
        /// CA certificates (PEM) that nodes trust for an https
        /// `machined.config=` URL on the kernel command line, besides the
        /// public web roots (for a config server of a private PKI).
        #[arg(long, value_name = "FILE")]
        config_ca: Option<PathBuf>,
        /// Timestamp for every file (default: the locked release's date).
        #[arg(long, env = "SOURCE_DATE_EPOCH")]
        source_date_epoch: Option<u64>,
        /// Parallel unpack jobs.
        #[arg(long, short = 'j', default_value_t = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))]
        jobs: usize,
    },
    /// Resolve PROFILE's packages in the signed index and write PROFILE.lock.
    Lock {
        profile: PathBuf,
        #[arg(long, env = "IMAGER_MIRROR")]
        mirror: Option<String>,
    },
    /// List the contents of an initramfs, disk image or manifest.
    Inspect { file: PathBuf },
    /// List the profiles in a directory.
    Profiles {
        #[arg(default_value = "profiles")]
        dir: PathBuf,
    },
}

/// Our binaries when --machined/--init/--pause are not given: the workspace's
/// release build (built now with cargo when missing and we are in the
/// workspace), else the ones beside this imager.
fn default_bin(name: &str) -> PathBuf {
    let release = Path::new("target/release").join(name);
    if !release.exists() && Path::new("machined/Cargo.toml").exists() {
        eprintln!(
            "building our {name} from the workspace (cargo build --release -p machined --bins)"
        );
        let _ = std::process::Command::new("cargo")
            .args(["build", "--release", "-p", "machined", "--bins"])
            .status();
    }
    if release.exists() {
        return release;
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or(release)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = Progress::new(cli.quiet);
    let r = match cli.command {
        Command::Build {
            profile,
            output,
            mirror,
            machined,
            init,
            pause,
            kubernetes_dir,
            kubernetes_tarball,
            kubernetes_source,
            no_kubernetes,
            embed_config,
            config_ca,
            source_date_epoch,
            jobs,
        } => {
            let opts = BuildOptions {
                profile,
                output,
                mirror,
                machined: machined.unwrap_or_else(|| default_bin("machined")),
                init: init.unwrap_or_else(|| default_bin("init")),
                pause: pause.unwrap_or_else(|| default_bin("pause")),
                kubernetes: match (kubernetes_dir, kubernetes_tarball, kubernetes_source) {
                    _ if no_kubernetes => KubeSource::None,
                    (Some(d), _, _) => KubeSource::Dir(d),
                    (_, Some(t), _) => KubeSource::Tarball(t),
                    (_, _, Some(m)) => KubeSource::Source(m),
                    _ => KubeSource::Auto,
                },
                embed_config,
                config_ca,
                source_date_epoch,
                jobs,
            };
            build::build(&opts, &progress).map(|m| {
                for o in &m.outputs {
                    println!(
                        "{:<10} {:>12}  {}  {}",
                        o.kind,
                        o.size,
                        &o.sha256[..16],
                        opts.output.join(&o.path).display()
                    );
                }
                if m.kubernetes.present {
                    println!("kubernetes: {}", m.kubernetes.note);
                } else {
                    println!("note: {}", m.kubernetes.note);
                }
                for i in &m.container_images {
                    println!(
                        "image      {:>12}  {}  {}",
                        i.size,
                        &i.manifest_digest[..23.min(i.manifest_digest.len())],
                        i.reference
                    );
                }
                println!("container images: {}", m.container_images_note);
            })
        }
        Command::Lock { profile, mirror } => build::lock(&profile, mirror.as_deref(), &progress)
            .and_then(|lock| {
                let path = Lock::path_for(&profile);
                machine_api::atomic::write_atomic(&path, lock.to_yaml().as_bytes(), 0o644)
                    .with_context(|| format!("write {}", path.display()))?;
                println!(
                    "wrote {} ({} packages)",
                    path.display(),
                    lock.packages.len()
                );
                Ok(())
            }),
        Command::Inspect { file } => imager::inspect::inspect(&file),
        Command::Profiles { dir } => profiles(&dir),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn profiles(dir: &Path) -> Result<()> {
    let mut found = false;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    entries.sort();
    for p in entries {
        found = true;
        match Profile::load(&p) {
            Ok((prof, _)) => {
                let lock = match Lock::load(&Lock::path_for(&p), &p, &prof.inputs_hash()) {
                    Ok(l) => format!("locked ({} packages, {})", l.packages.len(), l.suite),
                    Err(e) => format!("not buildable: {e}"),
                };
                println!("{:<8} {}\n         {lock}", prof.name, prof.description);
            }
            Err(e) => println!("{}: {e}", p.display()),
        }
    }
    if !found {
        bail!("no profiles (*.yaml) in {}", dir.display());
    }
    Ok(())
}
