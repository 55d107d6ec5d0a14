//! Builds the eBPF programs with the nightly toolchain and bpf-linker, for embedding.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("sag-agent has no parent directory"))?
        .join("sag-ebpf");
    // aya-build watches sag-ebpf; the programs also compile sag-common's parser.
    println!("cargo:rerun-if-changed={}", root_dir.with_file_name("sag-common").display());
    let root_dir = root_dir.to_str().ok_or_else(|| anyhow!("sag-ebpf path is not UTF-8"))?;
    let package = Package { name: "sag-ebpf", root_dir, ..Default::default() };
    aya_build::build_ebpf([package], Toolchain::default())
}
