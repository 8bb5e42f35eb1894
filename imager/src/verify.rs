//! `imager verify`: checks a build against its manifest, and with
//! `--rebuild` builds it again from the manifest's recorded inputs, so a
//! second party can confirm that an image is what its inputs make.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use machine_api::image_bundle;
use machine_api::image_signature::{self, TrustedKey};
use machine_api::layout::artifact;
use serde_json::Value;

use crate::build::{self, BuildOptions, OursProvenance, Progress};
use crate::kubernetes::KubeSource;
use crate::lock::Lock;

/// Reads `--key` files.
pub fn load_keys(paths: &[PathBuf]) -> Result<Vec<TrustedKey>> {
    paths
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("--key {}", p.display()))?;
            Ok(TrustedKey::from_pem(&text, &p.display().to_string())?)
        })
        .collect()
}

/// Without --rebuild: a manifest's outputs and signature, or a bundle.
pub fn check(path: &Path, keys: &[TrustedKey]) -> Result<()> {
    if path.extension().is_some_and(|e| e == "tar") {
        return check_bundle(path, keys);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let manifest = image_bundle::BundleManifest::parse(&bytes)
        .with_context(|| format!("{}", path.display()))?;
    let sig_path = dir.join(artifact::MANIFEST_SIGNATURE);
    let sig = std::fs::read(&sig_path).ok();
    match (keys.is_empty(), &sig) {
        (true, Some(_)) => println!("signature  present, not checked (give --key PUB)"),
        (true, None) => println!("signature  none (the build was not signed)"),
        (false, _) => {
            let id = image_signature::verify_manifest(&bytes, sig.as_deref(), keys)
                .map_err(|e| anyhow!("{}: signature check failed: {e}", path.display()))?;
            println!("signature  ok, by {id}");
        }
    }
    let mut bad = Vec::new();
    for o in &manifest.outputs {
        let p = dir.join(&o.path);
        let state = match std::fs::metadata(&p) {
            Err(e) => format!("MISSING ({e})"),
            Ok(md) if md.len() != o.size => {
                format!(
                    "SIZE DIFFERS ({} bytes, the manifest says {})",
                    md.len(),
                    o.size
                )
            }
            Ok(_) => match build::sha256_file(&p) {
                Ok(h) if h == o.sha256 => "ok".to_owned(),
                Ok(h) => format!("SHA256 DIFFERS ({h}, the manifest says {})", o.sha256),
                Err(e) => format!("UNREADABLE ({e:#})"),
            },
        };
        println!("{:<10} {:<28} {state}", o.kind, o.path);
        if state != "ok" {
            bad.push(o.path.clone());
        }
    }
    if !bad.is_empty() {
        bail!(
            "{} of {} outputs do not match {}: {}",
            bad.len(),
            manifest.outputs.len(),
            path.display(),
            bad.join(", ")
        );
    }
    println!(
        "verified: {} outputs match {}",
        manifest.outputs.len(),
        path.display()
    );
    Ok(())
}

fn check_bundle(path: &Path, keys: &[TrustedKey]) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
    let v = image_bundle::read(std::io::BufReader::new(f), keys, &mut |o, r| {
        let n = std::io::copy(r, &mut std::io::sink())?;
        println!("{:<10} {:<28} {n} bytes, sha256 checked", o.kind, o.path);
        Ok(())
    })
    .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    match (&v.signed_by, v.signed) {
        (Some(id), _) => println!("signature  ok, by {id}"),
        (None, true) => println!("signature  present, not checked (give --key PUB)"),
        (None, false) => println!("signature  none (the build was not signed)"),
    }
    println!(
        "verified: upgrade bundle of {} (manifest sha256 {})",
        v.manifest.profile.name, v.manifest_sha256
    );
    Ok(())
}

/// What `--rebuild` needs besides the manifest.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    pub output: Option<PathBuf>,
    pub profile: Option<PathBuf>,
    pub mirror: Option<String>,
    pub given: Option<(PathBuf, PathBuf, PathBuf)>,
    pub kubernetes_dir: Option<PathBuf>,
    pub embed_config: Option<PathBuf>,
    pub config_ca: Option<PathBuf>,
    pub jobs: usize,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// A file the rebuild needs, checked against the manifest's sha256.
fn matching_file(
    flag: &str,
    given: Option<&PathBuf>,
    want: Option<&str>,
) -> Result<Option<PathBuf>> {
    match (want, given) {
        (None, None) => Ok(None),
        (None, Some(_)) => bail!("{flag}: the manifest's build had none"),
        (Some(_), None) => bail!("the manifest's build had {flag}: give the same file"),
        (Some(w), Some(p)) => {
            let got = build::sha256_file(p)?;
            if got != w {
                bail!(
                    "{flag} {}: sha256 {got}, the manifest's was {w}",
                    p.display()
                );
            }
            Ok(Some(p.clone()))
        }
    }
}

/// `--rebuild`: the same build from the manifest's recorded inputs, then
/// a byte comparison of every output.
pub fn rebuild(manifest_path: &Path, o: &RebuildOptions, progress: &Progress) -> Result<()> {
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let text = std::fs::read(manifest_path)
        .with_context(|| format!("read {}", manifest_path.display()))?;
    let m: Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not JSON", manifest_path.display()))?;
    let recorded = image_bundle::BundleManifest::parse(&text)?;
    let name = recorded.profile.name.clone();
    let cwd = std::env::current_dir()?;
    let workspace = crate::our_binaries::workspace_root(&cwd);

    // The profile and the lock: the manifest pins both.
    let profile = match (&o.profile, &workspace) {
        (Some(p), _) => p.clone(),
        (None, Some(ws)) => ws.join("profiles").join(format!("{name}.yaml")),
        (None, None) => bail!("give --profile FILE (the profile {name:?} of the build)"),
    };
    let want_profile = str_at(&m, &["profile", "sha256"]).unwrap_or_default();
    let got_profile = build::sha256_file(&profile)?;
    if got_profile != want_profile {
        bail!(
            "profile {}: sha256 {got_profile}, the manifest's was {want_profile}: check out the commit that built it ({})",
            profile.display(),
            str_at(&m, &["ourBuild", "commit"]).unwrap_or("not recorded")
        );
    }
    check_lock_matches(&profile, &m)?;

    // Our binaries: the workspace's build, or the given files.
    let (machined, init, pause, ours) = match &o.given {
        Some((a, b, c)) => (
            a.clone(),
            b.clone(),
            c.clone(),
            OursProvenance {
                built_by: "given".into(),
                ..Default::default()
            },
        ),
        None => {
            if str_at(&m, &["ourBuild", "builtBy"]) == Some("given") {
                bail!("the manifest's build was given --machined, --init and --pause: give the same files");
            }
            crate::our_binaries::resolve(None, None, None, progress.is_quiet())?
        }
    };
    for (field, want) in [("rustc", "toolchain"), ("commit", "commit")] {
        let recorded = str_at(&m, &["ourBuild", field]);
        let now = match field {
            "rustc" => ours.rustc.as_deref(),
            _ => ours.commit.as_deref(),
        };
        if recorded.is_some() && recorded != now {
            eprintln!(
                "warning: the build's {want} was {}, this rebuild's is {}: the binaries will differ",
                recorded.unwrap_or("?"),
                now.unwrap_or("unknown")
            );
        }
    }

    let kubernetes = match str_at(&m, &["kubernetes", "source"]).unwrap_or("none") {
        "none" => KubeSource::None,
        "dir" => KubeSource::Dir(
            o.kubernetes_dir
                .clone()
                .or_else(|| str_at(&m, &["kubernetes", "from"]).map(PathBuf::from))
                .ok_or_else(|| anyhow!("the build took Kubernetes from a directory: give --kubernetes-dir"))?,
        ),
        "tarball" | "official-tarball" => KubeSource::Tarball(
            str_at(&m, &["kubernetes", "from"])
                .ok_or_else(|| anyhow!("the manifest does not say which tarball"))?
                .to_owned(),
        ),
        "source-build" => KubeSource::Source(
            workspace
                .as_ref()
                .map(|w| w.join("kubernetes"))
                .ok_or_else(|| anyhow!("the build built Kubernetes from source: run the rebuild inside the workspace"))?,
        ),
        other => bail!("the manifest's Kubernetes source {other:?} is not one this imager rebuilds"),
    };
    let embed_config = matching_file(
        "--embed-config",
        o.embed_config.as_ref(),
        str_at(&m, &["embeddedConfigSha256"]),
    )?;
    let config_ca = matching_file(
        "--config-ca",
        o.config_ca.as_ref(),
        str_at(&m, &["configCaSha256"]),
    )?;

    let tmp;
    let out_dir = match &o.output {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("imager-rebuild-")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let opts = BuildOptions {
        profile,
        output: out_dir.clone(),
        mirror: o.mirror.clone(),
        machined,
        init,
        pause,
        kubernetes,
        embed_config,
        config_ca,
        source_date_epoch: m.get("sourceDateEpoch").and_then(Value::as_u64),
        jobs: o.jobs,
        ours,
        image_version: str_at(&m, &["imageVersion"]).map(str::to_owned),
        sign: None,
    };
    progress.step(format!("rebuilding {name} into {}", out_dir.display()));
    let again = build::build(&opts, progress)?;
    let mut differ = Vec::new();
    for want in &recorded.outputs {
        match again.outputs.iter().find(|g| g.path == want.path) {
            Some(g) if g.sha256 == want.sha256 => {
                println!("{:<10} {:<28} identical", want.kind, want.path)
            }
            Some(g) => {
                println!(
                    "{:<10} {:<28} DIFFERS (rebuilt {}, recorded {})",
                    want.kind, want.path, g.sha256, want.sha256
                );
                differ.push(want.path.clone());
            }
            None => {
                println!("{:<10} {:<28} NOT REBUILT", want.kind, want.path);
                differ.push(want.path.clone());
            }
        }
    }
    if differ.is_empty() {
        println!(
            "reproduced: all {} outputs are byte-identical to {}",
            recorded.outputs.len(),
            manifest_path.display()
        );
        return Ok(());
    }
    let listing = artifact::tree_listing(&name);
    let first = match (
        std::fs::read_to_string(dir.join(&listing)),
        std::fs::read_to_string(out_dir.join(&listing)),
    ) {
        (Ok(a), Ok(b)) => crate::listing::first_difference(&a, &b).unwrap_or_else(|| {
            "every file of the image tree is the same: the difference is in how the outputs are laid out".into()
        }),
        _ => format!("no {listing} to compare"),
    };
    bail!(
        "not reproduced: {} differ; first difference in the image tree: {first} (the rebuild is in {})",
        differ.join(", "),
        out_dir.display()
    )
}

/// The profile's lock must hold exactly the manifest's inputs.
fn check_lock_matches(profile: &Path, m: &Value) -> Result<()> {
    let (p, _) = crate::profile::Profile::load(profile)?;
    let lock = Lock::load(&Lock::path_for(profile), profile, &p.inputs_hash())?;
    let recorded: Vec<(String, String, String)> = m
        .get("inputs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|i| {
                    let f = |k: &str| {
                        i.get(k)
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned()
                    };
                    (f("name"), f("version"), f("sha256"))
                })
                .collect()
        })
        .unwrap_or_default();
    let locked: Vec<(String, String, String)> = lock
        .packages
        .iter()
        .map(|p| (p.name.clone(), p.version.clone(), p.sha256.clone()))
        .collect();
    if let Some(i) =
        (0..recorded.len().max(locked.len())).find(|&i| recorded.get(i) != locked.get(i))
    {
        let show = |x: Option<&(String, String, String)>| {
            x.map(|(n, v, _)| format!("{n} {v}"))
                .unwrap_or_else(|| "nothing".into())
        };
        bail!(
            "the lock {} differs from the manifest's inputs at package {}: locked {}, recorded {}",
            Lock::path_for(profile).display(),
            i + 1,
            show(locked.get(i)),
            show(recorded.get(i))
        );
    }
    Ok(())
}
