//! End to end, guest health's building blocks on a private libvirtd with real QEMU: the test
//! guest's breakage knobs really break it while libvirt keeps saying "running", the probes see
//! it, the firmware's "nothing to boot" reaches the console log, and the guest agent answers.
//! Each test builds its own testbed (see testbed/mod.rs).

#[path = "testbed/guest_knobs.rs"]
mod guest_knobs;
mod testbed;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_knobs::*;
use testbed::*;
use tokio::sync::mpsc::UnboundedReceiver;
use virtwarden::guest::{AddressSource, GuestAccess};
use virtwarden::libvirt::events::{start_event_loop, subscribe, GuestEventKind, HypervisorEvent};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::console::{firmware_boot_failure, read_tail};
use virtwarden::observe::DomainState;
use virtwarden::plan::health::{HealthMonitor, HealthSettings, ProbeFailure, ProbeResult, Step, Verdict};
use virtwarden::probe::address::discover;
use virtwarden::probe::http::HyperGet;
use virtwarden::probe::{ProbeSpec, Prober};
use virtwarden_policies::{GuestAgentPing, HttpProbe, Probe, TcpProbe};

const GUEST_IP: &str = "10.77.0.2";
const BOOT: Duration = Duration::from_secs(180);
const T: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn ip() -> IpAddr {
    GUEST_IP.parse().unwrap()
}

fn spec(probe: Probe, address: Option<IpAddr>) -> ProbeSpec {
    ProbeSpec { domain: "web".into(), probe, address, timeout: Duration::from_secs(2) }
}

fn healthz() -> Probe {
    Probe::Http(HttpProbe { port: 80, path: Some("/healthz".into()) })
}

/// Probe until `done` holds for the result (the guest changes on its own time); the last result.
fn probe_until(
    rt: &tokio::runtime::Runtime,
    p: &Prober,
    s: &ProbeSpec,
    what: &str,
    done: impl Fn(&ProbeResult) -> bool,
) -> ProbeResult {
    let t0 = Instant::now();
    loop {
        let r = rt.block_on(p.probe(s));
        if done(&r) {
            return r;
        }
        assert!(t0.elapsed() < T, "timed out waiting for {what}; last probe: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The Linux guest on br0, booted and serving HTTP.
fn boot_guest(hv: &LibvirtHost, agent: bool) {
    bridge_with_address("br0", "10.77.0.1/24");
    define_health_guest(hv, "web", "br0", &format!("{GUEST_IP}/24"), agent);
    start(hv, "web");
    wait("web serves HTTP", BOOT, || http_ok(GUEST_IP));
}

/// Wait for an event matching `want`, returning every event seen until then.
fn wait_event(
    rx: &mut UnboundedReceiver<HypervisorEvent>,
    what: &str,
    want: impl Fn(&HypervisorEvent) -> bool,
) -> Vec<HypervisorEvent> {
    let mut seen = Vec::new();
    let t0 = Instant::now();
    loop {
        while let Ok(ev) = rx.try_recv() {
            let hit = want(&ev);
            seen.push(ev);
            if hit {
                return seen;
            }
        }
        assert!(t0.elapsed() < BOOT, "timed out waiting for {what}; events seen: {seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn guest_event(ev: &HypervisorEvent, kind: &GuestEventKind) -> bool {
    matches!(ev, HypervisorEvent::Guest(g) if g.domain == "web" && &g.kind == kind)
}

fn agent_event(ev: &HypervisorEvent, connected: bool) -> bool {
    matches!(ev, HypervisorEvent::Guest(g) if g.domain == "web"
        && matches!(g.kind, GuestEventKind::Agent { connected: c, .. } if c == connected))
}

#[test]
fn e2e_health_service_killed_or_frozen_fails_the_probe_while_libvirt_says_running() {
    if !inside("e2e_health_service_killed_or_frozen_fails_the_probe_while_libvirt_says_running") {
        return;
    }
    let hv = Arc::new(connect());
    boot_guest(&hv, false);
    let rt = runtime();
    let prober = Prober::new(hv.clone(), 4).with_http(Arc::new(HyperGet));
    // No address in the "policy": found through libvirt's ARP source by the NIC's MAC (the
    // domain has no agent and no libvirt network, so those two sources have nothing).
    let http = spec(healthz(), None);
    // Polled: a TCG guest on a loaded machine may miss one 2 s deadline.
    let r = probe_until(&rt, &prober, &http, "the probe passing", |r| r.outcome.is_ok());
    assert_eq!(r.address, Some(ip()), "{r:?}");
    let found = discover(hv.as_ref(), "web", &[]).unwrap();
    assert_eq!((found.address, found.source), (ip(), AddressSource::Arp));

    let said = knob(GUEST_IP, "kill-http").unwrap_or_default();
    assert!(said.contains("killed"), "{said}");
    let r = probe_until(&rt, &prober, &http, "refused", |r| r.outcome == Err(ProbeFailure::Refused));
    assert_eq!(r.describe(), format!("http://{GUEST_IP}:80/healthz: connection refused"));
    assert!(running(&hv, "web"), "libvirt still says running");
    // The control listener still answers: only the service died.
    assert!(knob(GUEST_IP, "start-http").unwrap_or_default().contains("started"));
    probe_until(&rt, &prober, &http, "serving again", |r| r.outcome.is_ok());

    // Frozen: the kernel accepts the connection, nobody answers.
    assert!(knob(GUEST_IP, "stop-http").unwrap_or_default().contains("stopped"));
    let frozen = spec(healthz(), Some(ip()));
    probe_until(&rt, &prober, &frozen, "a timeout", |r| {
        r.outcome == Err(ProbeFailure::Timeout(Duration::from_secs(2)))
    });
    assert!(running(&hv, "web"));
}

#[test]
fn e2e_health_kernel_panic_leaves_libvirt_saying_running_and_the_probe_failing() {
    if !inside("e2e_health_kernel_panic_leaves_libvirt_saying_running_and_the_probe_failing") {
        return;
    }
    start_event_loop();
    let hv = Arc::new(connect());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _sub = subscribe(&hv, tx).expect("subscribe");
    boot_guest(&hv, false);
    let rt = runtime();
    let prober = Prober::new(hv.clone(), 4).with_http(Arc::new(HyperGet));
    let tcp = spec(Probe::Tcp(TcpProbe { port: 80 }), Some(ip()));
    probe_until(&rt, &prober, &tcp, "the probe passing", |r| r.outcome.is_ok());
    while rx.try_recv().is_ok() {}

    assert!(knob(GUEST_IP, "panic").unwrap_or_default().contains("panicking"));
    wait("the console shows the panic", T, || {
        read_tail(&console_path("web")).is_ok_and(|t| t.contains("Kernel panic"))
    });
    let r = probe_until(&rt, &prober, &tcp, "the probe failing", |r| r.outcome.is_err());
    assert!(matches!(r.outcome, Err(ProbeFailure::Timeout(_) | ProbeFailure::Network(_))), "{r:?}");
    let d = state(&hv, "web").expect("web");
    assert_eq!((d.state, d.reason.as_str()), (DomainState::Running, "booted"), "no pvpanic: libvirt was not told");
    let events: Vec<HypervisorEvent> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert!(
        !events.iter().any(|e| matches!(e, HypervisorEvent::Lifecycle(l) if l.domain == "web")),
        "libvirt reported nothing: {events:?}"
    );
}

#[test]
fn e2e_health_no_boot_domain_shows_the_firmware_message_and_is_judged_boot_failed() {
    if !inside("e2e_health_no_boot_domain_shows_the_firmware_message_and_is_judged_boot_failed") {
        return;
    }
    let hv = Arc::new(connect());
    define_no_boot_domain(&hv, "nob");
    start(&hv, "nob");
    let started = Instant::now();
    let devices = hv.guest_devices("nob").expect("devices");
    assert_eq!(devices.console_log.as_deref(), Some(console_path("nob").as_path()));
    assert!(devices.macs.is_empty());
    let console = || read_tail(&console_path("nob")).ok();
    // SeaBIOS first says "Boot failed: could not read the boot disk", then, with nothing else
    // to try, "No bootable device." and halts.
    let no_bootable = |t: &str| firmware_boot_failure(t).is_some_and(|f| f.summary == "SeaBIOS: No bootable device");
    wait("SeaBIOS says it has nothing to boot", T, || console().is_some_and(|t| no_bootable(&t)));
    assert!(running(&hv, "nob"), "libvirt says running");

    // The health machine on real time, real probes and the real console log.
    let rt = runtime();
    let prober = Prober::new(hv.clone(), 4).with_http(Arc::new(HyperGet));
    let mut m = HealthMonitor::new(HealthSettings {
        period: Duration::from_millis(500),
        timeout: Duration::from_millis(400),
        failure_threshold: 3,
        boot_timeout: Duration::from_secs(3),
    });
    m.started(started.elapsed());
    let tcp = ProbeSpec { domain: "nob".into(), ..spec(Probe::Tcp(TcpProbe { port: 22 }), None) };
    let verdict = loop {
        let now = started.elapsed();
        match m.poll(now, console) {
            Step::Probe(ticket) => {
                let r = rt.block_on(prober.probe(&tcp));
                assert_eq!(r.outcome, Err(ProbeFailure::NoAddress("the domain has no network interface".into())));
                m.probe_done(started.elapsed(), ticket, &r);
            }
            Step::WaitUntil(t) => std::thread::sleep(t.saturating_sub(now)),
            Step::Verdict(v) => break v,
            Step::Idle => panic!("nothing suspends this domain"),
        }
        assert!(started.elapsed() < T, "no verdict");
    };
    let Verdict::BootFailed(b) = &verdict else { panic!("{verdict:?}") };
    assert_eq!(b.summary(), "SeaBIOS: No bootable device");
    let text = verdict.text();
    assert!(
        text.starts_with("boot failed: SeaBIOS: No bootable device (guest console: \"No bootable device"),
        "{text}"
    );
    assert!(text.contains("last probe: tcp port 22: no address: the domain has no network interface"), "{text}");
}

#[test]
fn e2e_health_guest_agent_answers_pings_and_libvirt_reports_agent_and_reset_events() {
    if !inside("e2e_health_guest_agent_answers_pings_and_libvirt_reports_agent_and_reset_events") {
        return;
    }
    start_event_loop();
    let hv = Arc::new(connect());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _sub = subscribe(&hv, tx).expect("subscribe");
    boot_guest(&hv, true);
    wait_event(&mut rx, "the agent connecting", |e| agent_event(e, true));
    assert!(hv.guest_devices("web").unwrap().agent_channel);
    let rt = runtime();
    let prober = Prober::new(hv.clone(), 4).with_http(Arc::new(HyperGet));
    let ping = spec(Probe::GuestAgentPing(GuestAgentPing {}), None);
    let r = probe_until(&rt, &prober, &ping, "the agent answering", |r| r.outcome.is_ok());
    assert_eq!(r.target.as_str(), "guest agent", "{r:?}");
    // The agent knows the guest's own addresses: the first source asked.
    let found = discover(hv.as_ref(), "web", &[]).unwrap();
    assert_eq!((found.address, found.source), (ip(), AddressSource::Agent));

    assert!(knob(GUEST_IP, "stop-agent").unwrap_or_default().contains("stopped"));
    wait_event(&mut rx, "the agent disconnecting", |e| agent_event(e, false));
    let r = rt.block_on(prober.probe(&ping));
    assert!(matches!(r.outcome, Err(ProbeFailure::Agent(_))), "{r:?}");

    assert!(knob(GUEST_IP, "reboot").unwrap_or_default().contains("rebooting"));
    wait_event(&mut rx, "a REBOOT event", |e| guest_event(e, &GuestEventKind::Reboot));
    wait("web serves HTTP after its reset", BOOT, || http_ok(GUEST_IP));
    wait_event(&mut rx, "the agent connecting again", |e| agent_event(e, true));
    assert!(running(&hv, "web"));
}

// ---- `virtwarden run` acting on health (the service process on the private libvirtd) ----

const PLAIN_IP: &str = "10.77.0.3";

#[test]
fn e2e_health_run_heals_a_dead_service_and_a_kernel_panic_and_leaves_a_guest_without_health_alone() {
    if !inside("e2e_health_run_heals_a_dead_service_and_a_kernel_panic_and_leaves_a_guest_without_health_alone") {
        return;
    }
    let hv = connect();
    bridge_with_address("br0", "10.77.0.1/24");
    define_health_guest(&hv, "web", "br0", &format!("{GUEST_IP}/24"), false);
    define_health_guest(&hv, "plain", "br0", &format!("{PLAIN_IP}/24"), false);
    let d = Daemon::start(&policy(&format!(
        "  domains:
    - name: web
      restart: always
      # Each breakage below starts a new failure streak (the guest served for more than 5s).
      backoff: {{resetAfter: 5s}}
      health:
        probe: {{http: {{port: 80, path: /healthz}}}}
        address: {GUEST_IP}
        period: 2s
        # Generous for a TCG guest on a loaded machine: a slow answer is no breakage here.
        timeout: 1500ms
        failureThreshold: 3
        bootTimeout: 170s
    - name: plain
      restart: always
"
    )));
    wait("web healthy", BOOT, || d.domain("web").is_some_and(|s| s["health"]["phase"] == "healthy"));
    wait("plain serves HTTP", BOOT, || http_ok(PLAIN_IP));

    // The service dies inside the guest; libvirt keeps saying running. Reset, serving again.
    assert!(knob(GUEST_IP, "kill-http").unwrap_or_default().contains("killed"));
    assert!(knob(PLAIN_IP, "kill-http").unwrap_or_default().contains("killed"));
    let took = wait("web reset", T, || d.domain("web").is_some_and(|s| s["lastAction"] == "reset (attempt 1)"));
    let s = d.domain("web").unwrap();
    assert_eq!(s["restarts"], 1, "this reset (virtwarden's first start is no restart): {s}");
    let failure = s["lastFailure"].as_str().unwrap_or_default().to_string();
    assert!(failure.starts_with(&format!("unhealthy (probe: http://{GUEST_IP}:80/healthz: ")), "{s}");
    eprintln!("service killed → reset issued in {took:?}");
    wait("web serves again", BOOT, || http_ok(GUEST_IP));
    wait("web healthy again", BOOT, || d.domain("web").is_some_and(|s| s["health"]["phase"] == "healthy"));

    // The guest kernel panics (no pvpanic: libvirt is told nothing). Reset again, serving again.
    assert!(knob(GUEST_IP, "panic").unwrap_or_default().contains("panicking"));
    wait("web reset after the panic", T, || {
        d.domain("web")
            .is_some_and(|s| s["restarts"] == 2 && s["lastAction"].as_str().is_some_and(|a| a.starts_with("reset")))
    });
    wait("web serves after the panic", BOOT, || http_ok(GUEST_IP));
    assert!(
        state(&hv, "web").is_some_and(|w| w.state == DomainState::Running),
        "the same domain, reset, not recreated"
    );

    // The guest without `health` whose service died is left alone: still running, not reset.
    let p = d.domain("plain").unwrap();
    assert_eq!(
        (&p["restarts"], &p["lastAction"]),
        (&0.into(), &"start (first start)".into()),
        "only virtwarden's first start: {p}"
    );
    assert!(p["health"].is_null(), "{p}");
    assert!(running(&hv, "plain"));
    assert!(!http_ok(PLAIN_IP), "nobody restarted plain's service");
}

#[test]
fn e2e_health_run_judges_a_no_boot_domain_boot_failed_resets_it_then_quarantines_it() {
    if !inside("e2e_health_run_judges_a_no_boot_domain_boot_failed_resets_it_then_quarantines_it") {
        return;
    }
    let hv = connect();
    define_no_boot_domain(&hv, "nob");
    let d = Daemon::start(&policy(
        "  domains:
    - name: nob
      restart: always
      backoff: {initialDelay: 100ms, maxDelay: 200ms, maxRestarts: 2, window: 1h}
      health:
        probe: {tcp: {port: 22}}
        period: 1s
        timeout: 500ms
        # Long enough for SeaBIOS to have said why, even on a loaded host.
        bootTimeout: 15s
",
    ));
    wait("boot failed", T, || {
        d.domain("nob").is_some_and(|s| s["lastFailure"].as_str().is_some_and(|f| f.starts_with("boot failed: ")))
    });
    let s = d.domain("nob").unwrap();
    let failure = s["lastFailure"].as_str().unwrap();
    // The firmware's own words from the console: "Boot failed: could not read the boot disk",
    // then "No bootable device." — which one is last at the deadline depends on how fast it ran.
    assert!(
        failure.starts_with("boot failed: SeaBIOS: "),
        "{s}\n{}\nconsole: {:?}",
        d.log(),
        read_tail(&console_path("nob"))
    );
    assert!(failure.contains("(guest console: \""), "{s}");
    assert!(failure.contains("no address: the domain has no network interface"), "{s}");
    let s = {
        wait("quarantined", T, || d.domain("nob").is_some_and(|s| s["quarantined"].is_string()));
        d.domain("nob").unwrap()
    };
    // maxRestarts 2: two resets, then quarantine (the first start is no restart).
    assert_eq!(s["restarts"], 2, "{s}");
    assert!(s["lastAction"].as_str().unwrap_or_default().starts_with("reset"), "{s}");
    assert_eq!(s["health"]["phase"], "suspended", "{s}");
    assert!(running(&hv, "nob"), "left as it is once quarantined");
    let text = sh(&[env!("CARGO_BIN_EXE_virtwarden"), "status", "--state-dir", d.state_dir.to_str().unwrap()]);
    assert!(text.contains("to retry once fixed: virtwarden release nob"), "{text}");
}

#[test]
fn e2e_health_run_restarts_a_guest_whose_kernel_panic_libvirt_reported_and_records_it() {
    if !inside("e2e_health_run_restarts_a_guest_whose_kernel_panic_libvirt_reported_and_records_it") {
        return;
    }
    let hv = connect();
    bridge_with_address("br0", "10.77.0.1/24");
    define_pvpanic_guest(&hv, "pp", "br0", &format!("{GUEST_IP}/24"));
    let d = Daemon::start(&policy("  domains:\n    - name: pp\n      restart: always\n"));
    wait("pp serves HTTP", BOOT, || http_ok(GUEST_IP));
    assert!(knob(GUEST_IP, "panic").unwrap_or_default().contains("panicking"));
    // libvirt is told (pvpanic), the domain stops (on_crash destroy) and virtwarden starts it.
    // The crash event may reach the worker only after the restart it caused (it waits while the
    // start runs), so wait for both before reading.
    wait("restarted after the panic, the event recorded", T, || {
        d.domain("pp").is_some_and(|s| s["restarts"] == 1 && s["lastGuestEvent"].is_string())
    });
    let s = d.domain("pp").unwrap();
    assert_eq!(s["lastGuestEvent"], "guest crashed (crashed/panicked)", "{s}");
    // The restart is immediate (the first start is no restart, so no backoff step): the failure
    // names whichever of libvirt's two events (crashed/panicked, then stopped/crashed) came last,
    // and the state seen then: shut off, or still crashed if libvirt's on_crash destroy had not
    // run yet when the worker looked (seen on a loaded machine). The worker may also look before
    // the event reaches it (another wake-up came first, seen in CI): then the state alone.
    let failure = s["lastFailure"].as_str().unwrap_or_default();
    assert!(
        [
            "stopped/crashed; shut off (crashed)",
            "crashed/panicked; shut off (crashed)",
            "crashed/panicked; crashed (panicked)",
            "shut off (crashed)",
            "crashed (panicked)"
        ]
        .contains(&failure),
        "{s}"
    );
    wait("pp serves HTTP again", BOOT, || http_ok(GUEST_IP));
}

// ---- Guest- and neighbour-supplied evidence (issue 19) ----

/// A second "guest" on br0 — a veth whose far end, in a network namespace of its own, holds
/// `ip` — that keeps sending ARP requests claiming it (as any host on the bridge can). Killed on
/// drop.
struct Spoofer(std::process::Child);

impl Spoofer {
    fn start(ip: &str) -> Spoofer {
        sh(&["ip", "netns", "add", "spoof"]);
        sh(&["ip", "link", "add", "vsp0", "type", "veth", "peer", "name", "vsp1"]);
        sh(&["ip", "link", "set", "vsp1", "netns", "spoof"]);
        sh(&["ip", "link", "set", "vsp0", "master", "br0", "up"]);
        sh(&["ip", "netns", "exec", "spoof", "ip", "addr", "add", &format!("{ip}/24"), "dev", "vsp1"]);
        sh(&["ip", "netns", "exec", "spoof", "ip", "link", "set", "vsp1", "up"]);
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", "spoof", "sh", "-c"])
            .arg("while :; do ping -c1 -W1 10.77.0.1 >/dev/null 2>&1; sleep 0.3; done")
            .spawn()
            .expect("spoofer");
        Spoofer(child)
    }
}

impl Drop for Spoofer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn e2e_health_run_an_arp_spoofer_on_the_bridge_is_an_address_conflict_never_a_reset() {
    if !inside("e2e_health_run_an_arp_spoofer_on_the_bridge_is_an_address_conflict_never_a_reset") {
        return;
    }
    let hv = connect();
    bridge_with_address("br0", "10.77.0.1/24");
    define_health_guest(&hv, "web", "br0", &format!("{GUEST_IP}/24"), false);
    // No `address`, no agent: the address comes from the host's neighbour table on br0.
    let d = Daemon::start(&policy(
        "  domains:
    - name: web
      restart: always
      health:
        probe: {http: {port: 80, path: /healthz}}
        period: 1s
        # Generous for a TCG guest on a loaded machine: the conflict is under test, not speed.
        timeout: 900ms
        failureThreshold: 5
        bootTimeout: 170s
",
    ));
    // The host talks to the guest (its neighbour table learns the guest's MAC on br0).
    wait("web serves HTTP", BOOT, || http_ok(GUEST_IP));
    let t0 = Instant::now();
    while !d.domain("web").is_some_and(|s| s["health"]["phase"] == "healthy") {
        assert!(t0.elapsed() < T, "web not healthy: {:?}\n{}", d.domain("web"), d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.domain("web").unwrap()["health"]["address"], GUEST_IP);

    let _spoofer = Spoofer::start(GUEST_IP);
    wait("the conflict is reported", T, || {
        d.domain("web").is_some_and(|s| {
            s["health"]["addressConflict"]
                .as_str()
                .is_some_and(|c| c.starts_with(&format!("{GUEST_IP} is answered by ")))
        })
    });
    let s = d.domain("web").unwrap();
    eprintln!("conflict reported: {}", s["health"]["addressConflict"]);
    // Twenty more probe periods under the spoofer: never judged, never reset, never quarantined.
    let mut probes = std::collections::HashSet::new();
    wait("twenty probes under the spoofer", T, || {
        let s = d.domain("web").unwrap();
        // Only virtwarden's first start, which is no restart (issue 18).
        assert_eq!(s["restarts"], 0, "only virtwarden's first start: {s}\n{}", d.log());
        assert_eq!(s["lastAction"], "start (first start)", "{s}");
        assert!(s["quarantined"].is_null(), "{s}");
        assert_ne!(s["health"]["phase"], "unhealthy", "{s}");
        assert_ne!(s["health"]["phase"], "boot-failed", "{s}");
        probes.insert(s["health"]["lastProbeAt"].to_string());
        probes.len() > 20
    });
    assert!(running(&hv, "web"));
    assert!(d.log().contains("address conflict"), "logged for the host's journal");
    let text = sh(&[env!("CARGO_BIN_EXE_virtwarden"), "status", "--state-dir", d.state_dir.to_str().unwrap()]);
    assert!(text.contains("address conflict: "), "{text}");
}

/// Run `script` in the guest through its agent (`guest-exec`), as the guest's own root would.
fn in_guest(hv: &LibvirtHost, domain: &str, script: &str) {
    let dom = hv.connection().lookup_domain_by_name(domain).expect("domain");
    let cmd = serde_json::json!({"execute": "guest-exec", "arguments": {"path": "/bin/sh", "arg": ["-c", script]}});
    dom.qemu_agent_command(&cmd.to_string(), 10, 0).expect("guest-exec");
}

#[test]
fn e2e_health_a_guest_agent_claiming_loopback_the_hosts_or_another_guests_address_is_not_probed() {
    if !inside("e2e_health_a_guest_agent_claiming_loopback_the_hosts_or_another_guests_address_is_not_probed") {
        return;
    }
    start_event_loop();
    let hv = Arc::new(connect());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _sub = subscribe(&hv, tx).expect("subscribe");
    boot_guest(&hv, true);
    wait_event(&mut rx, "the agent connecting", |e| agent_event(e, true));
    let rt = runtime();
    let prober = Prober::new(hv.clone(), 4).with_http(Arc::new(HyperGet));
    // Another managed guest is probed at 10.77.0.3.
    let other = ProbeSpec {
        domain: "db".into(),
        timeout: Duration::from_millis(500),
        ..spec(Probe::Tcp(TcpProbe { port: 80 }), Some(PLAIN_IP.parse().unwrap()))
    };
    rt.block_on(prober.probe(&other));
    // Services of the host's own: a probe aimed at them would be accepted here.
    let listeners: Vec<std::net::TcpListener> = ["127.0.0.1:80", "10.77.0.1:80"]
        .iter()
        .map(|a| {
            let l = std::net::TcpListener::bind(a).expect("bind");
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    for (claim, conflict, why) in [
        ("127.0.0.1/8", false, "loopback"),
        ("10.77.0.1/24", true, "an address of this host's own (br0)"),
        ("10.77.0.3/24", true, "used by another managed domain"),
    ] {
        let ip: IpAddr = claim.split('/').next().unwrap().parse().unwrap();
        in_guest(&hv, "web", &format!("ip addr flush dev eth0; ip addr add {claim} dev eth0"));
        wait("the agent reports the claim", T, || {
            hv.interface_addresses("web", AddressSource::Agent)
                .is_ok_and(|ifs| ifs.iter().any(|i| i.name == "eth0" && i.addrs == [ip]))
        });
        // What the host saw of the guest's real address is gone too: the agent's word is all.
        sh(&["ip", "neigh", "flush", "dev", "br0"]);
        let r = rt.block_on(prober.probe(&spec(healthz(), None)));
        let text = format!("guest agent reports {ip} on eth0: {why}");
        let ok = match &r.outcome {
            Err(ProbeFailure::Conflict(t)) => conflict && t.contains(&text),
            Err(ProbeFailure::Untrusted(t)) => !conflict && t.contains(&text),
            _ => false,
        };
        assert!(ok, "{claim}: {r:?}");
        assert_eq!(r.address, None, "not probed: {r:?}");
        assert!(r.describe().contains(&text), "reported: {}", r.describe());
    }
    for l in &listeners {
        let got = l.accept();
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a probe reached {:?}: {got:?}",
            l.local_addr()
        );
    }
}

#[test]
fn e2e_health_run_console_escapes_and_a_mebibyte_of_output_are_bounded_and_clean_in_status_and_hook_env() {
    if !inside("e2e_health_run_console_escapes_and_a_mebibyte_of_output_are_bounded_and_clean_in_status_and_hook_env") {
        return;
    }
    let hv = connect();
    // What the guest printed: a mebibyte of noise with escapes, then a firmware-looking line
    // that tries to retitle the terminal, clear it, and smuggle a line into the hook's env.
    let console = console_path("noisy");
    let mut text = String::new();
    while text.len() < 1 << 20 {
        text.push_str("noise \u{1b}[2J\u{1b}[31mred\u{1b}[0m \u{7}\u{8}\r\n");
    }
    text.push_str("\u{1b}]0;pwned\u{7}\u{1b}[1mNo bootable device.\u{1b}[0m\u{1b}[1E\u{b}VIRTWARDEN_DOMAIN=evil ");
    // Longer than any bound, and within the 64 KiB tail that is read.
    text.push_str(&"B".repeat(20_000));
    text.push('\n');
    std::fs::write(&console, &text).unwrap();
    // Diskless, no NIC, SeaBIOS not on serial: QEMU appends nothing of its own to the log.
    let xml = format!(
        "<domain type='{}'><name>noisy</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\
         <devices><serial type='file'><source path='{}' append='on'/></serial></devices></domain>",
        domain_type(),
        console.display(),
    );
    hv.connection().define_domain_xml(&xml).expect("define");
    let hook_out = work().join("hook-reason");
    let hook = work().join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\nprintf '%s' \"$VIRTWARDEN_REASON\" > {0}.tmp && mv {0}.tmp {0}\n", hook_out.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let d = Daemon::start(&policy(&format!(
        "  domains:
    - name: noisy
      restart: always
      # virtwarden's own first start, then the hook for the verdict.
      remediation:
        - action: start
        - action: exec
          after: 1
          command: [\"{}\"]
          timeout: 30s
      health:
        probe: {{tcp: {{port: 22}}}}
        period: 1s
        timeout: 500ms
        bootTimeout: 60s
",
        hook.display()
    )));
    let t0 = Instant::now();
    while !hook_out.exists() {
        let s = d.domain("noisy");
        assert!(t0.elapsed() < T, "the hook did not run; status: {s:?}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Written whole (renamed into place); the status may follow the hook by a moment.
    let reason = std::fs::read_to_string(&hook_out).unwrap();
    wait("the failure in status", T, || d.domain("noisy").is_some_and(|s| s["lastFailure"].is_string()));
    let s = d.domain("noisy").unwrap();
    let failure = s["lastFailure"].as_str().unwrap_or_default().to_string();
    for (what, t) in [("hook env", reason.as_str()), ("status", failure.as_str())] {
        assert!(
            t.starts_with("boot failed: SeaBIOS: No bootable device (guest console: \"No bootable device."),
            "{what}: {t:.300}"
        );
        assert!(!t.chars().any(char::is_control), "{what}: control characters in {t:?}");
        assert!(t.chars().count() <= 1024, "{what}: {} characters", t.chars().count());
        assert!(t.contains("…"), "{what}: the cut is marked: {t}");
        assert!(!t.contains("pwned"), "{what}: {t}");
    }
}
