//! virtwarden's Cockpit page (cockpit/virtwarden) in a real browser: cockpit-ws serves a local
//! session through cockpit-bridge (no login), the page is installed as a user package under a
//! temp XDG_DATA_HOME and pointed at a private `virtwarden run` (test driver) by a manifest
//! override under a temp XDG_CONFIG_HOME, and Debian's chromium, driven by Playwright
//! (controller/tests/cockpit/page.py), checks the rendered rows, a quarantined domain's reason,
//! diagnose findings, and that the release button lifts the quarantine. Screenshots go to
//! target/cockpit/. Nothing of the host's /run/virtwarden, /etc or libvirtd is used.

#[path = "support/ops_rig.rs"]
mod ops_rig;
#[path = "support/ops_tools.rs"]
mod ops_tools;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// cockpit-ws and its bridge, in their own process group (killed whole on drop).
struct CockpitWs {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl CockpitWs {
    /// Serve `package` as the user package `virtwarden`, its manifest "config" overridden by
    /// `config`, everything under `dir`.
    fn start(dir: &Path, package: &Path, config: &Value) -> CockpitWs {
        let data = dir.join("data");
        let conf = dir.join("config");
        let home = dir.join("home");
        for d in [data.join("cockpit"), conf.join("cockpit"), home.clone()] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::os::unix::fs::symlink(package, data.join("cockpit/virtwarden")).unwrap();
        std::fs::write(
            conf.join("cockpit/virtwarden.override.json"),
            serde_json::to_vec_pretty(&json!({ "config": config })).unwrap(),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
        let log = dir.join("cockpit-ws.log");
        let out = std::fs::File::create(&log).unwrap();
        let bridge = ops_tools::cockpit_bridge();
        let child = Command::new(ops_tools::cockpit_ws())
            .args(["--no-tls", "--address", "127.0.0.1", "--port", &port.to_string()])
            .arg(format!("--local-session={}", bridge.display()))
            // The bridge finds user packages in XDG_DATA_HOME and manifest overrides in
            // XDG_CONFIG_HOME/XDG_CONFIG_DIRS: all private, so the host's /etc/cockpit is not read.
            .env("HOME", &home)
            .env("XDG_DATA_HOME", &data)
            .env("XDG_CONFIG_HOME", &conf)
            .env("XDG_CONFIG_DIRS", &conf)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start cockpit-ws: {e}"));
        let ws = CockpitWs { child, port, log };
        ws.wait_serving();
        ws
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Until the page is served through the bridge (HTTP 200), or fail with cockpit-ws's log.
    fn wait_serving(&self) {
        let deadline = Instant::now() + ops_rig::WAIT;
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let req = format!(
                    "GET /cockpit/@localhost/virtwarden/index.html HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n",
                    self.port
                );
                // Only the status line: cockpit-ws keeps the connection open after the body.
                let mut head = [0u8; 12];
                if s.write_all(req.as_bytes()).is_ok() && s.read_exact(&mut head).is_ok() && head.ends_with(b" 200") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "cockpit-ws never served the page; its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for CockpitWs {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test started; no memory is involved.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// What `virtwarden diagnose` says about `domain` on the test driver: the page must show it.
fn diagnose_text(rig: &ops_rig::OpsRig, domain: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args(["diagnose", "--output", "json", "--connect", &ops_rig::testbed_uri(), "--policies"])
        .arg(&rig.policies)
        .args(["--", domain])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("diagnose --output json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    match report["domains"][0]["findings"].as_array().and_then(|f| f.first()) {
        Some(f) => f["what"].as_str().unwrap().to_string(),
        None => "found nothing wrong".to_string(),
    }
}

#[test]
fn cockpit_page_shows_the_status_live_and_its_release_button_lifts_a_quarantine() {
    // Every tool first, so a missing one fails at once with what to install.
    let python = ops_tools::playwright_python();
    let chromium = ops_tools::chromium();
    ops_tools::cockpit_base1();
    let dir = tempfile::tempdir().unwrap();
    let mut rig = ops_rig::OpsRig::start(&dir.path().join("service"));
    let s = rig.wait_web1_quarantined();
    let web1 = ops_rig::domain(&s, "web1").unwrap().clone();
    rig.wait_status("web2 healthy", |s| ops_rig::domain(s, "web2").is_some_and(|d| d["health"]["phase"] == "healthy"));

    let package = ops_tools::repo().join("cockpit/virtwarden");
    let config = json!({
        "stateDir": rig.state_dir,
        "command": [env!("CARGO_BIN_EXE_virtwarden")],
        "environ": [format!("VIRTWARDEN_LOCK_FILE={}", rig.dir.join("virtwarden.lock").display())],
        "diagnoseArgs": ["--connect", ops_rig::testbed_uri(), "--policies", rig.policies],
    });
    let ws = CockpitWs::start(&dir.path().join("cockpit"), &package, &config);

    // The cause is fixed before the release, so the release sticks: web1's probe answers now.
    rig.fix_web1();
    let shots = ops_tools::target_dir().join("cockpit");
    std::fs::create_dir_all(&shots).unwrap();
    let args = json!({
        "url": ws.url("/cockpit/@localhost/virtwarden/index.html"),
        "chromium": chromium,
        "policies": ["web", "database"],
        "domains": ["db1", "web1", "web2"],
        "quarantined": "web1",
        "reason": web1["quarantined"].as_str().unwrap(),
        "restarts": web1["restarts"],
        "failure": "boot failed: no probe passed within 1s",
        "healthy": "web2",
        "unprobed": "db1",
        "machines_href": "/machines#vm?name=web1&connection=system",
        "diagnose_text": diagnose_text(&rig, "web1"),
        "unprobed_diagnose_text": diagnose_text(&rig, "db1"),
        "screenshot_quarantined": shots.join("virtwarden-quarantined.png"),
        "screenshot_released": shots.join("virtwarden-released.png"),
        // Repeated page loads while the status changes, each given this long to show it.
        "loads": 8,
        "load_ms": 15_000,
    });
    let out = Command::new(&python)
        .arg(ops_tools::repo().join("controller/tests/cockpit/page.py"))
        .arg(args.to_string())
        .output()
        .expect("run the Playwright script");
    assert!(
        out.status.success(),
        "the browser test failed:\n{}{}\n--- cockpit-ws log:\n{}\n--- virtwarden log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        ws.log(),
        rig.log()
    );
    // The click went to the service: its own status says web1 is released and healthy again.
    let s = rig.wait_status("web1 released and healthy", |s| {
        ops_rig::domain(s, "web1").is_some_and(|d| d["quarantined"].is_null() && d["health"]["phase"] == "healthy")
    });
    assert!(ops_rig::domain(&s, "web1").unwrap()["quarantinedSince"].is_null());
    let png = std::fs::read(shots.join("virtwarden-quarantined.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
}
