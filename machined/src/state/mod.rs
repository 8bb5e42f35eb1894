//! The machine config on disk: current, last-known-good, staged, the
//! pending `try` and an unfinished reset, as one record written atomically
//! (temp file, fsync, rename, fsync dir), so a crash or power cut leaves
//! the state before a transition or after it.

pub mod change;
mod store;

pub use store::{
    unix_ms, ConfigStore, FaultHook, Record, StoreError, TryState, Wipe, WritePoint, RECORD,
};
