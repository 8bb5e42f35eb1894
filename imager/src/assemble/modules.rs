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
        .find(|p| staging.get(p).is_some())
}

/// A module's own file, decompressed.
fn module_bytes(data: &[u8], path: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::new();
    let r = if path.ends_with(".xz") {
        liblzma::read::XzDecoder::new(data).read_to_end(&mut out)
    } else if path.ends_with(".zst") {
        zstd::stream::read::Decoder::new(data).and_then(|mut d| d.read_to_end(&mut out))
    } else if path.ends_with(".gz") {
        flate2::read::GzDecoder::new(data).read_to_end(&mut out)
    } else {
        out.extend_from_slice(data);
        Ok(0)
    };
    r.map_err(|e| format!("{path}: cannot decompress: {e}"))?;
    Ok(out)
}

/// `depends=` from a module's `.modinfo` section: what depmod would write
/// to modules.dep. Debian's kernel packages ship no modules.dep (depmod
/// runs at install time), so the imager reads the modules themselves.
pub fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let Ok(elf) = goblin::elf::Elf::parse(ko) else {
        return Vec::new();
    };
    for sh in &elf.section_headers {
        if elf.shdr_strtab.get_at(sh.sh_name) != Some(".modinfo") {
            continue;
        }
        let start = sh.sh_offset as usize;
        let end = start.saturating_add(sh.sh_size as usize).min(ko.len());
        if start >= end {
            return Vec::new();
        }
        for field in ko[start..end].split(|b| *b == 0) {
            if let Some(v) = field.strip_prefix(b"depends=") {
                return String::from_utf8_lossy(v)
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(|d| d.replace('-', "_"))
                    .collect();
            }
        }
    }
    Vec::new()
}

/// Adds `wanted` modules and their dependencies to `image`; returns the
/// load order (dependencies first) as paths relative to the module dir.
/// Writes `modules.dep` for the subset and `/etc/modules-load.list` for init.
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
        AssembleError::Modules(format!(
            "kernel {version}: no module directory in the kernel package"
        ))
    })?;
    let text = |name: &str| -> String {
        match staging.get(&dir.join(name)) {
            Some(Entry::File { data, .. }) => String::from_utf8_lossy(data).into_owned(),
            _ => String::new(),
        }
    };
    let builtin: BTreeSet<String> = text("modules.builtin").lines().map(module_name).collect();
    // name → path relative to the module dir, from the files themselves.
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for (p, e) in staging.iter() {
        if let (Ok(rel), Entry::File { .. }) = (p.strip_prefix(&dir), e) {
            let rel = rel.to_string_lossy();
            if rel.contains(".ko") {
                by_name.insert(module_name(&rel), rel.into_owned());
            }
        }
    }
    let deps_of = |rel: &str| -> Result<Vec<String>, AssembleError> {
        match staging.get(&dir.join(rel)) {
            Some(Entry::File { data, .. }) => {
                let ko = module_bytes(data, rel).map_err(AssembleError::Modules)?;
                Ok(modinfo_depends(&ko))
            }
            _ => Ok(Vec::new()),
        }
    };

    let mut order: Vec<String> = Vec::new();
    let mut deps_table: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut missing = Vec::new();
    // Depth-first, dependencies before dependents. (A plain recursive fn
    // with its state passed in: a closure cannot recurse.)
    #[allow(clippy::too_many_arguments)]
    fn visit(
        name: &str,
        by_name: &BTreeMap<String, String>,
        builtin: &BTreeSet<String>,
        deps_of: &dyn Fn(&str) -> Result<Vec<String>, AssembleError>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        table: &mut BTreeMap<String, Vec<String>>,
        missing: &mut Vec<String>,
    ) -> Result<(), AssembleError> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let Some(rel) = by_name.get(name) else {
            if !builtin.contains(name) {
                missing.push(name.to_owned());
            }
            return Ok(());
        };
        let deps = deps_of(rel)?;
        for d in &deps {
            visit(d, by_name, builtin, deps_of, seen, order, table, missing)?;
        }
        table.insert(
            rel.clone(),
            deps.iter()
                .filter_map(|d| by_name.get(d).cloned())
                .collect(),
        );
        order.push(rel.clone());
        Ok(())
    }
    for w in wanted {
        visit(
            &w.replace('-', "_"),
            &by_name,
            &builtin,
            &deps_of,
            &mut seen,
            &mut order,
            &mut deps_table,
            &mut missing,
        )?;
    }
    if !missing.is_empty() {
        return Err(AssembleError::Modules(format!(
            "kernel {version} has no module {}: check kernel.modules in the profile",
            missing.join(", ")
        )));
    }
    // Stored decompressed: not every kernel can take compressed modules
    // through finit_module (Debian's cloud kernel answers ENOEXEC), and the
    // initramfs is compressed as a whole anyway.
    let plain = |rel: &str| -> String {
        let stem = rel.split(".ko").next().unwrap_or(rel);
        format!("{stem}.ko")
    };
    for m in &order {
        let p = dir.join(m);
        let Some(Entry::File { mode, data }) = staging.get(&p) else {
            return Err(AssembleError::Modules(format!("{} vanished", p.display())));
        };
        let raw = module_bytes(data, m).map_err(AssembleError::Modules)?;
        image.insert(&dir.join(plain(m)), Entry::file(*mode, raw))?;
    }
    let order: Vec<String> = order.iter().map(|m| plain(m)).collect();
    let deps_table: BTreeMap<String, Vec<String>> = deps_table
        .into_iter()
        .map(|(m, d)| (plain(&m), d.iter().map(|x| plain(x)).collect()))
        .collect();
    for name in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if let Some(e) = staging.get(&dir.join(name)) {
            image.insert(&dir.join(name), e.clone())?;
        }
    }
    let dep_text: String = deps_table
        .iter()
        .map(|(m, d)| format!("{m}: {}\n", d.join(" ")))
        .collect();
    image.insert(
        &dir.join("modules.dep"),
        Entry::file(0o644, dep_text.into_bytes()),
    )?;
    let list: String = order
        .iter()
        .map(|m| format!("{}\n", dir.join(m).display()))
        .collect();
    image.insert(
        Path::new("etc/modules-load.list"),
        Entry::file(0o644, list.into_bytes()),
    )?;
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_dep_lines() {
        assert_eq!(
            module_name("kernel/net/bridge/br_netfilter.ko.xz"),
            "br_netfilter"
        );
        assert_eq!(module_name("kernel/x/nf-conntrack.ko"), "nf_conntrack");
        let d = parse_dep("a.ko: b.ko c.ko\nb.ko:\n");
        assert_eq!(d["a.ko"], vec!["b.ko", "c.ko"]);
    }

    /// A minimal ELF64 relocatable object, as a kernel module is, whose
    /// `.modinfo` section holds `modinfo`.
    fn module_elf(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let modinfo_at = 64u64;
        let shstrtab_at = modinfo_at + modinfo.len() as u64;
        let shoff = (shstrtab_at + shstrtab.len() as u64).next_multiple_of(8);
        let mut elf = Vec::new();
        elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        elf.extend_from_slice(&[0; 8]);
        elf.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
        elf.extend_from_slice(&62u16.to_le_bytes()); // x86-64
        elf.extend_from_slice(&1u32.to_le_bytes()); // version
        elf.extend_from_slice(&0u64.to_le_bytes()); // entry
        elf.extend_from_slice(&0u64.to_le_bytes()); // program headers: none
        elf.extend_from_slice(&shoff.to_le_bytes());
        elf.extend_from_slice(&0u32.to_le_bytes()); // flags
        for half in [64u16, 0, 0, 64, 3, 2] {
            // header size, program header size and count, section header
            // size and count, index of the section name table
            elf.extend_from_slice(&half.to_le_bytes());
        }
        assert_eq!(elf.len() as u64, modinfo_at);
        elf.extend_from_slice(modinfo);
        elf.extend_from_slice(shstrtab);
        elf.resize(shoff as usize, 0);
        let section = |name: u32, kind: u32, flags: u64, offset: u64, size: usize| {
            let mut h = Vec::new();
            h.extend_from_slice(&name.to_le_bytes());
            h.extend_from_slice(&kind.to_le_bytes());
            h.extend_from_slice(&flags.to_le_bytes());
            h.extend_from_slice(&0u64.to_le_bytes()); // address
            h.extend_from_slice(&offset.to_le_bytes());
            h.extend_from_slice(&(size as u64).to_le_bytes());
            h.extend_from_slice(&[0; 8]); // link, info
            h.extend_from_slice(&1u64.to_le_bytes()); // alignment
            h.extend_from_slice(&0u64.to_le_bytes()); // entry size
            h
        };
        elf.extend_from_slice(&[0; 64]);
        elf.extend(section(1, 1, 2, modinfo_at, modinfo.len())); // PROGBITS, ALLOC
        elf.extend(section(10, 3, 0, shstrtab_at, shstrtab.len())); // STRTAB
        elf
    }

    #[test]
    fn modinfo_depends_of_a_module_compressed_or_not() {
        let ko = module_elf(b"license=GPL\0depends=bridge,nf-conntrack\0name=br_netfilter\0");
        assert_eq!(modinfo_depends(&ko), ["bridge", "nf_conntrack"]);
        let none = module_elf(b"license=GPL\0depends=\0name=bridge\0");
        assert!(modinfo_depends(&none).is_empty());
        assert!(modinfo_depends(b"not an ELF file").is_empty());

        let zst = zstd::encode_all(&ko[..], 3).unwrap();
        assert_eq!(module_bytes(&zst, "br_netfilter.ko.zst").unwrap(), ko);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &ko).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(module_bytes(&gz, "br_netfilter.ko.gz").unwrap(), ko);
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        std::io::Write::write_all(&mut xz, &ko).unwrap();
        let xz = xz.finish().unwrap();
        assert_eq!(module_bytes(&xz, "br_netfilter.ko.xz").unwrap(), ko);
        assert_eq!(module_bytes(&ko, "br_netfilter.ko").unwrap(), ko);
        assert!(module_bytes(b"junk", "x.ko.zst").is_err());
    }
}
