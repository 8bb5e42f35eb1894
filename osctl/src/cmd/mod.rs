//! One module per verb.

pub mod apply_config;
pub mod boot;
pub mod bootstrap;
pub mod cluster;
pub mod confirm;
pub mod dmesg;
pub mod docs;
pub mod etcd;
pub mod events;
pub mod gen;
pub mod get;
pub mod health;
pub mod kubeconfig;
pub mod logs;
pub mod power;
pub mod services;
pub mod session;
pub mod support;
pub mod upgrade;
pub mod validate;
pub mod version;
