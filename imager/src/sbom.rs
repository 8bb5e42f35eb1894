//! The software bill of materials of a node image, as CycloneDX 1.5 JSON.
//!
//! An immutable image is only as trustworthy as the account of what is in
//! it: which Debian packages (and which of their files), which Go modules
//! the Kubernetes binaries and CoreDNS link, which Rust crates machined is
//! built from, and which files imager itself wrote. A scanner (or a person)
//! answers "is this node affected?" from the SBOM without unpacking the
//! image. Every file of the image is listed under the component that
//! contributes it, so a file nobody claims cannot hide.
//!
//! The output is deterministic, like the image it describes: everything is
//! sorted, the timestamp is SOURCE_DATE_EPOCH, and the serial number is a
//! UUID derived from the SHA-256 of the document itself (written without
//! it), so the same input gives the same bytes.
//!
//! The document is built with the `cyclonedx-bom` crate (0.8, checked on
//! the crate mirror: it writes specs 1.3 to 1.5 from one model and adds
//! about ten crates to Cargo.lock). Its `Purl::new` takes no qualifiers and
//! escapes the slashes of a Go module path, so the package URLs are written
//! here ([`purl`]) and only checked by the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use cyclonedx_bom::external_models::uri::validate_purl;
use cyclonedx_bom::models::component::Classification;
use cyclonedx_bom::models::dependency::{Dependencies, Dependency};
use cyclonedx_bom::models::hash::{Hash, HashAlgorithm, HashValue, Hashes};
use cyclonedx_bom::models::property::{Properties, Property};
use cyclonedx_bom::models::tool::Tools;
use cyclonedx_bom::prelude::{
    Bom, Component, Components, DateTime, Metadata, NormalizedString, Purl, SpecVersion, UrnUuid,
    Validate,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A Debian package installed into the image.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DebPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// SHA-256 of the `.deb`, as the signed index gives it.
    pub sha256: String,
    /// The Debian suite it came from (`trixie`).
    pub suite: String,
    /// Path under the mirror (`pool/main/...`).
    pub filename: String,
}

/// A Go module linked into one or more binaries of the image.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoModule {
    pub path: String,
    /// `(devel)` for a main module built from a work tree.
    pub version: String,
    /// The go.sum hash (`h1:...`).
    pub sum: Option<String>,
    /// Image paths of the binaries that link it (`/usr/bin/kubelet`).
    pub used_by: Vec<String>,
    /// When this module is a `=>` replacement: the `path@version` it
    /// replaced.
    pub replaces: Option<String>,
    /// When the module was replaced by a directory (`=> ./staging/...`):
    /// that directory, which is what was built.
    pub source_dir: Option<String>,
}

/// A Rust crate machined is built from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RustCrate {
    pub name: String,
    pub version: String,
    /// Cargo.lock's `source` (none for workspace members).
    pub source: Option<String>,
    /// SHA-256 hex of the `.crate`, from Cargo.lock.
    pub checksum: Option<String>,
}

/// One of the binaries this project builds or pins (machined, init,
/// pause, the Kubernetes binaries, CoreDNS).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OurComponent {
    pub name: String,
    pub version: String,
    /// SHA-256 of the binary.
    pub sha256: String,
    pub description: String,
}

/// Which component contributed a file of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Index into [`SbomInput::debian`].
    Debian(usize),
    /// Index into [`SbomInput::ours`].
    Ours(usize),
    /// Written by imager itself: /etc files, directories, indexes.
    Imager,
}

/// A regular file of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFile {
    /// Absolute path in the image (`/usr/bin/etcd`).
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub origin: Origin,
}

/// Everything the SBOM of one image says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SbomInput {
    /// The profile name.
    pub image_name: String,
    pub imager_version: String,
    pub source_date_epoch: u64,
    pub debian: Vec<DebPackage>,
    pub go_modules: Vec<GoModule>,
    pub rust_crates: Vec<RustCrate>,
    pub ours: Vec<OurComponent>,
    pub files: Vec<ImageFile>,
}

/// The name of the component that holds the files imager generated.
pub const IMAGER_GENERATED: &str = "imager-generated";
/// The component of [`SbomInput::ours`] that depends on the Rust crates.
const RUST_COMPONENT: &str = "machined";
/// Prefix of this project's CycloneDX property names.
const PROPERTY_PREFIX: &str = "node-os:";

/// The SBOM as CycloneDX 1.5 JSON; the same input gives the same bytes.
pub fn cyclonedx_json(input: &SbomInput) -> Result<Vec<u8>> {
    let mut bom = build_bom(input)?;
    check(&bom)?;
    let unnumbered = to_json(bom.clone())?;
    bom.serial_number = Some(serial_number(&unnumbered));
    to_json(bom)
}

fn to_json(bom: Bom) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    bom.output_as_json_v1_5(&mut out)
        .context("writing the SBOM as CycloneDX 1.5 JSON")?;
    out.push(b'\n');
    Ok(out)
}

/// `urn:uuid:` of a UUID made of the first 16 bytes of the SHA-256 of
/// `content`, with the version (5: name-based) and variant bits set.
fn serial_number(content: &[u8]) -> UrnUuid {
    let digest = Sha256::digest(content);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    UrnUuid::from(uuid::Builder::from_sha1_bytes(bytes).into_uuid())
}

/// The crate's own validation (unique bom-refs, package URLs, dates).
fn check(bom: &Bom) -> Result<()> {
    let result = bom.validate_version(SpecVersion::V1_5);
    if result.has_errors() {
        let errors: Vec<String> = result
            .errors()
            .map(|(field, e)| format!("{field}: {e:?}"))
            .collect();
        bail!("the SBOM is not valid CycloneDX 1.5: {}", errors.join("; "));
    }
    Ok(())
}

fn build_bom(input: &SbomInput) -> Result<Bom> {
    let go_modules = merge_go_modules(input.go_modules.clone());
    let mut files = files_by_origin(input)?;
    let mut components = Vec::new();
    for i in sorted_indices(&input.debian) {
        let files = std::mem::take(&mut files.debian[i]);
        components.push(deb_component(&input.debian[i], files)?);
    }
    for i in sorted_indices(&input.ours) {
        let files = std::mem::take(&mut files.ours[i]);
        components.push(our_component(&input.ours[i], files)?);
    }
    components.push(imager_component(input, files.imager));
    for m in &go_modules {
        components.push(go_component(m)?);
    }
    let mut crates = input.rust_crates.clone();
    crates.sort();
    for c in &crates {
        components.push(crate_component(c)?);
    }
    let dependencies = dependencies(input, &go_modules, &components);
    Ok(Bom {
        version: 1,
        serial_number: None,
        metadata: Some(metadata(input)?),
        components: Some(Components(components)),
        dependencies: Some(dependencies),
        spec_version: SpecVersion::V1_5,
        ..Bom::default()
    })
}

/// Indices of `items` in their sorted order.
fn sorted_indices<T: Ord>(items: &[T]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[a].cmp(&items[b]));
    order
}

/// The file components of the image, grouped by origin, each group sorted
/// by path.
struct FilesByOrigin {
    debian: Vec<Vec<Component>>,
    ours: Vec<Vec<Component>>,
    imager: Vec<Component>,
}

fn files_by_origin(input: &SbomInput) -> Result<FilesByOrigin> {
    let mut by = FilesByOrigin {
        debian: vec![Vec::new(); input.debian.len()],
        ours: vec![Vec::new(); input.ours.len()],
        imager: Vec::new(),
    };
    let mut files: Vec<&ImageFile> = input.files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    for f in files {
        let group = match f.origin {
            Origin::Debian(i) => by.debian.get_mut(i),
            Origin::Ours(i) => by.ours.get_mut(i),
            Origin::Imager => Some(&mut by.imager),
        };
        let Some(group) = group else {
            bail!("{}: origin {:?} names no component", f.path, f.origin);
        };
        group.push(file_component(f)?);
    }
    Ok(by)
}

fn metadata(input: &SbomInput) -> Result<Metadata> {
    let epoch = i64::try_from(input.source_date_epoch).context("SOURCE_DATE_EPOCH")?;
    let timestamp = time::OffsetDateTime::from_unix_timestamp(epoch)
        .context("SOURCE_DATE_EPOCH")?
        .format(&time::format_description::well_known::Rfc3339)
        .context("formatting SOURCE_DATE_EPOCH")?;
    let imager = component(Classification::Application, "imager", None)
        .version(&input.imager_version)
        .description("Bakes bootable node images from a declarative profile and verified distribution packages.");
    let image = component(
        Classification::OperatingSystem,
        &input.image_name,
        Some(format!("image:{}", input.image_name)),
    )
    .description("Immutable Kubernetes node image")
    .properties(vec![(
        "source-date-epoch",
        input.source_date_epoch.to_string(),
    )]);
    Ok(Metadata {
        timestamp: Some(DateTime::try_from(timestamp).context("the SBOM timestamp")?),
        tools: Some(Tools::Object {
            services: None,
            components: Some(Components(vec![imager.0])),
        }),
        component: Some(image.0),
        ..Metadata::default()
    })
}

/// A [`Component`] under construction.
struct Built(Component);

fn component(kind: Classification, name: &str, bom_ref: Option<String>) -> Built {
    let mut c = Component::new(kind, name, "", bom_ref);
    c.version = None;
    Built(c)
}

impl Built {
    fn version(mut self, version: &str) -> Self {
        self.0.version = Some(NormalizedString::new(version));
        self
    }

    fn description(mut self, text: &str) -> Self {
        self.0.description = Some(NormalizedString::new(text));
        self
    }

    /// `node-os:NAME` properties, in the given order.
    fn properties<N: AsRef<str>>(mut self, props: Vec<(N, String)>) -> Self {
        if !props.is_empty() {
            let props = props
                .iter()
                .map(|(n, v)| Property::new(format!("{PROPERTY_PREFIX}{}", n.as_ref()), v))
                .collect();
            self.0.properties = Some(Properties(props));
        }
        self
    }

    fn sha256(mut self, hex: &str) -> Result<Self> {
        self.0.hashes = Some(Hashes(vec![sha256_hash(hex)?]));
        Ok(self)
    }

    fn purl(mut self, purl: String) -> Result<Self> {
        let purl = Purl::from_str(&purl).map_err(|()| anyhow::anyhow!("package URL {purl}"))?;
        // The crate's check is a parse with the `purl` crate.
        validate_purl(&purl).map_err(|e| anyhow::anyhow!("package URL {purl}: {e:?}"))?;
        self.0.purl = Some(purl);
        Ok(self)
    }

    fn children(mut self, children: Vec<Component>) -> Self {
        if !children.is_empty() {
            self.0.components = Some(Components(children));
        }
        self
    }
}

fn sha256_hash(hex: &str) -> Result<Hash> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{hex:?} is not a SHA-256 in hex");
    }
    Ok(Hash {
        alg: HashAlgorithm::SHA_256,
        content: HashValue(hex.to_ascii_lowercase()),
    })
}

fn file_component(f: &ImageFile) -> Result<Component> {
    Ok(component(
        Classification::File,
        &f.path,
        Some(format!("file:{}", f.path)),
    )
    .sha256(&f.sha256)
    .with_context(|| f.path.clone())?
    .properties(vec![("size", f.size.to_string())])
    .0)
}

fn deb_ref(p: &DebPackage) -> String {
    format!("deb:{}@{}", p.name, p.version)
}

fn deb_component(p: &DebPackage, files: Vec<Component>) -> Result<Component> {
    let what = || format!("Debian package {} {}", p.name, p.version);
    Ok(
        component(Classification::Library, &p.name, Some(deb_ref(p)))
            .version(&p.version)
            .purl(purl::deb(p))
            .with_context(what)?
            .sha256(&p.sha256)
            .with_context(what)?
            .properties(vec![
                ("suite", p.suite.clone()),
                ("pool-path", p.filename.clone()),
            ])
            .children(files)
            .0,
    )
}

fn our_ref(c: &OurComponent) -> String {
    format!("ours:{}@{}", c.name, c.version)
}

fn our_component(c: &OurComponent, files: Vec<Component>) -> Result<Component> {
    Ok(
        component(Classification::Application, &c.name, Some(our_ref(c)))
            .version(&c.version)
            .description(&c.description)
            .sha256(&c.sha256)
            .with_context(|| format!("{} {}", c.name, c.version))?
            .children(files)
            .0,
    )
}

fn imager_component(input: &SbomInput, files: Vec<Component>) -> Component {
    component(
        Classification::Data,
        IMAGER_GENERATED,
        Some(IMAGER_GENERATED.to_string()),
    )
    .version(&input.imager_version)
    .description("Files imager generated: /etc files, directories, indexes")
    .children(files)
    .0
}

fn go_ref(m: &GoModule) -> String {
    format!("go:{}@{}", m.path, m.version)
}

fn go_component(m: &GoModule) -> Result<Component> {
    let mut props: Vec<(&str, String)> = Vec::new();
    props.extend(m.sum.iter().map(|s| ("go-sum", s.clone())));
    props.extend(m.replaces.iter().map(|s| ("go-replaces", s.clone())));
    props.extend(m.source_dir.iter().map(|s| ("go-source-dir", s.clone())));
    props.extend(m.used_by.iter().map(|b| ("used-by", b.clone())));
    Ok(component(Classification::Library, &m.path, Some(go_ref(m)))
        .version(&m.version)
        .purl(purl::golang(m))
        .with_context(|| format!("Go module {} {}", m.path, m.version))?
        .properties(props)
        .0)
}

fn crate_ref(c: &RustCrate) -> String {
    format!("crate:{}@{}", c.name, c.version)
}

fn crate_component(c: &RustCrate) -> Result<Component> {
    let what = || format!("Rust crate {} {}", c.name, c.version);
    let mut built = component(Classification::Library, &c.name, Some(crate_ref(c)))
        .version(&c.version)
        .purl(purl::cargo(c))
        .with_context(what)?
        .properties(
            c.source
                .iter()
                .map(|s| ("cargo-source", s.clone()))
                .collect(),
        );
    if let Some(sum) = &c.checksum {
        built = built.sha256(sum).with_context(what)?;
    }
    Ok(built.0)
}

/// The image depends on every top-level component; machined on the Rust
/// crates; each of our binaries on the Go modules it links.
fn dependencies(input: &SbomInput, go_modules: &[GoModule], top: &[Component]) -> Dependencies {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, c) in input.ours.iter().enumerate() {
        let mut on: BTreeSet<String> = go_modules
            .iter()
            .filter(|m| m.used_by.iter().any(|b| links(input, i, b)))
            .map(go_ref)
            .collect();
        if c.name == RUST_COMPONENT {
            on.extend(input.rust_crates.iter().map(crate_ref));
        }
        if !on.is_empty() {
            graph.entry(our_ref(c)).or_default().extend(on);
        }
    }
    let image = Dependency {
        dependency_ref: format!("image:{}", input.image_name),
        dependencies: top
            .iter()
            .filter_map(|c| c.bom_ref.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let rest = graph.into_iter().map(|(r, on)| Dependency {
        dependency_ref: r,
        dependencies: on.into_iter().collect(),
    });
    Dependencies(std::iter::once(image).chain(rest).collect())
}

/// Whether `binary` (a Go module's `used_by` entry) is our component `i`:
/// one of its files, or a path whose file name is its name (CoreDNS is
/// `/coredns` inside its container image).
fn links(input: &SbomInput, i: usize, binary: &str) -> bool {
    let is_file = input
        .files
        .iter()
        .any(|f| f.origin == Origin::Ours(i) && f.path == binary);
    is_file
        || Path::new(binary)
            .file_name()
            .is_some_and(|n| n.to_str() == Some(input.ours[i].name.as_str()))
}

/// Package URLs (<https://github.com/package-url/purl-spec>).
pub mod purl {
    use super::{DebPackage, GoModule, RustCrate};

    /// Percent-encodes everything but the unreserved characters of RFC
    /// 3986 (`A-Z a-z 0-9 - . _ ~`): a Debian version's `+` and epoch
    /// `:` become `%2B` and `%3A`.
    pub fn encode(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// `pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=SUITE`.
    pub fn deb(p: &DebPackage) -> String {
        format!(
            "pkg:deb/debian/{}@{}?arch={}&distro={}",
            encode(&p.name),
            encode(&p.version),
            encode(&p.architecture),
            encode(&p.suite)
        )
    }

    /// `pkg:golang/PATH@VERSION`, each path segment encoded on its own;
    /// no version for a `(devel)` build, which names none.
    pub fn golang(m: &GoModule) -> String {
        let path: Vec<String> = m.path.split('/').map(encode).collect();
        let mut purl = format!("pkg:golang/{}", path.join("/"));
        if !m.version.is_empty() && m.version != "(devel)" {
            purl.push('@');
            purl.push_str(&encode(&m.version));
        }
        purl
    }

    /// `pkg:cargo/NAME@VERSION`.
    pub fn cargo(c: &RustCrate) -> String {
        format!("pkg:cargo/{}@{}", encode(&c.name), encode(&c.version))
    }
}

/// Go modules from a binary's module info (the text
/// [`crate::kubernetes::go_modinfo`] returns: lines `path\t...`,
/// `mod\t<path>\t<version>\t<h1>`, `dep\t<path>\t<version>\t<h1>`, and
/// `=>\t<replacement>\t<version>\t<h1>` after a replaced dep). A module
/// replacement is listed as the replacement (what was built), naming the
/// original in `replaces`; a directory replacement keeps the module and
/// names the directory in `source_dir`. `binary` is the image path
/// recorded in `used_by`.
pub fn go_modules_from_modinfo(modinfo: &str, binary: &str) -> Vec<GoModule> {
    let mut modules: Vec<GoModule> = Vec::new();
    let mut after_module = false;
    for line in modinfo.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["mod" | "dep", path, rest @ ..] => {
                modules.push(GoModule {
                    path: (*path).to_string(),
                    version: rest.first().unwrap_or(&"(devel)").to_string(),
                    sum: rest.get(1).filter(|s| !s.is_empty()).map(|s| s.to_string()),
                    used_by: vec![binary.to_string()],
                    ..GoModule::default()
                });
                after_module = true;
                continue;
            }
            ["=>", path, rest @ ..] if after_module => {
                if let Some(m) = modules.last_mut() {
                    replace(m, path, rest.first().copied(), rest.get(1).copied());
                }
            }
            _ => {}
        }
        after_module = false;
    }
    merge_go_modules(modules)
}

/// Applies a `=>` line to the module it follows.
fn replace(m: &mut GoModule, path: &str, version: Option<&str>, sum: Option<&str>) {
    // Go's rule (modfile.IsDirectoryPath): a local path, not a module.
    let directory = path.starts_with("./") || path.starts_with("../") || path.starts_with('/');
    if directory {
        m.source_dir = Some(path.to_string());
        m.sum = None;
        return;
    }
    m.replaces = Some(format!("{}@{}", m.path, m.version));
    m.path = path.to_string();
    m.version = version.unwrap_or("(devel)").to_string();
    m.sum = sum.filter(|s| !s.is_empty()).map(str::to_string);
}

/// Merge go modules of several binaries (same path+version → one entry,
/// `used_by` joined and sorted). Sorted by path, version.
pub fn merge_go_modules(mut all: Vec<GoModule>) -> Vec<GoModule> {
    all.sort();
    let mut merged: Vec<GoModule> = Vec::new();
    for m in all {
        match merged.last_mut() {
            Some(last) if last.path == m.path && last.version == m.version => {
                last.used_by.extend(m.used_by);
                last.sum = last.sum.take().or(m.sum);
                last.replaces = last.replaces.take().or(m.replaces);
                last.source_dir = last.source_dir.take().or(m.source_dir);
            }
            _ => merged.push(m),
        }
    }
    for m in &mut merged {
        m.used_by.sort();
        m.used_by.dedup();
    }
    merged
}

#[derive(Debug, Deserialize)]
struct CargoLock {
    #[serde(default)]
    package: Vec<LockedCrate>,
}

#[derive(Debug, Deserialize)]
struct LockedCrate {
    name: String,
    version: String,
    source: Option<String>,
    checksum: Option<String>,
    #[serde(default)]
    dependencies: Vec<String>,
}

/// The crates of `roots` (package names, e.g. `["machined"]`) and
/// everything they depend on, per the Cargo.lock text (its `[[package]]`
/// entries with `dependencies = [...]`; a dependency string is `name` or
/// `name version` or `name version (source)`). Sorted by name, version.
///
/// Cargo.lock does not tell build and dev dependencies, nor other
/// platforms' ones, from the rest, so the list is a superset of what is
/// linked.
pub fn rust_crates_from_cargo_lock(lock_text: &str, roots: &[&str]) -> Result<Vec<RustCrate>> {
    let lock: CargoLock = toml::from_str(lock_text).context("parsing Cargo.lock")?;
    let mut todo = Vec::new();
    for root in roots {
        todo.push(locked(&lock.package, root).context("a root of the SBOM's Rust crates")?);
    }
    let mut seen = BTreeSet::new();
    while let Some(i) = todo.pop() {
        if !seen.insert(i) {
            continue;
        }
        let p = &lock.package[i];
        for dep in &p.dependencies {
            todo.push(
                locked(&lock.package, dep)
                    .with_context(|| format!("a dependency of {} {}", p.name, p.version))?,
            );
        }
    }
    let mut crates: Vec<RustCrate> = seen
        .into_iter()
        .map(|i| {
            let p = &lock.package[i];
            RustCrate {
                name: p.name.clone(),
                version: p.version.clone(),
                source: p.source.clone(),
                checksum: p.checksum.clone(),
            }
        })
        .collect();
    crates.sort();
    Ok(crates)
}

/// The one package of Cargo.lock that `spec` (`name`, `name version` or
/// `name version (source)`) names.
fn locked(packages: &[LockedCrate], spec: &str) -> Result<usize> {
    let mut parts = spec.splitn(3, ' ');
    let name = parts.next().unwrap_or_default();
    let version = parts.next();
    let source = parts
        .next()
        .map(|s| s.trim_start_matches('(').trim_end_matches(')'));
    let found: Vec<usize> = packages
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            p.name == name
                && version.is_none_or(|v| p.version == v)
                && source.is_none_or(|s| p.source.as_deref() == Some(s))
        })
        .map(|(i, _)| i)
        .collect();
    match found.as_slice() {
        [i] => Ok(*i),
        [] => bail!("Cargo.lock has no package {spec:?}"),
        _ => bail!(
            "Cargo.lock has {} packages {spec:?}: name a version",
            found.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn input() -> SbomInput {
        SbomInput {
            image_name: "controlplane".into(),
            imager_version: "0.1.0".into(),
            source_date_epoch: 1_735_689_600,
            debian: vec![
                DebPackage {
                    name: "runc".into(),
                    version: "1.1.15+ds1-2".into(),
                    architecture: "amd64".into(),
                    sha256: hex('b'),
                    suite: "trixie".into(),
                    filename: "pool/main/r/runc/runc_1.1.15+ds1-2_amd64.deb".into(),
                },
                DebPackage {
                    name: "etcd-server".into(),
                    version: "3.5.16-4".into(),
                    architecture: "amd64".into(),
                    sha256: hex('a'),
                    suite: "trixie".into(),
                    filename: "pool/main/e/etcd/etcd-server_3.5.16-4_amd64.deb".into(),
                },
            ],
            go_modules: vec![
                GoModule {
                    path: "k8s.io/klog/v2".into(),
                    version: "v2.130.1".into(),
                    sum: Some("h1:n9Xl7H1Xvksem4KFG4PYbdQCQxqc/tTUyrgXaOhHSzE=".into()),
                    used_by: vec!["/usr/bin/kubelet".into()],
                    ..GoModule::default()
                },
                GoModule {
                    path: "k8s.io/klog/v2".into(),
                    version: "v2.130.1".into(),
                    sum: None,
                    used_by: vec!["/coredns".into()],
                    ..GoModule::default()
                },
            ],
            rust_crates: vec![RustCrate {
                name: "toml".into(),
                version: "1.2.2+spec-1.1.0".into(),
                source: Some("registry+https://example.invalid/index".into()),
                checksum: Some(hex('c')),
            }],
            ours: vec![
                OurComponent {
                    name: "machined".into(),
                    version: "0.1.0".into(),
                    sha256: hex('d'),
                    description: "the node agent".into(),
                },
                OurComponent {
                    name: "kubelet".into(),
                    version: "v1.33.1".into(),
                    sha256: hex('e'),
                    description: "the Kubernetes node agent".into(),
                },
                OurComponent {
                    name: "coredns".into(),
                    version: "v1.13.1".into(),
                    sha256: hex('f'),
                    description: "cluster DNS".into(),
                },
            ],
            files: vec![
                ImageFile {
                    path: "/usr/bin/kubelet".into(),
                    size: 10,
                    sha256: hex('e'),
                    origin: Origin::Ours(1),
                },
                ImageFile {
                    path: "/usr/bin/etcd".into(),
                    size: 20,
                    sha256: hex('1'),
                    origin: Origin::Debian(1),
                },
                ImageFile {
                    path: "/etc/os-release".into(),
                    size: 30,
                    sha256: hex('2'),
                    origin: Origin::Imager,
                },
            ],
        }
    }

    fn json(input: &SbomInput) -> serde_json::Value {
        serde_json::from_slice(&cyclonedx_json(input).unwrap()).unwrap()
    }

    fn component<'a>(doc: &'a serde_json::Value, bom_ref: &str) -> &'a serde_json::Value {
        doc["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["bom-ref"] == bom_ref)
            .unwrap_or_else(|| panic!("no component {bom_ref}"))
    }

    #[test]
    fn same_input_gives_same_bytes_whatever_the_order() {
        let a = cyclonedx_json(&input()).unwrap();
        assert_eq!(a, cyclonedx_json(&input()).unwrap());
        let mut shuffled = input();
        shuffled.files.reverse();
        shuffled.go_modules.reverse();
        // Swap the Debian packages and the origins that point at them.
        shuffled.debian.reverse();
        for f in &mut shuffled.files {
            if let Origin::Debian(i) = f.origin {
                f.origin = Origin::Debian(1 - i);
            }
        }
        assert_eq!(a, cyclonedx_json(&shuffled).unwrap());
        let mut other = input();
        other.source_date_epoch += 1;
        assert_ne!(a, cyclonedx_json(&other).unwrap());
    }

    #[test]
    fn header_is_cyclonedx_1_5_with_a_content_serial_number() {
        let doc = json(&input());
        assert_eq!(doc["bomFormat"], "CycloneDX");
        assert_eq!(doc["specVersion"], "1.5");
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["metadata"]["timestamp"], "2025-01-01T00:00:00Z");
        assert_eq!(doc["metadata"]["component"]["type"], "operating-system");
        assert_eq!(doc["metadata"]["component"]["name"], "controlplane");
        let tool = &doc["metadata"]["tools"]["components"][0];
        assert_eq!(
            (&tool["name"], &tool["version"]),
            (&"imager".into(), &"0.1.0".into())
        );
        let serial = doc["serialNumber"].as_str().unwrap();
        let uuid = uuid::Uuid::parse_str(serial.strip_prefix("urn:uuid:").unwrap()).unwrap();
        assert_eq!(uuid.get_version_num(), 5);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        let mut other = input();
        other.files[0].size += 1;
        assert_ne!(json(&other)["serialNumber"], doc["serialNumber"]);
    }

    #[test]
    fn files_nest_under_their_component() {
        let doc = json(&input());
        let etcd = component(&doc, "deb:etcd-server@3.5.16-4");
        assert_eq!(
            etcd["purl"],
            "pkg:deb/debian/etcd-server@3.5.16-4?arch=amd64&distro=trixie"
        );
        assert_eq!(etcd["hashes"][0]["alg"], "SHA-256");
        assert_eq!(etcd["components"][0]["bom-ref"], "file:/usr/bin/etcd");
        assert_eq!(etcd["components"][0]["type"], "file");
        assert_eq!(
            etcd["components"][0]["properties"][0]["name"],
            "node-os:size"
        );
        assert_eq!(etcd["components"][0]["properties"][0]["value"], "20");
        let generated = component(&doc, IMAGER_GENERATED);
        assert_eq!(generated["components"][0]["name"], "/etc/os-release");
        let kubelet = component(&doc, "ours:kubelet@v1.33.1");
        assert_eq!(kubelet["type"], "application");
        assert_eq!(kubelet["components"][0]["name"], "/usr/bin/kubelet");
    }

    #[test]
    fn dependencies_link_binaries_to_their_modules_and_crates() {
        let doc = json(&input());
        let deps = doc["dependencies"].as_array().unwrap();
        let on = |r: &str| -> Vec<String> {
            let d = deps.iter().find(|d| d["ref"] == r).unwrap();
            d["dependsOn"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(on("ours:kubelet@v1.33.1"), ["go:k8s.io/klog/v2@v2.130.1"]);
        assert_eq!(on("ours:coredns@v1.13.1"), ["go:k8s.io/klog/v2@v2.130.1"]);
        assert_eq!(on("ours:machined@0.1.0"), ["crate:toml@1.2.2+spec-1.1.0"]);
        let image = on("image:controlplane");
        assert!(image.contains(&"deb:runc@1.1.15+ds1-2".to_string()));
        assert!(image.contains(&IMAGER_GENERATED.to_string()));
        assert_eq!(image.len(), doc["components"].as_array().unwrap().len());
        let klog = component(&doc, "go:k8s.io/klog/v2@v2.130.1");
        assert_eq!(klog["purl"], "pkg:golang/k8s.io/klog/v2@v2.130.1");
        let toml = component(&doc, "crate:toml@1.2.2+spec-1.1.0");
        assert_eq!(toml["purl"], "pkg:cargo/toml@1.2.2%2Bspec-1.1.0");
    }

    #[test]
    fn refuses_a_bad_origin_or_hash() {
        let mut bad = input();
        bad.files[0].origin = Origin::Ours(9);
        assert!(cyclonedx_json(&bad).is_err());
        let mut bad = input();
        bad.debian[0].sha256 = "abc".into();
        assert!(cyclonedx_json(&bad).is_err());
    }

    #[test]
    fn debian_versions_are_percent_encoded() {
        let deb = |version: &str| DebPackage {
            name: "containerd".into(),
            version: version.into(),
            architecture: "amd64".into(),
            sha256: hex('a'),
            suite: "trixie".into(),
            filename: String::new(),
        };
        assert_eq!(
            purl::deb(&deb("1.7.24~ds1-6+deb13u1")),
            "pkg:deb/debian/containerd@1.7.24~ds1-6%2Bdeb13u1?arch=amd64&distro=trixie"
        );
        assert_eq!(
            purl::deb(&deb("1:2.3-4")),
            "pkg:deb/debian/containerd@1%3A2.3-4?arch=amd64&distro=trixie"
        );
        let mut i = input();
        i.debian[0] = deb("1:2.3-4+b1");
        let doc = json(&i);
        let c = component(&doc, "deb:containerd@1:2.3-4+b1");
        assert_eq!(c["version"], "1:2.3-4+b1");
        assert_eq!(
            c["purl"],
            "pkg:deb/debian/containerd@1%3A2.3-4%2Bb1?arch=amd64&distro=trixie"
        );
    }

    #[test]
    fn go_purls_keep_the_path_and_drop_devel() {
        let m = |path: &str, version: &str| GoModule {
            path: path.into(),
            version: version.into(),
            ..GoModule::default()
        };
        assert_eq!(
            purl::golang(&m("github.com/BurntSushi/toml", "v1.4.0+incompatible")),
            "pkg:golang/github.com/BurntSushi/toml@v1.4.0%2Bincompatible"
        );
        assert_eq!(
            purl::golang(&m("k8s.io/kubernetes", "(devel)")),
            "pkg:golang/k8s.io/kubernetes"
        );
    }

    const LOCK: &str = r#"
version = 4

[[package]]
name = "app"
version = "0.1.0"
dependencies = [
 "lib",
 "old 1.0.0",
]

[[package]]
name = "lib"
version = "2.0.0"
source = "registry+https://example.invalid/index"
checksum = "1111111111111111111111111111111111111111111111111111111111111111"
dependencies = [
 "old 2.0.0 (registry+https://example.invalid/index)",
]

[[package]]
name = "old"
version = "1.0.0"
source = "registry+https://example.invalid/index"

[[package]]
name = "old"
version = "2.0.0"
source = "registry+https://example.invalid/index"

[[package]]
name = "old"
version = "3.0.0"
source = "registry+https://example.invalid/index"

[[package]]
name = "unrelated"
version = "1.0.0"
"#;

    #[test]
    fn cargo_lock_closure_of_the_roots() {
        let crates = rust_crates_from_cargo_lock(LOCK, &["app"]).unwrap();
        let names: Vec<String> = crates
            .iter()
            .map(|c| format!("{} {}", c.name, c.version))
            .collect();
        assert_eq!(names, ["app 0.1.0", "lib 2.0.0", "old 1.0.0", "old 2.0.0"]);
        assert_eq!(crates[1].checksum.as_deref(), Some(&*"1".repeat(64)));
        assert_eq!(crates[0].source, None);
        assert!(rust_crates_from_cargo_lock(LOCK, &["missing"]).is_err());
        // "old" alone names three packages.
        assert!(rust_crates_from_cargo_lock(LOCK, &["old"]).is_err());
    }

    #[test]
    fn modinfo_with_a_replacement() {
        let modinfo = "path\tk8s.io/kubernetes/cmd/kubelet\n\
                       mod\tk8s.io/kubernetes\t(devel)\t\n\
                       dep\tgithub.com/a/b\tv1.0.0\th1:aaa=\n\
                       dep\tgithub.com/c/d\tv1.2.0\t\n\
                       =>\tgithub.com/fork/d\tv1.2.1\th1:fff=\n\
                       dep\tk8s.io/api\tv0.0.0\n\
                       =>\t./staging/src/k8s.io/api\n\
                       build\t-trimpath=true\n";
        let mods = go_modules_from_modinfo(modinfo, "/usr/bin/kubelet");
        let got: Vec<(&str, &str, Option<&str>)> = mods
            .iter()
            .map(|m| (m.path.as_str(), m.version.as_str(), m.sum.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("github.com/a/b", "v1.0.0", Some("h1:aaa=")),
                ("github.com/fork/d", "v1.2.1", Some("h1:fff=")),
                ("k8s.io/api", "v0.0.0", None),
                ("k8s.io/kubernetes", "(devel)", None),
            ]
        );
        assert_eq!(mods[1].replaces.as_deref(), Some("github.com/c/d@v1.2.0"));
        assert_eq!(
            mods[2].source_dir.as_deref(),
            Some("./staging/src/k8s.io/api")
        );
        assert!(mods.iter().all(|m| m.used_by == ["/usr/bin/kubelet"]));
    }

    #[test]
    fn merging_joins_used_by() {
        let m = |bin: &str| GoModule {
            path: "golang.org/x/sys".into(),
            version: "v0.30.0".into(),
            used_by: vec![bin.into()],
            ..GoModule::default()
        };
        let merged = merge_go_modules(vec![
            m("/usr/bin/kubelet"),
            m("/coredns"),
            m("/usr/bin/kubelet"),
        ]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].used_by, ["/coredns", "/usr/bin/kubelet"]);
    }
}
