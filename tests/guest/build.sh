#!/usr/bin/env bash
# Builds the test guest under target/guest/: Debian's cloud kernel (vmlinuz)
# and a busybox-static initramfs (initramfs.cpio) with the virtio-net modules.
# Idempotent: a stamp names the kernel package and this script's hash, and a
# matching stamp means nothing is rebuilt. Needs: apt (after apt-get update),
# dpkg-deb, depmod (kmod), cpio, busybox-static, cargo with glibc's static
# libraries (libc6-dev) for the probe.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

root=$(cd "$(dirname "$0")/../.." && pwd)
out=${GUEST_DIR:-$root/target/guest}
here=$(cd "$(dirname "$0")" && pwd)

pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
  awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  echo "build.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2
  exit 1
fi
# Test processes may call this at once (nextest runs each test in its own
# process): one builds, the others wait and then find the stamp current.
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
want="$pkg $(cat "$here/build.sh" "$here/init" "$here/udhcpc.sh" "$here/probe/Cargo.toml" "$here/probe/Cargo.lock" "$here/probe/src/main.rs" | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$want" ] &&
  [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
(cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1) || {
  echo "build.sh: apt-get download $pkg failed" >&2
  exit 1
}
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/x"
kver=${pkg#linux-image-}
moddir="$work/x/lib/modules/$kver"
# The package ships no modules.dep (depmod runs at install time).
depmod -b "$work/x" "$kver"

# Modules for virtio-net over PCI, dependencies first (from modules.dep).
declare -A seen=()
order=()
resolve() {
  local name=$1 line dep
  [ -n "${seen[$name]:-}" ] && return
  seen[$name]=1
  line=$(grep -E "(^|/)${name}\.ko(\.xz|\.zst)?:" "$moddir/modules.dep" | head -n1)
  [ -n "$line" ] || { echo "build.sh: module $name not found" >&2; exit 1; }
  for dep in ${line#*:}; do
    dep=$(basename "$dep")
    resolve "${dep%%.ko*}"
  done
  order+=("${line%%:*}")
}
for m in virtio_pci virtio_net; do resolve "$m"; done

rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,sbin,etc,proc,sys,dev,tmp,run,modules,usr/bin,usr/sbin}
cp /bin/busybox "$rootfs/bin/busybox"
# The probe: UDP client/servers, connection flood, latency loops; static, so
# it needs nothing else in the initramfs.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
  --manifest-path "$here/probe/Cargo.toml" --target-dir "$root/target/probe"
install -m 0755 "$root/target/probe/release/vg-probe" "$rootfs/bin/vg-probe"
: > "$rootfs/modules.order"
for path in "${order[@]}"; do
  name=$(basename "$path")
  case "$name" in
    *.ko.xz) xz -dc "$moddir/$path" > "$rootfs/modules/${name%.xz}" ;;
    *.ko.zst) zstd -qdc "$moddir/$path" > "$rootfs/modules/${name%.zst}" ;;
    *) cp "$moddir/$path" "$rootfs/modules/$name" ;;
  esac
  echo "${name%%.ko*}" >> "$rootfs/modules.order"
done
install -m 0755 "$here/init" "$rootfs/init"
install -m 0755 "$here/udhcpc.sh" "$rootfs/etc/udhcpc.sh"
(cd "$rootfs" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$out/initramfs.cpio.tmp"
cp "$work/x/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$want" > "$out/stamp"
echo "guest built: $pkg, modules: $(tr '\n' ' ' < "$rootfs/modules.order")"
