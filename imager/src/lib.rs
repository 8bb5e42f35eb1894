pub mod assemble;
pub mod lock;
pub mod profile;
pub mod tree;
pub mod source;
pub mod format;
pub mod build;
pub mod inspect;
