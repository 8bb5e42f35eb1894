//! The pipeline: profile + lock → verified packages → unpacked tree →
//! assembled image → cpio / squashfs / ESP / GPT → outputs + manifest.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use machine_api::layout::{self, artifact, Slot};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::assemble::{self, elf, modules};
use crate::container_images::{self, ManifestContainerImage};
use crate::format::{cpio, fat, gpt_disk, squashfs};
use crate::kubernetes::{KubeSource, ManifestKubernetes};
use crate::lock::{CheckReport, Lock};
use crate::profile::{OutputKind, Profile};
use crate::source::{self, Archives, Cache, MirrorOverrides};
use crate::tree::{Entry, Tree};

/// Reports steps: a spinner with the current step on a terminal, plain
/// timestamped lines otherwise (CI logs, pipes).
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    quiet: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(std::time::Duration::from_millis(100));
            b
        });
        Progress {
            start: Instant::now(),
            quiet,
            bar,
        }
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    pub fn step(&self, msg: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        let line = format!(
            "[{:>6.2}s] {}",
            self.start.elapsed().as_secs_f64(),
            msg.as_ref()
        );
        match &self.bar {
            Some(b) => {
                b.println(&line);
                b.set_message(msg.as_ref().to_owned());
            }
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Where each suite is fetched from: `--mirror` (the main archive),
/// `--mirror-for SUITE=URI`, `IMAGER_KEYRING`, else the host's apt
/// configuration ([`source::Archives`]).
fn archives(
    suites: &[String],
    mirror_uri: Option<&str>,
    mirror_for: &[String],
) -> Result<Archives> {
    let keyring = std::env::var_os("IMAGER_KEYRING")
        .filter(|k| !k.is_empty())
        .map(PathBuf::from);
    let o = MirrorOverrides::new(mirror_uri, mirror_for, keyring)?;
    Archives::from_host(suites, &o)
        .context("finding each suite's archive (pass --mirror URI, --mirror-for SUITE=URI)")
}

/// `imager lock`: resolves the profile's packages over the signed indexes
/// of its suites (highest version wins) and returns the lock.
pub fn lock(
    profile_path: &Path,
    mirror_uri: Option<&str>,
    mirror_for: &[String],
    progress: &Progress,
) -> Result<Lock> {
    let (profile, _) = Profile::load(profile_path)?;
    let archives = archives(&profile.source.suites, mirror_uri, mirror_for)?;
    let cache = Cache::new(Cache::default_dir());
    let indexes = crate::lock::fetch_suites(&profile, &archives, &cache, progress)?;
    let recs = source::resolve(
        &indexes.packages,
        &profile.packages,
        true,
        &profile.skip_depends,
    )?;
    for suite in &profile.source.suites {
        let n = recs.iter().filter(|r| r.suite == *suite).count();
        progress.step(format!("{n} packages from {suite}"));
    }
    Ok(Lock::new(&profile, &indexes.releases, recs)?)
}

/// `imager lock --check`: compares the lock with the suites' current
/// signed indexes, writing nothing.
pub fn check_lock(
    profile_path: &Path,
    mirror_uri: Option<&str>,
    mirror_for: &[String],
    progress: &Progress,
) -> Result<CheckReport> {
    let (profile, _) = Profile::load(profile_path)?;
    let lock = Lock::load(
        &Lock::path_for(profile_path),
        profile_path,
        &profile.inputs_hash(),
    )?;
    let archives = archives(&profile.source.suites, mirror_uri, mirror_for)?;
    let cache = Cache::new(Cache::default_dir());
    let indexes = crate::lock::fetch_suites(&profile, &archives, &cache, progress)?;
    Ok(crate::lock::check(&lock, &indexes.packages))
}

/// What `imager build` is told.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub profile: PathBuf,
    pub output: PathBuf,
    pub mirror: Option<String>,
    pub machined: PathBuf,
    pub init: PathBuf,
    /// Our pause binary, for the pod sandbox image.
    pub pause: PathBuf,
    /// Where the Kubernetes binaries come from ([`crate::kubernetes`]).
    pub kubernetes: KubeSource,
    /// A machine config to bake in (validated first).
    pub embed_config: Option<PathBuf>,
    /// CA certificates (PEM) a node trusts for https `machined.config=`
    /// URLs, besides the public web roots.
    pub config_ca: Option<PathBuf>,
    pub source_date_epoch: Option<u64>,
    pub jobs: usize,
    /// How machined, init and pause came to be ([`crate::our_binaries`]).
    pub ours: OursProvenance,
    /// The image's version (os-release VERSION_ID, the boot entry, what
    /// `osctl version` shows); default: imager's own version.
    pub image_version: Option<String>,
    /// Sign the manifest with this ed25519 key (read and checked before
    /// any slow work).
    pub sign: Option<std::sync::Arc<machine_api::image_signature::SigningKey>>,
}

/// Where our binaries came from, for the manifest: a rebuild needs it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OursProvenance {
    /// `workspace` (built by imager with paths remapped) or `given`
    /// (--machined/--init/--pause).
    pub built_by: String,
    /// `rustc -vV` of the workspace build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rustc: Option<String>,
    /// The workspace's git commit (`-dirty` when it had changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub profile: ManifestProfile,
    pub source_date_epoch: u64,
    pub imager_version: String,
    /// The image's version (os-release VERSION_ID, boot entry).
    pub image_version: String,
    /// How machined, init and pause were built (toolchain, commit).
    pub our_build: OursProvenance,
    /// The sha256 of the machine config baked in with --embed-config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded_config_sha256: Option<String>,
    /// The sha256 of the --config-ca bundle baked in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_ca_sha256: Option<String>,
    pub suite: String,
    pub release_sha256: String,
    pub inputs: Vec<ManifestInput>,
    pub our_binaries: Vec<ManifestFile>,
    pub kubernetes: ManifestKubernetes,
    /// The container images baked in as OCI archives.
    pub container_images: Vec<ManifestContainerImage>,
    /// Which images are there, and why one is missing.
    pub container_images_note: String,
    pub kernel: ManifestKernel,
    pub outputs: Vec<ManifestOutput>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestProfile {
    pub name: String,
    pub sha256: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestInput {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// Path in the distribution's pool (the mirror comes from the build host).
    pub from: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestFile {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestKernel {
    pub version: String,
    pub cmdline: String,
    pub modules: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestOutput {
    pub path: String,
    pub kind: String,
    pub size: u64,
    pub sha256: String,
}

/// Feeds a file that may be sparse to `sink`: holes (found with SEEK_DATA /
/// SEEK_HOLE) are fed as zeros without being read, which on some
/// filesystems costs more than the hashing or compressing itself.
fn read_sparse(path: &Path, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    use nix::unistd::{lseek, Whence};
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsFd;
    let mut f = std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let zeros = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        // Start of the next data region (ENXIO: only a hole remains).
        let data = match lseek(f.as_fd(), pos as i64, Whence::SeekData) {
            Ok(d) => (d as u64).min(len),
            Err(nix::errno::Errno::ENXIO) => len,
            Err(_) => pos, // no SEEK_DATA here: read everything
        };
        let mut hole = data - pos;
        while hole > 0 {
            let n = hole.min(zeros.len() as u64) as usize;
            sink(&zeros[..n])?;
            hole -= n as u64;
        }
        if data >= len {
            break;
        }
        let end = match lseek(f.as_fd(), data as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(len),
            Err(_) => len,
        };
        f.seek(SeekFrom::Start(data))?;
        let mut left = end - data;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n])?;
            sink(&buf[..n])?;
            left -= n as u64;
        }
        pos = end;
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    read_sparse(path, |b| {
        h.update(b);
        Ok(())
    })?;
    Ok(hex::encode(h.finalize()))
}

/// Which package (index into the lock) wrote each unpacked path last.
type UnpackedBy = std::collections::BTreeMap<PathBuf, usize>;

/// Unpacks every .deb (in parallel), then merges the trees in lock order so
/// a file shipped twice resolves the same way every build. Also says which
/// package each path came from (for the SBOM).
fn unpack_all(
    debs: &[PathBuf],
    shas: &[String],
    cache_dir: &Path,
    jobs: usize,
) -> Result<(Tree, UnpackedBy)> {
    let jobs = jobs.max(1);
    // Largest first, so the biggest package (the kernel) does not start last.
    let mut by_size: Vec<(usize, PathBuf, u64)> = debs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                i,
                p.clone(),
                std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            )
        })
        .collect();
    by_size.sort_by_key(|e| std::cmp::Reverse(e.2));
    let mut chunks: Vec<Vec<(usize, PathBuf)>> = vec![Vec::new(); jobs];
    let mut load = vec![0u64; jobs];
    for (i, p, size) in by_size {
        let j = (0..jobs).min_by_key(|&j| load[j]).unwrap_or(0);
        load[j] += size;
        chunks[j].push((i, p));
    }
    let results: Vec<Result<Vec<(usize, Tree)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|(i, p)| {
                            let mut t = Tree::new();
                            source::unpack_deb_cached(&p, &shas[i], cache_dir, &mut t)
                                .with_context(|| format!("unpacking {}", p.display()))?;
                            Ok((i, t))
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("an unpack thread panicked"))?)
            .collect()
    });
    let mut trees: Vec<(usize, Tree)> = Vec::new();
    for r in results {
        trees.extend(r?);
    }
    trees.sort_by_key(|(i, _)| *i);
    let mut staging = Tree::new();
    let mut by = UnpackedBy::new();
    for (i, t) in trees {
        for (p, e) in t.iter() {
            staging.insert(p, e.clone())?;
            by.insert(p.to_path_buf(), i);
        }
    }
    Ok((staging, by))
}

fn write_zstd_cpio(tree: &Tree, epoch: u64, path: &Path) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut enc = zstd::stream::write::Encoder::new(std::io::BufWriter::new(f), 3)?;
    // A fixed worker count keeps the output identical from build to build.
    enc.multithread(2)?;
    cpio::write_newc(tree, epoch, &mut enc)?;
    enc.finish()?.flush()?;
    Ok(())
}

/// `--image-version`, checked: it goes into os-release and the boot
/// entry, so it is one short token.
fn image_version(v: Option<&str>) -> Result<String> {
    let v = v.unwrap_or(env!("CARGO_PKG_VERSION"));
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b));
    if !ok {
        return Err(anyhow!(
            "--image-version {v:?}: give 1 to 64 letters, digits and . _ + - ~ (e.g. 1.2.0 or 1.2.0-rc1)"
        ));
    }
    Ok(v.to_owned())
}

/// `imager build`.
/// `--embed-config` and `--config-ca`, read and validated: (path in the
/// image, text, mode). The paths are where machined looks
/// (`machined::acquire::EMBEDDED_CONFIG` and `EMBEDDED_CA`).
fn baked_files(opts: &BuildOptions) -> Result<Vec<(&'static str, String, u32)>> {
    let mut out = Vec::new();
    if let Some(cfg) = &opts.embed_config {
        let text = std::fs::read_to_string(cfg)
            .with_context(|| format!("--embed-config {}", cfg.display()))?;
        machine_api::config::MachineConfig::parse(&text).map_err(|p| {
            anyhow!(
                "--embed-config {}: the config does not validate (check it with `osctl validate -f`):\n{p}",
                cfg.display()
            )
        })?;
        // 0600: it holds the node's secrets.
        out.push(("usr/lib/machined/config.yaml", text, 0o600));
    }
    if let Some(ca) = &opts.config_ca {
        let what = format!("--config-ca {}", ca.display());
        let text = std::fs::read_to_string(ca).with_context(|| what.clone())?;
        machine_api::pki::check_ca_bundle(&what, &text)
            .map_err(|e| anyhow!("{e} (give PEM CA certificates)"))?;
        out.push(("usr/lib/machined/config-ca.pem", text, 0o644));
    }
    Ok(out)
}

pub fn build(opts: &BuildOptions, progress: &Progress) -> Result<Manifest> {
    let (profile, profile_text) = Profile::load(&opts.profile)?;
    let image_version = image_version(opts.image_version.as_deref())?;
    let lock_path = Lock::path_for(&opts.profile);
    let lock = Lock::load(&lock_path, &opts.profile, &profile.inputs_hash())?;
    let epoch = opts
        .source_date_epoch
        .or_else(|| lock.source_date_epoch())
        .ok_or_else(|| {
            anyhow!(
                "no SOURCE_DATE_EPOCH and a release date of {} does not parse: run `imager lock` again",
                lock_path.display()
            )
        })?;
    // Files baked in for machined, checked before any slow work.
    let baked = baked_files(opts)?;
    std::fs::create_dir_all(&opts.output)
        .with_context(|| format!("create {}", opts.output.display()))?;

    // 1. Inputs, verified against the lock, each from its suite's archive.
    let archives = Archives::from_host(
        &lock.suite_names(),
        &MirrorOverrides::from_env(opts.mirror.as_deref())?,
    )
    .context(
        "finding each locked suite's archive (pass --mirror URI, set IMAGER_MIRROR_FOR=SUITE=URI)",
    )?;
    let cache = Cache::new(Cache::default_dir());
    progress.step(format!(
        "fetching {} packages (verified by sha256 from the lock)",
        lock.packages.len()
    ));
    let debs = crate::lock::fetch_locked(&lock, &archives, &cache, opts.jobs.max(4))
        .context("fetching the locked packages (a checksum mismatch means the lock no longer matches the archive: run `imager lock`)")?;
    progress.step("unpacking");
    let shas: Vec<String> = lock.packages.iter().map(|p| p.sha256.clone()).collect();
    let (mut staging, unpacked_by) = unpack_all(&debs, &shas, &cache.dir, opts.jobs)?;
    assemble::usrmerge_links(&mut staging)?;

    // 2. The image tree.
    progress.step("assembling the image tree");
    let (kernel_version, kernel) = assemble::kernel(&staging, &profile)?;
    let mut image = assemble::filter(&staging, &profile)?;
    assemble::base_layout(&mut image, &profile, &image_version)?;
    let modules = modules::add_modules(
        &mut image,
        &staging,
        &kernel_version,
        &profile.kernel.modules,
    )?;
    assemble::add_host_file(&mut image, &opts.machined, "usr/bin/machined", 0o755)
        .context("our machined binary (build it with `cargo build --release -p machined`, or pass --machined)")?;
    assemble::add_host_file(&mut image, &opts.init, "init", 0o755)
        .context("our init binary (build it with `cargo build --release -p machined --bin init`, or pass --init)")?;
    for (path, text, mode) in &baked {
        image.insert(
            Path::new(path),
            Entry::file(*mode, text.clone().into_bytes()),
        )?;
    }
    let kube = {
        // The source build's output lives here until it is read.
        let work = tempfile::tempdir_in(&opts.output)?;
        crate::kubernetes::add(
            &mut image,
            &profile,
            &opts.kubernetes,
            work.path(),
            progress,
        )?
    };
    let kubernetes = kube.manifest;
    let coredns_data = kube.coredns.as_ref().ok().map(|c| c.data.clone());
    progress.step(format!("kubernetes: {}", kubernetes.note));
    progress.step("container images (OCI archives)");
    let (container_images, container_images_note) =
        bake_container_images(opts, &lock, &staging, kube.coredns, epoch, &mut image)?;
    for i in &container_images {
        progress.step(format!(
            "container image {} ({} bytes, manifest {})",
            i.reference, i.size, i.manifest_digest
        ));
    }
    progress.step(format!("container images: {container_images_note}"));
    let added = elf::close(&mut image, &staging)?;
    progress.step(format!(
        "image tree: {} entries, {:.1} MiB, {} libraries added by the ELF closure, {} modules",
        image.len(),
        image.data_size() as f64 / 1048576.0,
        added.len(),
        modules.len()
    ));

    // 3. Outputs.
    let name = &profile.name;
    let mut outputs: Vec<(PathBuf, &str)> = Vec::new();
    progress.step("listing the image tree (sha256 of every file)");
    let digests = crate::listing::file_digests(&image, opts.jobs);
    let lines = crate::listing::lines(&image, &digests);
    for (file, text, kind) in [
        (
            artifact::tree_listing(name),
            crate::listing::render(&lines),
            "tree",
        ),
        (
            artifact::file_sums(name),
            crate::listing::render_sha256sums(&lines),
            "file-sums",
        ),
    ] {
        let p = opts.output.join(file);
        machine_api::atomic::write_atomic(&p, text.as_bytes(), 0o644)?;
        outputs.push((p, kind));
    }
    let ours = vec![
        (
            "machined",
            "/usr/bin/machined".to_owned(),
            sha256_file(&opts.machined)?,
        ),
        ("init", "/init".to_owned(), sha256_file(&opts.init)?),
        ("pause", String::new(), sha256_file(&opts.pause)?),
    ];
    let sbom_input = crate::build_sbom::input(&crate::build_sbom::Parts {
        name,
        epoch,
        lock: &lock,
        unpacked_by: &unpacked_by,
        image: &image,
        lines: &lines,
        ours: ours.clone(),
        provenance: &opts.ours,
        kubernetes: &kubernetes,
        container_images: &container_images,
        coredns: coredns_data.as_deref(),
    })?;
    let sbom_path = opts.output.join(artifact::sbom(name));
    machine_api::atomic::write_atomic(
        &sbom_path,
        &crate::sbom::cyclonedx_json(&sbom_input)?,
        0o644,
    )?;
    outputs.push((sbom_path, "sbom"));
    let kernel_path = opts.output.join(artifact::kernel(name));
    std::fs::write(&kernel_path, &kernel)?;
    outputs.push((kernel_path, "kernel"));
    if profile.outputs.contains(&OutputKind::Initramfs) {
        progress.step("writing initramfs (cpio newc, zstd)");
        let p = opts.output.join(artifact::initramfs(name));
        write_zstd_cpio(&image, epoch, &p)?;
        outputs.push((p, "initramfs"));
    }
    if profile.outputs.contains(&OutputKind::Disk) {
        let disk = write_disk(
            opts, &profile, &lock, &staging, &image, &kernel, epoch, progress,
        )?;
        outputs.push((opts.output.join(artifact::root(name)), "root"));
        outputs.push((disk.clone(), "disk"));
        // The disk's own small initramfs, also as a file: with `slot=A` a
        // VM boots kernel + this initrd directly and takes its root from
        // the disk's slot A, skipping the firmware and the unpacking of the
        // full initramfs (local clusters do this).
        let boot_initrd = opts.output.join(artifact::boot_initrd(name));
        if boot_initrd.exists() {
            outputs.push((boot_initrd, "boot-initrd"));
        }
        if profile.outputs.contains(&OutputKind::Compressed) {
            progress.step("compressing the disk (zstd)");
            let zpath = disk.with_extension("raw.zst");
            let mut enc = zstd::stream::write::Encoder::new(std::fs::File::create(&zpath)?, 3)?;
            enc.multithread(2)?;
            read_sparse(&disk, |b| Ok(enc.write_all(b)?))?;
            enc.finish()?;
            outputs.push((zpath, "disk.zst"));
        }
        if profile.outputs.contains(&OutputKind::Qcow2) {
            let q = disk.with_extension("qcow2");
            let ok = std::process::Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(&disk)
                .arg(&q)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                outputs.push((q, "qcow2"));
            } else {
                progress
                    .step("qcow2 skipped: qemu-img is not installed (apt-get install qemu-utils)");
            }
        }
    }

    // 4. Manifest.
    progress.step("hashing the outputs");
    let mut out = Vec::new();
    for (p, kind) in &outputs {
        out.push(ManifestOutput {
            path: p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            kind: (*kind).to_owned(),
            size: std::fs::metadata(p)?.len(),
            sha256: sha256_file(p)?,
        });
    }
    let manifest = Manifest {
        profile: ManifestProfile {
            name: profile.name.clone(),
            sha256: hex::encode(Sha256::digest(profile_text.as_bytes())),
        },
        source_date_epoch: epoch,
        imager_version: env!("CARGO_PKG_VERSION").into(),
        image_version: image_version.clone(),
        our_build: opts.ours.clone(),
        embedded_config_sha256: opts.embed_config.as_deref().map(sha256_file).transpose()?,
        config_ca_sha256: opts.config_ca.as_deref().map(sha256_file).transpose()?,
        suite: lock.suite.clone(),
        release_sha256: lock.release_sha256.clone(),
        inputs: lock
            .packages
            .iter()
            .map(|p| ManifestInput {
                name: p.name.clone(),
                version: p.version.clone(),
                sha256: p.sha256.clone(),
                from: p.filename.clone(),
            })
            .collect(),
        our_binaries: ours
            .into_iter()
            .map(|(name, path, sha256)| ManifestFile {
                path: if path.is_empty() {
                    format!("/{name} in {}", machine_api::layout::images::PAUSE)
                } else {
                    path
                },
                sha256,
            })
            .collect(),
        kubernetes,
        container_images,
        container_images_note,
        kernel: ManifestKernel {
            version: kernel_version,
            cmdline: profile.kernel.cmdline.clone(),
            modules: modules.iter().map(|m| modules::module_name(m)).collect(),
        },
        outputs: out,
    };
    let mpath = opts.output.join(artifact::MANIFEST);
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    let sig_path = opts.output.join(artifact::MANIFEST_SIGNATURE);
    // A signature of an earlier build must not sit beside this manifest.
    let _ = std::fs::remove_file(&sig_path);
    machine_api::atomic::write_atomic(&mpath, text.as_bytes(), 0o644)?;
    progress.step(format!("wrote {}", mpath.display()));
    if let Some(key) = &opts.sign {
        let signature = key.sign(text.as_bytes());
        machine_api::atomic::write_atomic(&sig_path, &signature, 0o644)?;
        progress.step(format!(
            "signed the manifest with {} ({})",
            key.public().id(),
            sig_path.display()
        ));
    }
    if profile.outputs.contains(&OutputKind::Disk) {
        let bundle = opts.output.join(artifact::upgrade_bundle(name));
        progress.step(format!("writing the upgrade bundle {}", bundle.display()));
        crate::bundle::write(&bundle, &opts.output, name, epoch)?;
    }
    Ok(manifest)
}

/// The container images ([`container_images`]) into `image`: pause
/// always, busybox when the packages have `busybox-static`, CoreDNS when
/// the Kubernetes binaries came with it. Returns the manifest's records
/// and a note naming what is missing and why.
fn bake_container_images(
    opts: &BuildOptions,
    lock: &Lock,
    staging: &Tree,
    coredns: std::result::Result<crate::kubernetes::CoreDns, String>,
    epoch: u64,
    image: &mut Tree,
) -> Result<(Vec<ManifestContainerImage>, String)> {
    let mut list = Vec::new();
    let mut absent = Vec::new();
    let pause = std::fs::read(&opts.pause).with_context(|| {
        format!(
            "our pause binary {} (build it with `cargo build --release -p machined --bins`, or pass --pause)",
            opts.pause.display()
        )
    })?;
    list.push((
        container_images::pause(&pause, staging)?,
        format!("machined's pause ({})", opts.pause.display()),
    ));
    match container_images::find_busybox(staging) {
        Ok(bb) => {
            let version = lock
                .packages
                .iter()
                .find(|p| p.name == "busybox-static")
                .map(|p| p.version.as_str())
                .unwrap_or("?");
            list.push((
                container_images::busybox(&bb)?,
                format!("Debian's busybox-static {version}"),
            ));
        }
        Err(e) => absent.push(format!("busybox ABSENT: {e}")),
    }
    match coredns {
        Ok(c) => list.push((
            container_images::coredns(&c.data)?,
            format!("{} ({})", c.from, c.version_check),
        )),
        Err(why) => absent.push(format!(
            "CoreDNS image ABSENT: {why}; the cluster DNS cannot run from this image (give `--kubernetes-dir DIR` from `scripts/build-kubernetes.sh --coredns DIR`)"
        )),
    }
    let baked = container_images::add(image, &list, epoch)?;
    let names: Vec<&str> = baked.iter().map(|i| i.reference.as_str()).collect();
    let mut note = format!(
        "{} baked in /{}",
        names.join(", "),
        machine_api::layout::images::DIR
    );
    for a in absent {
        note.push_str("; ");
        note.push_str(&a);
    }
    Ok((baked, note))
}

/// The raw UEFI disk: ESP (systemd-boot, a boot-counted entry for slot A),
/// slot A (squashfs root), slot B (empty until the first upgrade), STATE
/// and EPHEMERAL (formatted by machined on first boot).
#[allow(clippy::too_many_arguments)]
fn write_disk(
    opts: &BuildOptions,
    profile: &Profile,
    lock: &Lock,
    staging: &Tree,
    image: &Tree,
    kernel: &[u8],
    epoch: u64,
    progress: &Progress,
) -> Result<PathBuf> {
    let name = &profile.name;
    let work = tempfile::tempdir_in(&opts.output)?;
    progress.step("writing the root filesystem (squashfs, zstd)");
    // Kept as an output too: it is what an upgrade writes into a slot.
    let root = opts.output.join(artifact::root(name));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&root)?);
        squashfs::write(image, epoch as u32, squashfs::Compression::Zstd, &mut f)?;
        f.flush()?;
    }
    // The disk's initramfs holds only init and the kernel modules: init
    // loads them, mounts slot A's squashfs (found by partition name) and
    // switches to it, so the root is the verified read-only slot.
    let initrd = opts.output.join(artifact::boot_initrd(name));
    let mut boot = crate::assemble::boot_initramfs(image)?;
    // init is dynamically linked: its loader and libraries come along.
    elf::close(&mut boot, staging)?;
    write_zstd_cpio(&boot, epoch, &initrd)?;

    let sd_boot = [
        "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
        "lib/systemd/boot/efi/systemd-bootx64.efi",
    ]
    .iter()
    .find_map(|p| {
        match staging
            .resolve(Path::new(p))
            .and_then(|r| staging.get(&r).cloned())
        {
            Some(Entry::File { data, .. }) => Some(data),
            _ => None,
        }
    })
    .ok_or_else(|| {
        anyhow!("no systemd-bootx64.efi: add systemd-boot-efi to the profile's packages")
    })?;
    let files = esp_files(
        profile,
        &image_version(opts.image_version.as_deref())?,
        Slot::A,
        sd_boot.as_ref(),
        kernel,
        std::fs::read(&initrd)?,
    );
    progress.step("writing the EFI system partition (FAT32, systemd-boot)");
    let esp = work.path().join("esp.img");
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&esp)?;
        let seed = u32::from_be_bytes(
            Sha256::digest(format!("{}{}", profile.name, lock.release_sha256))[..4]
                .try_into()
                .unwrap_or([0; 4]),
        );
        fat::write_esp(
            &files,
            profile.disk.esp_mib << 20,
            layout::ESP_LABEL,
            seed,
            epoch,
            &mut f,
        )?;
    }
    progress.step("writing the GPT disk image");
    let disk = opts.output.join(artifact::disk(name));
    let seed = format!("{}:{}", profile.name, lock.release_sha256);
    gpt_disk::write_disk(
        &disk,
        profile.disk.size_mib << 20,
        &seed,
        &disk_partitions(&profile.disk, esp, root),
    )?;
    Ok(disk)
}

/// The ESP's files for booting `slot`: systemd-boot (at the firmware's
/// fallback path and its own), loader.conf, the slot's boot-counted entry,
/// and the slot's kernel and initramfs. Names and paths are the image
/// layout contract's ([`machine_api::layout`]).
fn esp_files(
    profile: &Profile,
    image_version: &str,
    slot: Slot,
    sd_boot: &[u8],
    kernel: &[u8],
    initrd: Vec<u8>,
) -> Vec<(String, Vec<u8>)> {
    let entry = format!(
        "title Kubernetes node OS {} (slot {slot})\nversion {}\nlinux /{}\ninitrd /{}\noptions {} {}\n",
        profile.name,
        image_version,
        slot.kernel_path(),
        slot.initrd_path(),
        profile.kernel.cmdline,
        slot.cmdline_arg(),
    );
    vec![
        (layout::EFI_FALLBACK_LOADER.into(), sd_boot.to_vec()),
        (layout::SYSTEMD_BOOT.into(), sd_boot.to_vec()),
        (
            layout::LOADER_CONF.into(),
            format!("timeout 0\ndefault {}\neditor no\n", layout::LOADER_DEFAULT).into_bytes(),
        ),
        // "+3": systemd-boot counts down tries on each boot; machined
        // renames the entry to `slot-a.conf` (good) once its API serves.
        // Should it never get there, the counter runs down to +0, which
        // systemd-boot still boots, last.
        (
            format!(
                "{}/{}",
                layout::ENTRIES_DIR,
                slot.counted_entry(layout::BOOT_TRIES)
            ),
            entry.into_bytes(),
        ),
        (slot.kernel_path(), kernel.to_vec()),
        (slot.initrd_path(), initrd),
    ]
}

/// The disk's partitions, in order: ESP (`esp`'s contents), slot A
/// (`root`), slot B (empty until the first upgrade), STATE, and EPHEMERAL
/// (the rest of the disk). Names and type GUIDs are the image layout
/// contract's ([`machine_api::layout`]).
fn disk_partitions(
    disk: &crate::profile::Disk,
    esp: PathBuf,
    root: PathBuf,
) -> Vec<gpt_disk::PartitionSpec> {
    use gpt_disk::PartitionSpec;
    vec![
        PartitionSpec {
            name: layout::ESP_PARTITION.into(),
            type_guid: gpt_disk::ESP,
            size_bytes: disk.esp_mib << 20,
            contents: Some(esp),
        },
        PartitionSpec {
            name: Slot::A.partition().into(),
            type_guid: gpt_disk::LINUX_ROOT_X86_64,
            size_bytes: disk.slot_mib << 20,
            contents: Some(root),
        },
        PartitionSpec {
            name: Slot::B.partition().into(),
            type_guid: gpt_disk::LINUX_ROOT_X86_64,
            size_bytes: disk.slot_mib << 20,
            contents: None,
        },
        PartitionSpec {
            name: layout::STATE_PARTITION.into(),
            type_guid: gpt_disk::LINUX_DATA,
            size_bytes: disk.state_mib << 20,
            contents: None,
        },
        PartitionSpec {
            name: layout::EPHEMERAL_PARTITION.into(),
            type_guid: gpt_disk::LINUX_DATA,
            size_bytes: 0,
            contents: None,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The disk imager writes is the one init and machined look for: the
    /// partitions, ESP paths, boot entry and `slot=` of
    /// [`machine_api::layout`] (whose own test pins the values).
    #[test]
    fn the_disk_follows_the_image_layout_contract() {
        let d = tempfile::tempdir().unwrap();
        let (esp, root) = (d.path().join("esp.img"), d.path().join("root.img"));
        std::fs::write(&esp, b"esp").unwrap();
        std::fs::write(&root, b"root").unwrap();
        let small = crate::profile::Disk {
            size_mib: 64,
            esp_mib: 8,
            slot_mib: 8,
            state_mib: 8,
        };
        let disk = d.path().join("disk.raw");
        let specs = disk_partitions(&small, esp, root);
        gpt_disk::write_disk(&disk, small.size_mib << 20, "seed", &specs).unwrap();
        let parts: Vec<(String, u128)> = gpt_disk::list(&disk)
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.type_guid.as_u128()))
            .collect();
        use layout::type_guid::{ESP, LINUX_DATA, ROOT_X86_64};
        assert_eq!(
            parts,
            [
                (layout::ESP_PARTITION.to_owned(), ESP),
                (Slot::A.partition().to_owned(), ROOT_X86_64),
                (Slot::B.partition().to_owned(), ROOT_X86_64),
                (layout::STATE_PARTITION.to_owned(), LINUX_DATA),
                (layout::EPHEMERAL_PARTITION.to_owned(), LINUX_DATA),
            ]
        );
        // EPHEMERAL is last and takes the rest: machined grows it.
        assert_eq!(specs.last().unwrap().size_bytes, 0);

        let profile_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/qemu.yaml");
        let (profile, _) = Profile::load(&profile_path).unwrap();
        let files = esp_files(
            &profile,
            "0.1.0",
            Slot::A,
            b"sd-boot",
            b"kernel",
            b"initrd".to_vec(),
        );
        let file = |path: &str| -> String {
            let (_, data) = files
                .iter()
                .find(|(p, _)| p == path)
                .unwrap_or_else(|| panic!("no {path} on the ESP"));
            String::from_utf8_lossy(data).into_owned()
        };
        assert_eq!(file(layout::EFI_FALLBACK_LOADER), "sd-boot");
        assert_eq!(file(&Slot::A.kernel_path()), "kernel");
        assert_eq!(file(&Slot::A.initrd_path()), "initrd");
        let entry_name = Slot::A.counted_entry(layout::BOOT_TRIES);
        let entry = file(&format!("{}/{entry_name}", layout::ENTRIES_DIR));
        assert!(
            entry.contains(&format!("\nlinux /{}\n", Slot::A.kernel_path())),
            "{entry}"
        );
        assert!(
            entry.contains(&format!("\ninitrd /{}\n", Slot::A.initrd_path())),
            "{entry}"
        );
        let options = entry
            .lines()
            .find_map(|l| l.strip_prefix("options "))
            .unwrap();
        assert!(
            options
                .split_whitespace()
                .any(|w| w == Slot::A.cmdline_arg()),
            "{entry}"
        );
        // systemd-boot's default pattern picks the entry, and machined can
        // take its counter off.
        let loader = file(layout::LOADER_CONF);
        let pattern = layout::LOADER_DEFAULT.strip_suffix('*').unwrap();
        assert!(
            loader.contains(&format!("default {}", layout::LOADER_DEFAULT)),
            "{loader}"
        );
        assert!(entry_name.starts_with(pattern));
        assert!(Slot::A.is_counted_entry(&entry_name));
        assert_eq!(
            layout::entry_without_counter(&entry_name),
            Some(Slot::A.good_entry())
        );
    }

    #[test]
    fn sparse_hash_equals_plain_hash() {
        use std::io::{Seek, SeekFrom, Write};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        drop(f);
        let plain = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
        assert_eq!(sha256_file(&p).unwrap(), plain);
    }
}
