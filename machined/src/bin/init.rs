//! init: PID 1 of a node. Small on purpose: mount the kernel filesystems,
//! load the image's modules, switch to the read-only root of the active
//! slot when booted from disk, bring up `lo`, then start machined, restart
//! it if it exits, and reap every orphan. machined is a separate process so
//! that a machined crash never becomes a kernel panic (PID 1 must not exit).
//! Networking, disks and /etc are machined's: it knows the machine config.
//!
//! Kernel command line:
//! - `slot=A|B`: mount that GPT partition (squashfs) as the root and switch
//!   to it (disk boots; systemd-boot's entry for each slot sets it);
//! - `init.test=poweroff`: print the boot marker and power off (boot tests);
//! - everything else is for machined (`machined.token=...`, `ip=...`).

use std::ffi::CString;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use machine_api::layout::{self, Slot};
use machine_api::retry::Backoff;
use machined::timeline::Timeline;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

const MACHINED: &str = "/usr/bin/machined";
/// machined exits with this code to ask for a reboot.
const EXIT_REBOOT: i32 = 10;
/// Quick exits of machined after which a trial boot is given up.
const QUICK_EXITS_ON_TRIAL: u32 = 3;

/// Whether this is a disk boot whose systemd-boot entry still counts
/// tries, with the other slot bootable (read from the ESP; false when that
/// cannot be read).
fn trial_boot() -> bool {
    let Some(slot) = cmdline_value(layout::SLOT_PARAM).and_then(|s| Slot::parse(&s)) else {
        return false;
    };
    match machined::bootentry::with_esp(|esp| {
        Ok(machined::bootentry::trial_with_fallback(esp, slot))
    }) {
        Ok(t) => t,
        Err(e) => {
            log(&format!("cannot read the boot entries: {e}"));
            false
        }
    }
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn log(msg: &str) {
    let line = format!("[init {:>8}s] {msg}\n", uptime());
    // PID 1's stdout is the console; ignore errors, there is nowhere else.
    let _ = std::io::stdout().write_all(line.as_bytes());
    let _ = std::io::stdout().flush();
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    match mount(Some(src), target, Some(fstype), flags, data) {
        Ok(()) => {}
        Err(nix::errno::Errno::EBUSY) => {} // already mounted (e.g. devtmpfs automount)
        Err(e) => log(&format!("mount {fstype} on {target}: {e}")),
    }
}

fn mount_all() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid, None);
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None);
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=0620,ptmxmode=0666"),
    );
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None);
}

/// Loads the modules listed by the imager, in dependency order.
fn load_modules() {
    let Ok(list) = std::fs::read_to_string("/etc/modules-load.list") else {
        return;
    };
    let mut loaded = 0;
    for path in list.lines().filter(|l| !l.trim().is_empty()) {
        let full = Path::new("/").join(path);
        let compressed = path.ends_with(".xz") || path.ends_with(".zst") || path.ends_with(".gz");
        let flags = if compressed {
            nix::kmod::ModuleInitFlags::from_bits_truncate(4) // MODULE_INIT_COMPRESSED_FILE
        } else {
            nix::kmod::ModuleInitFlags::empty()
        };
        match std::fs::File::open(&full) {
            Ok(f) => match nix::kmod::finit_module(&f, &CString::default(), flags) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => loaded += 1,
                Err(e) => log(&format!("module {path}: {e}")),
            },
            Err(e) => log(&format!("module {path}: {e}")),
        }
    }
    log(&format!("loaded {loaded} kernel modules"));
}

/// Brings the loopback interface up (etcd and the API use it).
fn loopback_up() {
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        log("lo: cannot open a socket");
        return;
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: fd is a valid socket and req a valid ifreq for these ioctls;
    // the union field written is the one SIOCSIFFLAGS reads.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
                log("lo: cannot bring it up");
            }
        }
        libc::close(fd);
    }
}

fn cmdline_value(key: &str) -> Option<String> {
    machined::cmdline::Cmdline::current()
        .get(key)
        .map(str::to_owned)
}

/// Removes the initramfs' files (they live in RAM) without crossing into
/// other mounts, as switch_root(8) does.
fn free_initramfs(dir: &Path, root_dev: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != root_dev {
            continue; // a mount point (the new root, /dev, /proc...)
        }
        if md.is_dir() {
            free_initramfs(&p, root_dev);
            let _ = std::fs::remove_dir(&p);
        } else {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Mounts slot `slot`'s squashfs (found by GPT partition name) on /sysroot
/// and makes it the root: the kernel filesystems move along, the
/// initramfs is freed, then chroot.
fn switch_root(slot: Slot) -> Result<(), String> {
    // The disk's driver may still be probing: look every 50 ms for 15 s.
    let part = Backoff::constant(Duration::from_millis(50))
        .timeout(Duration::from_secs(15))
        .retry_blocking(
            || machined::disks::find(Path::new("/sys/class/block"), slot.partition()).ok_or(()),
            |_, _| true,
        )
        .map_err(|()| {
            format!(
                "no partition named {} after 15 s (is the disk attached, and its driver in the image's kernel.modules?)",
                slot.partition()
            )
        })?;
    let _ = std::fs::create_dir_all("/sysroot");
    mount(
        Some(&part.dev),
        "/sysroot",
        Some(layout::ROOT_FSTYPE),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| {
        format!(
            "mount {} (slot {slot}) on /sysroot: {e}",
            part.dev.display()
        )
    })?;
    for d in ["/dev", "/proc", "/sys", "/run", "/tmp"] {
        let target = format!("/sysroot{d}");
        mount(
            Some(d),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| format!("move {d} to the new root: {e}"))?;
    }
    use std::os::unix::fs::MetadataExt;
    if let Ok(md) = std::fs::metadata("/") {
        free_initramfs(Path::new("/"), md.dev());
    }
    std::env::set_current_dir("/sysroot").map_err(|e| format!("chdir /sysroot: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move the new root to /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    log(&format!(
        "root: slot {slot} ({}, squashfs, read-only)",
        part.dev.display()
    ));
    Ok(())
}

/// The writable places of a read-only root: /system (machined's files
/// and /etc's links) is RAM; STATE and /var are mounted by machined.
fn mount_system() {
    mount_fs(
        "tmpfs",
        "/system",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    // Defaults until machined writes the real ones (etcd resolves
    // `localhost` through /etc/hosts).
    let _ = std::fs::create_dir_all("/system/etc");
    let _ = std::fs::write(
        "/system/etc/hosts",
        "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    );
    let _ = std::fs::write("/system/etc/resolv.conf", "");
    let _ = std::fs::write("/system/etc/hostname", "node\n");
}

/// Stops what is left, flushes and unmounts the data partitions, so that a
/// reboot never leaves STATE or EPHEMERAL dirty.
fn stop_everything() {
    // machined stopped the services; anything left gets TERM, then KILL.
    let _ = nix::sys::signal::kill(Pid::from_raw(-1), nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        reap(None);
        if matches!(
            waitpid(None, Some(WaitPidFlag::WNOHANG)),
            Err(nix::errno::Errno::ECHILD)
        ) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(Pid::from_raw(-1), nix::sys::signal::Signal::SIGKILL);
    reap(None);
    nix::unistd::sync();
    let mut targets: Vec<std::path::PathBuf> = machined::mountinfo::current()
        .into_iter()
        .filter(|m| matches!(m.fstype.as_str(), "ext4" | "xfs" | "vfat"))
        .map(|m| m.mount_point)
        .collect();
    targets.reverse(); // deepest (most recent) first
    for t in targets {
        if let Err(e) = umount2(&t, MntFlags::empty()) {
            log(&format!(
                "unmount {}: {e}; remounting read-only",
                t.display()
            ));
            let _ = mount(
                None::<&str>,
                &t,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
        }
    }
}

fn cmdline_has(word: &str) -> bool {
    machined::cmdline::Cmdline::current().has(word)
}

fn power(mode: RebootMode) -> ! {
    stop_everything();
    log(match mode {
        RebootMode::RB_AUTOBOOT => "rebooting",
        _ => "powering off",
    });
    let _ = reboot(mode);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Reaps every exited child; returns machined's exit code if it was one.
fn reap(machined: Option<Pid>) -> Option<i32> {
    let mut machined_exit = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if Some(pid) == machined => {
                machined_exit = Some(code)
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if Some(pid) == machined => {
                log(&format!("machined killed by {sig}"));
                machined_exit = Some(128 + sig as i32);
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return machined_exit,
            Ok(_) => {}
        }
    }
}

fn start_machined() -> Option<Pid> {
    if !Path::new(MACHINED).exists() {
        log("no machined in this image");
        return None;
    }
    let mut cmd = std::process::Command::new(MACHINED);
    // The kernel starts PID 1 with no PATH; machined finds etcd,
    // containerd and runc through it.
    cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    match cmd.spawn() {
        Ok(child) => {
            let pid = Pid::from_raw(child.id() as i32);
            // The child is reaped by waitpid(-1) below, not through `child`.
            std::mem::forget(child);
            log(&format!("started machined (pid {pid})"));
            Some(pid)
        }
        Err(e) => {
            log(&format!("cannot start machined: {e}"));
            None
        }
    }
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("init: must run as PID 1 (this is the node's init, not a tool)");
        std::process::exit(2);
    }
    mount_all();
    // Read once /proc is there: the kernel's part of the boot.
    let handoff = uptime();
    log("init started");
    load_modules();
    if let Some(slot) = cmdline_value(layout::SLOT_PARAM) {
        let switched = match Slot::parse(&slot) {
            Some(s) => switch_root(s),
            None => Err("unknown slot (A or B expected)".to_owned()),
        };
        if let Err(e) = switched {
            // Without its root the node cannot run machined: say why on the
            // console, then reboot so systemd-boot counts this try down and
            // falls back to the other slot.
            log(&format!(
                "cannot switch to slot {slot}: {e}; rebooting in 10 s"
            ));
            std::thread::sleep(Duration::from_secs(10));
            power(RebootMode::RB_AUTOBOOT);
        }
    }
    mount_system();
    let timeline = Timeline::new("/run/machined/timeline");
    timeline.mark_at(
        handoff.parse().unwrap_or(0.0),
        "kernel handed over to init",
        "",
    );
    timeline.mark(
        "root ready",
        &cmdline_value(layout::SLOT_PARAM)
            .map(|s| format!("slot {s} ({})", layout::ROOT_FSTYPE))
            .unwrap_or_else(|| "initramfs".into()),
    );
    loopback_up();
    if cmdline_has("init.test=poweroff") {
        log("boot test: init reached; powering off");
        power(RebootMode::RB_POWER_OFF);
    }
    let mut machined = start_machined();
    let mut last_start = Instant::now();
    // machined exits within a minute of its start, again and again: on a
    // boot whose entry still counts tries (an upgrade's first boots) that
    // is a broken new system, and only a reboot lets systemd-boot count
    // the try down and, with none left, start the slot that ran before.
    let mut quick_exits = 0u32;
    // 1 s, doubling up to 30 s; back to 1 s after a run of over a minute.
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(code) = reap(machined) {
            match code {
                EXIT_REBOOT => power(RebootMode::RB_AUTOBOOT),
                0 => power(RebootMode::RB_POWER_OFF),
                _ => {
                    if last_start.elapsed() > Duration::from_secs(60) {
                        backoff.reset();
                        quick_exits = 0;
                    } else {
                        quick_exits += 1;
                    }
                    if quick_exits >= QUICK_EXITS_ON_TRIAL && trial_boot() {
                        log(&format!(
                            "machined exited {quick_exits} times within a minute of its start on a boot whose entry still counts tries: rebooting, so systemd-boot counts this try down and starts the previous slot when none is left"
                        ));
                        nix::unistd::sync();
                        power(RebootMode::RB_AUTOBOOT);
                    }
                    let delay = backoff.next_delay();
                    log(&format!(
                        "machined exited with {code}; restarting in {}s",
                        delay.as_secs()
                    ));
                    std::thread::sleep(delay);
                    machined = start_machined();
                    last_start = Instant::now();
                }
            }
        }
    }
}
