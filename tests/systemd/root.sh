#!/usr/bin/env bash
# Build (once) the pristine Debian 12 root the systemd test boots: systemd as PID 1, libvirtd
# and QEMU, nothing of virtwarden. Usage: root.sh DIR — DIR is left alone when it is complete
# (run.sh names DIR after this script's checksum, so a changed recipe builds a new root).
# The mirror is read from this machine's apt configuration at run time (never kept in the repo).
set -euo pipefail
root=${1:?usage: root.sh DIR}
[ -e "$root/.complete" ] && exit 0

need=""
for p in debootstrap systemd-container; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
    echo "installing:$need"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need
fi

# The first Debian (not security) mirror this machine's apt uses.
mirror=""
shopt -s nullglob
for f in /etc/apt/sources.list.d/*.sources; do
    mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($i !~ /security/) print $i; break } }' "$f" | head -1)
        [ -n "$mirror" ] && break
    done
fi
[ -n "$mirror" ] || { echo "root.sh: no Debian mirror found in /etc/apt" >&2; exit 1; }

tmp="$root.tmp"
rm -rf "$tmp"
mkdir -p "$(dirname "$root")"
echo "root.sh: debootstrap bookworm from $mirror into $tmp (a few minutes, once)"
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,apt,ca-certificates \
    bookworm "$tmp" "$mirror" > "$tmp.log" 2>&1 || { tail -30 "$tmp.log" >&2; exit 1; }
echo "deb $mirror bookworm main" > "$tmp/etc/apt/sources.list"
# No service starts inside the chroot while packages install.
printf '#!/bin/sh\nexit 101\n' > "$tmp/usr/sbin/policy-rc.d"
chmod 755 "$tmp/usr/sbin/policy-rc.d"
chroot "$tmp" apt-get update -qq
chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 iproute2 procps \
    >> "$tmp.log" 2>&1 || { tail -30 "$tmp.log" >&2; exit 1; }
chroot "$tmp" apt-get clean
rm -f "$tmp/usr/sbin/policy-rc.d"
# In the container cgroup v1 controllers are read-only: libvirt must not try to use them. QEMU
# runs as root: the bound /dev/kvm keeps the host's owner and mode (root, 0600).
printf 'cgroup_controllers = [ ]\nuser = "root"\ngroup = "root"\n' >> "$tmp/etc/libvirt/qemu.conf"
# Shutting the container down must not wait minutes for guests without an OS to power off.
chroot "$tmp" systemctl mask libvirt-guests.service >/dev/null 2>&1
echo virtwarden-test > "$tmp/etc/hostname"
# No login prompt on the console the test does not read.
chroot "$tmp" systemctl mask console-getty.service getty@.service systemd-networkd-wait-online.service >/dev/null 2>&1 || true
touch "$tmp/.complete"
rm -rf "$root"
mv "$tmp" "$root"
rm -f "$tmp.log"
echo "root.sh: $root ready"
