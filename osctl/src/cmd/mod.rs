//! One module per verb.

pub mod docs;
pub mod gen;
pub mod validate;
