//! sag's agent as a library: the modules behind the `sag-agent` binary.

pub mod admin;
pub mod cli;
pub mod clock;
pub mod credentials;
pub mod dataplane;
pub mod pools;
pub mod store;
pub mod testing;
pub mod validation;
