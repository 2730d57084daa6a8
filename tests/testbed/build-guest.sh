#!/bin/bash
# Builds a tiny Linux guest for the end-to-end tests: Debian's cloud kernel and a busybox
# initramfs whose /init brings up eth0 with the address given as vw_ip=ADDR/PREFIX on the kernel
# command line and serves HTTP on port 80 (`/` and `/healthz`). Output (cached): OUT/vmlinuz,
# OUT/initrd.gz, OUT/version.
#
# Breakage knobs, driven from the host: a control listener on port 81 runs CGI scripts
#   /cgi-bin/kill-http   stop the port-80 service (connections are then refused)
#   /cgi-bin/start-http  start it again
#   /cgi-bin/stop-http   freeze it (SIGSTOP: connections are accepted, never answered)
#   /cgi-bin/cont-http   unfreeze it
#   /cgi-bin/panic       panic the kernel (sysrq c) a second later; with panic=0 on the command
#                        line and no pvpanic device the guest hangs and libvirt still says running;
#                        with a pvpanic device (<panic model='isa'/>, driver pvpanic-mmio loaded
#                        at boot) libvirt reports CRASHED/PANICKED
#   /cgi-bin/reboot      reset the guest (reboot -f) a second later: a libvirt REBOOT event
#   /cgi-bin/stop-agent  kill the QEMU guest agent (an AGENT_LIFECYCLE disconnect)
# Debian's qemu-guest-agent (with the libraries it links, copied from this host's Debian) runs
# when the domain has a virtio channel named org.qemu.guest_agent.0.
set -euo pipefail
out=$1
# Bump when the guest changes, so cached guests are rebuilt.
version=3
cached() { [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && [ "$(cat "$out/version" 2>/dev/null)" = "$version" ]; }
cached && exit 0
mkdir -p "$out"
# Tests run in parallel: one builds, the others wait and then find the cache.
exec 9>"$out/.lock"
flock 9
cached && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
pkg=$(kernel_pkg)
if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(kernel_pkg); fi
pkgs=("$pkg" busybox-static qemu-guest-agent)
apt-get download -q "${pkgs[@]}" >/dev/null 2>&1 || { apt-get update -qq; apt-get download -q "${pkgs[@]}"; }
mkdir x
for f in ./*.deb; do dpkg-deb -x "$f" x; done
kver=${pkg#linux-image-}
root=initramfs
mkdir -p $root/bin $root/proc $root/sys $root/dev $root/run $root/lib/modules $root/www $root/ctl/cgi-bin $root/usr/sbin
cp x/bin/busybox $root/bin/busybox
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_console pvpanic pvpanic-mmio"
for m in $modules; do
  find x/lib/modules/"$kver" -name "$m.ko*" -exec cp {} $root/lib/modules/ \;
done
# The guest agent and every library it links (same Debian release as the package).
cp x/usr/sbin/qemu-ga $root/usr/sbin/qemu-ga
if ldd x/usr/sbin/qemu-ga | grep -q 'not found'; then
  echo "qemu-ga needs libraries this host lacks:" >&2; ldd x/usr/sbin/qemu-ga >&2; exit 1
fi
for lib in $(ldd x/usr/sbin/qemu-ga | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cgi() { printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\n%s\n' "$2" > $root/ctl/cgi-bin/"$1"; chmod +x $root/ctl/cgi-bin/"$1"; }
cgi kill-http 'kill $(cat /run/http.pid) && echo killed'
cgi start-http '/bin/start-http && echo started'
cgi stop-http 'kill -STOP $(cat /run/http.pid) && echo stopped'
cgi cont-http 'kill -CONT $(cat /run/http.pid) && echo continued'
cgi panic 'echo panicking; (sleep 1; echo c > /proc/sysrq-trigger) >/dev/null 2>&1 &'
cgi reboot 'echo rebooting; (sleep 1; reboot -f) >/dev/null 2>&1 &'
cgi stop-agent 'kill $(cat /run/qemu-ga.pid) && echo stopped'
cat > $root/bin/start-http <<'START'
#!/bin/sh
httpd -f -p 80 -h /www >/dev/null 2>&1 </dev/null &
echo $! > /run/http.pid
START
chmod +x $root/bin/start-http
cat > $root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
# No modprobe/modules.dep: load in a few passes until dependencies resolve.
for pass in 1 2 3; do
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_console pvpanic pvpanic-mmio; do
    insmod /lib/modules/$m.ko 2>/dev/null
  done
done
ip=$(sed -n 's/.*vw_ip=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$ip" ] || { echo "VW_GUEST_NO_IP"; exit 1; }
ip link set lo up
ip link set eth0 up
ip addr add "$ip" dev eth0
echo "virtwarden e2e guest $ip" > /www/index.html
echo ok > /www/healthz
start-http
httpd -p 81 -h /ctl
agent=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && agent=/dev/${p##*/}
done
if [ -n "$agent" ]; then
  /usr/sbin/qemu-ga -m virtio-serial -p "$agent" -t /run -f /run/qemu-ga.pid -d && echo VW_GUEST_AGENT
fi
echo VW_GUEST_READY
while true; do sleep 3600; done
INIT
chmod +x $root/init
(cd $root && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.gz.tmp"
cp x/boot/vmlinuz-"$kver" "$out/vmlinuz.tmp"
mv "$out/initrd.gz.tmp" "$out/initrd.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$version" > "$out/version"
