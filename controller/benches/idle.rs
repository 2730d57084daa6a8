//! `make bench`: idle cost of `virtwarden run` with 100 managed domains and no drift. Starts the
//! release binary on a generated test-driver host, waits until it is ready, then samples CPU time
//! and RSS over BENCH_IDLE_SECS (default 60). Prints figures; asserts nothing.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (utime + stime) / ticks_per_sec()
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `/proc/PID/status` figure in KiB (`VmRSS:`, `RssAnon:`, `RssFile:`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let secs: u64 = std::env::var("BENCH_IDLE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let dir = tempfile::tempdir().expect("temp dir");
    let node = dir.path().join("node.xml");
    std::fs::write(&node, common::node_xml(100, 0)).expect("node file");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("policy dir");
    std::fs::write(policies.join("p.yaml"), common::policy_yaml(100, "")).expect("policy");
    let state = dir.path().join("state");
    let mut child = Command::new(env!("CARGO_BIN_EXE_virtwarden"))
        .args(["run", "--metrics-addr", "off", "--resync", "60s", "-c"])
        .arg(format!("test://{}", node.display()))
        .arg("--state-dir")
        .arg(&state)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("VIRTWARDEN_LOCK_FILE", dir.path().join("virtwarden.lock"))
        .arg(&policies)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start virtwarden run");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = state.join("status.json");
    while !std::fs::read_to_string(&status).is_ok_and(|s| s.contains("\"connected\": true") && s.contains("running ("))
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("virtwarden did not become ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let mut peak = rss_kib(pid);
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        peak = peak.max(rss_kib(pid));
    }
    let cpu = cpu_seconds(pid) - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    let rss = rss_kib(pid);
    let (anon, file) = (status_kib(pid, "RssAnon:"), status_kib(pid, "RssFile:"));
    let _ = child.kill();
    let _ = child.wait();
    println!("virtwarden run, 100 managed domains, no drift, {secs} s idle (one resync in the window)");
    println!(
        "idle CPU: {:.3} s over {:.0} s = {:.3} % of one core; RSS now {:.1} MiB (anonymous {:.1}, file {:.1}), \
         peak {:.1} MiB",
        cpu,
        wall,
        cpu / wall * 100.0,
        rss as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}
