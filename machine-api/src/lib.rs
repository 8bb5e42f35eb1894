//! What both ends of the wire share: the machine config document (types,
//! validation, JSON Schema), the cluster PKI, and the operator's client file.

pub mod atomic;
pub mod config;
pub mod osconfig;
pub mod pki;
