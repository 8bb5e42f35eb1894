//! Kernel modules: the requested ones and everything they depend on, from
//! `modules.dep`, plus a load order for init.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::AssembleError;
use crate::tree::{Entry, Tree};

/// Module name from its file: `kernel/net/bridge/br_netfilter.ko.xz` →
/// `br_netfilter` (names use `_`, never `-`).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Parsed `modules.dep`: module path → dependency paths.
pub fn parse_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            Some((
                m.trim().to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            ))
        })
        .collect()
}

/// The module directory (`usr/lib/modules/VERSION`, or `lib/modules/VERSION`).
pub fn module_dir(staging: &Tree, version: &str) -> Option<PathBuf> {
    ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| Path::new(d).join(version))
        .find(|p| staging.get(&p.join("modules.dep")).is_some())
}

/// Adds `wanted` modules and their dependencies to `image`; returns the
/// load order (dependencies first) as paths relative to the module dir.
pub fn add_modules(
    image: &mut Tree,
    staging: &Tree,
    version: &str,
    wanted: &[String],
) -> Result<Vec<String>, AssembleError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let dir = module_dir(staging, version).ok_or_else(|| {
        AssembleError::Modules(format!("kernel {version}: no modules.dep in the kernel package"))
    })?;
    let text = |name: &str| -> String {
        match staging.get(&dir.join(name)) {
            Some(Entry::File { data, .. }) => String::from_utf8_lossy(data).into_owned(),
            _ => String::new(),
        }
    };
    let dep = parse_dep(&text("modules.dep"));
    let builtin: BTreeSet<String> = text("modules.builtin").lines().map(module_name).collect();
    let by_name: BTreeMap<String, &String> = dep.keys().map(|k| (module_name(k), k)).collect();

    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    let mut missing = Vec::new();
    fn visit(
        m: &str,
        dep: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_owned()) {
            return;
        }
        // modules.dep lists every transitive dependency; visit them first.
        for d in dep.get(m).into_iter().flatten() {
            visit(d, dep, seen, order);
        }
        order.push(m.to_owned());
    }
    for w in wanted {
        let n = w.replace('-', "_");
        match by_name.get(&n) {
            Some(path) => visit(path, &dep, &mut seen, &mut order),
            None if builtin.contains(&n) => {} // built into the kernel
            None => missing.push(w.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(AssembleError::Modules(format!(
            "kernel {version} has no module {}: check kernel.modules in the profile",
            missing.join(", ")
        )));
    }
    for m in &order {
        let p = dir.join(m);
        let entry = staging
            .get(&p)
            .cloned()
            .ok_or_else(|| AssembleError::Modules(format!("{} listed in modules.dep but not unpacked", p.display())))?;
        image.insert(&p, entry)?;
    }
    for (path, e) in staging.iter() {
        if path.parent() == Some(dir.as_path())
            && path.file_name().is_some_and(|f| f.to_string_lossy().starts_with("modules."))
        {
            image.insert(path, e.clone())?;
        }
    }
    let list: String = order.iter().map(|m| format!("{}\n", dir.join(m).display())).collect();
    image.insert(Path::new("etc/modules-load.list"), Entry::file(0o644, list.into_bytes()))?;
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closure_and_order() {
        let mut staging = Tree::new();
        let d = "usr/lib/modules/6.12.0";
        let dep = "kernel/net/bridge/br_netfilter.ko.xz: kernel/net/bridge/bridge.ko.xz kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz\n\
kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz\n\
kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz\n\
kernel/net/llc/llc.ko.xz:\n\
kernel/fs/overlayfs/overlay.ko.xz:\n";
        staging
            .insert(&Path::new(d).join("modules.dep"), Entry::file(0o644, dep.as_bytes().to_vec()))
            .unwrap();
        staging
            .insert(&Path::new(d).join("modules.builtin"), Entry::file(0o644, b"kernel/fs/squashfs/squashfs.ko\n".to_vec()))
            .unwrap();
        for m in ["net/bridge/br_netfilter", "net/bridge/bridge", "net/802/stp", "net/llc/llc", "fs/overlayfs/overlay"] {
            staging
                .insert(&Path::new(d).join(format!("kernel/{m}.ko.xz")), Entry::file(0o644, vec![1]))
                .unwrap();
        }
        let mut image = Tree::new();
        let order = add_modules(&mut image, &staging, "6.12.0", &["br-netfilter".into(), "squashfs".into()]).unwrap();
        assert_eq!(order.last().unwrap(), "kernel/net/bridge/br_netfilter.ko.xz");
        assert_eq!(order.first().unwrap(), "kernel/net/llc/llc.ko.xz");
        assert_eq!(order.len(), 4);
        assert!(image.get(&Path::new(d).join("kernel/fs/overlayfs/overlay.ko.xz")).is_none());
        let err = add_modules(&mut image, &staging, "6.12.0", &["nope".into()]).unwrap_err();
        assert!(err.to_string().contains("no module nope"));
    }
}
