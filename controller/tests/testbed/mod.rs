//! The end-to-end testbed: a private libvirtd with real QEMU inside new mount, network and PID
//! namespaces (`tests/testbed/run-in-testbed.sh`), and `virtwarden run` as a real process in it.
//! Nothing touches the host's libvirtd, network or /etc; everything dies with the namespace.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use virtwarden::hypervisor::{DomainControl, DomainReader};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::ObservedDomain;

pub const URI: &str = "qemu:///system";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Re-run the calling test inside the testbed. Returns true inside (run the body), false in the
/// parent after the child passed. Fails loudly when the testbed cannot be built: CI must not pass
/// without the end-to-end suite.
pub fn inside(test_name: &str) -> bool {
    inside_as(test_name, "root")
}

/// Like [`inside`], with QEMU running as `libvirt-qemu:kvm` and libvirt chowning the images it
/// opens (dynamic_ownership), as on a real host: permission problems are then real.
pub fn inside_unprivileged(test_name: &str) -> bool {
    inside_as(test_name, "unprivileged")
}

fn inside_as(test_name: &str, qemu_user: &str) -> bool {
    if std::env::var_os("VW_TESTBED").is_some() {
        assert!(Path::new("/run/libvirt/libvirt-sock").exists(), "VW_TESTBED set but no private libvirtd");
        return true;
    }
    build_guest();
    let work = tempfile::Builder::new().prefix("vw-testbed-").tempdir().expect("work dir");
    let out = Command::new("unshare")
        .args(["--mount", "--net", "--pid", "--fork", "--mount-proc", "--"])
        .arg(repo().join("tests/testbed/run-in-testbed.sh"))
        .arg(work.path())
        .arg(std::env::current_exe().expect("test binary"))
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env("VW_TESTBED", "1")
        .env("VW_TESTBED_QEMU_USER", qemu_user)
        .env("VW_WORK", work.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot start the e2e testbed (unshare): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test_name} failed in the testbed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    false
}

/// Re-run the calling bench binary as the first process of the testbed, with `env` set, and
/// wait for it; panics with `what` when it fails. Inside, `VW_TESTBED` and `VW_WORK` are set.
pub fn run_bench_in_testbed(what: &str, env: &[(&str, &str)]) {
    let work = tempfile::Builder::new().prefix("vw-bench-").tempdir().expect("work dir");
    let status = Command::new("unshare")
        .args(["--mount", "--net", "--pid", "--fork", "--mount-proc", "--"])
        .arg(repo().join("tests/testbed/run-in-testbed.sh"))
        .arg(work.path())
        .arg(std::env::current_exe().expect("bench binary"))
        .env("VW_TESTBED", "1")
        .env("VW_WORK", work.path())
        .envs(env.iter().copied())
        .status()
        .expect("unshare");
    assert!(status.success(), "{what} failed in its testbed");
}

/// The Linux guest's kernel and initramfs (built from Debian packages, cached under target/).
pub fn guest_dir() -> PathBuf {
    repo().join("target/e2e-guest")
}

/// Build the Linux guest before entering the testbed (the testbed has no network to fetch it).
pub fn build_guest() {
    let out = Command::new(repo().join("tests/testbed/build-guest.sh"))
        .arg(guest_dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run build-guest.sh: {e}"));
    assert!(out.status.success(), "building the e2e guest failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// A Linux guest (TCG: under this machine's nested KVM the kernel stops early) that serves
/// HTTP on `ip` (e.g. `10.77.0.2/24`) through `bridge`; its serial console goes to a file.
pub fn define_linux_guest(hv: &LibvirtHost, name: &str, bridge: &str, ip: &str) {
    let g = guest_dir();
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>console=ttyS0 quiet vw_ip={ip}</cmdline></os><features><acpi/></features>\
         <devices><interface type='bridge'><source bridge='{bridge}'/><model type='virtio'/></interface>\
         <serial type='file'><source path='/var/log/libvirt/{name}.console'/></serial></devices></domain>",
        g.join("vmlinuz").display(),
        g.join("initrd.gz").display()
    );
    hv.connection().define_domain_xml(&xml).expect("define linux guest");
}

/// A bridge holding `addr` (e.g. `10.77.0.1/24`) in the testbed's namespace.
pub fn bridge_with_address(name: &str, addr: &str) {
    bridge(name);
    sh(&["ip", "addr", "add", addr, "dev", name]);
}

/// One HTTP GET; true when the guest answered with its page.
pub fn http_ok(ip: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = format!("{ip}:80").parse::<std::net::SocketAddr>() else { return false };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("virtwarden e2e guest")
}

pub fn work() -> PathBuf {
    PathBuf::from(std::env::var("VW_WORK").expect("VW_WORK"))
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("spawn");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// KVM when /dev/kvm works, else TCG.
pub fn domain_type() -> &'static str {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok() {
        "kvm"
    } else {
        "qemu"
    }
}

/// A 64 MiB diskless guest (firmware only) with one NIC on `bridge`. No network boot ROM: iPXE
/// under this machine's nested KVM ends in an emulation failure that pauses the guest.
pub fn define_guest(hv: &LibvirtHost, name: &str, bridge: &str) {
    let xml = format!(
        "<domain type='{}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\
         <features><acpi/></features><on_crash>destroy</on_crash>\
         <devices><interface type='bridge'><source bridge='{bridge}'/><model type='virtio'/><rom enabled='no'/></interface>\
         <serial type='pty'/></devices></domain>",
        domain_type()
    );
    hv.connection().define_domain_xml(&xml).expect("define guest");
}

pub fn bridge(name: &str) {
    sh(&["ip", "link", "add", name, "type", "bridge"]);
    sh(&["ip", "link", "set", name, "up"]);
}

pub fn qemu_pid(name: &str) -> Option<i32> {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).ok()?.trim().parse().ok()
}

pub fn kill9(pid: i32) {
    // SAFETY: kill(2) on a process inside our own PID namespace.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

pub fn state(hv: &LibvirtHost, name: &str) -> Option<ObservedDomain> {
    hv.observe_domain(name).ok().flatten()
}

/// Cheap check (one virDomainGetState, no XML), so polling does not slow libvirt down.
pub fn running(hv: &LibvirtHost, name: &str) -> bool {
    use virt::domain::DomainState as S;
    use virt::enumutil::Enum;
    hv.connection()
        .lookup_domain_by_name(name)
        .ok()
        .and_then(|d| d.state().ok())
        .is_some_and(|(s, _)| matches!(s, Enum::Known(S::Running)))
}

/// Poll `cond` every 2 ms until it holds (another process acts; there is nothing to subscribe to).
pub fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
    t0.elapsed()
}

/// `virtwarden run` in the testbed; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub state_dir: PathBuf,
}

impl Daemon {
    /// The daemon's directory: policies, state, data and its log. The same for every daemon a
    /// test starts, so a restarted daemon finds what the previous one remembered.
    pub fn dir() -> PathBuf {
        work().join(format!("d{}", std::process::id()))
    }

    /// Stop it as systemd would (SIGTERM) and wait for it to exit.
    pub fn stop(mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    pub fn start(policy_yaml: &str) -> Daemon {
        Self::start_with(policy_yaml, &[])
    }

    /// [`Daemon::start`] with more `virtwarden run` flags.
    pub fn start_with(policy_yaml: &str, flags: &[&str]) -> Daemon {
        let dir = Self::dir();
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("p.yaml"), policy_yaml).unwrap();
        let state_dir = dir.join("state");
        let log = std::fs::File::create(dir.join("virtwarden.log")).unwrap();
        // A test that wants the endpoint passes its own `--metrics-addr`.
        let metrics: &[&str] = if flags.contains(&"--metrics-addr") { &[] } else { &["--metrics-addr", "off"] };
        let child = Command::new(env!("CARGO_BIN_EXE_virtwarden"))
            .args(["run", "--connect", URI])
            .args(metrics)
            .args(["--network", "on", "--resync", "60s", "--state-dir"])
            .arg(&state_dir)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(flags)
            .arg(&policies)
            .env("RUST_LOG", "info")
            // The testbed's /run is private: the default host lock is the testbed's own.
            .env_remove("VIRTWARDEN_LOCK_FILE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start virtwarden run");
        let d = Daemon { child, state_dir };
        let t0 = Instant::now();
        while !d.status().is_some_and(|s| s["connected"] == true) {
            assert!(t0.elapsed() < Duration::from_secs(60), "virtwarden not ready after 60s:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(2));
        }
        d
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let text = std::fs::read(self.state_dir.join("status.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn domain(&self, name: &str) -> Option<serde_json::Value> {
        self.status()?["domains"].as_array()?.iter().find(|d| d["name"] == name).cloned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.parent().unwrap().join("virtwarden.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn connect() -> LibvirtHost {
    LibvirtHost::open(URI).expect("private libvirtd")
}

pub fn policy(spec: &str) -> String {
    format!("apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: e2e\nspec:\n{spec}")
}

pub fn start(hv: &LibvirtHost, name: &str) {
    hv.start(name).expect("start");
}
