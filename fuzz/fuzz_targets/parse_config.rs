//! Feeds arbitrary input to every YAML reader of machine-api. None of them
//! may panic, hang or blow up memory, whatever the operator hands in; a
//! config that parses must serialize to YAML that parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use machine_api::config::parse::{parse_yaml, LineMap};
use machine_api::config::MachineConfig;
use machine_api::osconfig::OsConfig;
use machine_api::pki::bundle::SecretsBundle;

fuzz_target!(|data: &[u8]| {
    // Valid UTF-8 is used as is (no copy); anything else lossily.
    let text = String::from_utf8_lossy(data);
    let text: &str = &text;

    let _ = LineMap::build(text);
    let _ = parse_yaml::<SecretsBundle>(text);
    let _ = OsConfig::parse(text);

    if let Ok(cfg) = MachineConfig::parse(text) {
        let yaml = cfg.to_yaml();
        if let Err(problems) = MachineConfig::parse(&yaml) {
            panic!(
                "a parsed config does not parse again after to_yaml:\n{problems}\n--- yaml ---\n{yaml}"
            );
        }
        let _ = cfg.redacted();
    }
});
