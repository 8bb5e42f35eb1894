//! The Kubernetes binaries of an image, and where they come from. In this
//! order:
//!
//! 1. `--kubernetes-dir DIR`: a directory holding the profile's
//!    `kubernetes.binaries` (for example `scripts/build-kubernetes.sh DIR`);
//! 2. `--kubernetes-tarball FILE|URL`: the official
//!    `kubernetes-server-linux-amd64.tar.gz`, pinned by the profile's
//!    `serverTarballSha512`;
//! 3. neither: the official tarball of the profile's release from
//!    `dl.k8s.io` when the profile pins its SHA-512 and the host answers
//!    (kept in imager's cache), else the source build
//!    (`scripts/build-kubernetes.sh`, found in the workspace or given with
//!    `--kubernetes-source`), else none: the image is built without them
//!    and the manifest's note says why.
//!
//! Whatever the source, binaries that state their release (the Go build
//! information linked into every Go binary, read without running it; the
//! build script's `BUILDINFO`) must state the profile's `version`, and
//! files listed in a directory's `SHA256SUMS` must match it.
//!
//! CoreDNS comes along when the source has it: a directory's `coredns`
//! (`scripts/build-kubernetes.sh --coredns DIR`, which the source build
//! runs), checked against its `SHA256SUMS`, `BUILDINFO.coredns` and Go
//! build information, which must state [`images::COREDNS_VERSION`], the
//! tag imager names its image with. The official tarball has none.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256, Sha512};

use machine_api::layout::images;

use crate::assemble::elf;
use crate::build::Progress;
use crate::profile::{Kubernetes, Profile};
use crate::tree::{Entry, Tree};

/// Where the binaries come from, as `imager build` was told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum KubeSource {
    /// The documented order (see the module docs).
    #[default]
    Auto,
    /// `--kubernetes-dir`.
    Dir(PathBuf),
    /// `--kubernetes-tarball`.
    Tarball(String),
    /// `--kubernetes-source DIR`: the source build of this `kubernetes/`
    /// module (the tarball is not tried).
    Source(PathBuf),
    /// `--no-kubernetes`.
    None,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestKubernetes {
    pub present: bool,
    /// The profile's `kubernetes.version`.
    pub version: Option<String>,
    /// `dir`, `tarball`, `official-tarball`, `source-build` or `none`.
    pub source: String,
    /// The directory, file or URL the binaries were read from.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub from: String,
    /// How the version was checked.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version_check: String,
    /// The build script's BUILDINFO (release, commit, date, toolchain,
    /// go.sum), when the binaries came with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_info: Option<String>,
    pub binaries: Vec<ManifestKubeBinary>,
    pub note: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestKubeBinary {
    pub path: String,
    pub sha256: String,
    /// The release the binary's Go build information states, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The CoreDNS binary that came with the Kubernetes binaries, checked.
#[derive(Debug, Clone)]
pub struct CoreDns {
    pub data: Vec<u8>,
    /// Where it was read from (`DIR/coredns`).
    pub from: String,
    /// How its version was checked.
    pub version_check: String,
}

/// What [`add`] put in, and the CoreDNS binary for its container image
/// (or why there is none).
#[derive(Debug)]
pub struct Added {
    pub manifest: ManifestKubernetes,
    pub coredns: std::result::Result<CoreDns, String>,
}

/// The official server tarball's address for a release.
pub fn official_url(version: &str) -> String {
    format!(
        "https://dl.k8s.io/v{}/kubernetes-server-linux-amd64.tar.gz",
        version.trim_start_matches('v')
    )
}

/// Puts the profile's Kubernetes binaries into `image`, from `source`.
pub fn add(
    image: &mut Tree,
    profile: &Profile,
    source: &KubeSource,
    work: &Path,
    progress: &Progress,
) -> Result<Added> {
    let Some(k) = &profile.kubernetes else {
        return Ok(absent(
            None,
            "the profile asks for no Kubernetes binaries".into(),
        ));
    };
    let got = match source {
        KubeSource::None => {
            return Ok(absent(
                Some(k),
                format!(
                    "Kubernetes {} binaries ABSENT: --no-kubernetes was given; this image can run etcd and containerd but not the Kubernetes roles",
                    k.version
                ),
            ))
        }
        KubeSource::Dir(dir) => from_dir(k, dir, "dir")?,
        KubeSource::Tarball(t) => {
            let sha = k.server_tarball_sha512.as_deref().ok_or_else(|| {
                anyhow!("--kubernetes-tarball needs kubernetes.serverTarballSha512 in the profile (from the release CHANGELOG)")
            })?;
            Got {
                binaries: kubernetes_from_tarball(t, sha, &k.binaries)?,
                source: "tarball",
                from: t.clone(),
                stated: Vec::new(),
                build_info: None,
                coredns: Err("the official server tarball has no CoreDNS".into()),
            }
        }
        KubeSource::Source(module) => {
            let script = script_for_module(module)?;
            match source_build(k, &script, work, progress) {
                Ok(g) => g,
                Err(SourceBuildError::Refused(e)) => return Err(e),
                Err(SourceBuildError::NotPossible(why)) => {
                    bail!("--kubernetes-source {}: {why}", module.display())
                }
            }
        }
        KubeSource::Auto => match auto(k, work, progress)? {
            Ok(g) => g,
            Err(why) => {
                return Ok(absent(
                    Some(k),
                    format!(
                        "Kubernetes {} binaries ABSENT: {why}; this image can run etcd and containerd but not the Kubernetes roles",
                        k.version
                    ),
                ))
            }
        },
    };
    let want = format!("v{}", k.version.trim_start_matches('v'));
    let mut files = Vec::new();
    let mut stated_by_binaries = 0;
    for (b, data) in got.binaries {
        if elf::needs(&data).is_none() {
            bail!("{}: {b} is not an ELF executable", got.from);
        }
        let version = go_modinfo(&data).and_then(|m| kubernetes_version(&m));
        if let Some(v) = &version {
            if *v != want {
                bail!(
                    "{}: {b} is Kubernetes {v} (its Go build information says so), but the profile's kubernetes.version is {}: refusing it (use binaries of {want}, or a profile for {v})",
                    got.from,
                    k.version
                );
            }
            stated_by_binaries += 1;
        }
        files.push(ManifestKubeBinary {
            path: format!("/usr/bin/{b}"),
            sha256: hex::encode(Sha256::digest(&data)),
            version,
        });
        image.insert(&Path::new("usr/bin").join(&b), Entry::file(0o755, data))?;
    }
    let mut checks = got.stated;
    if stated_by_binaries > 0 {
        checks.insert(
            0,
            format!(
                "{want} stated by the Go build information of {stated_by_binaries} of {} binaries",
                files.len()
            ),
        );
    }
    let version_check = if checks.is_empty() {
        if got.source == "tarball" || got.source == "official-tarball" {
            "the tarball's SHA-512 is the release's (profile's serverTarballSha512); the binaries state no version in their build information".into()
        } else {
            format!(
                "not checked: the binaries and {} state no version",
                got.from
            )
        }
    } else {
        checks.join("; ")
    };
    let note = format!(
        "Kubernetes {want} from {} ({})",
        match got.source {
            "dir" => "--kubernetes-dir",
            "tarball" => "--kubernetes-tarball",
            "official-tarball" => "the official server tarball",
            _ => "the source build",
        },
        got.from
    );
    Ok(Added {
        manifest: ManifestKubernetes {
            present: true,
            version: Some(k.version.clone()),
            source: got.source.into(),
            from: got.from,
            version_check,
            build_info: got.build_info,
            binaries: files,
            note,
        },
        coredns: got.coredns,
    })
}

fn absent(k: Option<&Kubernetes>, note: String) -> Added {
    Added {
        manifest: ManifestKubernetes {
            present: false,
            version: k.map(|k| k.version.clone()),
            source: "none".into(),
            from: String::new(),
            version_check: String::new(),
            build_info: None,
            binaries: vec![],
            note,
        },
        coredns: Err("the image has no Kubernetes binaries".into()),
    }
}

/// Binaries read, before the common checks.
struct Got {
    binaries: Vec<(String, Vec<u8>)>,
    source: &'static str,
    from: String,
    /// Version statements already checked (BUILDINFO, SHA256SUMS).
    stated: Vec<String>,
    /// The main lines of the build script's BUILDINFO.
    build_info: Option<String>,
    /// CoreDNS, when the source has it (else why not).
    coredns: std::result::Result<CoreDns, String>,
}

/// The documented order without flags. Ok(Err(why)) when no source is
/// possible.
fn auto(
    k: &Kubernetes,
    work: &Path,
    progress: &Progress,
) -> Result<std::result::Result<Got, String>> {
    let mut tried = Vec::new();
    if let Some(sha) = &k.server_tarball_sha512 {
        let url = official_url(&k.version);
        match official_tarball(&url, sha, progress) {
            Ok(bytes) => {
                progress.step(format!("Kubernetes {}: the official tarball", k.version));
                return Ok(Ok(Got {
                    binaries: binaries_of_tarball(&bytes, &url, &k.binaries)?,
                    source: "official-tarball",
                    from: url,
                    stated: Vec::new(),
                    build_info: None,
                    coredns: Err("the official server tarball has no CoreDNS".into()),
                }));
            }
            Err(OfficialError::Refused(e)) => return Err(e),
            Err(OfficialError::Unreachable(why)) => {
                progress.step(format!(
                    "Kubernetes {}: the official tarball is not reachable ({why}); trying the source build",
                    k.version
                ));
                tried.push(format!("{url} is not reachable ({why})"));
            }
        }
    } else {
        tried.push("the profile pins no serverTarballSha512 for the official tarball".into());
    }
    let Some(script) = find_script() else {
        tried.push("no scripts/build-kubernetes.sh and kubernetes/go.mod here for the source build (run imager in the workspace, or pass --kubernetes-dir, --kubernetes-tarball or --kubernetes-source)".into());
        return Ok(Err(tried.join("; ")));
    };
    match source_build(k, &script, work, progress) {
        Ok(g) => Ok(Ok(g)),
        Err(SourceBuildError::Refused(e)) => Err(e),
        Err(SourceBuildError::NotPossible(why)) => {
            tried.push(format!("the source build is not possible: {why}"));
            Ok(Err(tried.join("; ")))
        }
    }
}

enum OfficialError {
    /// Not there (no network, DNS, HTTP error): try the next source.
    Unreachable(String),
    /// There but wrong (SHA-512): refuse.
    Refused(anyhow::Error),
}

/// The official tarball: from imager's cache when verified there, else
/// downloaded (and cached). A host that does not answer a TCP connection
/// within 5 s counts as unreachable without waiting for HTTP timeouts.
fn official_tarball(
    url: &str,
    sha512: &str,
    progress: &Progress,
) -> std::result::Result<Vec<u8>, OfficialError> {
    let cache = crate::source::Cache::default_dir().join("kubernetes");
    let name = format!(
        "{}-{}",
        &sha512.trim().to_ascii_lowercase()[..16.min(sha512.trim().len())],
        url.rsplit('/').next().unwrap_or("server.tar.gz")
    );
    let cached = cache.join(&name);
    if let Ok(bytes) = std::fs::read(&cached) {
        if hex::encode(Sha512::digest(&bytes)).eq_ignore_ascii_case(sha512.trim()) {
            progress.step(format!(
                "official tarball from the cache ({})",
                cached.display()
            ));
            return Ok(bytes);
        }
        let _ = std::fs::remove_file(&cached);
    }
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| Some((u.host_str()?.to_owned(), u.port_or_known_default()?)))
        .ok_or_else(|| OfficialError::Unreachable(format!("{url}: not a URL")))?;
    reachable(&host.0, host.1).map_err(OfficialError::Unreachable)?;
    progress.step(format!("downloading {url}"));
    let bytes = crate::source::fetch(url).map_err(|e| OfficialError::Unreachable(e.to_string()))?;
    let got = hex::encode(Sha512::digest(&bytes));
    if !got.eq_ignore_ascii_case(sha512.trim()) {
        return Err(OfficialError::Refused(anyhow!(
            "{url}: sha512 {got} does not match kubernetes.serverTarballSha512 {sha512} in the profile: refusing it"
        )));
    }
    if std::fs::create_dir_all(&cache).is_ok() {
        let _ = machine_api::atomic::write_atomic(&cached, &bytes, 0o644);
    }
    Ok(bytes)
}

fn reachable(host: &str, port: u16) -> std::result::Result<(), String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .collect();
    let mut last = format!("{host}: no address");
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{host} ({a}): {e}"),
        }
    }
    Err(last)
}

/// `scripts/build-kubernetes.sh` beside a `kubernetes/` module directory.
fn script_for_module(module: &Path) -> Result<PathBuf> {
    if !module.join("go.mod").is_file() {
        bail!(
            "--kubernetes-source {}: no go.mod (give the workspace's kubernetes/ module)",
            module.display()
        );
    }
    let script = module.join("../scripts/build-kubernetes.sh");
    if !script.is_file() {
        bail!(
            "--kubernetes-source {}: no ../scripts/build-kubernetes.sh beside it",
            module.display()
        );
    }
    Ok(script)
}

/// The workspace's build script: above the current directory, else in the
/// source tree this imager was built from.
fn find_script() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok();
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    cwd.iter()
        .flat_map(|c| c.ancestors().map(Path::to_path_buf))
        .chain(std::iter::once(built_from))
        .find(|d| {
            d.join("scripts/build-kubernetes.sh").is_file() && d.join("kubernetes/go.mod").is_file()
        })
        .map(|d| d.join("scripts/build-kubernetes.sh"))
}

enum SourceBuildError {
    /// No Go, no module proxy, a failed compile: the next source (none).
    NotPossible(String),
    /// Built, but not what the profile asks for.
    Refused(anyhow::Error),
}

/// `KUBE_VERSION` of the module's `release.env`.
fn release_env_version(script: &Path) -> Option<String> {
    let env = script.parent()?.join("../kubernetes/release.env");
    std::fs::read_to_string(env)
        .ok()?
        .lines()
        .find_map(|l| l.trim().strip_prefix("KUBE_VERSION="))
        .map(|v| v.trim().trim_matches('"').to_owned())
}

/// Runs the build script into a directory under `work` and reads it as
/// `--kubernetes-dir` would.
fn source_build(
    k: &Kubernetes,
    script: &Path,
    work: &Path,
    progress: &Progress,
) -> std::result::Result<Got, SourceBuildError> {
    let want = format!("v{}", k.version.trim_start_matches('v'));
    match release_env_version(script) {
        Some(v) if v != want => {
            return Err(SourceBuildError::NotPossible(format!(
                "{} builds {v}, the profile asks for {want}",
                script.display()
            )))
        }
        _ => {}
    }
    let out = work.join("kubernetes");
    let _ = std::fs::remove_dir_all(&out);
    progress.step(format!(
        "Kubernetes {want}: the source build ({}; a warm cache takes seconds, a cold build about 13 minutes on 2 cores)",
        script.display()
    ));
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .arg("--coredns")
        .arg(&out)
        .stdin(Stdio::null());
    let output = if progress.is_quiet() {
        cmd.output()
    } else {
        // The script's progress lines go to our stderr: stdout is the
        // outputs table.
        use std::os::fd::AsFd;
        match std::io::stderr().as_fd().try_clone_to_owned() {
            Ok(fd) => cmd
                .stdout(Stdio::from(fd))
                .stderr(Stdio::inherit())
                .output(),
            Err(e) => Err(e),
        }
    }
    .map_err(|e| SourceBuildError::NotPossible(format!("cannot run {}: {e}", script.display())))?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("see its output above");
        return Err(SourceBuildError::NotPossible(format!(
            "{} failed ({}): {last}",
            script.display(),
            output.status
        )));
    }
    let mut got = from_dir(k, &out, "source-build").map_err(SourceBuildError::Refused)?;
    got.from = script.display().to_string();
    Ok(got)
}

/// The profile's binaries from a directory, checked against its
/// `SHA256SUMS` and `BUILDINFO` when it has them.
fn from_dir(k: &Kubernetes, dir: &Path, source: &'static str) -> Result<Got> {
    let want = format!("v{}", k.version.trim_start_matches('v'));
    let mut stated = Vec::new();
    let mut build_info = None;
    if let Ok(info) = std::fs::read_to_string(dir.join("BUILDINFO")) {
        if let Some(v) = info.lines().find_map(|l| l.strip_prefix("version=")) {
            if v.trim() != want {
                bail!(
                    "{}: its BUILDINFO says Kubernetes {}, but the profile's kubernetes.version is {}: refusing it",
                    dir.display(),
                    v.trim(),
                    k.version
                );
            }
            stated.push(format!("{want} stated by its BUILDINFO"));
            build_info = Some(
                info.lines()
                    .filter(|l| {
                        ["version=", "gitCommit=", "buildDate=", "go=", "go.sum="]
                            .iter()
                            .any(|k| l.starts_with(k))
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
    }
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap_or_default();
    let listed = |b: &str| {
        sums.lines().find_map(|l| {
            let (sum, name) = l.split_once("  ")?;
            (name.trim() == b).then(|| sum.trim().to_ascii_lowercase())
        })
    };
    let mut v = Vec::new();
    let mut matched = 0;
    for b in &k.binaries {
        let p = dir.join(b);
        let data = std::fs::read(&p)
            .with_context(|| format!("--kubernetes-dir {}: missing {b}", dir.display()))?;
        if let Some(sum) = listed(b) {
            let got = hex::encode(Sha256::digest(&data));
            if got != sum {
                bail!(
                    "{}: {b} has sha256 {got}, its SHA256SUMS says {sum}: refusing it",
                    dir.display()
                );
            }
            matched += 1;
        }
        v.push((b.clone(), data));
    }
    if matched > 0 {
        stated.push(format!(
            "{matched} of {} binaries match its SHA256SUMS",
            k.binaries.len()
        ));
    }
    Ok(Got {
        binaries: v,
        source,
        from: dir.display().to_string(),
        stated,
        build_info,
        coredns: coredns_from_dir(dir, &listed)?,
    })
}

/// `DIR/coredns`, checked: its `SHA256SUMS` line, the `version=` of
/// `BUILDINFO.coredns` and its Go build information must agree with
/// [`images::COREDNS_VERSION`] (the image's tag), and at least one of the
/// last two must state it. Ok(Err(why)) when the directory has none.
fn coredns_from_dir(
    dir: &Path,
    listed: &dyn Fn(&str) -> Option<String>,
) -> Result<std::result::Result<CoreDns, String>> {
    let path = dir.join("coredns");
    let Ok(data) = std::fs::read(&path) else {
        return Ok(Err(format!(
            "{} has no coredns (scripts/build-kubernetes.sh --coredns DIR builds it)",
            dir.display()
        )));
    };
    let want = images::COREDNS_VERSION;
    let shown = path.display();
    let mut checks = Vec::new();
    match elf::needs(&data) {
        None => bail!("{shown} is not an ELF executable"),
        Some(n) if n.interpreter.is_some() || !n.libraries.is_empty() => {
            bail!("{shown} is dynamically linked ({n:?}); its image holds only the binary: build it static (CGO_ENABLED=0, as scripts/build-kubernetes.sh does)")
        }
        Some(_) => {}
    }
    if let Some(sum) = listed("coredns") {
        let got = hex::encode(Sha256::digest(&data));
        if got != sum {
            bail!("{shown} has sha256 {got}, its SHA256SUMS says {sum}: refusing it");
        }
        checks.push("matches SHA256SUMS".to_owned());
    }
    let mut stated = false;
    if let Ok(info) = std::fs::read_to_string(dir.join("BUILDINFO.coredns")) {
        if let Some(v) = info.lines().find_map(|l| l.strip_prefix("version=")) {
            if v.trim() != want {
                bail!("{}: BUILDINFO.coredns says CoreDNS {}, but imager names its image {}: refusing it (build CoreDNS {want})", dir.display(), v.trim(), images::COREDNS);
            }
            stated = true;
            checks.push(format!("{want} stated by BUILDINFO.coredns"));
        }
    }
    if let Some(v) =
        go_modinfo(&data).and_then(|m| go_module_version(&m, "github.com/coredns/coredns"))
    {
        if v != want {
            bail!("{shown} is CoreDNS {v} (its Go build information says so), but imager names its image {}: refusing it (build CoreDNS {want})", images::COREDNS);
        }
        stated = true;
        checks.push(format!("{want} stated by its Go build information"));
    }
    if !stated {
        bail!("{shown} states no CoreDNS version (no BUILDINFO.coredns, no Go build information): cannot name its image {}", images::COREDNS);
    }
    Ok(Ok(CoreDns {
        data,
        from: shown.to_string(),
        version_check: checks.join("; "),
    }))
}

/// The binaries of the official server tarball, after checking it against
/// the sha512 the profile pins (the one published in the release CHANGELOG).
pub fn kubernetes_from_tarball(
    tarball: &str,
    sha512: &str,
    wanted: &[String],
) -> Result<Vec<(String, Vec<u8>)>> {
    let bytes = if tarball.starts_with("http://") || tarball.starts_with("https://") {
        crate::source::fetch(tarball).with_context(|| format!("downloading {tarball}"))?
    } else {
        std::fs::read(tarball).with_context(|| format!("reading {tarball}"))?
    };
    let got = hex::encode(Sha512::digest(&bytes));
    if !got.eq_ignore_ascii_case(sha512.trim()) {
        bail!(
            "{tarball}: sha512 {got} does not match kubernetes.serverTarballSha512 {sha512} in the profile: refusing it"
        );
    }
    binaries_of_tarball(&bytes, tarball, wanted)
}

fn binaries_of_tarball(
    bytes: &[u8],
    tarball: &str,
    wanted: &[String],
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut found: Vec<(String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    for entry in archive.entries().context("reading the server tarball")? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if let Some(name) = path.strip_prefix("kubernetes/server/bin/") {
            if wanted.iter().any(|w| w == name) {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut data)?;
                found.push((name.to_owned(), data));
            }
        }
    }
    for w in wanted {
        if !found.iter().any(|(n, _)| n == w) {
            bail!("{tarball}: no kubernetes/server/bin/{w} in the tarball");
        }
    }
    found.sort();
    Ok(found)
}

// ------------------------------------------------ Go build information

const BUILDINFO_MAGIC: &[u8] = b"\xff Go buildinf:";
/// What `cmd/go` puts around the module information.
const MODINFO_START: usize = 16;
const MODINFO_END: usize = 16;

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut x = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        x |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((x, i + 1));
        }
    }
    None
}

fn var_string(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (n, used) = uvarint(b)?;
    let n = usize::try_from(n).ok()?;
    let s = b.get(used..used.checked_add(n)?)?;
    Some((s, &b[used + n..]))
}

/// The module information a Go binary carries (what `go version -m`
/// prints: `path`, `mod`, `dep`, `=>` and `build` lines), read from its
/// `.go.buildinfo` header without running it. Go 1.18 and later
/// (inline strings); None for anything else.
pub fn go_modinfo(data: &[u8]) -> Option<String> {
    let section = goblin::elf::Elf::parse(data).ok().and_then(|elf| {
        elf.section_headers
            .iter()
            .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".go.buildinfo"))
            .and_then(|s| usize::try_from(s.sh_offset).ok())
    });
    let start = match section {
        Some(o)
            if data
                .get(o..)
                .is_some_and(|d| d.starts_with(BUILDINFO_MAGIC)) =>
        {
            o
        }
        _ => data
            .windows(BUILDINFO_MAGIC.len())
            .position(|w| w == BUILDINFO_MAGIC)?,
    };
    let header = data.get(start..start + 32)?;
    if header[15] & 2 == 0 {
        return None;
    }
    let (_go_version, rest) = var_string(&data[start + 32..])?;
    let (modinfo, _) = var_string(rest)?;
    if modinfo.len() < MODINFO_START + MODINFO_END + 1
        || modinfo[modinfo.len() - MODINFO_END - 1] != b'\n'
    {
        return None;
    }
    Some(String::from_utf8_lossy(&modinfo[MODINFO_START..modinfo.len() - MODINFO_END]).into_owned())
}

/// The Kubernetes release a binary's module information states: the
/// version stamp in its recorded `-ldflags` (builds without `-trimpath`),
/// else the version of the `k8s.io/kubernetes` module it was built from.
/// None when it states neither (a build inside the kubernetes repository
/// with `-trimpath` says `(devel)`).
pub fn kubernetes_version(modinfo: &str) -> Option<String> {
    const STAMP: &str = "k8s.io/component-base/version.gitVersion=";
    for line in modinfo.lines() {
        if let Some(flags) = line.strip_prefix("build\t-ldflags=") {
            if let Some(i) = flags.find(STAMP) {
                let v: String = flags[i + STAMP.len()..]
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '\'')
                    .collect();
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
    }
    go_module_version(modinfo, "k8s.io/kubernetes")
}

/// The version of `module` a binary was built from (its `mod` or `dep`
/// line; a replacement on the next line wins). None for `(devel)`.
pub fn go_module_version(modinfo: &str, module: &str) -> Option<String> {
    let lines: Vec<&str> = modinfo.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() >= 3 && (f[0] == "mod" || f[0] == "dep") && f[1] == module {
            // A replacement (`=>` on the next line) is what was built.
            let version = match lines.get(i + 1).map(|l| l.split('\t').collect::<Vec<_>>()) {
                Some(r) if r.first() == Some(&"=>") => r.get(2).copied().unwrap_or("(devel)"),
                _ => f[2],
            };
            if version.starts_with('v') {
                return Some(version.to_owned());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `.go.buildinfo` blob: magic, pointer size, flags (inline
    /// strings), padding, then the Go version and the module info.
    fn blob(modinfo: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"junk before the header..");
        b.extend_from_slice(BUILDINFO_MAGIC);
        b.push(8);
        b.push(2);
        b.extend_from_slice(&[0; 16]);
        let go = b"go1.26.8";
        b.push(go.len() as u8);
        b.extend_from_slice(go);
        let mut info = vec![b'0'; MODINFO_START];
        info.extend_from_slice(modinfo.as_bytes());
        info.push(b'\n');
        info.extend_from_slice(&[b'1'; MODINFO_END]);
        // uvarint of the length
        let mut n = info.len();
        while n >= 0x80 {
            b.push((n as u8) | 0x80);
            n >>= 7;
        }
        b.push(n as u8);
        b.extend_from_slice(&info);
        b
    }

    #[test]
    fn module_builds_state_their_release() {
        let info = "path\tk8s.io/kubernetes/cmd/kube-apiserver\nmod\tk8s.io/kubernetes\tv1.35.4\th1:x=\ndep\tk8s.io/component-base\tv0.35.4\n=>\tk8s.io/component-base\tv0.35.4\th1:y=";
        let got = go_modinfo(&blob(info)).unwrap();
        assert!(
            got.starts_with("path\tk8s.io/kubernetes/cmd/kube-apiserver"),
            "{got}"
        );
        assert_eq!(kubernetes_version(&got).as_deref(), Some("v1.35.4"));
    }

    #[test]
    fn in_tree_builds_state_it_in_ldflags_or_not_at_all() {
        let devel = "path\tk8s.io/kubernetes/cmd/kubelet\nmod\tk8s.io/kubernetes\t(devel)\t\nbuild\t-trimpath=true";
        assert_eq!(kubernetes_version(devel), None);
        let stamped = "path\tk8s.io/kubernetes/cmd/kubelet\nmod\tk8s.io/kubernetes\t(devel)\t\nbuild\t-ldflags=\"-s -w -X 'k8s.io/component-base/version.gitVersion=v1.35.0' -X k8s.io/component-base/version.gitMajor=1\"";
        assert_eq!(kubernetes_version(stamped).as_deref(), Some("v1.35.0"));
        assert_eq!(go_modinfo(b"\x7fELF not go at all"), None);
    }

    /// The real thing, when the build script's output is at hand
    /// (scripts/test.sh exports KUBE_BIN_DIR).
    #[test]
    fn the_source_builds_binaries_state_v1_35_4() {
        let Some(dir) = std::env::var_os("KUBE_BIN_DIR").map(PathBuf::from) else {
            return;
        };
        let Ok(data) = std::fs::read(dir.join("kube-scheduler")) else {
            return;
        };
        let info = go_modinfo(&data).expect("Go build information");
        let release = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../kubernetes/release.env"),
        )
        .unwrap();
        let want = release
            .lines()
            .find_map(|l| l.strip_prefix("KUBE_VERSION="))
            .unwrap();
        assert_eq!(kubernetes_version(&info).as_deref(), Some(want));
    }

    fn kube(version: &str, binaries: &[&str]) -> Kubernetes {
        Kubernetes {
            version: version.into(),
            server_tarball_sha512: None,
            binaries: binaries.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_directory_must_agree_with_its_buildinfo_and_sums() {
        let d = tempfile::tempdir().unwrap();
        let elf = std::fs::read("/bin/true").unwrap();
        std::fs::write(d.path().join("kubectl"), &elf).unwrap();
        let sum = hex::encode(Sha256::digest(&elf));
        std::fs::write(d.path().join("SHA256SUMS"), format!("{sum}  kubectl\n")).unwrap();
        std::fs::write(d.path().join("BUILDINFO"), "version=v1.35.4\ngitCommit=x\n").unwrap();
        let got = from_dir(&kube("1.35.4", &["kubectl"]), d.path(), "dir").unwrap();
        assert_eq!(got.stated.len(), 2, "{:?}", got.stated);

        let e = from_dir(&kube("1.35.0", &["kubectl"]), d.path(), "dir")
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("BUILDINFO says Kubernetes v1.35.4"),
            "{e}"
        );

        std::fs::write(d.path().join("kubectl"), b"\x7fELF changed").unwrap();
        let e = from_dir(&kube("1.35.4", &["kubectl"]), d.path(), "dir")
            .err()
            .unwrap();
        assert!(e.to_string().contains("its SHA256SUMS says"), "{e}");
    }

    fn tarball(dir: &Path) -> (PathBuf, String) {
        let path = dir.join("kubernetes-server-linux-amd64.tar.gz");
        let f = std::fs::File::create(&path).unwrap();
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            f,
            flate2::Compression::fast(),
        ));
        let elf = std::fs::read("/bin/true").unwrap();
        for name in ["kubelet", "kube-proxy"] {
            let mut h = tar::Header::new_gnu();
            h.set_size(elf.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(
                &mut h,
                format!("kubernetes/server/bin/{name}"),
                elf.as_slice(),
            )
            .unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        let sha = hex::encode(Sha512::digest(std::fs::read(&path).unwrap()));
        (path, sha)
    }

    #[test]
    fn kubernetes_tarball_is_pinned_by_sha512() {
        let d = tempfile::tempdir().unwrap();
        let (path, sha) = tarball(d.path());
        let p = path.to_str().unwrap();
        let got = kubernetes_from_tarball(p, &sha, &["kubelet".into()]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "kubelet");
        let err = kubernetes_from_tarball(p, &"0".repeat(128), &["kubelet".into()]).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        let err = kubernetes_from_tarball(p, &sha, &["kube-apiserver".into()]).unwrap_err();
        assert!(
            err.to_string()
                .contains("no kubernetes/server/bin/kube-apiserver"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_profiles_pin_the_source_builds_release() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let release = std::fs::read_to_string(root.join("kubernetes/release.env")).unwrap();
        let want = release
            .lines()
            .find_map(|l| l.strip_prefix("KUBE_VERSION="))
            .unwrap();
        for p in ["profiles/qemu.yaml", "profiles/metal.yaml"] {
            let (profile, _) = Profile::load(&root.join(p)).unwrap();
            let k = profile.kubernetes.unwrap();
            assert_eq!(format!("v{}", k.version), want, "{p}");
            assert_eq!(k.server_tarball_sha512.map(|s| s.len()), Some(128), "{p}");
        }
    }
}
