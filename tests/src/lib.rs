//! Shared helpers for virtwarden's integration tests: fixture paths and test-driver URIs.

pub mod faulty;
pub mod memhv;
pub mod peer;
pub mod rig;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A path under the repository root.
pub fn repo_path(rel: &str) -> PathBuf {
    repo_root().join(rel)
}

/// The libvirt test-driver URI of the example node file (`examples/testbed/node.xml`).
/// A policy document written inline in a test: `spec` is the text under `spec:` (indented by
/// two spaces). Panics if it is invalid (the test wrote it).
pub fn inline_policy(spec: &str) -> virtwarden_policies::DesiredState {
    let text = format!("apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: t\nspec:\n{spec}");
    virtwarden_policies::load_texts([(Path::new("inline.yaml"), text.as_str())])
        .expect("inline policy is valid")
        .desired
}

pub fn testbed_uri() -> String {
    format!("test://{}", repo_path("examples/testbed/node.xml").display())
}

/// A test-driver node file with these 64 MiB domains, each running or shut off.
pub fn node_xml(domains: &[(&str, bool)]) -> String {
    let mut xml = String::from("<node>\n");
    for (name, running) in domains {
        xml.push_str(&format!(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>{name}</name>\
             <memory>65536</memory><os><type arch='x86_64'>hvm</type></os>\
             <test:runstate>{}</test:runstate></domain>\n",
            if *running { 1 } else { 5 }
        ));
    }
    xml.push_str("</node>\n");
    xml
}

/// Sorted entries of a fixture directory.
pub fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.map(|e| e.path()).unwrap_or_else(|e| panic!("bad entry in {}: {e}", dir.display())))
        .collect();
    v.sort();
    v
}

/// Run the calling test inside a private network namespace.
///
/// Returns `true` when the caller is already inside one (run the test body) and `false` after
/// the body ran in a child process (`unshare --net`) — the caller then returns. The child's
/// namespace is checked against the parent's, so a test can never touch the host network.
/// When no namespace can be created the test fails with the reason (CI runs as root with
/// namespaces; a skip there would hide a regression).
pub fn in_private_netns(test_name: &str) -> bool {
    let own = netns_id();
    if let Ok(parent) = std::env::var("VW_PARENT_NETNS") {
        assert_ne!(parent, own, "refusing to run: not in a private network namespace");
        return true;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env("VW_PARENT_NETNS", &own)
        .output();
    let out = out.unwrap_or_else(|e| panic!("{test_name}: cannot run unshare ({e}); install util-linux"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || !stderr.contains("unshare failed"),
        "{test_name}: cannot create a private network namespace (run as root): {stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{test_name} failed in its network namespace:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{test_name} did not run in its namespace:\n{stdout}\n{stderr}");
    false
}

fn netns_id() -> String {
    std::fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default()
}

/// Run a shell-free command (test setup inside the private namespace), panicking on failure.
pub fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect("spawn");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A connector to a shared test-driver connection that fails its next `fail_next` connects (a
/// libvirtd restarting) and keeps each connection's event sender, so a test can say the
/// connection closed.
pub struct FlakyConnector {
    pub host: std::sync::Arc<virtwarden::libvirt::LibvirtHost>,
    pub connects:
        std::sync::Mutex<Vec<tokio::sync::mpsc::UnboundedSender<virtwarden::libvirt::events::HypervisorEvent>>>,
    pub fail_next: std::sync::atomic::AtomicUsize,
}

impl virtwarden::engine::connect::Connector for FlakyConnector {
    fn uri(&self) -> String {
        self.host.uri().to_string()
    }

    fn connect(
        &self,
        events: tokio::sync::mpsc::UnboundedSender<virtwarden::libvirt::events::HypervisorEvent>,
    ) -> Result<virtwarden::engine::connect::Connection, virtwarden::hypervisor::HypervisorError> {
        if self.fail_next.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            return Err(virtwarden::hypervisor::HypervisorError::Failed {
                op: "connect",
                domain: String::new(),
                message: "libvirtd is restarting".into(),
            });
        }
        let sub = virtwarden::libvirt::events::subscribe(&self.host, events.clone()).unwrap();
        self.connects.lock().unwrap().push(events);
        Ok(virtwarden::engine::connect::Connection::new(self.host.clone(), Some(sub)))
    }
}

impl FlakyConnector {
    pub fn new(host: std::sync::Arc<virtwarden::libvirt::LibvirtHost>, fail_first: usize) -> Self {
        FlakyConnector { host, connects: Default::default(), fail_next: fail_first.into() }
    }

    /// libvirt says the connection closed; the next `fail` connects fail.
    pub fn drop_connection(&self, fail: usize) {
        self.fail_next.store(fail, std::sync::atomic::Ordering::SeqCst);
        if let Some(tx) = self.connects.lock().unwrap().last() {
            let _ = tx.send(virtwarden::libvirt::events::HypervisorEvent::ConnectionClosed { reason: "end of file" });
        }
    }
}

/// A start that always fails with this message (a stand-in for "could not open disk image": the
/// test driver always starts), registered through the pluggable remediation registry.
pub struct BrokenStart(pub &'static str);

impl virtwarden::act::remediation::Remediation for BrokenStart {
    fn run<'a>(
        &'a self,
        ctx: &'a virtwarden::act::remediation::RemediationContext,
        _calls: &'a virtwarden::act::calls::Calls,
    ) -> virtwarden::act::remediation::StepFuture<'a> {
        Box::pin(async move {
            Err(virtwarden::hypervisor::HypervisorError::Failed {
                op: "start",
                domain: ctx.domain.clone(),
                message: self.0.into(),
            }
            .into())
        })
    }
}
