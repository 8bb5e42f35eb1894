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
        /// The image's version: os-release VERSION_ID, the boot entry's
        /// version, what `osctl version` shows (default: imager's version).
        #[arg(long, value_name = "VERSION")]
        image_version: Option<String>,
        /// Sign manifest.json with this ed25519 private key (PKCS#8 PEM,
        /// from `osctl gen signing-key`): writes manifest.json.sig, which
        /// nodes check against machine.upgrade.trustedImageKeys.
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
    },
    /// Check a build against its manifest: every output's size and sha256,
    /// the signature (with --key), or an upgrade bundle's members. With
    /// --rebuild, build again from the manifest's recorded inputs and
    /// name the first file of the image tree that differs.
    Verify {
        /// manifest.json (the outputs beside it) or an upgrade bundle (.tar).
        path: PathBuf,
        /// A trusted public key (PEM, from `osctl gen signing-key`); the
        /// manifest must be signed by one of them. Repeatable.
        #[arg(long = "key", value_name = "PUB")]
        keys: Vec<PathBuf>,
        /// Rebuild from the recorded inputs and compare byte for byte.
        #[arg(long)]
        rebuild: bool,
        /// Where the rebuild goes (default: a temporary directory, removed
        /// when the outputs match).
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
        /// The profile (default: profiles/NAME.yaml of the workspace);
        /// its sha256 must be the manifest's.
        #[arg(long)]
        profile: Option<PathBuf>,
        #[arg(long, env = "IMAGER_MIRROR")]
        mirror: Option<String>,
        /// For a build that was given --machined/--init/--pause.
        #[arg(long)]
        machined: Option<PathBuf>,
        #[arg(long)]
        init: Option<PathBuf>,
        #[arg(long)]
        pause: Option<PathBuf>,
        /// For a build whose Kubernetes binaries came from a directory.
        #[arg(long, value_name = "DIR")]
        kubernetes_dir: Option<PathBuf>,
        /// For a build with an embedded config (its sha256 must match).
        #[arg(long, value_name = "FILE")]
        embed_config: Option<PathBuf>,
        /// For a build with --config-ca (its sha256 must match).
        #[arg(long, value_name = "FILE")]
        config_ca: Option<PathBuf>,
    },
    /// Resolve PROFILE's packages over the signed indexes of its suites
    /// (highest version wins) and write PROFILE.lock.
    Lock {
        profile: PathBuf,
        /// The main archive's URI (default: the host's apt configuration);
        /// also serves the suites that are not *-security.
        #[arg(long, env = "IMAGER_MIRROR")]
        mirror: Option<String>,
        /// Fetch SUITE from the archive at URI (e.g. a *-security suite,
        /// which Debian serves from an archive of its own). Repeatable;
        /// the variable takes a comma-separated list.
        #[arg(
            long = "mirror-for",
            value_name = "SUITE=URI",
            env = "IMAGER_MIRROR_FOR"
        )]
        mirror_for: Vec<String>,
        /// Write nothing: list the locked packages that have a newer build
        /// in the suites now. Exit 0: none; 1: newer builds; 3: a newer
        /// build from a *-security suite; 2: the check failed.
        #[arg(long)]
        check: bool,
    },
    /// List the contents of an initramfs, disk image or manifest.
    Inspect { file: PathBuf },
    /// List the profiles in a directory.
    Profiles {
        #[arg(default_value = "profiles")]
        dir: PathBuf,
    },
}

fn signing_key(path: &Path) -> Result<machine_api::image_signature::SigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--sign {}", path.display()))?;
    Ok(machine_api::image_signature::SigningKey::from_pkcs8_pem(
        &text,
        &path.display().to_string(),
    )?)
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
            image_version,
            sign,
        } => (|| {
            let sign = sign
                .as_deref()
                .map(signing_key)
                .transpose()?
                .map(std::sync::Arc::new);
            let (machined, init, pause, ours) =
                imager::our_binaries::resolve(machined, init, pause, cli.quiet)?;
            let opts = BuildOptions {
                profile,
                output,
                mirror,
                machined,
                init,
                pause,
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
                ours,
                image_version,
                sign,
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
        })(),
        Command::Verify {
            path,
            keys,
            rebuild,
            output,
            profile,
            mirror,
            machined,
            init,
            pause,
            kubernetes_dir,
            embed_config,
            config_ca,
        } => (|| {
            let keys = imager::verify::load_keys(&keys)?;
            if !rebuild {
                return imager::verify::check(&path, &keys);
            }
            imager::verify::check(&path, &keys)?;
            let given = match (machined, init, pause) {
                (Some(m), Some(i), Some(p)) => Some((m, i, p)),
                (None, None, None) => None,
                _ => bail!("give all of --machined, --init and --pause, or none"),
            };
            imager::verify::rebuild(
                &path,
                &imager::verify::RebuildOptions {
                    output,
                    profile,
                    mirror,
                    given,
                    kubernetes_dir,
                    embed_config,
                    config_ca,
                    jobs: std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(2),
                },
                &progress,
            )
        })(),
        Command::Lock {
            profile,
            mirror,
            mirror_for,
            check: true,
        } => return lock_check(&profile, mirror.as_deref(), &mirror_for, &progress),
        Command::Lock {
            profile,
            mirror,
            mirror_for,
            check: false,
        } => build::lock(&profile, mirror.as_deref(), &mirror_for, &progress).and_then(|lock| {
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

/// `imager lock --check`: one line per changed package on stdout, then a
/// summary; the exit code says what changed (see [`imager::lock::CHECK_NEWER`]).
fn lock_check(
    profile: &Path,
    mirror: Option<&str>,
    mirror_for: &[String],
    progress: &Progress,
) -> ExitCode {
    match build::check_lock(profile, mirror, mirror_for, progress) {
        Ok(report) => {
            for c in &report.changes {
                println!("{}", c.line());
            }
            println!("{}", report.summary(profile));
            ExitCode::from(report.exit_code())
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(imager::lock::CHECK_FAILED)
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
