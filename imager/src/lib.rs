pub mod assemble;
pub mod build;
pub mod format;
pub mod inspect;
pub mod lock;
pub mod profile;
pub mod source;
pub mod tree;
