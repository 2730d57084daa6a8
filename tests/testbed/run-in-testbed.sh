#!/bin/bash
# Runs CMD inside a private libvirt stack. Start it as the first process of new mount, network
# and PID namespaces:
#   unshare --mount --net --pid --fork --mount-proc -- run-in-testbed.sh WORKDIR CMD...
# It mounts tmpfs over libvirt's runtime and state directories, bind-mounts private copies of
# /etc/libvirt, /etc/passwd and /etc/group (the host's files are never written), starts virtlogd
# and libvirtd, and runs CMD. When this script (PID 1 of the namespace) exits, the kernel kills
# everything left in the namespace: nothing outlives a test, even one that panicked.
set -euo pipefail
work=$1
shift
[ "$$" = 1 ] || { echo "run-in-testbed.sh must be PID 1 of its own PID namespace" >&2; exit 90; }
mount --make-rprivate /
mount -t tmpfs tmpfs /run
for d in /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do
  mkdir -p "$d"
  mount -t tmpfs tmpfs "$d"
done
mkdir -p "$work/etc-libvirt"
cp -a /etc/libvirt/. "$work/etc-libvirt/"
# QEMU runs as root unless VW_TESTBED_QEMU_USER=unprivileged asks for what a real host does:
# libvirt-qemu:kvm, with libvirt chowning the images it opens (dynamic_ownership).
if [ "${VW_TESTBED_QEMU_USER:-root}" = unprivileged ]; then
  qemu_identity='user = "libvirt-qemu"
group = "kvm"
dynamic_ownership = 1'
else
  qemu_identity='user = "root"
group = "root"'
fi
cat > "$work/etc-libvirt/qemu.conf" <<CONF
$qemu_identity
cgroup_controllers = [ ]
security_driver = "none"
CONF
mount --bind "$work/etc-libvirt" /etc/libvirt
# libvirtd refuses to start without the libvirt-qemu user and the kvm group, even when QEMU
# runs as root: add them to private copies of the account files.
cp /etc/passwd "$work/passwd"
cp /etc/group "$work/group"
grep -q '^kvm:' "$work/group" || echo 'kvm:x:64054:' >> "$work/group"
grep -q '^libvirt-qemu:' "$work/group" || echo 'libvirt-qemu:x:64055:' >> "$work/group"
grep -q '^libvirt-qemu:' "$work/passwd" || echo 'libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin' >> "$work/passwd"
# As Debian's libvirt-daemon-system does: libvirt-qemu is a member of kvm.
sed -i '/^kvm:/{/libvirt-qemu/!{s/:$/:libvirt-qemu/;t;s/$/,libvirt-qemu/}}' "$work/group"
mount --bind "$work/passwd" /etc/passwd
mount --bind "$work/group" /etc/group
ip link set lo up
mkdir -p /run/libvirt
virtlogd -d
libvirtd -d --pid-file /run/libvirtd.pid
for _ in $(seq 200); do
  [ -S /run/libvirt/libvirt-sock ] && break
  sleep 0.05
done
[ -S /run/libvirt/libvirt-sock ] || { echo "libvirtd did not start" >&2; exit 91; }
# Run the command as a child and wait: bash, as PID 1, also reaps orphaned QEMU processes.
"$@" &
cmd=$!
wait "$cmd"
