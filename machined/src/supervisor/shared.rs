//! State shared by the per-service runners and the public API: each
//! service's current status, and the notifications sent when one changes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::{broadcast, watch};

use super::cgroup::Cgroup;
use super::status::{ServiceState, ServiceStatus};
use super::{lock, SupervisorOptions, SupervisorPaths};

/// Status events a slow subscriber may lag behind before missing some.
const EVENT_CAPACITY: usize = 256;

/// What the supervisor knows about a service right now.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub status: ServiceStatus,
    /// The cgroup of the running process, for resource accounting.
    pub cgroup: Option<Cgroup>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub paths: SupervisorPaths,
    pub options: SupervisorOptions,
    records: Mutex<BTreeMap<String, Record>>,
    events: broadcast::Sender<ServiceStatus>,
    /// Bumped on every status change; services waiting for dependencies
    /// watch it.
    changes: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new(paths: SupervisorPaths, options: SupervisorOptions) -> Self {
        Self {
            paths,
            options,
            records: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(EVENT_CAPACITY).0,
            changes: watch::channel(0).0,
        }
    }

    /// The cgroup a new process of `name` is started in.
    pub(crate) fn cgroup_for(&self, name: &str) -> Option<Cgroup> {
        self.paths
            .cgroup_base
            .as_ref()
            .map(|base| Cgroup::new(base.join(name)))
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ServiceStatus> {
        self.events.subscribe()
    }

    pub(crate) fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Registers a service (replacing any record of the same name).
    pub(crate) fn insert(&self, status: ServiceStatus) {
        lock(&self.records).insert(
            status.name.clone(),
            Record {
                status: status.clone(),
                cgroup: None,
            },
        );
        self.publish(status);
    }

    /// Changes a service's record; subscribers hear of it if its status
    /// actually changed. `since` follows state changes.
    pub(crate) fn update(&self, name: &str, change: impl FnOnce(&mut Record)) {
        let published = {
            let mut records = lock(&self.records);
            let Some(record) = records.get_mut(name) else {
                return;
            };
            let before = record.status.clone();
            change(record);
            if record.status.state != before.state {
                record.status.since = SystemTime::now();
            }
            (record.status != before).then(|| record.status.clone())
        };
        if let Some(status) = published {
            self.publish(status);
        }
    }

    /// Forgets a service, telling subscribers it is stopped for good.
    pub(crate) fn remove(&self, name: &str) {
        let removed = lock(&self.records).remove(name);
        if let Some(mut record) = removed {
            if record.status.state != ServiceState::Stopped {
                record.status.state = ServiceState::Stopped;
                record.status.since = SystemTime::now();
            }
            record.status.pid = None;
            self.publish(record.status);
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<Record> {
        lock(&self.records).get(name).cloned()
    }

    pub(crate) fn snapshot(&self) -> Vec<Record> {
        lock(&self.records).values().cloned().collect()
    }

    /// Those of `deps` that are not Healthy (unknown ones included).
    pub(crate) fn unhealthy(&self, deps: &[String]) -> Vec<String> {
        let records = lock(&self.records);
        deps.iter()
            .filter(|d| {
                records
                    .get(d.as_str())
                    .is_none_or(|r| r.status.state != ServiceState::Healthy)
            })
            .cloned()
            .collect()
    }

    fn publish(&self, status: ServiceStatus) {
        // No subscriber is not an error.
        let _ = self.events.send(status);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}
