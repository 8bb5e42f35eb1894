//! What a config change means: the diff shown to the operator, and whether
//! it can be applied live.

use machine_api::config::MachineConfig;

/// Fields that only take effect at boot: disks and links are set up
/// before services start.
/// Reads one field of a config as comparable text.
type FieldReader = fn(&MachineConfig) -> String;

const REBOOT_FIELDS: &[(&str, FieldReader)] = &[
    ("machine.installDisk", |c| {
        format!("{:?}", c.machine.install_disk)
    }),
    ("machine.network", |c| format!("{:?}", c.machine.network)),
];

/// The fields whose change needs a reboot. Kernel settings are applied
/// live when added or changed; removing one needs a reboot, since the
/// kernel keeps a set sysctl and a loaded module until then.
pub fn reboot_required(old: &MachineConfig, new: &MachineConfig) -> Vec<&'static str> {
    let mut fields: Vec<&'static str> = REBOOT_FIELDS
        .iter()
        .filter(|(_, get)| get(old) != get(new))
        .map(|(name, _)| *name)
        .collect();
    if old
        .machine
        .kernel_modules
        .iter()
        .any(|m| !new.machine.kernel_modules.contains(m))
    {
        fields.push("machine.kernelModules (a module removed)");
    }
    if old
        .machine
        .sysctls
        .keys()
        .any(|k| !new.machine.sysctls.contains_key(k))
    {
        fields.push("machine.sysctls (a sysctl removed)");
    }
    fields
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
