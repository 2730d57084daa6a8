//! Ownership rules on policy files, run as a user would: `run` and `apply` refuse files that
//! someone other than root (or the service user) could have written, `check` and `plan` warn,
//! and a reload that breaks the rules keeps the last good policy.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const GOOD: &str =
    "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  domains:\n    - name: web1\n";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_virtwarden"));
    c.env_remove("LIBVIRT_DEFAULT_URI").env_remove("NOTIFY_SOCKET");
    c
}

/// The binary with the test's own host lock file (tests run in parallel; the host's /run is
/// never touched).
fn bin_in(dir: &Path) -> Command {
    let mut c = bin();
    c.env("VIRTWARDEN_LOCK_FILE", dir.join("virtwarden.lock"));
    c
}

/// `virtwarden run` with state, data and lock under `dir`.
fn run_in(dir: &Path, policies: &Path) -> Command {
    let mut c = bin_in(dir);
    c.args(["run", "-c", &testbed(), "--metrics-addr", "off", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg(policies);
    c
}

fn testbed() -> String {
    format!("test://{}", repo().join("examples/testbed/node.xml").display())
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A private policy directory with one good policy; paths without symlinks.
fn policies() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap().join("policies");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    let file = dir.join("p.yaml");
    std::fs::write(&file, GOOD).unwrap();
    chmod(&file, 0o644);
    (tmp, dir, file)
}

fn run(args: &[&str], path: &Path) -> Output {
    bin().args(args).arg(path).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn acting_commands_refuse_a_writable_policy_directory_and_the_others_warn() {
    let (tmp, dir, _file) = policies();
    chmod(&dir, 0o775);
    let named = format!("{} is writable by its group (mode 0775)", dir.display());

    let check = run(&["check"], &dir);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check.stderr));
    assert!(text(&check.stderr).starts_with(&format!("warning: {named}\n  note: `apply` and `run` refuse these files")));

    let plan = run(&["plan", "-c", &testbed()], &dir);
    assert_eq!(plan.status.code(), Some(3), "plan still plans: {}", text(&plan.stderr));
    assert!(text(&plan.stderr).contains(&named));

    let data = tmp.path().join("data");
    let apply =
        bin_in(tmp.path()).args(["apply", "-c", &testbed(), "--data-dir"]).arg(&data).arg(&dir).output().unwrap();
    assert_eq!(apply.status.code(), Some(2));
    assert!(text(&apply.stderr).starts_with(&format!("error: {named}\n")), "{}", text(&apply.stderr));
    assert!(text(&apply.stdout).is_empty(), "nothing was applied");

    let out = run_in(tmp.path(), &dir).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with(&format!("{named}\n")), "{}", text(&out.stderr));
}

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(state: &Path) -> Option<serde_json::Value> {
    let out = bin().args(["status", "--output", "json", "--state-dir"]).arg(state).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Poll the status file (written by another process; there is nothing to subscribe to).
fn wait_status(state: &Path, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = status(state).filter(|s| cond(s)) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; status: {:?}", status(state));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_reload_of_a_world_writable_policy_keeps_the_last_good_one() {
    let (tmp, dir, file) = policies();
    let state = tmp.path().join("state");
    let _svc = Service(run_in(tmp.path(), &dir).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_status(&state, "the first policy in force", |s| s["policies"] == serde_json::json!(["p"]));
    chmod(&file, 0o666);
    std::fs::write(&file, GOOD.replace("name: p", "name: q")).unwrap();
    let s = wait_status(&state, "the reload rejected", |s| s["policyError"].is_string());
    let err = s["policyError"].as_str().unwrap();
    assert!(err.starts_with(&format!("{} is writable by its group and others (mode 0666)", file.display())), "{err}");
    assert_eq!(s["policies"], serde_json::json!(["p"]), "the last good policy stays in force");
}

#[test]
fn the_operator_takes_only_an_absolute_allowed_exec_directory() {
    let out = bin().args(["operator", "--node-name", "n1", "--allow-exec-dir", "hooks"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr), "error: --allow-exec-dir hooks: write an absolute path\n");
    let help = text(&bin().args(["operator", "--help"]).output().unwrap().stdout);
    assert!(help.contains("--allow-exec-dir <DIR>"), "{help}");
}
