//! machined: the node agent beside PID 1. It serves the OS API, keeps the
//! machine config, and supervises the node's services.
//!
//! The binary is thin (`main.rs`); everything lives here so integration
//! tests and benchmarks can reach the parts.

pub mod acquire;
pub mod api;
pub mod bootentry;
pub mod cmdline;
pub mod disks;
pub mod etc_files;
pub mod etcd_backup;
pub mod events;
pub mod fault;
pub mod kernel;
pub mod kmsg;
pub mod limits;
pub mod mountinfo;
pub mod net;
pub mod node;
pub mod paths;
pub mod pod_network;
pub mod roles;
pub mod state;
pub mod supervisor;
pub mod timeline;
pub mod upgrade;
