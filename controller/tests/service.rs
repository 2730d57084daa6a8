//! `virtwarden run` as a process: one writer per host (a second `run` and an `apply` are
//! refused), a bad policy edit keeps the last good policy, SIGTERM exits 0, `virtwarden status`
//! shows what the service reports, a remembered quarantine holds across a restart until
//! `virtwarden release` lifts it (through the service, or in the memory when none runs).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The binary with the test's own host lock file (tests run in parallel; the host's /run is
/// never touched).
fn bin_in(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_virtwarden"));
    c.env_remove("LIBVIRT_DEFAULT_URI")
        .env_remove("NOTIFY_SOCKET")
        .env("VIRTWARDEN_LOCK_FILE", dir.join("virtwarden.lock"));
    c
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_virtwarden"));
    c.env_remove("LIBVIRT_DEFAULT_URI").env_remove("NOTIFY_SOCKET");
    c
}

/// `virtwarden run` with everything under `dir`: state, data and lock.
fn run_args(dir: &Path) -> Command {
    let mut c = bin_in(dir);
    c.args(["run", "-c", &testbed(), "--metrics-addr", "off", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--data-dir")
        .arg(dir.join("data"));
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

/// Start `run` with state, data and lock under `dir`; the state directory is `dir/state`.
fn start(dir: &Path, policies: &Path) -> Service {
    let state = dir.join("state");
    let child =
        run_args(dir).arg(policies).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start virtwarden run");
    Service { child, state }
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
    let deadline = Instant::now() + Duration::from_secs(60);
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
fn one_writer_per_host_a_second_run_and_an_apply_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(dir.path(), &repo().join("examples/policies"));
    wait_status(&svc.state, "first instance ready", |s| s["connected"] == true);
    let holder = format!("another virtwarden is changing this host (pid {}, `run`)", svc.child.id());
    // Another state directory does not make it another host.
    let out = bin_in(dir.path())
        .args(["run", "-c", &testbed(), "--metrics-addr", "off", "--state-dir"])
        .arg(dir.path().join("other-state"))
        .arg("--data-dir")
        .arg(dir.path().join("other-data"))
        .arg(repo().join("examples/policies"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&holder), "{err}");
    let out = bin_in(dir.path())
        .args(["apply", "-c", &testbed(), "--data-dir"])
        .arg(dir.path().join("data"))
        .arg(repo().join("examples/policies"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&holder) && err.contains("nothing was changed"), "{err}");
    assert!(out.stdout.is_empty(), "apply did nothing: {}", String::from_utf8_lossy(&out.stdout));
    // Read-only commands need no lock.
    let out =
        bin_in(dir.path()).args(["plan", "-c", &testbed()]).arg(repo().join("examples/policies")).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A memory file in which `domain` is quarantined, as a previous run left it.
fn remembered_quarantine(data: &Path, domain: &str) {
    std::fs::create_dir_all(data).unwrap();
    let memory = serde_json::json!({
        "format": 1,
        "domains": { domain: { "restarts": {
            "restarts": [1_700_000_000_000u64, 1_700_000_001_000u64],
            "consecutive": 2,
            "quarantine": { "reason": "2 restarts within 1h; more would exceed backoff.maxRestarts", "since": 1_700_000_001_000u64 },
            "totalRestarts": 2
        } } }
    });
    std::fs::write(data.join("memory.json"), serde_json::to_vec(&memory).unwrap()).unwrap();
}

fn web1_policy(dir: &Path) -> PathBuf {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("p.yaml"),
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  domains:\n    - name: web1\n      restart: always\n",
    )
    .unwrap();
    policies
}

#[test]
fn a_remembered_quarantine_holds_across_a_restart_until_release_lifts_it() {
    let dir = tempfile::tempdir().unwrap();
    remembered_quarantine(&dir.path().join("data"), "web1");
    let policies = web1_policy(dir.path());
    // web1 is shut off in the node file and would be started — but it is remembered quarantined.
    let svc = start(dir.path(), &policies);
    let s = wait_status(&svc.state, "web1 seen, quarantined", |s| {
        domain(s, "web1").is_some_and(|d| d["quarantined"].is_string() && d["state"] != "unknown")
    });
    let d = domain(&s, "web1").unwrap();
    assert!(d["state"].as_str().unwrap().starts_with("shut off"), "{d}");
    assert_eq!(d["restarts"], 2, "{d}");
    let text = bin().args(["status", "--state-dir"]).arg(&svc.state).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("quarantined since 2023-11-14T22:13:21+00:00: 2 restarts within 1h"), "{text}");
    assert!(text.contains("to retry once fixed: virtwarden release web1"), "{text}");

    let out = bin_in(dir.path()).args(["release", "web1", "--state-dir"]).arg(&svc.state).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("released web1 (was quarantined: 2 restarts within 1h"), "{said}");
    let s = wait_status(&svc.state, "web1 started after release", |s| {
        domain(s, "web1").is_some_and(|d| d["state"].as_str().unwrap_or("").starts_with("running"))
    });
    assert!(domain(&s, "web1").unwrap()["quarantined"].is_null());
    // The release is remembered: the file no longer holds the quarantine.
    let memory: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("data/memory.json")).unwrap()).unwrap();
    assert!(memory["domains"]["web1"]["restarts"]["quarantine"].is_null(), "{memory}");
    // Asking for a domain no policy manages is an error.
    let out = bin_in(dir.path()).args(["release", "legacy", "--state-dir"]).arg(&svc.state).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`legacy` is not managed"));
}

#[test]
fn release_without_a_running_service_edits_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    remembered_quarantine(&data, "web1");
    let out = bin_in(dir.path())
        .args(["release", "web1", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("released web1 (was quarantined: 2 restarts"));
    let memory: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("memory.json")).unwrap()).unwrap();
    assert!(memory["domains"]["web1"]["restarts"]["quarantine"].is_null(), "{memory}");
    assert_eq!(memory["domains"]["web1"]["restarts"]["totalRestarts"], 2, "the lifetime count stays");
    // The service started afterwards starts it.
    let svc = start(dir.path(), &web1_policy(dir.path()));
    wait_status(&svc.state, "web1 started", |s| {
        domain(s, "web1").is_some_and(|d| d["state"].as_str().unwrap_or("").starts_with("running"))
    });
}

#[test]
fn a_corrupt_memory_file_is_set_aside_reported_and_the_service_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("memory.json"), b"{\"format\": 1, \"domains\": {").unwrap();
    let svc = start(dir.path(), &web1_policy(dir.path()));
    let s = wait_status(&svc.state, "web1 started", |s| {
        domain(s, "web1").is_some_and(|d| d["state"].as_str().unwrap_or("").starts_with("running"))
    });
    let problem = s["memoryError"].as_str().unwrap_or_default();
    assert!(problem.contains("is not valid") && problem.contains("set aside as"), "{s}");
    let names: Vec<String> =
        std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert!(names.iter().any(|n| n.starts_with("memory.json.corrupt-")), "{names:?}");
    let text = bin().args(["status", "--state-dir"]).arg(&svc.state).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("MEMORY PROBLEM: "), "{text}");
    // `restart: always` started web1 anyway; the service is in "memory lost" mode until it is
    // rebuilt (web1 seen running: it is the only domain, so at once) or confirmed.
    let lost =
        wait_status(&svc.state, "the memory rebuilt: every managed domain seen running", |s| s["memoryLost"].is_null());
    assert!(lost["memoryError"].is_string());
    // Confirming when nothing is lost says so.
    let out = bin_in(dir.path()).args(["memory", "confirm", "--state-dir"]).arg(&svc.state).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to confirm"));
}

#[test]
fn memory_confirm_without_a_running_service_ends_the_lost_mode() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // A memory that was written once (its marker), then deleted.
    std::fs::write(data.join("memory.json.written"), b"").unwrap();
    let confirm = || {
        bin_in(dir.path())
            .args(["memory", "confirm", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap()
    };
    let out = confirm();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("confirmed: the memory lost (") && said.contains("is missing although it had been written"),
        "{said}"
    );
    let memory: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("memory.json")).unwrap()).unwrap();
    assert!(memory["lost"].is_null(), "{memory}");
    assert!(String::from_utf8_lossy(&confirm().stdout).contains("nothing to confirm"));
    let help = bin().args(["memory", "confirm", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("domains it left down may be started by their policies again"), "{help}");
}

#[test]
fn bad_edit_keeps_last_good_policy_and_sigterm_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let file = policies.join("p.yaml");
    std::fs::write(&file, "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  domains:\n    - name: web1\n").unwrap();
    let mut svc = start(dir.path(), &policies);
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
    let out = run_args(dir.path()).arg(repo().join("tests/bad-policies/14-unknown-boot-device.yaml")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn plan_notes_a_guest_the_service_last_judged_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let memory = serde_json::json!({
        "format": 1,
        "domains": { "web2": { "badHealth": {
            "verdict": "boot failed: SeaBIOS: No bootable device (console: \"No bootable device.\")",
            "at": 1_700_000_000_000u64
        } } }
    });
    std::fs::write(data.join("memory.json"), serde_json::to_vec(&memory).unwrap()).unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("p.yaml"),
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  domains:\n    - name: web2\n      health: {probe: {tcp: {port: 22}}}\n",
    )
    .unwrap();
    let out =
        bin_in(dir.path()).args(["plan", "-c", &testbed(), "--data-dir"]).arg(&data).arg(&policies).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "warning: web2: last known health: boot failed: SeaBIOS: No bootable device (console: \"No bootable device.\") (judged 2023-11-14T22:13:20Z)"
        ),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `virtwarden run` with its log in `dir/run.log`.
fn start_logged(dir: &Path, policies: &Path) -> Service {
    let state = dir.join("state");
    let log = std::fs::File::create(dir.join("run.log")).unwrap();
    let child = run_args(dir).arg(policies).stdout(Stdio::null()).stderr(log).spawn().expect("start virtwarden run");
    Service { child, state }
}

fn count_in_log(dir: &Path, what: &str) -> usize {
    std::fs::read_to_string(dir.join("run.log")).unwrap_or_default().matches(what).count()
}

fn wait_log(dir: &Path, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while count_in_log(dir, what) < n {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n}× `{what}` in the log:\n{}",
            std::fs::read_to_string(dir.join("run.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Write `name` into `dir` the way editors do (a temporary file renamed over it).
fn write_policy(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[test]
fn reload_waits_for_the_services_verdict_once_per_change_and_fails_keeping_the_last_good_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    for f in ["web-tier.yaml", "data-tier.yaml"] {
        std::fs::copy(repo().join("examples/policies").join(f), policies.join(f)).unwrap();
    }
    let svc = start_logged(dir.path(), &policies);
    wait_status(&svc.state, "ready", |s| s["ready"] == true);
    let reload = || bin().arg("reload").arg("--state-dir").arg(&svc.state).output().unwrap();

    // Unchanged files: the verdict is the policies in force; nothing is reloaded.
    let out = reload();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("policies in force") && said.contains("web-tier"), "{said}");
    assert_eq!(count_in_log(dir.path(), "policies reloaded"), 0);

    // An edit, then `systemctl reload`: the watch and the request see one change, one reload.
    let web = std::fs::read_to_string(policies.join("web-tier.yaml")).unwrap();
    let edited = web.replacen("autostart: true", "autostart: false", 1);
    assert_ne!(edited, web);
    write_policy(&policies, "web-tier.yaml", &edited);
    let out = reload();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // The second of the two (watch or request) finds the files already loaded.
    wait_log(dir.path(), "unchanged since the last load", 2);
    assert_eq!(count_in_log(dir.path(), "policies reloaded"), 1, "one reload per change");
    let good = status_json(&svc.state).unwrap()["policies"].clone();
    assert!(good.as_array().is_some_and(|p| p.len() == 3), "{good}");

    // A rejected edit: exit 2 with the located error; the last good policy stays in force.
    write_policy(
        &policies,
        "bad.yaml",
        "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata: { name: bad }\nspec:\n  domains:\n    - name: web9\n      state: sideways\n",
    );
    let out = reload();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:7:") && err.contains("keeps the last good policy"), "{err}");
    let s = wait_status(&svc.state, "the rejection in status", |s| s["policyError"].is_string());
    assert_eq!(s["policies"], good);
}

#[test]
fn reload_without_a_service_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin().arg("reload").arg("--state-dir").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service listens"), "{:?}", out);
}
