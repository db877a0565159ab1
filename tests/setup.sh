#!/usr/bin/env bash
# Installs what building, the demo and the tests need on Debian 12, as root.
# Idempotent: packages already present are not fetched again; `apt-get update`
# runs once, and only when something is missing or the package lists are
# empty. The Rust toolchain (1.91 or newer) must already be installed: Debian
# 12's own rustc is too old for smoltcp 0.14.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

# util-linux: setpriv and prlimit (the unprivileged and descriptor-limit
# tests); systemd: systemd-socket-activate (the socket activation tests);
# libvirt-*: the libvirt boot test (its libvirtd, QEMU as libvirt-qemu).
# iperf3 and passt are for the benchmark (bench/vm.rs).
packages=(qemu-system-x86 busybox-static cpio kmod iproute2 procps util-linux libc6-dev dnsmasq-base iperf3 passt tcpdump systemd
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || ! apt-cache depends linux-image-cloud-amd64 2>/dev/null | grep -q "Depends: linux-image-[0-9]"; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root to install: ${missing[*]:-package lists}" >&2
    exit 1
  fi
  echo "setup.sh: apt-get update; installing: ${missing[*]:-(none, lists only)}"
  apt-get update -q >/dev/null
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup.sh: cargo not found; install Rust 1.91 or newer (rustup) first" >&2
  exit 1
fi
rustc_minor=$(rustc --version | awk '{split($2, v, "."); print v[2]}')
if [ "${rustc_minor:-0}" -lt 91 ]; then
  echo "setup.sh: rustc $(rustc --version) is older than 1.91" >&2
  exit 1
fi
bash "$(dirname "$0")/guest/build.sh"
