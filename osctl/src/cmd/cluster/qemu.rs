//! QEMU for local clusters: preflight, accelerator choice, one VM per node.
//!
//! Each VM has two NICs:
//! - eth0 on the cluster's private network: QEMU socket networking on a
//!   multicast group bound to loopback, so VMs of one cluster share an L2
//!   segment that no host interface is part of;
//! - eth1 on QEMU user networking, with only the OS API and etcd client
//!   ports (and a control plane's Kubernetes API port, 6443) forwarded to
//!   127.0.0.1, for osctl, etcdctl and kubectl on this host.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const QEMU: &str = "qemu-system-x86_64";

/// Finds QEMU, or says which package to install.
pub fn preflight() -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(QEMU).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{QEMU} not found on PATH: install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86; Fedora: dnf install qemu-system-x86)");
    }
    Ok(())
}

/// Which accelerator to use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a probe guest boots to init under it within 10 s, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// Resolves `auto`. /dev/kvm can exist and still hang the guest (nested
/// or broken setups: QEMU starts, the vCPU never runs), so the probe boots
/// the image's own kernel under KVM to our init (`init.test=poweroff`)
/// within 10 s. The answer is cached per host boot in `cache_dir`.
pub fn choose_accel(want: Accel, kernel: &Path, initrd: &Path, cache_dir: &Path) -> Accel {
    match want {
        Accel::Auto => {}
        other => return other,
    }
    if !Path::new("/dev/kvm").exists() {
        return Accel::Tcg;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = cache_dir.join(".kvm-probe");
    if let Ok(c) = std::fs::read_to_string(&cache) {
        if let Some((id, answer)) = c.split_once(' ') {
            if id == boot_id.trim() {
                return if answer.trim() == "kvm" {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                };
            }
        }
    }
    let works = probe_kvm(kernel, initrd);
    let _ = std::fs::create_dir_all(cache_dir);
    let _ = std::fs::write(
        &cache,
        format!("{} {}\n", boot_id.trim(), if works { "kvm" } else { "tcg" }),
    );
    if works {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

fn probe_kvm(kernel: &Path, initrd: &Path) -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let console = dir.path().join("console");
    let child = Command::new(QEMU)
        .args([
            "-accel", "kvm", "-m", "512", "-display", "none", "-monitor", "none",
        ])
        .args(["-nodefaults", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 init.test=poweroff"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(&console)
        .map(|c| c.contains("boot test: init reached"))
        .unwrap_or(false)
}

/// One VM's launch parameters.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    pub cmdline: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    /// `GROUP:PORT` of the private network.
    pub mcast: String,
    pub mac: String,
    pub api_port: u16,
    pub etcd_port: u16,
    /// 127.0.0.1 port forwarded to the node's kube-apiserver (6443).
    pub k8s_port: Option<u16>,
    /// 127.0.0.1 port forwarded to [`NODE_PORT`] (workers).
    pub node_port: Option<u16>,
    pub console: PathBuf,
    pub pidfile: PathBuf,
}

/// The NodePort forwarded from the host to each worker VM: the first of
/// the default NodePort range, for a service that asks for it.
pub const NODE_PORT: u16 = 30080;

impl VmSpec {
    pub fn command(&self) -> Command {
        let mut c = Command::new(QEMU);
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            _ => "tcg",
        };
        c.args(["-name", &self.name, "-accel", accel])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-display", "none", "-monitor", "none", "-nodefaults"])
            // Entropy from the host: without it the guest kernel's random
            // pool is seeded slowly under emulation, and the first key or
            // token machined makes waits for it.
            .args(["-device", "virtio-rng-pci"])
            .arg("-serial")
            .arg(format!("file:{}", self.console.display()))
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &self.cmdline])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,cache=unsafe",
                self.disk.display()
            ))
            .args([
                "-netdev",
                &format!("socket,id=priv,mcast={},localaddr=127.0.0.1", self.mcast),
                "-device",
                &format!("virtio-net-pci,netdev=priv,mac={}", self.mac),
            ])
            .args([
                "-netdev",
                &format!(
                    "user,id=host,restrict=on,hostfwd=tcp:127.0.0.1:{}-:50000,hostfwd=tcp:127.0.0.1:{}-:2379{}{}",
                    self.api_port,
                    self.etcd_port,
                    self.k8s_port
                        .map(|p| format!(",hostfwd=tcp:127.0.0.1:{p}-:6443"))
                        .unwrap_or_default(),
                    self.node_port
                        .map(|p| format!(",hostfwd=tcp:127.0.0.1:{p}-:{NODE_PORT}"))
                        .unwrap_or_default()
                ),
                "-device",
                "virtio-net-pci,netdev=host",
            ])
            .args(["-daemonize", "-pidfile"])
            .arg(&self.pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    /// Starts the VM in the background; returns its pid.
    pub fn start(&self) -> Result<u32> {
        let _ = std::fs::remove_file(&self.pidfile);
        let out = self
            .command()
            .output()
            .with_context(|| format!("starting {QEMU} for {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{QEMU} for {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        read_pid(&self.pidfile)
            .with_context(|| format!("{QEMU} for {} wrote no pid file", self.name))
    }
}

pub fn read_pid(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// True when `pid` is a running QEMU (not a recycled pid).
pub fn is_qemu(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().starts_with("qemu-system"))
        .unwrap_or(false)
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn stop(pid: u32, grace: Duration) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if !is_qemu(pid) {
        return;
    }
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_qemu(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(p, Signal::SIGKILL);
}

/// Copies a raw disk keeping its holes (SEEK_DATA/SEEK_HOLE), then sets
/// its size: the image's 2 GiB disk is mostly holes, and the grown size is
/// what EPHEMERAL expands into on first boot.
pub fn sparse_copy(src: &Path, dst: &Path, size: u64) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;
    let mut from = std::fs::File::open(src).with_context(|| src.display().to_string())?;
    let mut to = std::fs::File::create(dst).with_context(|| dst.display().to_string())?;
    let len = from.metadata()?.len();
    to.set_len(len.max(size))?;
    let fd = from.as_raw_fd();
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < len {
        // SAFETY: lseek on a valid fd with SEEK_DATA has no memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // no more data: the rest is a hole
        }
        // SAFETY: as above, SEEK_HOLE.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        from.seek(SeekFrom::Start(data as u64))?;
        to.seek(SeekFrom::Start(data as u64))?;
        let mut left = (end - data) as usize;
        while left > 0 {
            let chunk = left.min(buf.len());
            let n = from.read(&mut buf[..chunk])?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n])?;
            left -= n;
        }
        pos = end;
    }
    to.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        use std::io::{Seek, SeekFrom, Write};
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src.raw");
        let mut f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(b"slot A").unwrap();
        drop(f);
        let dst = t.path().join("dst.raw");
        sparse_copy(&src, &dst, 128 << 20).unwrap();
        let data = std::fs::read(&dst).unwrap();
        assert_eq!(data.len(), 128 << 20);
        assert_eq!(&data[10 << 20..(10 << 20) + 6], b"slot A");
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
    }

    #[test]
    fn vm_command_has_private_and_forwarded_networks() {
        let spec = VmSpec {
            name: "c-cp1".into(),
            kernel: "k".into(),
            initrd: "i".into(),
            disk: "d.raw".into(),
            cmdline: "console=ttyS0".into(),
            memory_mib: 1024,
            cpus: 1,
            accel: Accel::Tcg,
            mcast: "230.0.1.2:40000".into(),
            mac: "52:54:00:05:00:0a".into(),
            api_port: 51000,
            etcd_port: 52000,
            k8s_port: Some(53000),
            node_port: None,
            console: "console.log".into(),
            pidfile: "vm.pid".into(),
        };
        let args: Vec<String> = spec
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("mcast=230.0.1.2:40000,localaddr=127.0.0.1"),
            "{joined}"
        );
        assert!(
            joined.contains("hostfwd=tcp:127.0.0.1:51000-:50000"),
            "{joined}"
        );
        assert!(
            joined.contains("hostfwd=tcp:127.0.0.1:53000-:6443"),
            "{joined}"
        );
        assert!(joined.contains("-accel tcg"), "{joined}");
    }
}
