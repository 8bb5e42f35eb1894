//! `machine.sysctls` and `machine.kernelModules`: applied at boot before
//! services start, and again live when a config changes them (a sysctl
//! write and a module load are both safe on a running node; a module
//! removed from the config stays loaded until the next boot).
//!
//! Modules are loaded from the image's subset with `finit_module`, after
//! their dependencies from `modules.dep` (imager writes it for the subset),
//! the same way init loads the image's own list.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// What [`apply`] did and what failed (one line each).
#[derive(Debug, Default)]
pub struct Report {
    pub done: Vec<String>,
    pub errors: Vec<String>,
}

/// Applies sysctls and loads modules under `root` (`/` on a node).
pub fn apply(root: &Path, sysctls: &BTreeMap<String, String>, modules: &[String]) -> Report {
    let mut report = Report::default();
    for m in modules {
        match load_module(root, m) {
            Ok(()) => report.done.push(format!("module {m}")),
            Err(e) => report
                .errors
                .push(format!("machine.kernelModules: {m}: {e}")),
        }
    }
    for (key, value) in sysctls {
        match write_sysctl(root, key, value) {
            Ok(()) => report.done.push(format!("{key}={value}")),
            Err(e) => report.errors.push(format!("machine.sysctls[{key:?}]: {e}")),
        }
    }
    report
}

/// The config's sysctls over the ones its roles need: packet forwarding
/// for pod traffic on every Kubernetes node, and bridged pod traffic
/// through netfilter on workers (kube-proxy's service rules must see
/// pod-to-pod traffic on the same bridge). The config wins on a clash.
pub fn with_role_defaults(cfg: &machine_api::config::MachineConfig) -> BTreeMap<String, String> {
    use machine_api::config::Role;
    let mut out = BTreeMap::new();
    if cfg.has_role(Role::Worker) || cfg.has_role(Role::Controlplane) {
        out.insert("net.ipv4.ip_forward".to_owned(), "1".to_owned());
        out.insert("net.ipv6.conf.all.forwarding".to_owned(), "1".to_owned());
    }
    if cfg.has_role(Role::Worker) {
        out.insert(
            "net.bridge.bridge-nf-call-iptables".to_owned(),
            "1".to_owned(),
        );
        out.insert(
            "net.bridge.bridge-nf-call-ip6tables".to_owned(),
            "1".to_owned(),
        );
    }
    for (k, v) in &cfg.machine.sysctls {
        out.insert(k.clone(), v.clone());
    }
    out
}

/// `net.ipv4.ip_forward` → `ROOT/proc/sys/net/ipv4/ip_forward`. Keys are
/// validated as dotted names (no `..`, no leading `/`) before they get
/// here; this checks again, as a path is about to be written.
pub fn sysctl_path(root: &Path, key: &str) -> Result<PathBuf, String> {
    let parts: Vec<&str> = key.split(['.', '/']).collect();
    if parts.iter().any(|p| {
        p.is_empty()
            || *p == ".."
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }) {
        return Err("not a sysctl name".into());
    }
    let mut path = root.join("proc/sys");
    for p in parts {
        path.push(p);
    }
    Ok(path)
}

fn write_sysctl(root: &Path, key: &str, value: &str) -> Result<(), String> {
    let path = sysctl_path(root, key)?;
    if !path.exists() {
        return Err("no such sysctl on this kernel (is its module loaded?)".into());
    }
    std::fs::write(&path, value).map_err(|e| format!("cannot set {value:?}: {e}"))?;
    // Read back: the kernel may clamp or ignore a value.
    let now = std::fs::read_to_string(&path).unwrap_or_default();
    let now = now.split_whitespace().collect::<Vec<_>>().join(" ");
    let want = value.split_whitespace().collect::<Vec<_>>().join(" ");
    if now != want {
        return Err(format!("set {want:?} but the kernel reports {now:?}"));
    }
    Ok(())
}

/// The kernel release's module directory under `root`.
fn modules_dir(root: &Path) -> Result<PathBuf, String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("cannot read the kernel release: {e}"))?;
    Ok(root.join("lib/modules").join(release.trim()))
}

/// `modules.dep`: module name (`br_netfilter`) → its path and its
/// dependencies' paths, relative to the module directory.
fn module_index(text: &str) -> HashMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let (path, deps) = l.split_once(':')?;
            let file = path.rsplit('/').next()?;
            let name = file.split('.').next()?.replace('-', "_");
            let deps = deps.split_whitespace().map(str::to_owned).collect();
            Some((name, (path.to_owned(), deps)))
        })
        .collect()
}

fn load_module(root: &Path, name: &str) -> Result<(), String> {
    let dir = modules_dir(root)?;
    let dep = std::fs::read_to_string(dir.join("modules.dep"))
        .map_err(|e| format!("cannot read {}: {e}", dir.join("modules.dep").display()))?;
    let index = module_index(&dep);
    let key = name.replace('-', "_");
    let Some((path, deps)) = index.get(&key) else {
        // Built into the kernel, or already loaded: nothing to do.
        if Path::new("/sys/module").join(&key).exists() {
            return Ok(());
        }
        return Err("not in the image (add it to the profile's kernel modules)".into());
    };
    // modules.dep lists dependencies deepest last; load them first.
    for d in deps.iter().rev().chain(std::iter::once(path)) {
        finit(&dir.join(d))?;
    }
    Ok(())
}

fn finit(path: &Path) -> Result<(), String> {
    let p = path.to_string_lossy();
    let compressed = p.ends_with(".xz") || p.ends_with(".zst") || p.ends_with(".gz");
    let flags = if compressed {
        nix::kmod::ModuleInitFlags::from_bits_truncate(4) // MODULE_INIT_COMPRESSED_FILE
    } else {
        nix::kmod::ModuleInitFlags::empty()
    };
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match nix::kmod::finit_module(&f, &CString::default(), flags) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_paths_stay_under_proc_sys() {
        let r = Path::new("/r");
        assert_eq!(
            sysctl_path(r, "net.ipv4.ip_forward").unwrap(),
            PathBuf::from("/r/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            sysctl_path(r, "net/bridge/bridge-nf-call-iptables").unwrap(),
            PathBuf::from("/r/proc/sys/net/bridge/bridge-nf-call-iptables")
        );
        for bad in ["/etc/passwd", "net..x", "../../etc", "a.b/", "", "a b"] {
            assert!(sysctl_path(r, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sysctls_are_written_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("proc/sys/net/ipv4");
        std::fs::create_dir_all(&f).unwrap();
        std::fs::write(f.join("ip_forward"), "0\n").unwrap();
        let mut s = BTreeMap::new();
        s.insert("net.ipv4.ip_forward".to_owned(), "1".to_owned());
        s.insert("net.ipv4.nope".to_owned(), "1".to_owned());
        let r = apply(d.path(), &s, &[]);
        assert_eq!(std::fs::read_to_string(f.join("ip_forward")).unwrap(), "1");
        assert_eq!(r.done, vec!["net.ipv4.ip_forward=1"]);
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].contains("no such sysctl"), "{:?}", r.errors);
    }

    #[test]
    fn modules_dep_is_indexed_by_name() {
        let i = module_index(
            "kernel/net/bridge/br_netfilter.ko.xz: kernel/net/bridge/bridge.ko.xz kernel/net/llc/llc.ko.xz\nkernel/net/llc/llc.ko.xz:\n",
        );
        let (p, deps) = &i["br_netfilter"];
        assert_eq!(p, "kernel/net/bridge/br_netfilter.ko.xz");
        assert_eq!(deps.len(), 2);
        assert!(i.contains_key("llc"));
    }
}
