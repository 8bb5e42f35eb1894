//! Dependency order: who starts first, who stops first, how `list` sorts.

use std::collections::{BTreeMap, BTreeSet};

/// Sorts services by dependency depth, then name: everything a service
/// depends on comes before it. Stopping uses the reverse.
///
/// Dependencies on services outside the set are ignored (they cannot be
/// ordered; the dependent just waits). Services on a dependency cycle cannot
/// be ordered either: they come last, by name, and never start because each
/// waits for the other.
pub(crate) fn dependency_order(services: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut remaining: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let mut out = Vec::with_capacity(services.len());
    loop {
        // One level: everything whose known dependencies are all placed.
        // `remaining` is a BTreeSet, so each level comes out sorted by name.
        let level: Vec<&str> = remaining
            .iter()
            .copied()
            .filter(|name| {
                services.get(*name).is_none_or(|deps| {
                    deps.iter()
                        .all(|d| placed.contains(d.as_str()) || !services.contains_key(d.as_str()))
                })
            })
            .collect();
        if level.is_empty() {
            break;
        }
        for name in level {
            remaining.remove(name);
            placed.insert(name);
            out.push(name.to_owned());
        }
    }
    if !remaining.is_empty() {
        tracing::warn!(services = ?remaining, "dependency cycle between services");
        out.extend(remaining.into_iter().map(str::to_owned));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, deps)| (n.to_string(), deps.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    #[test]
    fn depth_then_name() {
        let g = graph(&[
            ("kubelet", &["containerd"]),
            ("apiserver", &["etcd", "kubelet"]),
            ("etcd", &["containerd"]),
            ("containerd", &[]),
            ("chrony", &[]),
        ]);
        assert_eq!(
            dependency_order(&g),
            ["chrony", "containerd", "etcd", "kubelet", "apiserver"]
        );
    }

    #[test]
    fn unknown_dependencies_are_ignored_and_cycles_go_last() {
        let g = graph(&[
            ("a", &["missing"]),
            ("x", &["y"]),
            ("y", &["x"]),
            ("b", &["a"]),
        ]);
        assert_eq!(dependency_order(&g), ["a", "b", "x", "y"]);
    }
}
