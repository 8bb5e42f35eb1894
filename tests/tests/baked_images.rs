//! The container images imager bakes (OCI archives), checked by
//! independent tools: a real containerd on a temporary root imports them
//! through machined's `roles::images::import_baked`, `ctr` lists them and
//! runs them. The archives are written with imager's own library code:
//! pause from the built `pause` binary (its libraries from this host),
//! busybox from the host's Debian `busybox-static`, CoreDNS when
//! `KUBE_BIN_DIR` has it (`scripts/build-kubernetes.sh --coredns DIR`).
//!
//! containerd and ctr come from `PATH`, or from `TEST_CONTAINERD_DIR` (a
//! directory with `containerd`, `ctr` and `containerd-shim-runc-v2`, e.g.
//! the node image's 1.7 from its package). Needs root (mounts, runc).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imager::tree::{Entry, Tree};
use machine_api::layout::images;
use node_tests::{bin, kill_all_under, run, skip, wait_until, Run};

/// A containerd of its own on a temporary root; killed (with its shims)
/// and its mounts undone when dropped.
struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    ctr: PathBuf,
    child: Child,
}

impl Containerd {
    fn start(dir: &Path, bins: &Option<PathBuf>) -> Self {
        let tool = |name: &str| match bins {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        };
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        // The CRI plugin is not needed to import and run with ctr.
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n[grpc]\n  address = {:?}\n\n[ttrpc]\n  address = {:?}\n\n[metrics]\n  address = \"\"\n",
                dir.join("root").display().to_string(),
                dir.join("state").display().to_string(),
                socket.display().to_string(),
                dir.join("containerd.sock.ttrpc").display().to_string(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let mut cmd = Command::new(tool("containerd"));
        cmd.arg("--config").arg(&config);
        if let Some(d) = bins {
            // The shim is found on PATH.
            let path = format!(
                "{}:{}",
                d.display(),
                std::env::var("PATH").unwrap_or_default()
            );
            cmd.env("PATH", path);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            dir: dir.to_owned(),
            socket,
            ctr: tool("ctr"),
            child,
        };
        wait_until(Duration::from_secs(30), "containerd answers", || {
            c.ctr(&["version"]).ok
        });
        c
    }

    /// ctr in the k8s.io namespace.
    fn ctr(&self, args: &[&str]) -> Run {
        run(Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", machined::roles::images::NAMESPACE])
            .args(args))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_all_under(&self.dir);
        // Anything a killed shim left mounted under the root.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let needle = self.dir.display().to_string();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&needle))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A staging tree with this host's copies of what `elf` needs (libraries
/// and loader, recursively), laid out as a merged-/usr Debian has them:
/// what imager takes from the unpacked packages in a real build.
fn host_libraries(elf: &[u8]) -> Tree {
    let mut t = Tree::new();
    imager::assemble::usrmerge_links(&mut t).unwrap();
    let mut todo = vec![elf.to_vec()];
    while let Some(data) = todo.pop() {
        let n = imager::assemble::elf::needs(&data).unwrap();
        let mut wanted: Vec<(PathBuf, PathBuf)> = n
            .libraries
            .iter()
            .map(|l| {
                (
                    Path::new("/usr/lib/x86_64-linux-gnu").join(l),
                    Path::new("usr/lib/x86_64-linux-gnu").join(l),
                )
            })
            .collect();
        if let Some(i) = &n.interpreter {
            // /lib64 is a link into /usr in the tree.
            wanted.push((i.into(), Path::new("usr").join(i.trim_start_matches('/'))));
        }
        for (host, at) in wanted {
            if t.get(&at).is_some() {
                continue;
            }
            let bytes = std::fs::read(std::fs::canonicalize(&host).unwrap()).unwrap();
            t.insert(&at, Entry::file(0o755, bytes.clone())).unwrap();
            todo.push(bytes);
        }
    }
    t
}

/// Writes the archives and index with imager's code into `dir`; the refs.
fn write_archives(dir: &Path) -> Option<Vec<String>> {
    let mut list = Vec::new();
    let pause = std::fs::read(bin("pause")).unwrap();
    list.push((
        imager::container_images::pause(&pause, &host_libraries(&pause)).unwrap(),
        "test".to_owned(),
    ));
    let busybox = std::fs::read("/bin/busybox").ok().filter(|b| {
        imager::assemble::elf::needs(b)
            .is_some_and(|n| n.interpreter.is_none() && n.libraries.is_empty())
    });
    let Some(busybox) = busybox else {
        skip("no static /bin/busybox on this host (apt-get install busybox-static; scripts/test.sh installs it)");
        return None;
    };
    list.push((
        imager::container_images::busybox(&busybox).unwrap(),
        "test".to_owned(),
    ));
    if let Some(coredns) = node_tests::kube_bin_dir()
        .map(|d| d.join("coredns"))
        .filter(|p| p.is_file())
    {
        let data = std::fs::read(coredns).unwrap();
        list.push((
            imager::container_images::coredns(&data).unwrap(),
            "test".to_owned(),
        ));
    } else {
        eprintln!("no coredns in KUBE_BIN_DIR: its image is not checked");
    }
    let mut root = Tree::new();
    let made = imager::container_images::add(&mut root, &list, 1_700_000_000).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for (path, entry) in root.iter() {
        if let (Ok(rel), Entry::File { data, .. }) = (path.strip_prefix(images::DIR), entry) {
            std::fs::write(dir.join(rel), data.as_slice()).unwrap();
        }
    }
    Some(made.into_iter().map(|m| m.reference).collect())
}

fn tool_dir() -> Option<PathBuf> {
    std::env::var_os("TEST_CONTAINERD_DIR").map(PathBuf::from)
}

fn have_tools(bins: &Option<PathBuf>) -> bool {
    for t in ["containerd", "ctr"] {
        let ok = match bins {
            Some(d) => d.join(t).is_file(),
            None => node_tests::have(t),
        };
        if !ok {
            skip(format!(
                "{t} is not installed (scripts/test.sh installs it)"
            ));
            return false;
        }
    }
    if !node_tests::have("runc") {
        skip("runc is not installed (scripts/test.sh installs it)");
        return false;
    }
    if !nix::unistd::Uid::effective().is_root() {
        skip("not root: containerd needs it to mount and run containers");
        return false;
    }
    true
}

#[test]
fn containerd_imports_and_runs_the_baked_images() {
    let bins = tool_dir();
    if !have_tools(&bins) {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("baked").tempdir().unwrap();
    let images_dir = tmp.path().join("images");
    let Some(refs) = write_archives(&images_dir) else {
        return;
    };
    let cd = Containerd::start(&tmp.path().join("c"), &bins);
    let markers = tmp.path().join("c/root/machined-imported");

    // First boot: every archive is imported, unpacked and pinned.
    let t = Instant::now();
    let got = machined::roles::images::import_baked(&cd.ctr, &cd.socket, &images_dir, &markers)
        .unwrap_or_else(|e| panic!("{e}\n{}", cd.log()));
    eprintln!("imported {got:?} in {:.1}s", t.elapsed().as_secs_f64());
    assert_eq!(got, refs);
    let ls = cd.ctr(&["images", "ls"]).expect_ok().stdout;
    let index: Vec<images::IndexEntry> =
        serde_json::from_slice(&std::fs::read(images_dir.join(images::INDEX)).unwrap()).unwrap();
    for e in &index {
        let line = ls
            .lines()
            .find(|l| l.split_whitespace().next() == Some(e.reference.as_str()))
            .unwrap_or_else(|| panic!("{} not listed:\n{ls}", e.reference));
        assert!(line.contains(&e.manifest_digest), "{line}");
        assert!(line.contains("io.cri-containerd.pinned=pinned"), "{line}");
        assert!(line.contains("linux/amd64"), "{line}");
    }
    // Unpacked into the overlayfs snapshotter (what the CRI runs from).
    let check = cd
        .ctr(&["images", "check", "--snapshotter", "overlayfs"])
        .expect_ok()
        .stdout;
    for r in &refs {
        let line = check
            .lines()
            .find(|l| l.starts_with(r.as_str()))
            .unwrap_or_else(|| panic!("{r} not in:\n{check}"));
        assert!(line.contains("complete"), "{line}");
        assert!(line.trim_end().ends_with("true"), "not unpacked: {line}");
    }

    // Next boot: nothing again.
    let again =
        machined::roles::images::import_baked(&cd.ctr, &cd.socket, &images_dir, &markers).unwrap();
    assert!(again.is_empty(), "{again:?}");

    // busybox runs, with its applets and users.
    let out = cd
        .ctr(&[
            "run",
            "--rm",
            images::BUSYBOX,
            "bb1",
            "/bin/busybox",
            "echo",
            "hello",
        ])
        .expect_ok();
    assert_eq!(out.stdout.trim(), "hello", "{}", out.text());
    let out = cd
        .ctr(&[
            "run",
            "--rm",
            images::BUSYBOX,
            "bb2",
            "sh",
            "-c",
            "id; ls -ld /tmp; echo $PATH",
        ])
        .expect_ok();
    assert!(
        out.stdout.contains("uid=0(root) gid=0(root)"),
        "{}",
        out.text()
    );
    assert!(out.stdout.contains("drwxrwxrwt"), "{}", out.text());
    assert!(out.stdout.contains("/usr/bin"), "{}", out.text());

    // pause runs until SIGTERM, then exits 0.
    let mut pause = Command::new(&cd.ctr)
        .arg("--address")
        .arg(&cd.socket)
        .args(["--namespace", machined::roles::images::NAMESPACE])
        .args(["run", "--rm", images::PAUSE, "p1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "pause running", || {
        cd.ctr(&["tasks", "ls"])
            .stdout
            .lines()
            .any(|l| l.starts_with("p1 ") && l.contains("RUNNING"))
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pause.try_wait().unwrap().is_none(),
        "pause exited by itself"
    );
    cd.ctr(&["tasks", "kill", "--signal", "SIGTERM", "p1"])
        .expect_ok();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = pause.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pause did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "pause exited with {status}");

    // CoreDNS, when built: it states its version.
    if refs.iter().any(|r| r == images::COREDNS) {
        let out = cd
            .ctr(&[
                "run",
                "--rm",
                images::COREDNS,
                "dns1",
                "/coredns",
                "-version",
            ])
            .expect_ok();
        assert!(
            out.stdout.contains(&format!(
                "CoreDNS-{}",
                images::COREDNS_VERSION.trim_start_matches('v')
            )),
            "{}",
            out.text()
        );
    }
}

/// pause as PID 1 of a PID namespace reaps orphans that are reparented to
/// it, and exits 0 on SIGTERM.
#[test]
fn pause_reaps_orphans_and_stops_on_sigterm() {
    node_tests::require!("unshare", "nsenter");
    if !nix::unistd::Uid::effective().is_root() {
        skip("not root: unshare --pid needs it");
        return;
    }
    let mut ns = KillOnDrop(
        Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .arg(bin("pause"))
            .spawn()
            .unwrap(),
    );
    // pause: the child of unshare.
    let children = format!("/proc/{}/task/{}/children", ns.0.id(), ns.0.id());
    let mut pause_pid = 0;
    wait_until(Duration::from_secs(10), "pause started", || {
        pause_pid = std::fs::read_to_string(&children)
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pause_pid != 0
    });
    // An orphan inside its namespace: sh starts sleep and exits, so sleep
    // is reparented to pause (PID 1 there). It would live a minute, so a
    // loaded machine still sees it reparented; then it is killed from
    // outside, and pause must reap it.
    run(Command::new("nsenter")
        .args(["--target", &pause_pid.to_string(), "--pid", "--"])
        // sleep's output is not ours: holding the pipe open, it would keep
        // `run` waiting for it to end.
        .args(["sh", "-c", "sleep 60 </dev/null >/dev/null 2>&1 & exit 0"]))
    .expect_ok();
    let pause_children = format!("/proc/{pause_pid}/task/{pause_pid}/children");
    let mut orphan = 0;
    wait_until(
        Duration::from_secs(30),
        "the orphan reparented to pause",
        || {
            orphan = std::fs::read_to_string(&pause_children)
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            orphan != 0
        },
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(orphan),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Reaped: no longer pause's child, and gone from /proc (a zombie would
    // stay in both).
    wait_until(Duration::from_secs(30), "the orphan reaped", || {
        std::fs::read_to_string(&pause_children)
            .unwrap_or_default()
            .trim()
            .is_empty()
            && !std::path::Path::new(&format!("/proc/{orphan}")).exists()
    });
    assert!(node_tests::alive(pause_pid), "pause exited");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pause_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = ns.0.wait().unwrap();
    assert!(status.success(), "pause exited with {status}");
}

/// Kills unshare (and with `--kill-child`, pause) when a check fails, so
/// a failed test leaves no process behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
