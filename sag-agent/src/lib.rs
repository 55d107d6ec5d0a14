//! sag's agent as a library: the modules behind the `sag-agent` binary.

pub mod admin;
pub mod api;
pub mod api_client;
pub mod billing;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod dataplane;
pub mod gateway;
pub mod history;
pub mod kernel;
pub mod lifecycle;
pub mod login_api;
pub mod metrics;
pub mod netlink;
pub mod notify;
pub mod pools;
pub mod roaming;
pub mod store;
pub mod testing;
pub mod tls;
pub mod validation;
pub mod wgconfig;
