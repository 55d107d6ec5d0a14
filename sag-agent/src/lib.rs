//! sag's agent as a library: the modules behind the `sag-agent` binary.

pub mod cli;
pub mod dataplane;
pub mod testing;
