//! Imports the container images baked into the node image (OCI archives
//! under [`images::DIR`], written by imager) into containerd's `k8s.io`
//! namespace, where the CRI plugin and so kubelet find them: no registry
//! is reachable from a node.
//!
//! Each archive is imported once: after a successful import (unpacked
//! into the overlayfs snapshotter, and labelled pinned so that kubelet's
//! image garbage collection never removes it) a marker named by the
//! image's manifest digest is written into the marker directory. Keep that
//! directory with containerd's root, so that both go together when
//! EPHEMERAL is formatted again. A new node image with a changed archive
//! has a new manifest digest, so it is imported again.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use machine_api::layout::images::{self, IndexEntry};

/// How long one `ctr` run may take (an import unpacks the layer; under
/// emulation that is slow).
pub const CTR_TIMEOUT: Duration = Duration::from_secs(120);
/// containerd's namespace of the CRI plugin.
pub const NAMESPACE: &str = "k8s.io";
/// The snapshotter the CRI plugin runs containers from (containerd's
/// default on Linux).
pub const SNAPSHOTTER: &str = "overlayfs";

/// Imports every archive listed in `images_dir`'s index that has no
/// marker in `marker_dir` yet, with `ctr` on containerd's `socket`.
/// Returns the references imported (none when all were there already,
/// or when the image bakes none: no index). Each `ctr` run is bounded by
/// [`CTR_TIMEOUT`]; an error carries its stderr.
pub fn import_baked(
    ctr: &Path,
    socket: &Path,
    images_dir: &Path,
    marker_dir: &Path,
) -> Result<Vec<String>, String> {
    let index_path = images_dir.join(images::INDEX);
    let text = match std::fs::read(&index_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", index_path.display())),
    };
    let index: Vec<IndexEntry> =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", index_path.display()))?;
    let mut pending = Vec::new();
    for entry in index {
        let marker = marker_name(&entry)
            .map_err(|e| format!("{}: {}: {e}", index_path.display(), entry.reference))?;
        if !marker_dir.join(&marker).exists() {
            pending.push((entry, marker));
        }
    }
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let ctr = Ctr::new(ctr, socket)?;
    std::fs::create_dir_all(marker_dir).map_err(|e| format!("{}: {e}", marker_dir.display()))?;
    let mut imported = Vec::new();
    for (entry, marker) in pending {
        let archive = images_dir.join(&entry.file);
        let size = std::fs::metadata(&archive)
            .map_err(|e| format!("{}: {e}", archive.display()))?
            .len();
        if size != entry.size {
            return Err(format!(
                "{}: {size} bytes, the index says {}: the image is damaged",
                archive.display(),
                entry.size
            ));
        }
        ctr.import(&archive)
            .map_err(|e| format!("importing {} ({}): {e}", entry.reference, archive.display()))?;
        ctr.check_digest(&entry)?;
        let (key, value) = images::PINNED_LABEL;
        ctr.run(&[
            "images",
            "label",
            &entry.reference,
            &format!("{key}={value}"),
        ])
        .map_err(|e| format!("pinning {}: {e}", entry.reference))?;
        machine_api::atomic::write_atomic(
            &marker_dir.join(&marker),
            format!("{}\n", entry.reference).as_bytes(),
            0o644,
        )
        .map_err(|e| format!("{}: {e}", marker_dir.join(&marker).display()))?;
        imported.push(entry.reference);
    }
    Ok(imported)
}

/// The marker file of an entry: its manifest digest (`sha256-HEX`),
/// checked so that the index cannot name a path.
fn marker_name(entry: &IndexEntry) -> Result<String, String> {
    let hex = entry
        .manifest_digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("bad manifest digest {:?}", entry.manifest_digest))?;
    let plain_name =
        !entry.file.is_empty() && !entry.file.contains('/') && !entry.file.starts_with('.');
    if !plain_name {
        return Err(format!("bad archive file name {:?}", entry.file));
    }
    Ok(format!("sha256-{}", hex.to_ascii_lowercase()))
}

/// `ctr` on one containerd, in the `k8s.io` namespace.
struct Ctr<'a> {
    bin: &'a Path,
    socket: &'a Path,
    /// Whether this ctr has `--local`: the import that unpacks into the
    /// snapshotter in the same run (as 1.6, which has no such flag, always
    /// does, and 1.7.24 by default). Without it a ctr that has the flag
    /// may go through containerd's transfer service, which in 1.7 did not
    /// unpack.
    local_flag: bool,
}

impl<'a> Ctr<'a> {
    fn new(bin: &'a Path, socket: &'a Path) -> Result<Self, String> {
        let mut c = Ctr {
            bin,
            socket,
            local_flag: false,
        };
        let help = c.run(&["images", "import", "--help"])?;
        c.local_flag = help.lines().any(|l| l.trim_start().starts_with("--local"));
        Ok(c)
    }

    fn import(&self, archive: &Path) -> Result<String, String> {
        let archive = archive.to_string_lossy();
        let mut args = vec!["images", "import", "--snapshotter", SNAPSHOTTER];
        if self.local_flag {
            args.push("--local");
        }
        args.push(&archive);
        self.run(&args)
    }

    /// The imported reference points at the index's manifest (another
    /// image of that name would have been replaced by the import).
    fn check_digest(&self, entry: &IndexEntry) -> Result<(), String> {
        let list = self.run(&["images", "ls"])?;
        let found = list
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&entry.reference.as_str())).then(|| f.get(2).copied())?
            })
            .next();
        match found {
            Some(d) if d == entry.manifest_digest => Ok(()),
            Some(d) => Err(format!(
                "{} was imported as {d}, but its archive's manifest is {}",
                entry.reference, entry.manifest_digest
            )),
            None => Err(format!(
                "{} is not in containerd after its import (does the archive name it?)",
                entry.reference
            )),
        }
    }

    /// Runs ctr with `args`, bounded by [`CTR_TIMEOUT`]; its stdout, or an
    /// error with its stderr.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        run_bounded(
            Command::new(self.bin)
                .arg("--address")
                .arg(self.socket)
                .args(["--namespace", NAMESPACE])
                .args(args),
            CTR_TIMEOUT,
        )
        .map_err(|e| format!("ctr {}: {e}", args.join(" ")))
    }
}

/// Runs `cmd` (stdin closed, output captured), killing it after
/// `timeout`. Stdout on success; else the exit status and stderr.
pub(crate) fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run: {e}"))?;
    // Drained on threads, so that a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {}s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(e.to_string()),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let stderr = stderr.trim();
    match status {
        Ok(s) if s.success() => Ok(stdout),
        Ok(s) => Err(format!("{s}: {stderr}")),
        Err(e) if stderr.is_empty() => Err(e),
        Err(e) => Err(format!("{e}: {stderr}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(digest: &str, file: &str) -> IndexEntry {
        IndexEntry {
            reference: images::PAUSE.into(),
            file: file.into(),
            manifest_digest: digest.into(),
            size: 1,
        }
    }

    #[test]
    fn markers_are_digests_and_files_are_plain_names() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            marker_name(&entry(&d, "pause-1.tar")).unwrap(),
            format!("sha256-{}", "ab".repeat(32))
        );
        for bad in [
            "sha256:../x",
            "md5:00",
            "sha256:",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(marker_name(&entry(bad, "pause-1.tar")).is_err(), "{bad}");
        }
        for bad in ["", "../pause.tar", "a/b.tar", ".hidden"] {
            assert!(marker_name(&entry(&d, bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_index_means_nothing_to_import() {
        let d = tempfile::tempdir().unwrap();
        let got = import_baked(
            Path::new("/nonexistent/ctr"),
            Path::new("/nonexistent.sock"),
            d.path(),
            &d.path().join("m"),
        )
        .unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn runs_are_bounded_and_say_why_they_failed() {
        let e =
            run_bounded(Command::new("sleep").arg("5"), Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        let e = run_bounded(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(e.contains("oops") && e.contains('3'), "{e}");
        let out = run_bounded(Command::new("echo").arg("hi"), Duration::from_secs(5)).unwrap();
        assert_eq!(out, "hi\n");
    }
}
