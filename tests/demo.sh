#!/usr/bin/env bash
# The main job: build vhost-gateway, run it on its embedded defaults inside a
# fresh network namespace, and boot a demo guest through it that shows its
# network: DHCP lease, SLAAC address, pings to the gateway. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
cargo build --release --quiet
bin=$PWD/target/release/vhost-gateway

ns=vg-demo-$$
dir=$(mktemp -d)
cleanup() {
  [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
ip netns exec "$ns" "$bin" --socket-path "$dir/vhost.sock" &
daemon=$!
for _ in $(seq 1 100); do [ -S "$dir/vhost.sock" ] && break; sleep 0.05; done

mkdir "$dir/extra"
cat > "$dir/extra/test.sh" <<'GUEST'
echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
ip link set eth0 up
udhcpc -i eth0 -s /etc/udhcpc.sh -q -n -t 10 -T 1 -O mtu -O search
for i in $(seq 1 150); do
  ip -6 addr show dev eth0 scope global | grep -q inet6 && break
  sleep 0.1
done
echo "--- guest addresses and routes"
ip addr show dev eth0
ip route; ip -6 route
echo "--- ping the gateway"
ping -c 3 198.19.0.1
ping6 -c 3 fd76:6761:7465::1
GUEST
chmod +x "$dir/extra/test.sh"
(cd "$dir/extra" && echo test.sh | cpio -o -H newc --quiet) > "$dir/extra.cpio"
cat target/guest/initramfs.cpio "$dir/extra.cpio" > "$dir/initrd"

if [ -e /sys/module/kvm_intel ] || [ -e /sys/module/kvm_amd ]; then
  accel=(-accel kvm -cpu host)
else
  accel=(-accel tcg,thread=multi -cpu max)
fi
qemu-system-x86_64 "${accel[@]}" -m 512M -smp 1 -nographic -nodefaults -no-reboot \
  -serial stdio \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -chardev socket,id=c0,path="$dir/vhost.sock" -netdev vhost-user,id=n0,chardev=c0 \
  -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,vectors=0,romfile= \
  -kernel target/guest/vmlinuz -initrd "$dir/initrd" \
  -append "console=ttyS0 quiet panic=-1 cryptomgr.notests" 2>/dev/null | tr -d '\r' | grep -v -e '^\x1b' -e SeaBIOS -e 'Booting from'
