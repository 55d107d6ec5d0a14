//! `cargo xtask test`: setup, then every check and test.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

#[derive(Debug, Args)]
pub struct Options {
    /// Skip the setup step, for a machine that is known to be ready.
    #[arg(long)]
    no_setup: bool,
    /// Arguments passed on to `cargo test`, after `--`, such as a test name filter.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// Runs formatting and lint checks, then all tests of the workspace.
pub fn run(options: &Options) -> Result<()> {
    crate::require_root("test")?;
    if !options.no_setup {
        crate::setup::run()?;
    }
    crate::run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    crate::run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    let mut cargo_test = Command::new("cargo");
    cargo_test.args(["test", "--workspace", "--no-fail-fast"]).args(&options.cargo_test_args);
    let totals = run_counting(&mut cargo_test)?;
    // One closing line for the whole run: cargo prints one per test binary, the last often
    // for a crate without doc tests.
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    if totals.ignored > 0 {
        bail!("{} tests were ignored; every test, kernel tests included, must run", totals.ignored);
    }
    if totals.failed > 0 || !totals.success {
        bail!("cargo test failed");
    }
    check_package()?;
    // Repeated as the last line, after the package build's output.
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    Ok(())
}

/// Files the Debian package must install.
const PACKAGE_FILES: [&str; 6] = [
    "./usr/bin/sag-agent",
    "./etc/sag/agent.toml",
    "./usr/lib/systemd/system/sag-agent.service",
    "./usr/share/sag/prometheus/prometheus.yml",
    "./usr/share/sag/prometheus/rules.yml",
    "./usr/share/sag/grafana/sag.json",
];

/// Builds the Debian package with `cargo deb` and checks its files and configuration files.
fn check_package() -> Result<()> {
    let output = Command::new("cargo")
        .args(["deb", "-p", "sag-agent"])
        .current_dir(crate::workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("failed to start cargo deb")?;
    if !output.status.success() {
        bail!("cargo deb failed with {}", output.status);
    }
    // cargo deb prints the path of the package it wrote as its last line.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let package = stdout.lines().last().context("cargo deb printed no package path")?.trim();
    let listing = command_output("dpkg-deb", &["--contents", package])?;
    for file in PACKAGE_FILES {
        if !listing.lines().any(|line| line.ends_with(&format!(" {file}"))) {
            bail!("the package {package} lacks {file}:\n{listing}");
        }
    }
    let conffiles = command_output("dpkg-deb", &["--info", package, "conffiles"])?;
    if conffiles.trim() != "/etc/sag/agent.toml" {
        bail!("the package {package} has conffiles {conffiles:?}, expected /etc/sag/agent.toml");
    }
    println!("package: {package} has the agent, its configuration file and unit, and the rules");
    Ok(())
}

/// Runs a command and returns its standard output, failing if it exits non-zero.
fn command_output(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("failed to start {program}"))?;
    if !output.status.success() {
        bail!("{program} {} failed with {}", args.join(" "), output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[derive(Debug, Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    success: bool,
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines.
fn run_counting(command: &mut Command) -> Result<Totals> {
    command.current_dir(crate::workspace_root()).stdout(Stdio::piped());
    let mut child = command.spawn().with_context(|| format!("failed to start {command:?}"))?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("failed to read cargo test output")?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            totals.passed += count(summary, "passed");
            totals.failed += count(summary, "failed");
            totals.ignored += count(summary, "ignored");
        }
    }
    totals.success = child.wait()?.success();
    Ok(totals)
}

/// Returns the number before `word` in a summary such as "ok. 4 passed; 0 failed; 1 ignored".
fn count(summary: &str, word: &str) -> u64 {
    let fields = summary.split_once(". ").map_or(summary, |(_, fields)| fields);
    fields
        .split(';')
        .filter_map(|field| field.trim().split_once(' '))
        .find(|(_, name)| *name == word)
        .and_then(|(number, _)| number.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn count_reads_summary_fields() {
        let summary =
            "ok. 22 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.00s";
        assert_eq!(count(summary, "passed"), 22);
        assert_eq!(count(summary, "failed"), 1);
        assert_eq!(count(summary, "ignored"), 3);
    }

    #[test]
    fn count_reads_failed_summary() {
        assert_eq!(count("FAILED. 4 passed; 2 failed; 0 ignored", "failed"), 2);
        assert_eq!(count("FAILED. 4 passed; 2 failed; 0 ignored", "passed"), 4);
    }
}
