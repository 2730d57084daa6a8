//! `virtwarden show` as an operator adopting a host uses it: show → check → plan finds nothing
//! to do, on libvirt's test driver and, for bridges and forwarding, on a real kernel in a
//! private network namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use virtwarden_policies::{DesiredDomainState, HostPolicy};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn testbed() -> String {
    format!("test://{}", repo().join("examples/testbed/node.xml").display())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The binary with its own lock file and data directory (never the host's /run or /var/lib).
fn virtwarden(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args(args)
        .env_remove("LIBVIRT_DEFAULT_URI")
        .env("VIRTWARDEN_LOCK_FILE", dir.join("virtwarden.lock"))
        .output()
        .expect("run virtwarden")
}

fn plan(dir: &Path, file: &Path) -> Output {
    let data = dir.join("data");
    virtwarden(dir, &["plan", "-c", &testbed(), "--data-dir", data.to_str().unwrap(), file.to_str().unwrap()])
}

#[test]
fn show_writes_the_test_driver_host_so_that_plan_finds_nothing_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = virtwarden(dir.path(), &["show", "--connect", &testbed()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    let file = dir.path().join("host.yaml");
    std::fs::write(&file, &yaml).unwrap();

    // The project's loader takes it as it is, and it says what the host is.
    let check = virtwarden(dir.path(), &["check", file.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}\n{yaml}", text(&check.stderr));
    let doc: HostPolicy = serde_saphyr::from_str(&yaml).unwrap();
    let state = |n: &str| doc.spec.domains.iter().find(|d| d.name == n).unwrap_or_else(|| panic!("{n}: {yaml}"));
    assert_eq!(state("db1").state, DesiredDomainState::Running);
    assert_eq!(state("web1").state, DesiredDomainState::Stopped);
    assert_eq!(state("web1").boot.as_deref().map(|b| b.len()), Some(2));
    assert_eq!(state("cache1").state, DesiredDomainState::Ignored, "paused is not a steady state");
    assert!(yaml.contains("state: ignored # paused"), "the reason is written beside it: {yaml}");
    assert!(!doc.metadata.name.is_empty());

    let p = plan(dir.path(), &file);
    assert_eq!(p.status.code(), Some(0), "{}\n{}\n{yaml}", text(&p.stdout), text(&p.stderr));
    assert!(text(&p.stdout).contains("in sync: nothing to do"), "{}", text(&p.stdout));

    // The same in JSON.
    let out = virtwarden(dir.path(), &["show", "-c", &testbed(), "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json_doc: HostPolicy = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json_doc, doc);
    let json_file = dir.path().join("host.json");
    std::fs::write(&json_file, &out.stdout).unwrap();
    let p = plan(dir.path(), &json_file);
    assert_eq!(p.status.code(), Some(0), "{}\n{}", text(&p.stdout), text(&p.stderr));

    // Editing what the host is makes the same file drift: the check above can fail.
    let edited = yaml.replacen("name: web1\n    state: stopped", "name: web1\n    state: running", 1);
    assert_ne!(edited, yaml, "{yaml}");
    std::fs::write(&file, edited).unwrap();
    assert_eq!(plan(dir.path(), &file).status.code(), Some(3));
}

#[test]
fn show_of_named_domains_writes_only_those_and_refuses_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = virtwarden(dir.path(), &["show", "-c", &testbed(), "web2", "db1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: HostPolicy = serde_saphyr::from_str(&text(&out.stdout)).unwrap();
    let names: Vec<&str> = doc.spec.domains.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["db1", "web2"]);

    let out = virtwarden(dir.path(), &["show", "-c", &testbed(), "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("`nosuch` is not defined"), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
}

/// Bridges (STP, host-NIC ports, no taps) and forwarding, read from a real kernel: the test
/// driver's web1 uses br0. Everything runs in a private network namespace (`unshare --net`).
#[test]
fn show_writes_bridges_and_forwarding_of_a_real_kernel_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_virtwarden");
    let uri = testbed();
    let d = dir.path().display();
    let script = format!(
        r#"set -e
readlink /proc/self/ns/net > {d}/netns
ip link add br0 type bridge stp_state 1 forward_delay 400 hello_time 200 max_age 1200 priority 4096
ip link add eth1 type veth peer name eth1-peer
ip link set eth1 master br0
ip tuntap add vnet7 mode tap
ip link set vnet7 master br0
ip link set br0 up
echo 1 > /proc/sys/net/ipv4/ip_forward
export VIRTWARDEN_LOCK_FILE={d}/lock
{bin} show --network on -c '{uri}' > {d}/host.yaml
set +e
{bin} plan --network on -c '{uri}' --data-dir {d}/data {d}/host.yaml > {d}/plan.txt 2>&1
echo $? > {d}/plan.rc
echo 0 > /proc/sys/net/ipv4/ip_forward
{bin} plan --network on -c '{uri}' --data-dir {d}/data {d}/host.yaml > {d}/drift.txt 2>&1
echo $? > {d}/drift.rc
"#
    );
    let out = Command::new("unshare").args(["--net", "--", "sh", "-c", &script]).output().expect("run unshare");
    assert!(out.status.success(), "cannot run in a private network namespace (run as root): {}", text(&out.stderr));
    let own = std::fs::read_link("/proc/self/ns/net").unwrap().display().to_string();
    let theirs = std::fs::read_to_string(dir.path().join("netns")).unwrap();
    assert_ne!(theirs.trim(), own, "the script ran in the host's network namespace");

    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    let yaml = read("host.yaml");
    let doc: HostPolicy = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(doc.spec.bridges.len(), 1, "{yaml}");
    let br0 = &doc.spec.bridges[0];
    assert_eq!(br0.name, "br0");
    assert_eq!(br0.ports, ["eth1"], "host NICs only, no taps: {yaml}");
    let stp = br0.stp.as_ref().unwrap();
    assert!(stp.enabled);
    assert_eq!(
        (stp.forward_delay, stp.hello_time, stp.max_age, stp.priority),
        (Some(4), Some(2), Some(12), Some(4096))
    );
    assert_eq!(doc.spec.forwarding.and_then(|f| f.ipv4), Some(true), "{yaml}");

    assert_eq!(read("plan.rc").trim(), "0", "{}\n{yaml}", read("plan.txt"));
    assert!(read("plan.txt").contains("in sync: nothing to do"), "{}", read("plan.txt"));
    // Forwarding changed behind its back: the same file drifts now.
    assert_eq!(read("drift.rc").trim(), "3", "{}", read("drift.txt"));
    assert!(read("drift.txt").contains("ipv4 forwarding off, policy wants on"), "{}", read("drift.txt"));
}
