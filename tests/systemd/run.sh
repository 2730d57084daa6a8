#!/usr/bin/env bash
# The Debian package under a real systemd, as an operator meets it (issue 18, items 1–5).
# A copy of the cached Debian 12 root (tests/systemd/root.sh) boots with systemd-nspawn, systemd
# as PID 1, libvirtd and QEMU (KVM) inside, a private network; the newest
# target/debian/virtwarden_*.deb is installed with apt and the service checked point by point.
# Each check prints `ok` or `FAIL`; the last line counts them; any failure exits 1.
# Usage: tests/systemd/run.sh   (as root; `make test-systemd` builds the package first)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=$repo/target/systemd-host
t0=$(date +%s)

fail_setup() { echo "systemd test: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail_setup "needs root (systemd-nspawn)"
[ -e /dev/kvm ] || fail_setup "needs /dev/kvm for the QEMU domain"
deb=$(ls -t "$repo"/target/debian/virtwarden_*.deb 2>/dev/null | head -1)
[ -n "$deb" ] || fail_setup "no target/debian/virtwarden_*.deb: run make deb"

key=$(sha256sum "$here/root.sh" | cut -c1-12)
pristine=$cache/root-$key
bash "$here/root.sh" "$pristine" || fail_setup "cannot build the Debian root"
t_root=$(date +%s)

run=$cache/run.$$
logs=$cache/last-run
rm -rf "$run" "$logs"
mkdir -p "$logs"
cp -a "$pristine" "$run" || fail_setup "cannot copy the root"
cp "$deb" "$run/root/virtwarden.deb"

systemd-nspawn -D "$run" -b --register=no --keep-unit --private-network --bind=/dev/kvm \
    --capability=all -q > "$logs/console.txt" 2>&1 &
nspawn=$!
leader=""
cleanup() {
    if [ -n "$leader" ]; then
        inc journalctl --no-pager -o short-precise > "$logs/journal.txt" 2>&1
        # PID 1 of the container's PID namespace: everything in it (QEMU included) ends with it.
        kill -KILL "$leader" 2>/dev/null
    fi
    kill -KILL "$nspawn" 2>/dev/null
    wait "$nspawn" 2>/dev/null
    rm -rf "$run"
}
trap cleanup EXIT

# Run a command inside the container (all its namespaces, a clean environment).
inc() {
    nsenter -t "$leader" -m -u -i -n -p -C -- \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
}

# wait_for SECONDS COMMAND…: poll until COMMAND succeeds; false after SECONDS.
wait_for() {
    local deadline=$(($(date +%s) + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.3
    done
}

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
# check DESCRIPTION COMMAND…
check() {
    local what=$1; shift
    if "$@" > "$logs/last-check.txt" 2>&1; then ok "$what"; else bad "$what"; sed 's/^/     | /' "$logs/last-check.txt" | tail -15; fi
}

for _ in $(seq 100); do
    leader=$(pgrep -P "$nspawn" -x systemd) && break
    sleep 0.2
done
[ -n "$leader" ] || { cat "$logs/console.txt"; fail_setup "the container's systemd did not start"; }
wait_for 120 inc systemctl is-system-running --wait || true
state=$(inc systemctl is-system-running)
[ "$state" = running ] || { inc systemctl --failed --no-pager; fail_setup "the container's systemd is $state"; }
t_boot=$(date +%s)

prop() { inc systemctl show -P "$2" "$1"; }
status_json() { inc virtwarden status -o json; }
# domain_field NAME FIELD: a field of one domain in `virtwarden status -o json`.
domain_field() {
    status_json | python3 -c '
import json, sys
name, field = sys.argv[1], sys.argv[2]
for d in json.load(sys.stdin)["domains"]:
    if d["name"] == name:
        v = d.get(field)
        print("" if v is None else v)
' "$1" "$2"
}
domstate() { inc virsh -c qemu:///system domstate "$1" 2>/dev/null | head -1; }
# The unit's journal messages ([journalctl options]). Records from the native socket and from
# stderr are not in time order among themselves, so checks look for what is unique to each step
# (or count) instead of reading after a cursor.
journal() { inc journalctl --no-pager -q -u virtwarden -o cat "$@"; }
journal_count() { local pattern=$1; shift; journal "$@" | grep -c -- "$pattern"; }
active_state_is() { test "$(prop virtwarden ActiveState)" = "$1"; }
domstate_is() { test "$(domstate "$1")" = "$2"; }
status_text_has() { local s; s=$(prop virtwarden StatusText); echo "STATUS=$s"; for w in "$@"; do echo "$s" | grep -q -- "$w" || return 1; done; }
# Checks run the helpers in a child bash.
export -f inc wait_for prop status_json domain_field domstate journal journal_count active_state_is domstate_is status_text_has
export leader logs

# --- The host before virtwarden: three QEMU domains (KVM, diskless, 64 MiB).
domain_xml() {
    cat <<EOF
<domain type='kvm'>
  <name>$1</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>$2</devices>
</domain>
EOF
}
domain_xml vm1 "" > "$run/root/vm1.xml"
domain_xml vm2 "" > "$run/root/vm2.xml"
# Its disk does not exist: every start fails.
domain_xml broken "<disk type='file' device='disk'><source file='/srv/missing.img'/><target dev='vda' bus='virtio'/></disk>" \
    > "$run/root/broken.xml"
for d in vm1 vm2 broken; do inc virsh -q -c qemu:///system define "/root/$d.xml" >/dev/null || fail_setup "define $d"; done
inc virsh -q -c qemu:///system start vm1 >/dev/null || fail_setup "start vm1"

host_snapshot() {
    for d in vm1 vm2 broken; do
        echo "$d $(inc virsh -c qemu:///system domstate --reason "$d") autostart=$(inc virsh -c qemu:///system dominfo "$d" | awk '/Autostart/ {print $2}')"
    done
    inc ip -d -o link show | sed 's/ link\/.*//'
    inc sysctl -n net.ipv4.ip_forward net.ipv6.conf.all.forwarding
}

# === Item 1: the package.
host_snapshot > "$logs/before.txt"
t_install0=$(date +%s)
check "apt installs the package (private network: its dependencies are already there)" \
    inc env DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/virtwarden.deb
[ "$failed" -eq 0 ] || fail_setup "the package did not install; nothing else can be checked"
t_install=$(( $(date +%s) - t_install0 ))
check "the service is enabled" test "$(inc systemctl is-enabled virtwarden)" = enabled
check "the service is started and ready (Type=notify)" wait_for 60 active_state_is active
host_snapshot > "$logs/after.txt"
check "install changed nothing (domains, autostart, links, forwarding)" diff "$logs/before.txt" "$logs/after.txt"
check "status says no policy is loaded" wait_for 10 status_text_has 'no policy loaded' 
check "/etc/virtwarden/policies exists, empty, root-owned 0755" \
    inc sh -c 'test -d /etc/virtwarden/policies && test -z "$(ls -A /etc/virtwarden/policies)" && test "$(stat -c %U:%a /etc/virtwarden/policies)" = root:755'
check "the examples are under /usr/share/doc/virtwarden/examples" \
    inc sh -c 'ls /usr/share/doc/virtwarden/examples/policies/*.yaml && test -f /usr/share/doc/virtwarden/examples/systemd/virtwarden.service.d/hooks.conf'
check "the Cockpit page is in /usr/share/cockpit/virtwarden" \
    inc test -f /usr/share/cockpit/virtwarden/manifest.json -a -f /usr/share/cockpit/virtwarden/index.html
check "a man page per command" \
    inc sh -c 'for c in "" -check -plan -apply -run -status -release -reload -diagnose -show; do test -f /usr/share/man/man1/virtwarden$c.1.gz || { echo "no virtwarden$c.1.gz"; exit 1; }; done'
check "bash, zsh and fish completions" \
    inc test -f /usr/share/bash-completion/completions/virtwarden -a -f /usr/share/zsh/vendor-completions/_virtwarden -a -f /usr/share/fish/vendor_completions.d/virtwarden.fish
check "Depends: libvirt0 (from the shared libraries)" bash -c "inc dpkg-query -W -f='\${Depends}\n' virtwarden | tee /dev/stderr | grep -q 'libvirt0'"
check "the packaged unit runs /usr/bin/virtwarden" bash -c "inc systemctl cat virtwarden | grep -q '^ExecStart=/usr/bin/virtwarden run'"
check "the first start is not a restart of the unit (NRestarts=0)" test "$(prop virtwarden NRestarts)" = 0

# === Item 3: logging. Native journal records: priority per level, structured fields, the
# message without a timestamp of its own.
check "records reach journald natively: PRIORITY=6, URI field, no second timestamp" bash -c '
    inc journalctl -u virtwarden -o json --no-pager | python3 -c "
import json, re, sys
recs = [json.loads(l) for l in sys.stdin if l.strip()]
run = [r for r in recs if str(r.get(\"MESSAGE\")).startswith(\"virtwarden running \")]
assert run, \"no record with MESSAGE=virtwarden running\"
r = run[-1]
assert r.get(\"PRIORITY\") == \"6\", r.get(\"PRIORITY\")
assert r.get(\"URI\") == \"qemu:///system\", r
bad = [r[\"MESSAGE\"] for r in recs if isinstance(r.get(\"MESSAGE\"), str) and re.match(r\"\\s*\\d{4}-\\d\\d-\\d\\dT\", r[\"MESSAGE\"])]
assert not bad, bad[:3]
"'
check "ordered after libvirtd and virtqemud, neither pulled in" bash -c '
    after=$(inc systemctl show -P After virtwarden); deps="$(inc systemctl show -P Wants virtwarden) $(inc systemctl show -P Requires virtwarden) $(inc systemctl show -P Requisite virtwarden) $(inc systemctl show -P BindsTo virtwarden)"
    echo "After=$after"; echo "deps=$deps"
    echo "$after" | grep -qw libvirtd.service && echo "$after" | grep -qw virtqemud.service && ! echo "$deps" | grep -Eq "libvirtd|virtqemud"'

# === Item 2: `virtwarden show` adopts the host as it is; `plan` on it has nothing to do.
check "show → plan in sync (exit 0)" inc sh -c '
    virtwarden show > /root/adopted.yaml || exit 1
    mkdir -p /root/adopt && cp /root/adopted.yaml /root/adopt/ && virtwarden plan /root/adopt'
# === Item 4: `check` warns about an exec hook that does not exist.
cat > "$run/root/hook.yaml" <<'EOF'
apiVersion: virtwarden.io/v1alpha1
kind: HostPolicy
metadata: { name: hooked }
spec:
  domains:
    - name: vm1
      remediation:
        - action: exec
          command: ["/usr/local/libexec/no-such-repair", "vm1"]
EOF
check "check warns that an exec hook's command does not exist" \
    bash -c "inc virtwarden check /root/hook.yaml 2>&1 | tee /dev/stderr | grep -i 'warning' | grep -q '/usr/local/libexec/no-such-repair'"

# === A policy through `systemctl reload`: one reload per change.
cat > "$run/root/test.yaml" <<'EOF'
apiVersion: virtwarden.io/v1alpha1
kind: HostPolicy
metadata: { name: test }
spec:
  domains:
    - name: vm1
      state: running
      restart: always
    - name: vm2
      state: running
      restart: always
      # A backoff step would be plain to see: the first retry waits 10 s.
      backoff: { initialDelay: 10s, maxDelay: 10s, maxRestarts: 10, window: 1h }
    - name: broken
      state: running
      restart: always
      backoff: { initialDelay: 1s, maxDelay: 1s, maxRestarts: 2, window: 1h }
EOF
unchanged0=$(journal_count 'unchanged since the last load')
reloads0=$(journal_count 'policies reloaded')
inc sh -c 'cp /root/test.yaml /etc/virtwarden/policies/.test.tmp && mv /etc/virtwarden/policies/.test.tmp /etc/virtwarden/policies/test.yaml'
check "systemctl reload with a good policy succeeds" inc systemctl reload virtwarden
check "the file watch and the reload: one of them finds the files already loaded" \
    wait_for 30 bash -c "test \$(journal_count 'unchanged since the last load') -gt $unchanged0"
check "one reload per change" bash -c "n=\$((\$(journal_count 'policies reloaded') - $reloads0)); echo \"reloads: \$n\"; test \"\$n\" = 1"
check "STATUS= names the policy and the reload's result" wait_for 10 status_text_has 'policies: test' 'last reload OK' 

# === Item 4: a domain never seen before, shut off, started by virtwarden: a start, not a restart.
check "vm2 (never started) is started" wait_for 60 bash -c "test \"\$(domstate vm2)\" = running"
check "vm2's first start is not a restart (restarts 0)" \
    wait_for 10 bash -c "test \"\$(domain_field vm2 restarts)\" = 0"
inc virsh -q -c qemu:///system destroy vm2 >/dev/null
check "a destroyed domain (restart: always) right after install is back" wait_for 60 bash -c "test \"\$(domstate vm2)\" = running"
check "…without backoff: one restart counted, no restart waiting" bash -c "
    r=\$(domain_field vm2 restarts); echo \"restarts: \$r\"
    test \"\$r\" = 1 && ! journal | grep -E 'vm2.*restart in|restart in.*vm2'"

# === Item 3: errors at error priority: a quarantine shows in `journalctl -p err`.
check "journalctl -p err shows the quarantine of the domain that cannot start" \
    wait_for 120 bash -c "inc journalctl -u virtwarden -p err -o json --no-pager | grep -q '\"DOMAIN\":\"broken\".*quarantined\\|quarantined.*\"DOMAIN\":\"broken\"'"

# === Item 3: a rejected reload fails and keeps the last good policy.
printf 'apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: { name: bad }\nspec:\n  domains:\n    - name: vm1\n      state: sideways\n' > "$run/root/bad.yaml"
inc install -m 0644 /root/bad.yaml /etc/virtwarden/policies/bad.yaml
check "systemctl reload fails when the new policy is rejected" bash -c "! inc systemctl reload virtwarden"
check "the service stays active" active_state_is active
check "STATUS= says the reload failed" wait_for 10 status_text_has 'reload FAILED' 'last good policy in force'
check "systemctl status shows it" bash -c "s=\$(inc systemctl status --no-pager virtwarden); echo \"\$s\" | head -8; echo \"\$s\" | grep -q 'Status: .*reload FAILED'"
check "the last good policy stays in force" bash -c "status_json | python3 -c 'import json,sys; p=json.load(sys.stdin)[\"policies\"]; print(p); assert p == [\"test\"]'"
check "the rejection is in journalctl -p err, located" \
    wait_for 10 bash -c "journal -p err | grep -q 'bad.yaml:[0-9]*:[0-9]*: unknown variant .sideways'"
inc rm /etc/virtwarden/policies/bad.yaml

# === Item 3: the hooks drop-in, installed as documented, on a host without its directories.
inc sh -c 'rm -rf /var/log/virtwarden-hooks; rmdir /var/lib/libvirt/images'
check "drop-in installed as documented" inc sh -c '
    install -D -m 0644 /usr/share/doc/virtwarden/examples/systemd/virtwarden.service.d/hooks.conf \
      /etc/systemd/system/virtwarden.service.d/hooks.conf && systemctl daemon-reload && systemctl restart virtwarden'
check "with the drop-in the service runs" wait_for 60 active_state_is active
check "…and its hooks may write /var/log/virtwarden-hooks, not the rest of /var" bash -c '
    pid=$(inc systemctl show -P MainPID virtwarden)
    inc nsenter -t "$pid" -m touch /var/log/virtwarden-hooks/probe && ! inc nsenter -t "$pid" -m touch /var/lib/probe'

# === Item 3: an invalid or untrusted policy at start: failed after one attempt, located error.
printf 'apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: { name: bad }\nspec:\n  domains:\n    - name: vm1\n      restart: sometimes\n' > "$run/root/bad.yaml"
inc install -m 0644 /root/bad.yaml /etc/virtwarden/policies/bad.yaml
inc systemctl restart virtwarden >/dev/null 2>&1
check "invalid policy at start: the unit is failed (no auto-restart pending)" \
    wait_for 30 active_state_is failed
check "…after one attempt (NRestarts=0, exit status 2)" \
    bash -c "test \"\$(prop virtwarden NRestarts)\" = 0 && test \"\$(prop virtwarden ExecMainStatus)\" = 2"
check "…with the located error in the journal" \
    wait_for 10 bash -c "journal | grep -q 'bad.yaml:[0-9]*:[0-9]*: unknown variant .sometimes'"
check "…at error priority, located" wait_for 10 bash -c "journal -p err | grep 'not starting' | grep -q 'bad.yaml:[0-9]*:[0-9]*: unknown variant .sometimes'"
inc rm /etc/virtwarden/policies/bad.yaml
inc chmod 0666 /etc/virtwarden/policies/test.yaml
inc systemctl reset-failed virtwarden
inc systemctl start virtwarden >/dev/null 2>&1
check "untrusted policy at start: failed after one attempt" \
    bash -c "wait_for 30 active_state_is failed && test \"\$(prop virtwarden NRestarts)\" = 0"
check "…saying which file and why" wait_for 10 bash -c "journal -p err | grep -q 'test.yaml is writable'"
inc chmod 0644 /etc/virtwarden/policies/test.yaml
inc systemctl reset-failed virtwarden
check "fixed, the service starts again" bash -c "inc systemctl start virtwarden && active_state_is active"

end=$(date +%s)
echo "systemd test: root $((t_root - t0)) s (cached when 0), boot $((t_boot - t_root)) s, install ${t_install} s, total $((end - t0)) s; logs in $logs"
echo "systemd test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
