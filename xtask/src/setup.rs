//! `cargo xtask setup`: runs the idempotent install script.

use std::process::Command;

use anyhow::Result;

/// Runs `xtask/setup.sh`.
pub fn run() -> Result<()> {
    crate::require_root("setup")?;
    crate::run(Command::new("bash").arg("xtask/setup.sh"))
}
