//! `make bench-health` (part 2): on the private libvirtd with the Linux test guest under
//! `virtwarden run`, the guest's HTTP service killed → detected (reset issued) → serving again,
//! and the guest kernel panicking (no pvpanic: libvirt says "running") → serving again; p50/p99
//! over `BENCH_HEALTH_TRIALS` trials (default 10) next to the configured detection bound
//! (period × failureThreshold + timeout) and KubeVirt's defaults for the same detection.

// Shared with the e2e tests; this bench uses part of it.
#[allow(dead_code)]
#[path = "../tests/testbed/guest_knobs.rs"]
mod guest_knobs;
#[path = "../tests/testbed/mod.rs"]
mod testbed;

use std::time::{Duration, Instant};

use guest_knobs::*;
use testbed::*;

const IP: &str = "10.77.0.2";
const PERIOD_S: f64 = 2.0;
const TIMEOUT_S: f64 = 1.0;
const THRESHOLD: f64 = 2.0;
const BOOT: Duration = Duration::from_secs(240);

fn trials() -> usize {
    std::env::var("BENCH_HEALTH_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(10)
}

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64()
}

fn row(name: &str, mut v: Vec<Duration>) {
    let n = v.len();
    let (p50, p99) = (pct(&mut v, 0.5), pct(&mut v, 0.99));
    println!("{name:<52} n={n:<3} p50={p50:>7.2} s  p99={p99:>7.2} s");
}

fn restarts(d: &Daemon) -> u64 {
    d.domain("web").and_then(|s| s["restarts"].as_u64()).unwrap_or(0)
}

/// Break the guest with `knob`; time until virtwarden reset it and until it serves again.
fn trial(d: &Daemon, knob_name: &str) -> (Duration, Duration) {
    wait("web healthy", BOOT, || d.domain("web").is_some_and(|s| s["health"]["phase"] == "healthy"));
    let before = restarts(d);
    let t0 = Instant::now();
    let said = knob(IP, knob_name).unwrap_or_default();
    assert!(!said.is_empty() || knob_name == "panic", "knob {knob_name} did not answer");
    wait("reset issued", Duration::from_secs(60), || restarts(d) > before);
    let detected = t0.elapsed();
    wait("serving again", BOOT, || http_ok(IP));
    (detected, t0.elapsed())
}

fn main() {
    if std::env::var_os("VW_TESTBED").is_none() {
        build_guest();
        run_bench_in_testbed("bench-health (end to end)", &[]);
        return;
    }
    let n = trials();
    let hv = connect();
    bridge_with_address("br0", "10.77.0.1/24");
    define_health_guest(&hv, "web", "br0", &format!("{IP}/24"), false);
    let d = Daemon::start(&policy(&format!(
        "  domains:
    - name: web
      restart: always
      backoff: {{resetAfter: 1ms, maxRestarts: 1000}}
      health:
        probe: {{http: {{port: 80, path: /healthz}}}}
        address: {IP}
        period: {PERIOD_S}s
        timeout: {TIMEOUT_S}s
        failureThreshold: {THRESHOLD}
        bootTimeout: 200s
"
    )));
    let bound = PERIOD_S * THRESHOLD + TIMEOUT_S;
    println!(
        "private libvirtd, TCG Linux guest `web` probed over HTTP: period {PERIOD_S} s, timeout {TIMEOUT_S} s, \
         failureThreshold {THRESHOLD}; {n} trials each"
    );
    let (mut kill_detect, mut kill_serve, mut panic_detect, mut panic_serve) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let (a, b) = trial(&d, "kill-http");
        kill_detect.push(a);
        kill_serve.push(b);
    }
    for _ in 0..n {
        let (a, b) = trial(&d, "panic");
        panic_detect.push(a);
        panic_serve.push(b);
    }
    row("service killed → reset issued (detected)", kill_detect);
    row("service killed → serving again", kill_serve);
    row("kernel panic → reset issued (detected)", panic_detect);
    row("kernel panic → serving again", panic_serve);
    println!(
        "detection bound as configured (period × failureThreshold + timeout): {bound:.1} s; \
         the same detection with KubeVirt's probe defaults (periodSeconds 10, failureThreshold 3, timeoutSeconds 1): 31.0 s"
    );
}
