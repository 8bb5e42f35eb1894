//! What machined does at start before it serves: read the config record,
//! take a config from the image, the kernel command line or a URL when
//! there is none, bring the network up, write /etc, adopt services a
//! previous machined left running, and hand the state to the core.

use std::sync::Arc;

use machine_api::config::MachineConfig;
use tracing::info;

use super::{Node, NodeError, Request};
use crate::net;
use crate::state::{ConfigStore, Record, StoreError};

/// How long the first boot of an upgrade has to get every service healthy.
pub const UPGRADE_HEALTHY_WITHIN: std::time::Duration = std::time::Duration::from_secs(600);

impl Node {
    /// Loads the config record, adopts running services, starts the core
    /// and waits until the start transition (resume or roll back a try,
    /// promote a staged config, finish a reset) has run.
    pub async fn boot(self: &Arc<Self>) -> Result<(), NodeError> {
        let store = self.store();
        let mut record = self.load_record(&store)?;
        if record.current.is_none() && !record.resetting && !self.opts.host_mode {
            self.bring_up_network(None).await;
            if let Some(cfg) = self.acquire_config().await {
                let next = Record {
                    generation: record.generation + 1,
                    current: Some(cfg.to_yaml()),
                    ..Record::default()
                };
                match store.commit(&next) {
                    Ok(()) => record = next,
                    Err(e) => self.note(format!("cannot store the acquired config: {e}")),
                }
            }
        }
        if !self.opts.host_mode && !self.net_configured() {
            let cfg = record
                .current
                .as_deref()
                .and_then(|t| MachineConfig::parse(t).ok());
            self.bring_up_network(cfg.as_ref()).await;
        }
        let adopted = self.supervisor.adopt_existing().await;
        if !adopted.is_empty() {
            info!("adopted running services: {}", adopted.join(", "));
        }
        self.start_core(store, record);
        // Queued behind the start transition: returns once it has run.
        self.request(Request::Reconcile).await?;
        if self.config().is_some() {
            self.timeline.mark("config loaded", "");
            self.timeline.mark("services started", "");
        }
        Ok(())
    }

    /// The record on disk. A damaged one (a disk fault: writes are atomic)
    /// is moved aside and the node starts in maintenance mode rather than
    /// not at all.
    fn load_record(&self, store: &ConfigStore) -> Result<Record, NodeError> {
        match store.load() {
            Ok(r) => Ok(r),
            Err(StoreError::Damaged { path, reason }) => {
                let aside = path.with_extension("json.damaged");
                let _ = std::fs::rename(&path, &aside);
                self.note(format!(
                    "the config record {} is damaged ({reason}); moved to {} and started in maintenance mode",
                    path.display(),
                    aside.display()
                ));
                Ok(Record::default())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Once per boot, on a disk boot: this slot's systemd-boot entry loses
    /// its try counter once the new system is healthy. For imager's first
    /// entry (a fresh disk) that is when the API serves: config problems
    /// are handled by rollback, not by another slot. For an upgrade's entry
    /// of a configured node it is when the API serves and every service
    /// is healthy; if that does not happen within [`UPGRADE_HEALTHY_WITHIN`]
    /// the node reboots, and systemd-boot counts a try down; when none is
    /// left it boots the slot that ran before.
    pub fn mark_boot_good(self: &Arc<Self>) {
        if self.opts.host_mode || self.timeline.has("boot entry") {
            return;
        }
        let cmdline = crate::cmdline::Cmdline::current();
        let Some(slot) = crate::bootentry::running_slot(cmdline.text()) else {
            return;
        };
        let this =
            crate::bootentry::with_esp(|esp| Ok(crate::bootentry::this_boot_entry(esp, slot)));
        let upgrade_trial =
            matches!(this, Ok(Some((e, true))) if e.generation > 0) && self.config().is_some();
        if !upgrade_trial {
            self.mark_now(cmdline.text());
            return;
        }
        info!("first boot of an upgrade: the entry is marked good once every service is healthy");
        self.timeline
            .mark("upgrade trial", "waiting for every service to be healthy");
        let node = self.clone();
        let text = cmdline.text().to_owned();
        tokio::spawn(async move {
            let start = std::time::Instant::now();
            loop {
                let services = node.services().await;
                let healthy = !services.is_empty()
                    && services
                        .iter()
                        .all(|s| s.state == crate::supervisor::ServiceState::Healthy);
                if healthy {
                    node.mark_now(&text);
                    return;
                }
                if start.elapsed() > UPGRADE_HEALTHY_WITHIN {
                    let sick: Vec<String> = services
                        .iter()
                        .filter(|s| s.state != crate::supervisor::ServiceState::Healthy)
                        .map(|s| format!("{} {:?}", s.name, s.state))
                        .collect();
                    let msg = format!(
                        "the upgrade did not become healthy within {} s ({}): rebooting; systemd-boot counts a try down and starts the previous slot when none is left",
                        UPGRADE_HEALTHY_WITHIN.as_secs(),
                        sick.join(", ")
                    );
                    tracing::warn!("{msg}");
                    node.timeline.mark("upgrade trial", &msg);
                    node.note(msg);
                    // Dropping the outcome fires the reboot.
                    let _ = node.request(Request::Reboot).await;
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        });
    }

    fn mark_now(&self, cmdline: &str) {
        match crate::bootentry::mark_good(cmdline) {
            None => {}
            Some(Ok(msg)) => {
                info!("{msg}");
                self.timeline.mark("boot entry", &msg);
            }
            Some(Err(e)) => {
                self.timeline
                    .mark("boot entry", &format!("not marked: {e}"));
                self.note(format!(
                    "cannot mark the boot entry good: {e}; systemd-boot keeps counting tries down"
                ));
            }
        }
    }

    fn net_configured(&self) -> bool {
        self.facts
            .read()
            .map(|n| !n.addresses.is_empty())
            .unwrap_or(false)
    }

    /// Configures the network (node mode): the machine config's interfaces,
    /// else the kernel's `ip=`, else DHCP on the first link with carrier.
    async fn bring_up_network(&self, cfg: Option<&MachineConfig>) {
        let cmdline = crate::cmdline::Cmdline::current();
        let plan = match cfg.and_then(|c| net::Plan::from_config(&c.machine.network)) {
            Some(p) => p,
            None => match net::Plan::from_kernel_cmdline(cmdline.text()) {
                Ok(Some(p)) => p,
                Ok(None) => net::Plan::default_dhcp(),
                Err(e) => {
                    self.note(format!("{e}; falling back to DHCP"));
                    net::Plan::default_dhcp()
                }
            },
        };
        let (out, errors) = net::apply(&plan).await;
        for e in errors {
            self.note(format!("network: {e}"));
        }
        let addresses: Vec<String> = out
            .addresses
            .iter()
            .map(|(i, a)| format!("{i} {a}"))
            .collect();
        self.timeline.mark(
            "network up",
            &format!("{} from the {}", addresses.join(", "), plan.source),
        );
        if let Ok(mut n) = self.facts.write() {
            if let Some(ip) = out.node_ip() {
                n.node_ip = ip;
            }
            n.addresses = addresses;
            n.nameservers = out.nameservers;
            if let Some(h) = out.hostname {
                n.cmdline_hostname = Some(h);
            }
        }
    }

    /// A node without a stored config tries the embedded config and the
    /// kernel command line before maintenance mode.
    async fn acquire_config(&self) -> Option<MachineConfig> {
        let cmdline = crate::cmdline::Cmdline::current();
        let embedded = self.opts.paths.root.join(crate::acquire::EMBEDDED_CONFIG);
        let extra_ca = self.opts.paths.root.join(crate::acquire::EMBEDDED_CA);
        for source in crate::acquire::sources(cmdline.text(), &embedded) {
            let got = match crate::acquire::fetch(&source, cmdline.text(), &extra_ca).await {
                Ok(g) => g,
                Err(e) => {
                    self.note(format!("config source {source}: {e}"));
                    continue;
                }
            };
            let cfg = match MachineConfig::parse(&got.text) {
                Ok(c) => c,
                Err(p) => {
                    self.note(format!("config from {source} rejected:\n{p}"));
                    continue;
                }
            };
            if let Err(e) = Self::check_runnable(&cfg) {
                self.note(format!("config from {source} rejected: {e}"));
                continue;
            }
            info!("config from {source} accepted");
            self.timeline.mark("config acquired", &source);
            return Some(cfg);
        }
        None
    }

    /// /etc/hosts, resolv.conf and hostname (node mode), and the kernel's
    /// host name.
    pub(super) fn write_etc_files(&self, cfg: Option<&MachineConfig>) {
        if self.opts.host_mode {
            return;
        }
        let name = self.identity_for(cfg).name;
        let mut nameservers = self.nameservers();
        if let Some(c) = cfg {
            if !c.machine.network.nameservers.is_empty() {
                nameservers = c.machine.network.nameservers.iter().map(|n| n.0).collect();
            }
        }
        let files = crate::etc_files::EtcFiles {
            hostname: name.clone(),
            addresses: vec![self.node_ip()],
            nameservers,
        };
        if let Err(e) = files.write(&self.opts.paths.etc_dir()) {
            self.note(format!("cannot write /system/etc: {e}"));
        }
        if let Err(e) = nix::unistd::sethostname(&name) {
            self.note(format!("cannot set the host name {name}: {e}"));
        }
    }

    /// machine.sysctls and machine.kernelModules (node mode; a host's own
    /// kernel settings are left alone in host mode).
    pub(super) fn apply_kernel_settings(&self, cfg: &MachineConfig) {
        if self.opts.host_mode {
            return;
        }
        let report = crate::kernel::apply(
            std::path::Path::new("/"),
            &crate::kernel::with_role_defaults(cfg),
            &cfg.machine.kernel_modules,
        );
        if !report.done.is_empty() {
            self.timeline
                .mark("kernel settings", &report.done.join(", "));
        }
        for e in report.errors {
            self.note(e);
        }
    }
}
