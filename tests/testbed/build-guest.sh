#!/bin/bash
# Builds a tiny Linux guest for the end-to-end tests: Debian's cloud kernel and a busybox
# initramfs whose /init brings up eth0 with the address given as vw_ip=ADDR/PREFIX on the kernel
# command line and serves HTTP on port 80. Output (cached): OUT/vmlinuz, OUT/initrd.gz.
set -euo pipefail
out=$1
[ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && exit 0
mkdir -p "$out"
# Tests run in parallel: one builds, the others wait and then find the cache.
exec 9>"$out/.lock"
flock 9
[ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
pkg=$(kernel_pkg)
if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(kernel_pkg); fi
apt-get download -q "$pkg" busybox-static >/dev/null 2>&1 || { apt-get update -qq; apt-get download -q "$pkg" busybox-static; }
mkdir x
for f in ./*.deb; do dpkg-deb -x "$f" x; done
kver=${pkg#linux-image-}
root=initramfs
mkdir -p $root/bin $root/proc $root/sys $root/dev $root/lib/modules $root/www
cp x/bin/busybox $root/bin/busybox
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
  find x/lib/modules/"$kver" -name "$m.ko*" -exec cp {} $root/lib/modules/ \;
done
cat > $root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# No modprobe/modules.dep: load in a few passes until dependencies resolve.
for pass in 1 2 3; do
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko 2>/dev/null
  done
done
ip=$(sed -n 's/.*vw_ip=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$ip" ] || { echo "VW_GUEST_NO_IP"; exit 1; }
ip link set lo up
ip link set eth0 up
ip addr add "$ip" dev eth0
echo "virtwarden e2e guest $ip" > /www/index.html
httpd -p 80 -h /www
echo VW_GUEST_READY
while true; do sleep 3600; done
INIT
chmod +x $root/init
(cd $root && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.gz.tmp"
cp x/boot/vmlinuz-"$kver" "$out/vmlinuz.tmp"
mv "$out/initrd.gz.tmp" "$out/initrd.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
