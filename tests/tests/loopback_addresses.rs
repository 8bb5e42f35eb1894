//! Host-mode tests run in parallel, each machined on its own loopback
//! address (port 50000 everywhere): two test files on the same `127.0.N.x`
//! block would take each other's ports now and then, which shows up as a
//! flaky test far from its cause. Each file keeps a block of its own;
//! `127.0.0.1` (free ports only) is shared.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

/// The third octets of the `"127.0.N.` addresses written in `text`.
fn blocks(text: &str) -> Vec<u32> {
    text.match_indices("\"127.0.")
        .filter_map(|(i, m)| {
            let rest = &text[i + m.len()..];
            let end = rest.find('.')?;
            rest[..end].parse().ok()
        })
        .collect()
}

#[test]
fn every_test_file_has_its_own_loopback_block() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut owners: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".rs") || name == "loopback_addresses.rs" {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        let mut mine = blocks(&text);
        mine.sort_unstable();
        mine.dedup();
        for b in mine.into_iter().filter(|b| *b != 0) {
            owners.entry(b).or_default().push(name.clone());
        }
    }
    assert!(owners.len() > 5, "found too few addresses: {owners:?}");
    let shared: Vec<_> = owners.iter().filter(|(_, f)| f.len() > 1).collect();
    assert!(
        shared.is_empty(),
        "loopback blocks used by more than one test file (pick a free 127.0.N for one of them): {shared:?}"
    );
}

#[test]
fn blocks_are_read_from_quoted_addresses() {
    assert_eq!(
        blocks(r#"let ip = "127.0.13.11"; let j = "127.0.2.1"; // 127.0.9.9"#),
        [13, 2]
    );
}
