//! Where machined keeps things. On a node the root is `/`; in host mode
//! (`--root DIR`) everything lives under DIR, so several machined processes
//! can run side by side on one host for tests.

use std::path::{Path, PathBuf};

/// Every path machined uses, derived from one root.
#[derive(Clone, Debug)]
pub struct Paths {
    pub root: PathBuf,
}

impl Paths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Paths { root: root.into() }
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Machine config, last-known-good, staged and try state (the STATE
    /// partition on a node).
    pub fn state_dir(&self) -> PathBuf {
        self.at("system/state")
    }
    /// Certificates minted on this node.
    pub fn secrets_dir(&self) -> PathBuf {
        self.at("system/secrets")
    }
    /// Supervisor state files (pids), kept across machined restarts.
    pub fn services_dir(&self) -> PathBuf {
        self.at("run/machined/services")
    }
    /// This boot's phase stamps, shared with init (see `timeline`).
    pub fn timeline_file(&self) -> PathBuf {
        self.at("run/machined/timeline")
    }
    /// Files machined writes for /etc (/etc/hosts and friends link here:
    /// the root filesystem is read-only).
    pub fn etc_dir(&self) -> PathBuf {
        self.at("system/etc")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.at("var/log")
    }
    pub fn etcd_data(&self) -> PathBuf {
        self.at("var/lib/etcd")
    }
    pub fn containerd_root(&self) -> PathBuf {
        self.at("var/lib/containerd")
    }
    pub fn containerd_state(&self) -> PathBuf {
        self.at("run/containerd")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.at("run/containerd/containerd.sock")
    }
    pub fn containerd_config(&self) -> PathBuf {
        self.at("system/etc/containerd/config.toml")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.at("system/etc/cni/net.d")
    }
    /// CNI plugins: Debian's containernetworking-plugins installs them in
    /// /usr/lib/cni (that is where images have them); /opt/cni/bin is the
    /// upstream default.
    pub fn cni_bin_dir(&self) -> PathBuf {
        let debian = self.at("usr/lib/cni");
        if debian.is_dir() {
            debian
        } else {
            self.at("opt/cni/bin")
        }
    }

    /// Creates every directory machined writes to, private where it holds
    /// secrets.
    pub fn create_all(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for d in [
            self.state_dir(),
            self.secrets_dir(),
            self.services_dir(),
            self.log_dir(),
            self.etcd_data(),
            self.containerd_root(),
            self.containerd_state(),
            self.cni_conf_dir(),
        ] {
            std::fs::create_dir_all(&d)?;
        }
        for d in [self.state_dir(), self.secrets_dir(), self.etcd_data()] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
        }
        if let Some(parent) = self.containerd_config().parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(())
    }
}

/// Finds a binary: in `bin_dir` when given, else on PATH.
pub fn find_binary(bin_dir: Option<&Path>, name: &str) -> Option<PathBuf> {
    if let Some(dir) = bin_dir {
        let p = dir.join(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}
