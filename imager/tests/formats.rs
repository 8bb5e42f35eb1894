//! The format writers checked against the real, independent tools:
//! cpio (GNU cpio), squashfs-tools, mtools and dosfstools, gdisk (sgdisk).
//! A test whose tool is missing prints "SKIPPED: <tool> is not installed"
//! and passes, except under CI, where it fails
//! ([`machine_api::testing`]); `apt-get install cpio squashfs-tools mtools
//! dosfstools gdisk` makes them run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::collections::BTreeSet;
use std::fs;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use imager::format::gpt_disk::{self, PartitionSpec};
use imager::format::squashfs::Compression;
use imager::format::{cpio, fat, squashfs, FormatError};
use imager::tree::{Entry, Tree};
use machine_api::require_tools as require;
use machine_api::testing::{have, skip};

const EPOCH: u64 = 1_700_000_000; // 2023-11-14T22:13:20Z

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// Deterministic incompressible-ish bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const TOOL: &[u8] = b"#!/bin/sh\necho hello\n";

fn sample_tree() -> Tree {
    let mut t = Tree::new();
    t.insert(Path::new("etc"), Entry::Dir { mode: 0o755 })
        .unwrap();
    t.insert(
        Path::new("etc/os-release"),
        Entry::file(0o644, b"ID=test\nVERSION_ID=1\n".to_vec()),
    )
    .unwrap();
    t.insert(Path::new("etc/empty"), Entry::file(0o600, Vec::new()))
        .unwrap();
    t.insert(Path::new("root"), Entry::Dir { mode: 0o700 })
        .unwrap();
    t.insert(Path::new("usr/bin/tool"), Entry::file(0o755, TOOL.to_vec()))
        .unwrap();
    t.insert(
        Path::new("bin"),
        Entry::Symlink {
            target: "usr/bin".into(),
        },
    )
    .unwrap();
    t.insert(
        Path::new("usr/lib/libfoo.so"),
        Entry::Symlink {
            target: "/usr/lib/libfoo.so.1".into(),
        },
    )
    .unwrap();
    t.insert(
        Path::new("usr/lib/libfoo.so.1"),
        Entry::file(0o644, noise(3000, 7)),
    )
    .unwrap();
    t.insert(
        Path::new("usr/share/big.bin"),
        Entry::file(0o644, noise(1 << 20, 1)),
    )
    .unwrap();
    t
}

fn tree_paths(t: &Tree) -> Vec<String> {
    t.iter()
        .map(|(p, _)| p.to_str().unwrap().to_string())
        .collect()
}

/// Checks an extracted directory against the tree: file bytes, modes,
/// symlink targets.
fn check_extracted(root: &Path, t: &Tree) {
    for (p, e) in t.iter() {
        let on_disk = root.join(p);
        let meta =
            fs::symlink_metadata(&on_disk).unwrap_or_else(|e| panic!("{}: {e}", on_disk.display()));
        match e {
            Entry::Dir { mode } => {
                assert!(meta.is_dir(), "{p:?}");
                assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{p:?}");
            }
            Entry::File { mode, data } => {
                assert!(meta.is_file(), "{p:?}");
                assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{p:?}");
                assert!(
                    fs::read(&on_disk).unwrap() == **data,
                    "{p:?}: contents differ"
                );
            }
            Entry::Symlink { target } => {
                assert!(meta.file_type().is_symlink(), "{p:?}");
                assert_eq!(&fs::read_link(&on_disk).unwrap(), target, "{p:?}");
            }
        }
    }
}

#[test]
fn cpio_newc_matches_gnu_cpio() {
    let t = sample_tree();
    let mut a = Vec::new();
    let n = cpio::write_newc(&t, EPOCH, &mut a).unwrap();
    assert_eq!(n as usize, a.len());
    let mut b = Vec::new();
    cpio::write_newc(&t, EPOCH, &mut b).unwrap();
    assert!(a == b, "two writes of one tree differ");
    let mut c = Vec::new();
    cpio::write_newc(&t, EPOCH + 1, &mut c).unwrap();
    assert!(a != c, "the mtime does not reach the bytes");

    // Our own reader.
    let listed = cpio::list_newc(&a).unwrap();
    let expect: Vec<(String, u32, u64)> = t
        .iter()
        .map(|(p, e)| {
            let (mode, size) = match e {
                Entry::Dir { mode } => (0o040000 | mode, 0),
                Entry::File { mode, data } => (0o100000 | mode, data.len() as u64),
                Entry::Symlink { target } => (0o120777, target.as_os_str().len() as u64),
            };
            (p.to_str().unwrap().to_string(), mode, size)
        })
        .collect();
    assert_eq!(listed, expect);
    // Inode numbers 1.. in order, mtime in every header.
    assert_eq!(&a[..14], b"07070100000001");
    assert!(a.windows(8).any(|w| w == format!("{EPOCH:08x}").as_bytes()));

    require!("cpio");
    let mut child = Command::new("cpio")
        .args(["-it", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = a.clone();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(names, tree_paths(&t));

    // Extraction with modes and symlinks.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("initramfs.cpio");
    fs::write(&archive, &a).unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    run(Command::new("sh")
        .arg("-c")
        .arg("cpio -idv --quiet --no-absolute-filenames < \"$1\"")
        .arg("sh")
        .arg(&archive)
        .current_dir(&root));
    check_extracted(&root, &t);
}

#[test]
fn squashfs_matches_unsquashfs() {
    let t = sample_tree();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, compression| -> PathBuf {
        let path = dir.path().join(name);
        let mut f = fs::File::create(&path).unwrap();
        let n = squashfs::write(&t, EPOCH as u32, compression, &mut f).unwrap();
        assert_eq!(n, f.metadata().unwrap().len());
        assert_eq!(n % 4096, 0);
        path
    };
    let a = write("a.zstd.sqfs", Compression::Zstd);
    let b = write("b.zstd.sqfs", Compression::Zstd);
    assert!(
        fs::read(&a).unwrap() == fs::read(&b).unwrap(),
        "two writes of one tree differ"
    );
    // Also into memory: the same bytes.
    let mut mem = Cursor::new(Vec::new());
    squashfs::write(&t, EPOCH as u32, Compression::Zstd, &mut mem).unwrap();
    assert!(mem.into_inner() == fs::read(&a).unwrap());

    // Our own reader.
    let listed = squashfs::list(&a).unwrap();
    let names: Vec<String> = listed.iter().map(|(p, _, _)| p.clone()).collect();
    assert_eq!(names, tree_paths(&t));
    assert!(listed.contains(&("usr/bin/tool".into(), 0o100755, TOOL.len() as u64)));
    assert!(listed.contains(&("root".into(), 0o040700, 0)));
    assert!(listed.contains(&("bin".into(), 0o120777, 7)));

    require!("unsquashfs");
    for (name, compression) in [
        ("z.sqfs", Compression::Zstd),
        ("x.sqfs", Compression::Xz),
        ("g.sqfs", Compression::Gzip),
    ] {
        let img = write(name, compression);
        let again = write(&format!("again.{name}"), compression);
        assert!(
            fs::read(&img).unwrap() == fs::read(&again).unwrap(),
            "{compression:?}: two writes of one tree differ"
        );
        let out = stdout(Command::new("unsquashfs").arg("-l").arg(&img));
        let got: BTreeSet<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("squashfs-root/"))
            .map(str::to_string)
            .collect();
        let want: BTreeSet<String> = tree_paths(&t).into_iter().collect();
        assert_eq!(got, want, "{compression:?}: {out}");

        // Owners 0:0 and the fixed time on every inode, the root included.
        let out = stdout(
            Command::new("unsquashfs")
                .arg("-lln")
                .arg(&img)
                .env("TZ", "UTC"),
        );
        let rows: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("squashfs-root"))
            .collect();
        assert_eq!(rows.len(), t.len() + 1, "{out}");
        for row in rows {
            assert!(row.contains(" 0/0 "), "{row}");
            assert!(row.contains("2023-11-14 22:13"), "{row}");
        }
        let sb = stdout(
            Command::new("unsquashfs")
                .arg("-s")
                .arg(&img)
                .env("TZ", "UTC"),
        );
        assert!(sb.contains("Tue Nov 14 22:13:20 2023"), "{sb}");
        assert!(sb.contains("Number of ids 1"), "{sb}");
        eprintln!("{sb}");

        let dest = dir.path().join(format!("{name}.d"));
        run(Command::new("unsquashfs")
            .arg("-q")
            .arg("-n")
            .arg("-d")
            .arg(&dest)
            .arg(&img));
        check_extracted(&dest, &t);
    }
}

fn esp_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("EFI/BOOT/BOOTX64.EFI".to_string(), noise(300_000, 3)),
        (
            "loader/entries/a.conf".to_string(),
            b"title Node\nefi /EFI/Linux/node.efi\n".to_vec(),
        ),
    ]
}

const ESP_SIZE: u64 = 128 << 20;

fn write_esp_image() -> Vec<u8> {
    let mut img = Cursor::new(Vec::new());
    fat::write_esp(&esp_files(), ESP_SIZE, "ESP", 0x1234_abcd, EPOCH, &mut img).unwrap();
    img.into_inner()
}

fn mtools(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    c.env("MTOOLS_SKIP_CHECK", "1").env("TZ", "UTC");
    c
}

#[test]
fn fat_esp_matches_mtools_and_fsck() {
    let a = write_esp_image();
    assert_eq!(a.len() as u64, ESP_SIZE);
    let b = write_esp_image();
    assert!(a == b, "two writes of one ESP differ");
    // FAT32, with the volume id and label given.
    assert_eq!(&a[82..90], b"FAT32   ");
    assert_eq!(&a[67..71], &0x1234_abcdu32.to_le_bytes());
    assert_eq!(&a[71..82], b"ESP        ");

    // Our own reader.
    let listed = fat::list(&a).unwrap();
    let mut want: Vec<(String, u64)> = esp_files()
        .iter()
        .map(|(p, d)| (p.clone(), d.len() as u64))
        .collect();
    want.sort();
    assert_eq!(listed, want);

    // Writing over a non-empty stream gives the same bytes.
    let mut dirty = Cursor::new(vec![0xAAu8; 4096]);
    fat::write_esp(
        &esp_files(),
        ESP_SIZE,
        "ESP",
        0x1234_abcd,
        EPOCH,
        &mut dirty,
    )
    .unwrap();
    assert!(dirty.into_inner() == a);

    // A different epoch changes only timestamps, but does change bytes.
    let mut other = Cursor::new(Vec::new());
    fat::write_esp(
        &esp_files(),
        ESP_SIZE,
        "ESP",
        0x1234_abcd,
        EPOCH + 86_400,
        &mut other,
    )
    .unwrap();
    assert!(other.into_inner() != a);

    // Too much data: an error naming the file.
    let mut small = Cursor::new(Vec::new());
    let err = fat::write_esp(
        &[("EFI/BIG.EFI".into(), vec![1; 5 << 20])],
        4 << 20,
        "ESP",
        1,
        EPOCH,
        &mut small,
    )
    .unwrap_err();
    assert!(err.to_string().contains("EFI/BIG.EFI"), "{err}");

    require!("mdir", "mtype");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("esp.img");
    fs::write(&img, &a).unwrap();
    let out = stdout(mtools("mdir").arg("-i").arg(&img).arg("::/EFI/BOOT"));
    assert!(out.contains("BOOTX64") && out.contains("300000"), "{out}");
    assert!(out.contains("2023-11-14"), "fixed date: {out}");
    let out = run(mtools("mtype")
        .arg("-i")
        .arg(&img)
        .arg("::/loader/entries/a.conf"))
    .stdout;
    assert_eq!(out, esp_files()[1].1);
    let out = run(mtools("mcopy")
        .arg("-i")
        .arg(&img)
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .arg("-"))
    .stdout;
    assert!(out == esp_files()[0].1);

    if have("fsck.fat") {
        let out = stdout(Command::new("fsck.fat").arg("-n").arg(&img));
        assert!(
            !out.contains("differ") && !out.contains("Free cluster summary wrong"),
            "{out}"
        );
    } else {
        skip("fsck.fat is not installed: the FAT check was left out");
    }
}

/// Many files, long and clashing names, nested directories spanning
/// several clusters, on FAT16 and FAT32: fsck.fat is clean and mcopy gets
/// every file back.
#[test]
fn fat_many_names_fat16_and_fat32() {
    let mut files = Vec::new();
    for i in 0..150 {
        files.push((
            format!("EFI/Linux/node-kernel-version-{i:03}.efi"),
            noise(1000 + i * 37, i as u64),
        ));
    }
    files.push(("EFI/Linux/short.txt".into(), b"x".to_vec()));
    files.push(("EFI/Linux/SHORT.TX".into(), Vec::new()));
    files.push(("loader/loader.conf".into(), b"timeout 3\n".to_vec()));
    files.push((
        "a/b/c/d/e/f/deep file with spaces.conf".into(),
        noise(5000, 9),
    ));
    files.push(("Ünïcode/ñame.txt".into(), b"utf".to_vec()));
    for size in [16u64 << 20, 96 << 20] {
        let mut img = Cursor::new(Vec::new());
        fat::write_esp(&files, size, "TEST", 42, EPOCH, &mut img).unwrap();
        let img = img.into_inner();
        let fat32 = &img[82..90] == b"FAT32   ";
        assert_eq!(fat32, size >= 64 << 20);
        let mut want: Vec<(String, u64)> = files
            .iter()
            .map(|(p, d)| (p.clone(), d.len() as u64))
            .collect();
        want.sort();
        assert_eq!(fat::list(&img).unwrap(), want);

        require!("mcopy");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("esp.img");
        fs::write(&path, &img).unwrap();
        if have("fsck.fat") {
            run(Command::new("fsck.fat").arg("-n").arg("-v").arg(&path));
        } else {
            skip("fsck.fat is not installed: the FAT check was left out");
        }
        let dest = dir.path().join("out");
        fs::create_dir(&dest).unwrap();
        run(mtools("mcopy")
            .arg("-s")
            .arg("-n")
            .arg("-i")
            .arg(&path)
            .arg("::/EFI")
            .arg("::/loader")
            .arg("::/a")
            .arg("::/Ünïcode")
            .arg(&dest)
            .env("LC_ALL", "C.UTF-8"));
        for (p, d) in &files {
            let got = fs::read(dest.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert!(&got == d, "{p} differs");
        }
    }
}

#[test]
fn gpt_disk_matches_sgdisk() {
    let t = sample_tree();
    let dir = tempfile::tempdir().unwrap();
    let esp = dir.path().join("esp.img");
    fs::write(&esp, write_esp_image()).unwrap();
    let sqfs = dir.path().join("root.sqfs");
    squashfs::write(
        &t,
        EPOCH as u32,
        Compression::Zstd,
        &mut fs::File::create(&sqfs).unwrap(),
    )
    .unwrap();
    let sqfs_bytes = fs::read(&sqfs).unwrap();

    let mib = 1u64 << 20;
    let parts = vec![
        PartitionSpec {
            name: "EFI".into(),
            type_guid: gpt_disk::ESP,
            size_bytes: ESP_SIZE,
            contents: Some(esp.clone()),
        },
        PartitionSpec {
            name: "A".into(),
            type_guid: gpt_disk::LINUX_ROOT_X86_64,
            size_bytes: 100 * mib,
            contents: Some(sqfs.clone()),
        },
        PartitionSpec {
            name: "B".into(),
            type_guid: gpt_disk::LINUX_ROOT_X86_64,
            size_bytes: 100 * mib,
            contents: None,
        },
        PartitionSpec {
            name: "STATE".into(),
            type_guid: gpt_disk::LINUX_DATA,
            size_bytes: 64 * mib,
            contents: None,
        },
        PartitionSpec {
            name: "EPHEMERAL".into(),
            type_guid: gpt_disk::LINUX_DATA,
            size_bytes: 0,
            contents: None,
        },
    ];
    let disk_size = 512 * mib;
    let disk = dir.path().join("disk.img");
    let infos = gpt_disk::write_disk(&disk, disk_size, "node-1", &parts).unwrap();
    let meta = fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), disk_size);
    // Sparse: only tables, the ESP's used clusters and the squashfs.
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 16 << 20,
        "{} bytes allocated",
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512
    );
    assert_eq!(infos.len(), 5);
    for (i, p) in infos.iter().zip(&parts) {
        assert_eq!(i.name, p.name);
        assert_eq!(i.offset() % mib, 0, "{} aligned", i.name);
        if p.size_bytes != 0 {
            assert_eq!(i.size_bytes(), p.size_bytes);
        }
    }
    assert_eq!(infos[0].first_lba, 2048);
    assert_eq!(gpt_disk::list(&disk).unwrap(), infos);

    // Contents at their offsets.
    let mut f = fs::File::open(&disk).unwrap();
    let mut got = vec![0u8; sqfs_bytes.len()];
    f.seek(SeekFrom::Start(infos[1].offset())).unwrap();
    f.read_exact(&mut got).unwrap();
    assert!(got == sqfs_bytes, "A does not hold the squashfs");
    let mut got = vec![0u8; 4096];
    f.seek(SeekFrom::Start(infos[0].offset())).unwrap();
    f.read_exact(&mut got).unwrap();
    assert_eq!(&got[82..90], b"FAT32   ");

    // Same seed, same disk; another seed, other GUIDs.
    let again = dir.path().join("again.img");
    let infos2 = gpt_disk::write_disk(&again, disk_size, "node-1", &parts).unwrap();
    assert_eq!(infos, infos2);
    let g1 = gpt_disk::read_disk_guid(&disk).unwrap();
    assert_eq!(g1, gpt_disk::read_disk_guid(&again).unwrap());
    assert!(fs::read(&disk).unwrap() == fs::read(&again).unwrap());
    let other = dir.path().join("other.img");
    let infos3 = gpt_disk::write_disk(&other, disk_size, "node-2", &parts).unwrap();
    assert_ne!(g1, gpt_disk::read_disk_guid(&other).unwrap());
    assert_ne!(infos[0].guid, infos3[0].guid);
    fs::remove_file(&again).unwrap();
    fs::remove_file(&other).unwrap();

    // Contents larger than the partition: an error naming it.
    let mut bad = parts.clone();
    bad[1].size_bytes = mib;
    let err = gpt_disk::write_disk(&dir.path().join("bad.img"), disk_size, "x", &bad).unwrap_err();
    assert!(matches!(err, FormatError::ContentsTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("\"A\""), "{err}");

    require!("sgdisk");
    let out = stdout(Command::new("sgdisk").arg("-p").arg(&disk));
    eprintln!("{out}");
    assert!(
        out.contains(&format!(
            "Disk identifier (GUID): {}",
            g1.to_string().to_uppercase()
        )),
        "{out}"
    );
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() >= 7 && w[0].parse::<u32>().is_ok())
        .collect();
    assert_eq!(rows.len(), 5, "{out}");
    let want = [
        ("EFI", "128.0", "EF00"),
        ("A", "100.0", "8304"),
        ("B", "100.0", "8304"),
        ("STATE", "64.0", "8300"),
        ("EPHEMERAL", "", "8300"),
    ];
    for (row, (name, size, code)) in rows.iter().zip(want) {
        assert_eq!(row[6], name, "{out}");
        assert_eq!(row[5], code, "{out}");
        if !size.is_empty() {
            assert_eq!((row[3], row[4]), (size, "MiB"), "{out}");
        }
    }
    let out = stdout(Command::new("sgdisk").arg("-v").arg(&disk));
    assert!(out.contains("No problems found"), "{out}");
    let out = stdout(Command::new("sgdisk").arg("-i").arg("2").arg(&disk));
    assert!(
        out.contains(&infos[1].guid.to_string().to_uppercase()),
        "{out}"
    );

    if have("mdir") {
        let out = stdout(
            mtools("mdir")
                .arg("-i")
                .arg(format!("{}@@{}", disk.display(), infos[0].offset()))
                .arg("::/EFI/BOOT"),
        );
        assert!(out.contains("BOOTX64"), "{out}");
    } else {
        skip("mdir is not installed: the ESP listing was left out");
    }
}

/// A ~100 MB tree written as cpio and squashfs, timed. Not an assertion:
/// run with `cargo test -p imager --test formats -- --ignored --nocapture`.
#[test]
#[ignore]
fn write_speed_100mb() {
    // Real binaries and libraries of this machine, up to ~100 MB: data
    // that compresses like an OS image does.
    let mut t = Tree::new();
    let mut stack = vec![PathBuf::from("/usr/lib"), PathBuf::from("/usr/bin")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if t.data_size() > 100_000_000 {
                break;
            }
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                if let Ok(data) = fs::read(&p) {
                    let _ = t.insert(&p, Entry::file(m.permissions().mode() & 0o7777, data));
                }
            }
        }
    }
    let mb = t.data_size() as f64 / 1e6;
    let dir = tempfile::tempdir().unwrap();

    let start = Instant::now();
    let mut f = std::io::BufWriter::new(fs::File::create(dir.path().join("a.cpio")).unwrap());
    let n = cpio::write_newc(&t, EPOCH, &mut f).unwrap();
    f.flush().unwrap();
    let s = start.elapsed().as_secs_f64();
    eprintln!(
        "cpio: {mb:.0} MB tree -> {n} bytes in {s:.2} s ({:.0} MB/s)",
        mb / s
    );

    for c in [Compression::Zstd, Compression::Gzip, Compression::Xz] {
        let start = Instant::now();
        let mut f = fs::File::create(dir.path().join("a.sqfs")).unwrap();
        let n = squashfs::write(&t, EPOCH as u32, c, &mut f).unwrap();
        let s = start.elapsed().as_secs_f64();
        eprintln!(
            "squashfs {c:?}: {mb:.0} MB tree -> {n} bytes in {s:.2} s ({:.1} MB/s)",
            mb / s
        );
    }

    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("EFI/Linux/uki{i}.efi"), noise(30_000_000, i)))
        .collect();
    let start = Instant::now();
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("esp.img"))
        .unwrap();
    fat::write_esp(&files, 256 << 20, "ESP", 1, EPOCH, &mut f).unwrap();
    let s = start.elapsed().as_secs_f64();
    eprintln!("fat: 90 MB of files into a 256 MiB File in {s:.2} s");
}
