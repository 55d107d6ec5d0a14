//! sag's agent as a library: the modules behind the `sag-agent` binary.

pub mod cli;
pub mod credentials;
pub mod dataplane;
pub mod notify;
pub mod testing;
pub mod validation;
