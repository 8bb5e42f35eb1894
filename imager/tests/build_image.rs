//! End to end: lock and build the qemu profile from the real (signed)
//! distribution archive, read every output back with independent tools,
//! check reproducibility, and boot the result under QEMU (TCG).
//!
//! Needs the package mirror from the host's apt configuration; without it
//! the tests say SKIPPED (and fail under CI). Packages are cached by content hash, so only the
//! first run downloads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use machine_api::layout::{self, Slot};
use machine_api::testing::skip;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn imager(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imager"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// machined, init and pause, built by the workspace build that precedes the tests.
fn our_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// A scratch copy of a profile (and its lock) so tests can edit them.
fn scratch_profile(dir: &Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(root().join("profiles/qemu.yaml")).unwrap();
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, edit(text)).unwrap();
    let lock = root().join("profiles/qemu.lock");
    if lock.exists() {
        std::fs::copy(&lock, p.with_extension("lock")).unwrap();
    }
    p
}

/// The qemu profile built once for all tests of this file; None when the
/// mirror cannot be reached.
static BUILT: OnceLock<Option<(PathBuf, tempfile::TempDir)>> = OnceLock::new();

/// Removes the shared build's directory when the test ends, passed or
/// panicked: a static is never dropped, and each run would otherwise leave
/// about 3 GB in the temporary directory.
struct RemoveBuiltOnDrop;

impl Drop for RemoveBuiltOnDrop {
    fn drop(&mut self) {
        if let Some(Some((_, tmp))) = BUILT.get() {
            let _ = std::fs::remove_dir_all(tmp.path());
        }
    }
}

fn built() -> Option<&'static (PathBuf, tempfile::TempDir)> {
    BUILT
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let profile = scratch_profile(tmp.path(), "qemu", |t| t);
            if !profile.with_extension("lock").exists() {
                let (ok, out) = imager(&["lock", profile.to_str().unwrap()]);
                if !ok {
                    skip(format!("cannot lock against the mirror: {out}"));
                    return None;
                }
            }
            let out_dir = tmp.path().join("out");
            let (ok, out) = imager(&[
                "build",
                profile.to_str().unwrap(),
                "-o",
                out_dir.to_str().unwrap(),
                "--machined",
                our_bin("machined").to_str().unwrap(),
                "--init",
                our_bin("init").to_str().unwrap(),
                "--pause",
                our_bin("pause").to_str().unwrap(),
                // Kubernetes is the source build's business (its own tests).
                "--no-kubernetes",
            ]);
            if !ok
                && (out.contains("cannot fetch")
                    || out.contains("resolve")
                    || out.contains("connect"))
            {
                skip(format!("the package mirror is unreachable: {out}"));
                return None;
            }
            assert!(ok, "build failed:\n{out}");
            Some((out_dir, tmp))
        })
        .as_ref()
}

fn initramfs_reads_back_with_cpio() {
    let Some((out, _)) = built() else { return };
    let data = zstd::decode_all(std::fs::File::open(out.join("qemu-initramfs.cpio.zst")).unwrap())
        .unwrap();
    let mut child = Command::new("cpio")
        .args(["-it", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cpio installed");
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&data).unwrap();
    }
    let list = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    for want in [
        "init",
        "usr/bin/machined",
        "usr/bin/etcd",
        "usr/bin/containerd",
        "etc/modules-load.list",
        "etc/os-release",
    ] {
        assert!(
            list.lines().any(|l| l == want),
            "{want} missing from the initramfs"
        );
    }
    assert!(list.lines().any(|l| l.ends_with("runc")), "runc missing");
    assert!(
        list.lines().any(|l| l.contains("libseccomp.so.2")),
        "libseccomp missing (ELF closure)"
    );
    assert!(
        !list.lines().any(|l| l.starts_with("usr/share/doc")),
        "docs were not filtered"
    );
    // The baked container images; busybox only inside its archive: the
    // root has no shell.
    for want in ["index.json", "pause-1.tar", "busybox-1.tar"] {
        let p = format!("{}/{want}", layout::images::DIR);
        assert!(
            list.lines().any(|l| l == p),
            "{p} missing from the initramfs"
        );
    }
    assert!(
        !list
            .lines()
            .any(|l| l.ends_with("/busybox") || l.ends_with("bin/sh")),
        "a shell in the root"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["kubernetes"]["present"], false);
    let images: Vec<&str> = manifest["containerImages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ref"].as_str().unwrap())
        .collect();
    assert_eq!(images, [layout::images::PAUSE, layout::images::BUSYBOX]);
    assert!(manifest["containerImagesNote"]
        .as_str()
        .unwrap()
        .contains("CoreDNS image ABSENT"));
    assert!(manifest["kubernetes"]["note"]
        .as_str()
        .unwrap()
        .contains("ABSENT"));
    assert!(manifest["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == "etcd-server"));
}

fn disk_reads_back_with_sgdisk_mtools_and_unsquashfs() {
    let Some((out, tmp)) = built() else { return };
    let disk = out.join("qemu-disk.raw");
    let p = Command::new("sgdisk")
        .arg("-p")
        .arg(&disk)
        .output()
        .expect("gdisk installed");
    let text = String::from_utf8_lossy(&p.stdout);
    for name in [
        layout::ESP_PARTITION,
        Slot::A.partition(),
        Slot::B.partition(),
        layout::STATE_PARTITION,
        layout::EPHEMERAL_PARTITION,
    ] {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().last() == Some(name)),
            "{name}:\n{text}"
        );
    }
    let v = Command::new("sgdisk")
        .arg("-v")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("No problems found"),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
    // Partition offsets from `imager inspect`-equivalent parsing of sgdisk -i.
    let start = |n: u32| -> u64 {
        let o = Command::new("sgdisk")
            .arg(format!("-i{n}"))
            .arg(&disk)
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&o.stdout).into_owned();
        t.lines()
            .find(|l| l.starts_with("First sector:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 512
    };
    let esp = format!("{}@@{}", disk.display(), start(1));
    let m = Command::new("mdir")
        .args(["-i", &esp, "-/", "::"])
        .output()
        .expect("mtools installed");
    let listing = String::from_utf8_lossy(&m.stdout);
    assert!(
        listing.contains("BOOTX64") && listing.contains("vmlinuz"),
        "{listing}"
    );
    let entry_path = format!(
        "::/{}/{}",
        layout::ENTRIES_DIR,
        Slot::A.counted_entry(layout::BOOT_TRIES)
    );
    let entry = Command::new("mtype")
        .args(["-i", &esp, &entry_path])
        .output()
        .unwrap();
    let entry = String::from_utf8_lossy(&entry.stdout);
    assert!(
        entry.contains(&format!("linux /{}", Slot::A.kernel_path()))
            && entry.contains(&Slot::A.cmdline_arg()),
        "{entry}"
    );
    // Slot A holds the squashfs root.
    let bytes = std::fs::read(&disk).unwrap();
    let a = start(2) as usize;
    let sq = tmp.path().join("a.squashfs");
    std::fs::write(&sq, &bytes[a..a + (512 << 20)]).unwrap();
    let l = Command::new("unsquashfs")
        .args(["-l", "-d", "r"])
        .arg(&sq)
        .output()
        .expect("squashfs-tools installed");
    let files = String::from_utf8_lossy(&l.stdout);
    assert!(
        files.contains("r/usr/bin/machined") && files.contains("r/usr/bin/etcd"),
        "{files}"
    );
}

/// Flips one byte in the middle of a file.
fn flip_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x20;
    std::fs::write(p, b).unwrap();
}

/// The lock's sha256 of a package.
fn locked_sha(profile: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(profile.with_extension("lock")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.trim_start().trim_start_matches("- ") == format!("name: {name}"))
        .unwrap_or_else(|| panic!("{name} is not in the lock"));
    lines[i..]
        .iter()
        .find_map(|l| l.trim_start().strip_prefix("sha256: "))
        .unwrap()
        .trim()
        .to_owned()
}

/// A second build, from a private copy of the package cache in which one
/// cached .deb and one unpacked tree have a flipped byte: both are
/// reported, discarded and made again, and every output (and the
/// manifest) equals the first build's. The second build is signed; the
/// signature is a file beside the manifest and changes no output.
fn same_profile_and_lock_build_byte_identical_outputs() {
    let Some((out, tmp)) = built() else { return };
    let profile = tmp.path().join("qemu.yaml");
    let again = tmp.path().join("again");
    let cache = tmp.path().join("cache");
    let shared = imager::source::Cache::default_dir();
    for sub in ["sha256", "unpacked"] {
        std::fs::create_dir_all(cache.join(sub)).unwrap();
        for e in std::fs::read_dir(shared.join(sub)).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), cache.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    let deb = cache
        .join("sha256")
        .join(locked_sha(&profile, "etcd-server"));
    let unpacked = cache
        .join("unpacked")
        .join(format!("{}.data.tar", locked_sha(&profile, "runc")));
    assert!(
        deb.is_file() && unpacked.is_file(),
        "the first build cached both"
    );
    flip_byte(&deb);
    flip_byte(&unpacked);

    let key = machine_api::image_signature::SigningKey::generate().unwrap();
    let key_file = tmp.path().join("image-signing.key");
    std::fs::write(&key_file, key.to_pkcs8_pem()).unwrap();
    let out_text = Command::new(env!("CARGO_BIN_EXE_imager"))
        .args([
            "build",
            profile.to_str().unwrap(),
            "-o",
            again.to_str().unwrap(),
        ])
        .arg("--machined")
        .arg(our_bin("machined"))
        .arg("--init")
        .arg(our_bin("init"))
        .arg("--pause")
        .arg(our_bin("pause"))
        .arg("--no-kubernetes")
        .arg("--sign")
        .arg(&key_file)
        .env("IMAGER_CACHE", &cache)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out_text.stdout).into_owned()
        + &String::from_utf8_lossy(&out_text.stderr);
    assert!(out_text.status.success(), "{text}");
    assert!(
        text.contains("warning: cached package etcd-server")
            && text.contains("does not match its sha256"),
        "the tampered .deb was not reported:\n{text}"
    );
    assert!(
        text.contains("warning: cached unpacked tree")
            && text.contains("does not match the sha256 recorded when it was made"),
        "the tampered unpacked tree was not reported:\n{text}"
    );
    for f in [
        "qemu-initramfs.cpio.zst",
        "qemu-disk.raw",
        "qemu-vmlinuz",
        "qemu-boot-initrd.cpio.zst",
        "qemu-root.squashfs",
        "qemu-tree.txt",
        "qemu-files.sha256",
        "qemu-sbom.cdx.json",
        "qemu-upgrade.tar",
        "manifest.json",
    ] {
        let a = std::fs::read(out.join(f)).unwrap();
        let b = std::fs::read(again.join(f)).unwrap_or_default();
        if f == "qemu-upgrade.tar" {
            // The signed build's bundle carries the signature too.
            assert!(b.len() > a.len(), "{f}");
            continue;
        }
        assert!(a == b, "{f} differs between two builds");
    }
    // The repaired entries verify again.
    assert!(
        std::fs::read(&deb).is_ok_and(|d| sha256_hex(&d) == locked_sha(&profile, "etcd-server"))
    );
    signed_outputs_verify_and_tampering_is_refused(&again, &key);
}

fn sha256_hex(d: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(d))
}

/// `imager verify`: the manifest with the right key, refused with another
/// key; the upgrade bundle likewise, and refused with one byte changed; an
/// output with one byte changed is named.
fn signed_outputs_verify_and_tampering_is_refused(
    dir: &Path,
    key: &machine_api::image_signature::SigningKey,
) {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let good = keys.join("good.pub");
    let other = keys.join("other.pub");
    std::fs::write(&good, key.public().to_pem()).unwrap();
    let stranger = machine_api::image_signature::SigningKey::generate().unwrap();
    std::fs::write(&other, stranger.public().to_pem()).unwrap();
    let manifest = dir.join("manifest.json");
    let m = manifest.to_str().unwrap();
    let (ok, text) = imager(&["verify", m, "--key", good.to_str().unwrap()]);
    assert!(
        ok && text.contains("signature  ok") && text.contains("verified:"),
        "{text}"
    );
    let (ok, text) = imager(&["verify", m, "--key", other.to_str().unwrap()]);
    assert!(!ok && text.contains("signature check failed"), "{text}");
    // An independent checker agrees: openssl verifies the signature.
    let o = Command::new("openssl")
        .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
        .arg(&good)
        .args(["-rawin", "-in"])
        .arg(&manifest)
        .arg("-sigfile")
        .arg(dir.join("manifest.json.sig"))
        .output()
        .unwrap();
    assert!(o.status.success(), "openssl: {o:?}");

    let bundle = dir.join("qemu-upgrade.tar");
    let b = bundle.to_str().unwrap();
    let (ok, text) = imager(&["verify", b, "--key", good.to_str().unwrap()]);
    assert!(ok && text.contains("signature  ok"), "{text}");
    let (ok, text) = imager(&["verify", b, "--key", other.to_str().unwrap()]);
    assert!(!ok && text.contains("signature check failed"), "{text}");
    flip_byte(&bundle);
    let (ok, text) = imager(&["verify", b, "--key", good.to_str().unwrap()]);
    assert!(!ok && text.contains("file check failed"), "{text}");

    flip_byte(&dir.join("qemu-vmlinuz"));
    let (ok, text) = imager(&["verify", m]);
    assert!(
        !ok && text.contains("qemu-vmlinuz") && text.contains("SHA256 DIFFERS"),
        "{text}"
    );
}

/// `imager verify --rebuild` with a different machined (one byte
/// appended): the rebuild differs and the error names the first file of
/// the image tree that differs.
fn a_rebuild_that_differs_names_the_first_differing_file() {
    let Some((out, tmp)) = built() else { return };
    let other = tmp.path().join("machined-changed");
    let mut data = std::fs::read(our_bin("machined")).unwrap();
    data.push(0);
    std::fs::write(&other, data).unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let rebuilt = tmp.path().join("rebuilt");
    let (ok, text) = imager(&[
        "verify",
        out.join("manifest.json").to_str().unwrap(),
        "--rebuild",
        "-o",
        rebuilt.to_str().unwrap(),
        "--profile",
        tmp.path().join("qemu.yaml").to_str().unwrap(),
        "--machined",
        other.to_str().unwrap(),
        "--init",
        our_bin("init").to_str().unwrap(),
        "--pause",
        our_bin("pause").to_str().unwrap(),
    ]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("not reproduced")
            && text.contains(
                "first difference in the image tree: /usr/bin/machined: expected file 0755"
            ),
        "{text}"
    );
    // The kernel does not depend on machined: it is reported identical.
    assert!(
        text.contains("qemu-vmlinuz") && text.contains("identical"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&rebuilt);
}

/// The SBOM names etcd, containerd, runc and the kernel with the locked
/// versions, nests each file under its package, and an independent
/// CycloneDX validator accepts it.
fn sbom_lists_the_locked_packages() {
    let Some((out, tmp)) = built() else { return };
    let text = std::fs::read_to_string(out.join("qemu-sbom.cdx.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["specVersion"], "1.5");
    let lock = std::fs::read_to_string(tmp.path().join("qemu.lock")).unwrap();
    let comps = v["components"].as_array().unwrap();
    for want in ["etcd-server", "containerd", "runc", "linux-image-"] {
        let c = comps
            .iter()
            .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(want)))
            .unwrap_or_else(|| panic!("{want} is not in the SBOM"));
        let version = c["version"].as_str().unwrap();
        assert!(
            lock.contains(&format!("version: {version}"))
                || lock.contains(&format!("version: '{version}'")),
            "{want} {version} is not the locked version"
        );
        let files = c["components"].as_array().map(Vec::len).unwrap_or(0);
        assert!(files > 0, "{want} lists no files");
    }
    let etcd = comps.iter().find(|c| c["name"] == "etcd-server").unwrap();
    assert!(
        etcd["components"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "/usr/bin/etcd"),
        "/usr/bin/etcd is not under etcd-server"
    );
    let python = std::env::var("PYTHON_CHECKERS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target/pyenv/bin/python"));
    let check = Command::new(&python)
        .args([
            "-c",
            "import sys\nfrom cyclonedx.validation.json import JsonStrictValidator\nfrom cyclonedx.schema import SchemaVersion\ne = JsonStrictValidator(SchemaVersion.V1_5).validate_str(open(sys.argv[1]).read())\nprint(e or 'valid')\nsys.exit(1 if e else 0)",
        ])
        .arg(out.join("qemu-sbom.cdx.json"))
        .output();
    match check {
        Ok(o) => assert!(
            o.status.success(),
            "the CycloneDX validator refused the SBOM: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => skip(format!(
            "no CycloneDX validator ({}: {e}); scripts/test.sh installs it",
            python.display()
        )),
    }
}

#[test]
fn a_lock_that_no_longer_matches_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = scratch_profile(tmp.path(), "qemu", |t| t);
    let lock = profile.with_extension("lock");
    let text = std::fs::read_to_string(&lock).unwrap();
    // Corrupt the recorded sha256 of runc.
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let i = lines.iter().position(|l| l.contains("name: runc")).unwrap();
    let j = (i..lines.len())
        .find(|&k| lines[k].trim_start().starts_with("sha256:"))
        .unwrap();
    let (key, value) = lines[j].split_once(':').unwrap();
    lines[j] = format!("{key}: {}", "0".repeat(value.trim().len()));
    std::fs::write(&lock, lines.join("\n")).unwrap();
    let (ok, out) = imager(&[
        "build",
        profile.to_str().unwrap(),
        "-o",
        tmp.path().join("o").to_str().unwrap(),
        "--machined",
        our_bin("machined").to_str().unwrap(),
        "--init",
        our_bin("init").to_str().unwrap(),
        "--pause",
        our_bin("pause").to_str().unwrap(),
        "--no-kubernetes",
    ]);
    assert!(!ok);
    assert!(out.contains("runc") && out.contains("imager lock"), "{out}");

    // A profile changed since its lock is refused as stale.
    let stale = scratch_profile(tmp.path(), "stale", |t| {
        t.replace("  - runc\n", "  - runc\n  - iproute2\n")
    });
    let (ok, out) = imager(&[
        "build",
        stale.to_str().unwrap(),
        "-o",
        tmp.path().join("s").to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("stale"), "{out}");
}

#[test]
fn a_missing_library_fails_naming_binary_library_and_package() {
    let tmp = tempfile::tempdir().unwrap();
    let profile = scratch_profile(tmp.path(), "nolib", |t| {
        t.replace("  - libseccomp2\n", "")
            .replace("skipDepends:\n", "skipDepends:\n  - libseccomp2\n")
    });
    let _ = std::fs::remove_file(profile.with_extension("lock"));
    let (ok, out) = imager(&["lock", profile.to_str().unwrap()]);
    if !ok {
        machine_api::skip_test!("cannot lock against the mirror: {out}");
    }
    let (ok, out) = imager(&[
        "build",
        profile.to_str().unwrap(),
        "-o",
        tmp.path().join("o").to_str().unwrap(),
        "--machined",
        our_bin("machined").to_str().unwrap(),
        "--init",
        our_bin("init").to_str().unwrap(),
        "--pause",
        our_bin("pause").to_str().unwrap(),
        "--no-kubernetes",
    ]);
    assert!(!ok);
    assert!(
        out.contains("runc needs libseccomp.so.2") && out.contains("add libseccomp2"),
        "{out}"
    );
}

/// Boots kernel + initramfs under QEMU (TCG) until our init runs.
fn kernel_and_initramfs_boot_to_our_init_under_qemu() {
    let Some((out, tmp)) = built() else { return };
    machine_api::require_tools!("qemu-system-x86_64");
    let serial = tmp.path().join("serial-direct.log");
    let start = Instant::now();
    let status = Command::new("timeout")
        .args([
            "180",
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-nographic",
            "-no-reboot",
            "-serial",
            &format!("file:{}", serial.display()),
            "-monitor",
            "none",
            "-display",
            "none",
            "-kernel",
            out.join("qemu-vmlinuz").to_str().unwrap(),
            "-initrd",
            out.join("qemu-initramfs.cpio.zst").to_str().unwrap(),
            "-append",
            "console=ttyS0 panic=-1 init.test=poweroff",
        ])
        .status()
        .unwrap();
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        log.contains("init started"),
        "our init did not run ({status}):\n{log}"
    );
    assert!(log.contains("boot test: init reached"), "{log}");
    eprintln!(
        "direct boot: init reached, QEMU exited after {:.1}s wall",
        start.elapsed().as_secs_f64()
    );
}

/// Boots the raw disk through OVMF and systemd-boot until our init runs.
fn disk_image_boots_through_ovmf_and_systemd_boot() {
    let Some((out, tmp)) = built() else { return };
    let code = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
    machine_api::require_tools!("qemu-system-x86_64");
    if !code.exists() {
        machine_api::skip_test!("OVMF is not installed (apt-get install ovmf)");
    }
    let vars = tmp.path().join("vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
    let disk = tmp.path().join("boot.raw");
    // Sparse: the 2 GiB image is mostly holes.
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(out.join("qemu-disk.raw"))
        .arg(&disk)
        .status()
        .unwrap();
    assert!(cp.success());
    let serial = tmp.path().join("serial-disk.log");
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
            "-display",
            "none",
            "-serial",
            &format!("file:{}", serial.display()),
        ])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,readonly=on,file={}",
            code.display()
        ))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .arg("-drive")
        .arg(format!("if=virtio,format=raw,file={}", disk.display()))
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut log = String::new();
    while start.elapsed() < Duration::from_secs(240) {
        log = std::fs::read_to_string(&serial).unwrap_or_default();
        if log.contains("init started") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        log.contains("init started"),
        "our init did not run from the disk:\n{log}"
    );
    eprintln!(
        "disk boot: init reached after {:.1}s wall",
        start.elapsed().as_secs_f64()
    );
}

/// One build, every check: nextest runs each test in its own process, so
/// the expensive build is shared by making the checks steps of one test.
#[test]
fn qemu_profile_builds_reads_back_reproduces_and_boots() {
    let _cleanup = RemoveBuiltOnDrop;
    if built().is_none() {
        return;
    }
    initramfs_reads_back_with_cpio();
    disk_reads_back_with_sgdisk_mtools_and_unsquashfs();
    sbom_lists_the_locked_packages();
    a_rebuild_that_differs_names_the_first_differing_file();
    same_profile_and_lock_build_byte_identical_outputs();
    kernel_and_initramfs_boot_to_our_init_under_qemu();
    disk_image_boots_through_ovmf_and_systemd_boot();
}
