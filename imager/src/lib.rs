pub mod tree;
pub mod assemble;
pub mod lock;
pub mod profile;
