//! What both ends of the wire share: the machine config document (types,
//! validation, JSON Schema), the cluster PKI, the operator's client file,
//! the keys and signatures of node images, and the checks of an etcd
//! snapshot;
//! and what every program of the workspace shares: the image layout
//! contract, retry backoff, and the tests' skip rule.

pub mod atomic;
pub mod config;
pub mod etcd_snapshot;
pub mod image_bundle;
pub mod image_signature;
pub mod layout;
pub mod osconfig;
pub mod pki;
pub mod retry;
pub mod testing;

/// The gRPC API (generated from `proto/machine.proto`).
#[allow(clippy::all, missing_debug_implementations)]
pub mod proto {
    tonic::include_proto!("machine.v1alpha1");

    /// The encoded `FileDescriptorSet` of the API: lets tests enumerate
    /// every RPC, and clients reflect on it.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/machine_descriptor.bin"));

    /// `ApplyConfigurationResponse.outcome` of a dry run of a config with
    /// problems (listed in `problems`).
    pub const APPLY_OUTCOME_INVALID: &str = "invalid";
}
