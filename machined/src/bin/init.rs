//! init: PID 1 of a node. Small on purpose: mount the kernel filesystems,
//! load the image's modules, bring up `lo`, then start machined, restart it
//! if it exits, and reap every orphan. machined is a separate process so
//! that a machined crash never becomes a kernel panic (PID 1 must not exit).
//!
//! Kernel command line:
//! - `init.test=poweroff`: print the boot marker and power off (boot tests);
//! - everything else is for machined (`machined.token=...`, `ip=...`).

use std::ffi::CString;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

const MACHINED: &str = "/usr/bin/machined";
/// machined exits with this code to ask for a reboot.
const EXIT_REBOOT: i32 = 10;

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

/// An IPv4 address as a sockaddr for the interface ioctls.
fn sockaddr(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr_in and sockaddr are plain old data of the same size;
    // all-zero is a valid value of both.
    unsafe {
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
        std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin)
    }
}

/// Static IPv4 from the kernel's `ip=CLIENT::GATEWAY:NETMASK::DEVICE:off`
/// argument (the kernel's own format). Returns the address for machined.
fn configure_ip_from_cmdline() -> Option<std::net::Ipv4Addr> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    let spec = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))?;
    let f: Vec<&str> = spec.split(':').collect();
    let client: std::net::Ipv4Addr = f.first()?.parse().ok()?;
    let gateway: Option<std::net::Ipv4Addr> = f.get(2).and_then(|g| g.parse().ok());
    let mask: std::net::Ipv4Addr = f
        .get(3)
        .and_then(|m| m.parse().ok())
        .unwrap_or([255, 255, 255, 0].into());
    let dev = f
        .get(5)
        .filter(|d| !d.is_empty())
        .copied()
        .unwrap_or("eth0");
    if dev.len() >= libc::IFNAMSIZ {
        log(&format!("ip=: interface name {dev:?} is too long"));
        return None;
    }
    // SAFETY: socket(2) with constant arguments; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in dev.bytes().enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    let mut ok = true;
    // SAFETY: fd is a valid socket; req is a valid ifreq whose union member
    // written matches what each ioctl reads; rt is a valid rtentry.
    unsafe {
        req.ifr_ifru.ifru_addr = sockaddr(client);
        ok &= libc::ioctl(fd, libc::SIOCSIFADDR, &req) == 0;
        req.ifr_ifru.ifru_netmask = sockaddr(mask);
        ok &= libc::ioctl(fd, libc::SIOCSIFNETMASK, &req) == 0;
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            ok &= libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) == 0;
        } else {
            ok = false;
        }
        if let Some(gw) = gateway {
            let mut rt: libc::rtentry = std::mem::zeroed();
            rt.rt_dst = sockaddr([0, 0, 0, 0].into());
            rt.rt_genmask = sockaddr([0, 0, 0, 0].into());
            rt.rt_gateway = sockaddr(gw);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            ok &= libc::ioctl(fd, libc::SIOCADDRT, &rt) == 0;
        }
        libc::close(fd);
    }
    if ok {
        log(&format!(
            "{dev}: {client}/{mask} via {}",
            gateway.map(|g| g.to_string()).unwrap_or_else(|| "-".into())
        ));
        Some(client)
    } else {
        log(&format!(
            "{dev}: cannot configure {spec} ({})",
            std::io::Error::last_os_error()
        ));
        None
    }
}

fn cmdline_has(word: &str) -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == word))
        .unwrap_or(false)
}

fn power(mode: RebootMode) -> ! {
    nix::unistd::sync();
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

fn start_machined(node_ip: Option<std::net::Ipv4Addr>) -> Option<Pid> {
    if !Path::new(MACHINED).exists() {
        log("no machined in this image");
        return None;
    }
    let mut cmd = std::process::Command::new(MACHINED);
    // The kernel starts PID 1 with no PATH; machined finds etcd,
    // containerd and runc through it.
    cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    if let Some(ip) = node_ip {
        cmd.args(["--node-ip", &ip.to_string()]);
    }
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
    log("init started");
    load_modules();
    loopback_up();
    let node_ip = configure_ip_from_cmdline();
    if cmdline_has("init.test=poweroff") {
        log("boot test: init reached; powering off");
        power(RebootMode::RB_POWER_OFF);
    }
    let mut machined = start_machined(node_ip);
    let mut last_start = Instant::now();
    let mut backoff = Duration::from_secs(1);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(code) = reap(machined) {
            match code {
                EXIT_REBOOT => power(RebootMode::RB_AUTOBOOT),
                0 => power(RebootMode::RB_POWER_OFF),
                _ => {
                    log(&format!(
                        "machined exited with {code}; restarting in {}s",
                        backoff.as_secs()
                    ));
                    std::thread::sleep(backoff);
                    backoff = if last_start.elapsed() > Duration::from_secs(60) {
                        Duration::from_secs(1)
                    } else {
                        (backoff * 2).min(Duration::from_secs(30))
                    };
                    machined = start_machined(node_ip);
                    last_start = Instant::now();
                }
            }
        }
    }
}
