//! `virtwarden run` as a process: one instance per state dir, a bad policy edit keeps the last
//! good policy, SIGTERM exits 0, `virtwarden status` shows what the service reports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_virtwarden"));
    c.env_remove("LIBVIRT_DEFAULT_URI").env_remove("NOTIFY_SOCKET");
    c
}

fn testbed() -> String {
    format!("test://{}", repo().join("examples/testbed/node.xml").display())
}

struct Service {
    child: Child,
    state: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(state: &Path, policies: &Path) -> Service {
    let child = bin()
        .args(["run", "-c", &testbed(), "--metrics-addr", "off", "--state-dir"])
        .arg(state)
        .arg(policies)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start virtwarden run");
    Service { child, state: state.to_path_buf() }
}

fn status_json(state: &Path) -> Option<serde_json::Value> {
    let out = bin().args(["status", "--output", "json", "--state-dir"]).arg(state).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Poll the status file (written by another process; there is nothing to subscribe to).
fn wait_status(state: &Path, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = status_json(state) {
            if cond(&s) {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; status: {:?}", status_json(state));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn domain<'a>(s: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    s["domains"].as_array()?.iter().find(|d| d["name"] == name)
}

#[test]
fn second_instance_exits_1_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let svc = start(&state, &repo().join("examples/policies"));
    wait_status(&state, "first instance ready", |s| s["connected"] == true);
    let out = bin()
        .args(["run", "-c", &testbed(), "--metrics-addr", "off", "--state-dir"])
        .arg(&state)
        .arg(repo().join("examples/policies"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("another virtwarden is already running (pid {})", svc.child.id())), "{err}");
}

#[test]
fn bad_edit_keeps_last_good_policy_and_sigterm_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let file = policies.join("p.yaml");
    std::fs::write(&file, "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  domains:\n    - name: web1\n").unwrap();
    let mut svc = start(&state, &policies);
    wait_status(&state, "web1 started", |s| {
        domain(s, "web1").is_some_and(|d| d["state"].as_str().unwrap_or("").starts_with("running"))
    });

    std::fs::write(&file, "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  domains:\n    - name: web1\n      boot: [usb]\n").unwrap();
    let s = wait_status(&state, "reload rejected", |s| s["policyError"].is_string());
    let err = s["policyError"].as_str().unwrap();
    assert!(err.contains("p.yaml:7:14: unknown variant `usb`"), "{err}");
    assert_eq!(s["policies"], serde_json::json!(["p"]), "the last good policy stays in force");
    assert!(domain(&s, "web1").is_some());

    // A good edit is picked up and clears the error.
    std::fs::write(&file, "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: q}\nspec:\n  domains:\n    - name: db1\n").unwrap();
    let s = wait_status(&state, "good reload", |s| s["policies"] == serde_json::json!(["q"]));
    assert!(s["policyError"].is_null());
    assert!(domain(&s, "web1").is_none() && domain(&s, "db1").is_some());

    let text = bin().args(["status", "--state-dir"]).arg(&state).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("policies: q") && text.contains("db1"), "{text}");

    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(svc.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(st) = svc.child.try_wait().unwrap() {
            break st.code();
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    let _ = svc.state;
}

#[test]
fn invalid_policy_at_start_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["run", "-c", &testbed(), "--metrics-addr", "off", "--state-dir"])
        .arg(dir.path())
        .arg(repo().join("tests/bad-policies/14-unknown-boot-device.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
