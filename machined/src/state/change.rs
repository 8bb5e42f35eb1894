//! What a config change means: the diff shown to the operator, and whether
//! it can be applied live.

use machine_api::config::MachineConfig;

/// Fields that only take effect at boot: disks, links, kernel modules and
/// kernel parameters are set up by init before services start.
/// Reads one field of a config as comparable text.
type FieldReader = fn(&MachineConfig) -> String;

const REBOOT_FIELDS: &[(&str, FieldReader)] = &[
    ("machine.installDisk", |c| {
        format!("{:?}", c.machine.install_disk)
    }),
    ("machine.network", |c| format!("{:?}", c.machine.network)),
    ("machine.kernelModules", |c| {
        format!("{:?}", c.machine.kernel_modules)
    }),
    ("machine.sysctls", |c| format!("{:?}", c.machine.sysctls)),
];

/// The fields whose change needs a reboot.
pub fn reboot_required(old: &MachineConfig, new: &MachineConfig) -> Vec<&'static str> {
    REBOOT_FIELDS
        .iter()
        .filter(|(_, get)| get(old) != get(new))
        .map(|(name, _)| *name)
        .collect()
}

/// A unified diff of the two configs with secrets redacted.
pub fn diff(old: Option<&MachineConfig>, new: &MachineConfig) -> String {
    let old_text = old.map(|c| c.redacted().to_yaml()).unwrap_or_default();
    let new_text = new.redacted().to_yaml();
    similar::TextDiff::from_lines(&old_text, &new_text)
        .unified_diff()
        .context_radius(2)
        .header("running", "new")
        .to_string()
}
