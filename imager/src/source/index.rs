//! The `Packages` index of a component and architecture, verified by the
//! hash and size the signed Release lists for it.

use std::io::Read;

use super::deb822::paragraphs;
use super::{fetch, join_uri, verify_bytes, Cache, Mirror, Release, SourceError};

/// One binary package of the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageRecord {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// Path of the .deb relative to the mirror's URI.
    pub filename: String,
    pub sha256: String,
    pub size: u64,
    /// OR-groups of package names, version and architecture qualifiers
    /// stripped.
    pub depends: Vec<Vec<String>>,
    pub pre_depends: Vec<Vec<String>>,
    pub provides: Vec<String>,
    /// Source package name (the package's own name when not given).
    pub source: String,
    /// The suite whose index lists it (empty when parsed on its own): with
    /// several suites, it says which archive serves `filename`.
    pub suite: String,
}

/// The package name of one relation ("libc6:any (>= 2.36) [amd64] <!nocheck>").
fn relation_name(alt: &str) -> &str {
    let alt = alt.trim();
    let end = alt
        .find(|c: char| c.is_whitespace() || matches!(c, '(' | '[' | '<' | ':'))
        .unwrap_or(alt.len());
    &alt[..end]
}

/// Parses a relation field (Depends, Pre-Depends, Provides) into OR-groups
/// of names.
pub(crate) fn parse_relations(value: &str) -> Vec<Vec<String>> {
    value
        .split(',')
        .map(|group| {
            group
                .split('|')
                .map(relation_name)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect()
}

/// Parses the text of a `Packages` file. `origin` names it in errors.
pub fn parse_packages(text: &str, origin: &str) -> Result<Vec<PackageRecord>, SourceError> {
    let mut out = Vec::new();
    for p in paragraphs(text) {
        let Some(name) = p.get("Package") else {
            continue;
        };
        let need = |f: &str| {
            p.get(f)
                .map(str::to_owned)
                .ok_or_else(|| SourceError::Index {
                    url: origin.to_owned(),
                    reason: format!("package {name} has no {f} field"),
                })
        };
        let size = need("Size")?;
        let size = size.parse().map_err(|_| SourceError::Index {
            url: origin.to_owned(),
            reason: format!("package {name} has a malformed Size {size:?}"),
        })?;
        let sha256 = need("SHA256")?.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(SourceError::Index {
                url: origin.to_owned(),
                reason: format!("package {name} has a malformed SHA256 {sha256:?}"),
            });
        }
        let rel = |f: &str| p.get(f).map(parse_relations).unwrap_or_default();
        out.push(PackageRecord {
            name: name.to_owned(),
            version: need("Version")?,
            architecture: need("Architecture")?,
            filename: need("Filename")?,
            sha256,
            size,
            depends: rel("Depends"),
            pre_depends: rel("Pre-Depends"),
            provides: rel("Provides").into_iter().flatten().collect(),
            source: p
                .get("Source")
                .map(relation_name)
                .filter(|s| !s.is_empty())
                .unwrap_or(name)
                .to_owned(),
            suite: String::new(),
        });
    }
    Ok(out)
}

/// Fetches `dists/{suite}/{component}/binary-{arch}/Packages.xz` (or .gz,
/// or uncompressed, whichever the Release lists first), verified by the
/// hash and size in the Release and cached by hash, and parses it; each
/// record names the Release's suite.
pub fn fetch_index(
    m: &Mirror,
    r: &Release,
    component: &str,
    arch: &str,
    cache: &Cache,
) -> Result<Vec<PackageRecord>, SourceError> {
    let base = format!("{component}/binary-{arch}/Packages");
    let Some((path, (sha256, size))) = ["xz", "gz", ""].iter().find_map(|ext| {
        let p = if ext.is_empty() {
            base.clone()
        } else {
            format!("{base}.{ext}")
        };
        r.files.get(&p).map(|v| (p, v.clone()))
    }) else {
        return Err(SourceError::MissingIndex {
            suite: r.suite.clone(),
            path: format!("{base}.xz"),
        });
    };
    let url = join_uri(&m.uri, &format!("dists/{}/{path}", r.suite));
    let data = match cache
        .read_verified(&sha256)
        .filter(|d| d.len() as u64 == size)
    {
        Some(d) => d,
        None => {
            let d = fetch(&url)?;
            verify_bytes(
                &d,
                &sha256,
                size,
                &url,
                &format!("InRelease of {}", r.suite),
            )?;
            cache.put(&sha256, &d, &url)?;
            d
        }
    };
    let index_err = |reason: String| SourceError::Index {
        url: url.clone(),
        reason,
    };
    let mut raw = Vec::new();
    if path.ends_with(".xz") {
        liblzma::read::XzDecoder::new_multi_decoder(&data[..])
            .read_to_end(&mut raw)
            .map_err(|e| index_err(format!("cannot decompress xz: {e}")))?;
    } else if path.ends_with(".gz") {
        flate2::read::MultiGzDecoder::new(&data[..])
            .read_to_end(&mut raw)
            .map_err(|e| index_err(format!("cannot decompress gzip: {e}")))?;
    } else {
        raw = data;
    }
    let text = String::from_utf8(raw).map_err(|_| index_err("not UTF-8 text".to_owned()))?;
    let mut recs = parse_packages(&text, &url)?;
    for rec in &mut recs {
        rec.suite.clone_from(&r.suite);
    }
    Ok(recs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relations_strip_versions_and_qualifiers() {
        assert_eq!(
            parse_relations("libc6 (>= 2.36), debconf (>= 0.5) | debconf-2.0,python3:any, foo [amd64] <!nocheck>"),
            vec![
                vec!["libc6".to_owned()],
                vec!["debconf".to_owned(), "debconf-2.0".to_owned()],
                vec!["python3".to_owned()],
                vec!["foo".to_owned()],
            ]
        );
        assert!(parse_relations("").is_empty());
    }

    #[test]
    fn packages_records() {
        let h = "b".repeat(64);
        let text = format!(
            "Package: a\nSource: asrc (1.0-1)\nVersion: 1:1.0-1\nArchitecture: amd64\nDepends: b (>= 1),\n c | d\nProvides: virt (= 1)\nFilename: pool/main/a/a.deb\nSize: 10\nSHA256: {h}\nDescription: x\n long\n\nPackage: b\nVersion: 1\nArchitecture: all\nFilename: pool/b.deb\nSize: 3\nSHA256: {h}\n"
        );
        let v = parse_packages(&text, "t").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].source, "asrc");
        assert_eq!(v[0].depends.len(), 2);
        assert_eq!(v[0].depends[1], vec!["c".to_owned(), "d".to_owned()]);
        assert_eq!(v[0].provides, vec!["virt".to_owned()]);
        assert_eq!(v[1].source, "b");
        let bad = "Package: z\nVersion: 1\n";
        let e = parse_packages(bad, "t").unwrap_err().to_string();
        assert!(e.contains("package z"), "{e}");
    }
}
