//! End to end on the private libvirtd with real QEMU: a start that waits for its storage in
//! `virtwarden run` says so and goes as soon as the storage is there — mounted (the mount table
//! tells at once) or a file created (the 500 ms poll finds it) — not at the next resync (60 s).

mod testbed;

use std::time::Duration;

use testbed::*;

const T: Duration = Duration::from_secs(30);
/// Under the daemon's 60 s resync (the start follows the path, not the resync), and long enough
/// for a QEMU start on a loaded machine.
const SOON: Duration = Duration::from_secs(40);

#[test]
fn e2e_run_starts_a_domain_once_its_required_path_appears() {
    if !inside("e2e_run_starts_a_domain_once_its_required_path_appears") {
        return;
    }
    let hv = connect();
    bridge("br0");
    for name in ["db1", "web1", "web2"] {
        define_guest(&hv, name, "br0");
    }
    // web1's disk lives on storage that is not mounted yet; web2's appears as a file.
    let export = work().join("export");
    std::fs::create_dir_all(export.join("images")).unwrap();
    std::fs::write(export.join("images/web1.img"), b"").unwrap();
    let mnt = work().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let web1_disk = mnt.join("images/web1.img").display().to_string();
    let web2_flag = work().join("ready/web2").display().to_string();
    let d = Daemon::start(&policy(&format!(
        "  domains:\n    - name: db1\n      restart: always\n      startup: {{order: 1}}\n    - name: web1\n      restart: always\n      startup:\n        order: 2\n        after: [db1]\n        requires: {{paths: [{web1_disk}]}}\n    - name: web2\n      restart: always\n      startup:\n        order: 2\n        requires: {{paths: [{web2_flag}]}}\n"
    )));
    wait("db1 started", T, || running(&hv, "db1"));
    wait("web1 and web2 say what they wait for", T, || {
        d.domain("web1").is_some_and(|s| s["waitingFor"] == serde_json::json!([web1_disk]))
            && d.domain("web2").is_some_and(|s| s["waitingFor"] == serde_json::json!([web2_flag]))
    });
    assert!(!running(&hv, "web1") && !running(&hv, "web2"));
    let text = sh(&[env!("CARGO_BIN_EXE_virtwarden"), "status", "--state-dir", d.state_dir.to_str().unwrap()]);
    assert!(text.contains(&format!("waits for {web1_disk}")), "{text}");

    // The storage is mounted: web1 starts at once.
    sh(&["mount", "--bind", export.to_str().unwrap(), mnt.to_str().unwrap()]);
    wait("web1 started after the mount", SOON, || running(&hv, "web1"));
    assert!(!running(&hv, "web2"), "web2 still waits for its own path");

    // A file appears (no mount): the poll finds it.
    std::fs::create_dir_all(work().join("ready")).unwrap();
    std::fs::write(&web2_flag, b"").unwrap();
    wait("web2 started after its file appeared", SOON, || running(&hv, "web2"));
    // Each started once: waiting was not an attempt; the wait is gone from status.
    wait("status: one start each, no wait left", T, || {
        ["web1", "web2"].iter().all(|n| d.domain(n).is_some_and(|s| s["waitingFor"].is_null() && s["restarts"] == 0))
    });
    let log = d.log();
    assert!(log.contains("start waits") && log.contains("start may go"), "{log}");
}
