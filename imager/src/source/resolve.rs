//! The closure of wanted packages over Depends and Pre-Depends, over the
//! union of several suites' indexes: of the records of one name, the
//! highest version (dpkg's order) wins, so a security or point update
//! replaces the release's build.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{compare_versions, PackageRecord, SourceError};

struct Index<'a> {
    /// Name → newest record of that name.
    by_name: BTreeMap<&'a str, &'a PackageRecord>,
    /// Virtual name → names of the packages providing it (sorted).
    providers: BTreeMap<&'a str, BTreeSet<&'a str>>,
}

/// Name → the record of that name with the highest version. Of records
/// with equal versions the first wins, so with indexes concatenated in the
/// profile's suite order a tie goes to the earlier suite.
pub fn newest_by_name(index: &[PackageRecord]) -> BTreeMap<&str, &PackageRecord> {
    let mut by_name: BTreeMap<&str, &PackageRecord> = BTreeMap::new();
    for r in index {
        by_name
            .entry(r.name.as_str())
            .and_modify(|cur| {
                if compare_versions(&r.version, &cur.version) == Ordering::Greater {
                    *cur = r;
                }
            })
            .or_insert(r);
    }
    by_name
}

impl<'a> Index<'a> {
    fn new(index: &'a [PackageRecord]) -> Self {
        let by_name = newest_by_name(index);
        let mut providers: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for r in by_name.values() {
            for p in &r.provides {
                providers
                    .entry(p.as_str())
                    .or_default()
                    .insert(r.name.as_str());
            }
        }
        Index { by_name, providers }
    }

    /// The package that satisfies `name`: the real package of that name,
    /// else a provider, preferring one already selected, else the first by
    /// name.
    fn satisfier(&self, name: &str, selected: &BTreeSet<&str>) -> Option<&'a str> {
        if let Some((n, _)) = self.by_name.get_key_value(name) {
            return Some(n);
        }
        let provs = self.providers.get(name)?;
        provs
            .iter()
            .find(|p| selected.contains(*p))
            .or_else(|| provs.iter().next())
            .copied()
    }

    /// Up to five names close to `name`, for the "did you mean" hint.
    fn close_names(&self, name: &str) -> Vec<String> {
        let limit = (name.len() / 3).max(2);
        let mut scored: Vec<(usize, &str)> = self
            .by_name
            .keys()
            .chain(self.providers.keys())
            .filter_map(|cand| {
                let d = levenshtein(name, cand);
                let contains = name.len() >= 3 && (cand.contains(name) || name.contains(cand));
                (d <= limit || contains).then_some((d, *cand))
            })
            .collect();
        scored.sort();
        scored.dedup_by(|a, b| a.1 == b.1);
        scored
            .into_iter()
            .take(5)
            .map(|(_, n)| n.to_owned())
            .collect()
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Resolves `wanted` against `index`: each wanted name (a package, or a
/// virtual package with one provider) and, when `follow_depends`, the
/// closure over Depends and Pre-Depends. Of an OR-group, an alternative
/// already selected satisfies it, else the first alternative present
/// (directly or through Provides) is taken. A group naming anything in
/// `skip` is not followed. Returns the records sorted by name.
pub fn resolve(
    index: &[PackageRecord],
    wanted: &[String],
    follow_depends: bool,
    skip: &[String],
) -> Result<Vec<PackageRecord>, SourceError> {
    let idx = Index::new(index);
    let skip: BTreeSet<&str> = skip.iter().map(String::as_str).collect();
    let mut selected: BTreeSet<&str> = BTreeSet::new();
    let mut queue = VecDeque::new();

    for w in wanted {
        let name = w.trim();
        let chosen = if let Some((n, _)) = idx.by_name.get_key_value(name) {
            *n
        } else if let Some(provs) = idx.providers.get(name) {
            let in_wanted: Vec<&str> = provs
                .iter()
                .copied()
                .filter(|p| wanted.iter().any(|w| w.trim() == *p))
                .collect();
            match (provs.len(), in_wanted.first()) {
                (_, Some(p)) => p,
                (1, None) => provs.iter().next().copied().unwrap_or(name),
                _ => {
                    return Err(SourceError::AmbiguousVirtual {
                        name: name.to_owned(),
                        providers: provs.iter().map(|s| (*s).to_owned()).collect(),
                    })
                }
            }
        } else {
            return Err(SourceError::UnknownPackage {
                name: name.to_owned(),
                suggestions: idx.close_names(name),
            });
        };
        if selected.insert(chosen) {
            queue.push_back(chosen);
        }
    }

    if follow_depends {
        while let Some(name) = queue.pop_front() {
            let Some(rec) = idx.by_name.get(name) else {
                continue;
            };
            for group in rec.pre_depends.iter().chain(&rec.depends) {
                if group.iter().any(|alt| skip.contains(alt.as_str())) {
                    continue;
                }
                let satisfied = group.iter().any(|alt| {
                    selected.contains(alt.as_str())
                        || idx
                            .providers
                            .get(alt.as_str())
                            .is_some_and(|ps| ps.iter().any(|p| selected.contains(p)))
                });
                if satisfied {
                    continue;
                }
                let Some(chosen) = group.iter().find_map(|alt| idx.satisfier(alt, &selected))
                else {
                    return Err(SourceError::Unsatisfiable {
                        package: rec.name.clone(),
                        dependency: group.join(" | "),
                    });
                };
                if selected.insert(chosen) {
                    queue.push_back(chosen);
                }
            }
        }
    }

    // BTreeSet iteration is sorted by name.
    Ok(selected
        .into_iter()
        .filter_map(|n| idx.by_name.get(n).map(|r| (*r).clone()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, version: &str, depends: &[&[&str]], provides: &[&str]) -> PackageRecord {
        PackageRecord {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            filename: format!("pool/{name}.deb"),
            sha256: "0".repeat(64),
            size: 1,
            depends: depends
                .iter()
                .map(|g| g.iter().map(|s| (*s).to_owned()).collect())
                .collect(),
            pre_depends: vec![],
            provides: provides.iter().map(|s| (*s).to_owned()).collect(),
            source: name.into(),
            suite: "trixie".into(),
        }
    }

    fn in_suite(suite: &str, mut r: PackageRecord) -> PackageRecord {
        r.suite = suite.into();
        r
    }

    #[test]
    fn highest_version_over_suites_wins_and_ties_keep_the_earlier_suite() {
        // trixie, trixie-updates, trixie-security, concatenated in that order.
        let idx = vec![
            rec("runc", "1.1.15+ds1-2+b4", &[], &[]),
            rec("kernel", "6.12.117-1", &[], &[]),
            rec("same", "1.0-1", &[], &[]),
            in_suite("trixie-updates", rec("kernel", "6.12.117-2~bpo", &[], &[])),
            in_suite("trixie-updates", rec("same", "1.0-1", &[], &[])),
            in_suite(
                "trixie-security",
                rec("runc", "1.1.15+ds1-2+deb13u1", &[], &[]),
            ),
            in_suite("trixie-security", rec("kernel", "6.12.118-1", &[], &[])),
            in_suite("trixie-security", rec("old", "0.9-1", &[], &[])),
            rec("old", "1:0.1-1", &[], &[]),
        ];
        let n = newest_by_name(&idx);
        let got = |name: &str| (n[name].version.as_str(), n[name].suite.as_str());
        assert_eq!(got("runc"), ("1.1.15+ds1-2+deb13u1", "trixie-security"));
        assert_eq!(got("kernel"), ("6.12.118-1", "trixie-security"));
        assert_eq!(got("same"), ("1.0-1", "trixie"));
        assert_eq!(got("old"), ("1:0.1-1", "trixie"), "the epoch wins");
        let wanted = ["runc".to_owned(), "kernel".to_owned()];
        let r = resolve(&idx, &wanted, true, &[]).unwrap();
        assert_eq!(
            r.iter()
                .map(|r| (r.name.as_str(), r.suite.as_str()))
                .collect::<Vec<_>>(),
            [("kernel", "trixie-security"), ("runc", "trixie-security")]
        );
    }

    fn names(v: &[PackageRecord]) -> Vec<&str> {
        v.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn closure_alternatives_provides_skip_and_versions() {
        let idx = vec![
            rec(
                "app",
                "1",
                &[
                    &["libfoo"],
                    &["missing", "mta"],
                    &["debconf", "debconf-2.0"],
                ],
                &[],
            ),
            rec("libfoo", "1", &[&["libc"]], &[]),
            rec("libfoo", "2", &[&["libc"], &["zlib"]], &[]),
            rec("libc", "1", &[], &[]),
            rec("zlib", "1", &[&["libc"]], &[]),
            rec("postfix", "1", &[], &["mta"]),
            rec("exim", "1", &[], &["mta"]),
            rec("debconf", "1", &[], &[]),
        ];
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let r = resolve(&idx, &s(&["app"]), true, &s(&["debconf"])).unwrap();
        assert_eq!(names(&r), ["app", "exim", "libc", "libfoo", "zlib"]);
        assert_eq!(r[3].version, "2");
        let r = resolve(&idx, &s(&["app", "postfix"]), true, &[]).unwrap();
        assert_eq!(
            names(&r),
            ["app", "debconf", "libc", "libfoo", "postfix", "zlib"]
        );
        let r = resolve(&idx, &s(&["app"]), false, &[]).unwrap();
        assert_eq!(names(&r), ["app"]);
        assert!(matches!(
            resolve(&idx, &s(&["mta"]), false, &[]),
            Err(SourceError::AmbiguousVirtual { .. })
        ));
        let e = resolve(&idx, &s(&["libfo"]), true, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"libfo\"") && e.contains("libfoo"), "{e}");
        let bad = vec![rec("x", "1", &[&["nowhere"]], &[])];
        let e = resolve(&bad, &s(&["x"]), true, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nowhere"), "{e}");
    }
}
