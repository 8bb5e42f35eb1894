//! The pipeline: profile + lock → verified packages → unpacked tree →
//! assembled image → cpio / squashfs / ESP / GPT → outputs + manifest.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::assemble::{self, elf, modules};
use crate::format::{cpio, fat, gpt_disk, squashfs};
use crate::lock::{rfc2822_to_epoch, Lock, LockedPackage};
use crate::profile::{OutputKind, Profile};
use crate::source::{self, Cache, Mirror, PackageRecord};
use crate::tree::{Entry, Tree};

/// Prints steps: plain lines, so logs and terminals read the same.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Progress {
            start: Instant::now(),
            quiet,
        }
    }
    pub fn step(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!(
                "[{:>6.2}s] {}",
                self.start.elapsed().as_secs_f64(),
                msg.as_ref()
            );
        }
    }
}

pub fn mirror(override_uri: Option<&str>) -> Result<Mirror> {
    let mut m = Mirror::from_host().context("finding the package mirror (pass --mirror URI)")?;
    if let Some(uri) = override_uri {
        m.uri = uri.to_owned();
    }
    Ok(m)
}

/// `imager lock`: resolves the profile's packages in the signed index.
pub fn lock(profile_path: &Path, mirror_uri: Option<&str>, progress: &Progress) -> Result<Lock> {
    let (profile, _) = Profile::load(profile_path)?;
    let m = mirror(mirror_uri)?;
    let cache = Cache::new(Cache::default_dir());
    progress.step(format!(
        "fetching and verifying InRelease of {}",
        profile.source.suite
    ));
    let release = source::fetch_release(&m, &profile.source.suite)?;
    let mut index = Vec::new();
    for c in &profile.source.components {
        progress.step(format!(
            "fetching {c}/binary-{} index",
            profile.source.architecture
        ));
        index.extend(source::fetch_index(
            &m,
            &release,
            c,
            &profile.source.architecture,
            &cache,
        )?);
    }
    let recs = source::resolve(&index, &profile.packages, true, &profile.skip_depends)?;
    progress.step(format!("resolved {} packages", recs.len()));
    Ok(Lock {
        profile: profile.name.clone(),
        profile_inputs_sha256: profile.inputs_hash(),
        suite: profile.source.suite.clone(),
        release_date: release.date.clone(),
        release_sha256: release.sha256.clone(),
        packages: recs
            .into_iter()
            .map(|r| LockedPackage {
                name: r.name,
                version: r.version,
                architecture: r.architecture,
                filename: r.filename,
                sha256: r.sha256,
                size: r.size,
            })
            .collect(),
    })
}

/// What `imager build` is told.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub profile: PathBuf,
    pub output: PathBuf,
    pub mirror: Option<String>,
    pub machined: PathBuf,
    pub init: PathBuf,
    pub kubernetes_dir: Option<PathBuf>,
    pub source_date_epoch: Option<u64>,
    pub jobs: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub profile: ManifestProfile,
    pub source_date_epoch: u64,
    pub imager_version: String,
    pub suite: String,
    pub release_sha256: String,
    pub inputs: Vec<ManifestInput>,
    pub our_binaries: Vec<ManifestFile>,
    pub kubernetes: ManifestKubernetes,
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
pub struct ManifestKubernetes {
    pub present: bool,
    pub version: Option<String>,
    pub binaries: Vec<ManifestFile>,
    pub note: String,
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

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn record(p: &LockedPackage) -> PackageRecord {
    PackageRecord {
        name: p.name.clone(),
        version: p.version.clone(),
        architecture: p.architecture.clone(),
        filename: p.filename.clone(),
        sha256: p.sha256.clone(),
        size: p.size,
        depends: Vec::new(),
        pre_depends: Vec::new(),
        provides: Vec::new(),
        source: String::new(),
    }
}

/// Unpacks every .deb (in parallel), then merges the trees in lock order so
/// a file shipped twice resolves the same way every build.
fn unpack_all(debs: &[PathBuf], jobs: usize) -> Result<Tree> {
    let jobs = jobs.max(1);
    let chunks: Vec<Vec<(usize, PathBuf)>> = (0..jobs)
        .map(|j| {
            debs.iter()
                .enumerate()
                .filter(|(i, _)| i % jobs == j)
                .map(|(i, p)| (i, p.clone()))
                .collect()
        })
        .collect();
    let results: Vec<Result<Vec<(usize, Tree)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|(i, p)| {
                            let mut t = Tree::new();
                            source::unpack_deb(&p, &mut t)
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
    for (_, t) in trees {
        for (p, e) in t.iter() {
            staging.insert(p, e.clone())?;
        }
    }
    Ok(staging)
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

/// `imager build`.
pub fn build(opts: &BuildOptions, progress: &Progress) -> Result<Manifest> {
    let (profile, profile_text) = Profile::load(&opts.profile)?;
    let lock_path = Lock::path_for(&opts.profile);
    let lock = Lock::load(&lock_path, &opts.profile, &profile.inputs_hash())?;
    let epoch = opts
        .source_date_epoch
        .or_else(|| rfc2822_to_epoch(&lock.release_date))
        .ok_or_else(|| {
            anyhow!("no SOURCE_DATE_EPOCH and the lock's release date does not parse")
        })?;
    std::fs::create_dir_all(&opts.output)
        .with_context(|| format!("create {}", opts.output.display()))?;

    // 1. Inputs, verified against the lock.
    let m = mirror(opts.mirror.as_deref())?;
    let cache = Cache::new(Cache::default_dir());
    let recs: Vec<PackageRecord> = lock.packages.iter().map(record).collect();
    progress.step(format!(
        "fetching {} packages (verified by sha256 from the lock)",
        recs.len()
    ));
    let debs = source::fetch_debs(&m, &recs, &cache, opts.jobs.max(4))
        .context("an input no longer matches the lock (run `imager lock` to update it)")?;
    progress.step("unpacking");
    let mut staging = unpack_all(&debs, opts.jobs)?;
    assemble::usrmerge_links(&mut staging)?;

    // 2. The image tree.
    progress.step("assembling the image tree");
    let (kernel_version, kernel) = assemble::kernel(&staging, &profile)?;
    let mut image = assemble::filter(&staging, &profile)?;
    assemble::base_layout(&mut image, &profile, env!("CARGO_PKG_VERSION"))?;
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
    let kubernetes = add_kubernetes(&mut image, &profile, opts.kubernetes_dir.as_deref())?;
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
    let kernel_path = opts.output.join(format!("{name}-vmlinuz"));
    std::fs::write(&kernel_path, &kernel)?;
    outputs.push((kernel_path, "kernel"));
    if profile.outputs.contains(&OutputKind::Initramfs) {
        progress.step("writing initramfs (cpio newc, zstd)");
        let p = opts.output.join(format!("{name}-initramfs.cpio.zst"));
        write_zstd_cpio(&image, epoch, &p)?;
        outputs.push((p, "initramfs"));
    }
    if profile.outputs.contains(&OutputKind::Disk) {
        let disk = write_disk(
            opts, &profile, &lock, &staging, &image, &kernel, epoch, progress,
        )?;
        outputs.push((disk.clone(), "disk"));
        if profile.outputs.contains(&OutputKind::Compressed) {
            progress.step("compressing the disk (zstd)");
            let zpath = disk.with_extension("raw.zst");
            let mut enc = zstd::stream::write::Encoder::new(std::fs::File::create(&zpath)?, 3)?;
            enc.multithread(2)?;
            std::io::copy(&mut std::fs::File::open(&disk)?, &mut enc)?;
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
        our_binaries: vec![
            ManifestFile {
                path: "/usr/bin/machined".into(),
                sha256: sha256_file(&opts.machined)?,
            },
            ManifestFile {
                path: "/init".into(),
                sha256: sha256_file(&opts.init)?,
            },
        ],
        kubernetes,
        kernel: ManifestKernel {
            version: kernel_version,
            cmdline: profile.kernel.cmdline.clone(),
            modules: modules.iter().map(|m| modules::module_name(m)).collect(),
        },
        outputs: out,
    };
    let mpath = opts.output.join("manifest.json");
    machine_api::atomic::write_atomic(
        &mpath,
        (serde_json::to_string_pretty(&manifest)? + "\n").as_bytes(),
        0o644,
    )?;
    progress.step(format!("wrote {}", mpath.display()));
    Ok(manifest)
}

fn add_kubernetes(
    image: &mut Tree,
    profile: &Profile,
    dir: Option<&Path>,
) -> Result<ManifestKubernetes> {
    let Some(k) = &profile.kubernetes else {
        return Ok(ManifestKubernetes {
            present: false,
            version: None,
            binaries: vec![],
            note: "the profile asks for no Kubernetes binaries".into(),
        });
    };
    let Some(dir) = dir else {
        return Ok(ManifestKubernetes {
            present: false,
            version: Some(k.version.clone()),
            binaries: vec![],
            note: format!(
                "Kubernetes {} binaries ABSENT: no --kubernetes-dir was given (no package registry carries them); this image can run etcd and containerd but not the Kubernetes roles",
                k.version
            ),
        });
    };
    let mut files = Vec::new();
    for b in &k.binaries {
        let p = dir.join(b);
        let data = std::fs::read(&p)
            .with_context(|| format!("--kubernetes-dir {}: missing {b}", dir.display()))?;
        if elf::needs(&data).is_none() {
            bail!("{} is not an ELF executable", p.display());
        }
        files.push(ManifestFile {
            path: format!("/usr/bin/{b}"),
            sha256: hex::encode(Sha256::digest(&data)),
        });
        image.insert(&Path::new("usr/bin").join(b), Entry::file(0o755, data))?;
    }
    Ok(ManifestKubernetes {
        present: true,
        version: Some(k.version.clone()),
        binaries: files,
        note: format!("from {}", dir.display()),
    })
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
    let root = work.path().join("root.squashfs");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&root)?);
        squashfs::write(image, epoch as u32, squashfs::Compression::Zstd, &mut f)?;
        f.flush()?;
    }
    // The boot initramfs is the same tree for now: init finds everything in
    // it. Mounting slot A's squashfs as root is the init's next step.
    let initrd = work.path().join("initrd");
    write_zstd_cpio(image, epoch, &initrd)?;

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
    let entry = format!(
        "title Kubernetes node OS {} (slot A)\nversion {}\nlinux /A/vmlinuz\ninitrd /A/initrd\noptions {} slot=A\n",
        profile.name,
        env!("CARGO_PKG_VERSION"),
        profile.kernel.cmdline
    );
    let files: Vec<(String, Vec<u8>)> = vec![
        ("EFI/BOOT/BOOTX64.EFI".into(), sd_boot.as_ref().clone()),
        (
            "EFI/systemd/systemd-bootx64.efi".into(),
            sd_boot.as_ref().clone(),
        ),
        (
            "loader/loader.conf".into(),
            b"timeout 0\ndefault slot-*\neditor no\n".to_vec(),
        ),
        // "+3": systemd-boot counts down tries; machined marks the entry
        // good (renames it) once the node is healthy.
        ("loader/entries/slot-a+3.conf".into(), entry.into_bytes()),
        ("A/vmlinuz".into(), kernel.to_vec()),
        ("A/initrd".into(), std::fs::read(&initrd)?),
    ];
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
            "ESP",
            seed,
            epoch,
            &mut f,
        )?;
    }
    progress.step("writing the GPT disk image");
    let disk = opts.output.join(format!("{name}-disk.raw"));
    let seed = format!("{}:{}", profile.name, lock.release_sha256);
    use gpt_disk::PartitionSpec;
    gpt_disk::write_disk(
        &disk,
        profile.disk.size_mib << 20,
        &seed,
        &[
            PartitionSpec {
                name: "EFI".into(),
                type_guid: gpt_disk::ESP,
                size_bytes: profile.disk.esp_mib << 20,
                contents: Some(esp),
            },
            PartitionSpec {
                name: "A".into(),
                type_guid: gpt_disk::LINUX_ROOT_X86_64,
                size_bytes: profile.disk.slot_mib << 20,
                contents: Some(root),
            },
            PartitionSpec {
                name: "B".into(),
                type_guid: gpt_disk::LINUX_ROOT_X86_64,
                size_bytes: profile.disk.slot_mib << 20,
                contents: None,
            },
            PartitionSpec {
                name: "STATE".into(),
                type_guid: gpt_disk::LINUX_DATA,
                size_bytes: profile.disk.state_mib << 20,
                contents: None,
            },
            PartitionSpec {
                name: "EPHEMERAL".into(),
                type_guid: gpt_disk::LINUX_DATA,
                size_bytes: 0,
                contents: None,
            },
        ],
    )?;
    Ok(disk)
}
