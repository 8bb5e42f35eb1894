//! The machine config on disk: current, last-known-good, staged, and the
//! pending `try`. Every write is atomic (temp file, fsync, rename, fsync
//! dir), so a crash or power cut leaves the old config or the new one.

pub mod change;
mod store;

pub use store::{unix_ms, BootConfig, ConfigStore, StoreError, TryState};
