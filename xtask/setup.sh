#!/usr/bin/env bash
# Installs what building and testing sag needs on a fresh Debian 12 machine, and nothing twice.
# Run as root. When everything is already present it returns in a few seconds.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
bpf_linker_version=0.13.0
cargo_deb_version=3.8.0
llvm_prefix=/usr/lib/llvm-22
# Debian packages: LLVM 22 for bpf-linker, then the tools that the kernel and tunnel tests run.
# `--no-install-recommends` keeps wireguard-tools from pulling in a kernel package.
packages=(
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  iproute2 iputils-ping ethtool bpftool tcpdump iperf3 wireguard-tools wireguard-go prometheus
  python3-aiosmtpd systemd
)

log() { printf 'setup: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root: it installs Debian packages and mounts bpffs"
  exit 1
fi

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
    missing+=("$package")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The eBPF crate builds core from source with the nightly toolchain.
sysroot=$(rustc +nightly --print sysroot)
if [[ ! -d "$sysroot/lib/rustlib/src/rust/library/core" ]]; then
  log "adding rust-src to the nightly toolchain"
  if ! rustup component add rust-src --toolchain nightly; then
    archive=""
    for candidate in "$repo/../shared/toolchain" /work/shared/toolchain; do
      if [[ -f "$candidate/SHA256SUMS" ]]; then
        archive=$candidate
        break
      fi
    done
    if [[ -z "$archive" ]]; then
      log "rustup could not add rust-src and no fallback copy was found in ../shared/toolchain"
      exit 1
    fi
    log "rustup failed; unpacking the fallback copy from $archive"
    (cd "$archive" && sha256sum --check --quiet SHA256SUMS)
    tar -xJf "$archive"/rust-src-nightly-*.tar.xz -C "$sysroot/lib/rustlib"
  fi
fi

if ! bpf-linker --version 2>/dev/null | grep -q "$bpf_linker_version"; then
  log "building bpf-linker $bpf_linker_version against LLVM 22 (about 2 minutes)"
  # Without LLVM_PREFIX the build finds LLVM 14's llvm-config and fails to link -lLLVM.
  LLVM_PREFIX=$llvm_prefix cargo install "bpf-linker@$bpf_linker_version" --locked \
    --no-default-features --features llvm-22
fi

# `cargo deb` builds the Debian package; the tests build it too.
if ! cargo deb --version 2>/dev/null | grep -q "$cargo_deb_version"; then
  log "installing cargo-deb $cargo_deb_version (about 2.5 minutes)"
  cargo install "cargo-deb@$cargo_deb_version" --locked
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs on /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

log "ready"
