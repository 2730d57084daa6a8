//! Guest faults fed to the engine, on the in-memory hypervisor (libvirt's test driver cannot
//! produce them): a watchdog or a disk I/O error makes the domain's worker look at once and
//! resume a guest they paused; `enospc` (the host's disk is full) is reported and never answered
//! with a reset; lost control of QEMU makes it look at once; the guest agent coming and going is
//! recorded as evidence. A failed start is explained by the injected diagnosis backend.

use std::sync::Arc;

use virtwarden::engine::{Backends, Explain};
use virtwarden::hypervisor::events::{AgentReason, GuestEventKind, IoErrorAction, WatchdogAction};
use virtwarden::hypervisor::{ErrorKind, Hypervisor};
use virtwarden::observe::{DomainState, StateReason};
use virtwarden_tests::inline_policy;
use virtwarden_tests::memhv::{MemConnector, MemHv, Script};
use virtwarden_tests::rig::{find, running, test_config, EngineRig, WAIT};

fn rig(hv: &Arc<MemHv>, spec: &str) -> EngineRig {
    EngineRig::spawn(Arc::new(MemConnector { hv: hv.clone() }), inline_policy(spec))
}

fn last_guest_event(rig: &EngineRig, name: &str) -> Option<String> {
    find(&rig.engine.status(), name).and_then(|d| d.last_guest_event.clone())
}

/// The calls that change `name`.
fn changes(hv: &MemHv, name: &str) -> Vec<String> {
    hv.calls()
        .into_iter()
        .filter(|(op, d)| d == name && !matches!(op.as_str(), "observe" | "state"))
        .map(|(op, _)| op)
        .collect()
}

/// Reads of `name` so far.
fn reads(hv: &MemHv, name: &str) -> usize {
    hv.count("observe", name) + hv.count("state", name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watchdog_that_paused_the_guest_makes_the_worker_resume_it_at_once() {
    let hv = MemHv::new().with_domain("web1", DomainState::Running, StateReason::Booted);
    let rig = rig(&hv, "  domains:\n    - name: web1\n");
    rig.until("web1 seen running", |s| running(s, "web1")).await;

    // The guest hangs, its watchdog fires and QEMU pauses it. No lifecycle event: the guest
    // event alone must make the worker look (the resync is an hour away).
    hv.set_state("web1", DomainState::Paused, StateReason::Watchdog);
    hv.guest_event("web1", GuestEventKind::Watchdog { action: WatchdogAction::Pause });

    assert!(hv.wait_calls("resume", "web1", 1, WAIT).await, "not resumed; calls: {:?}", hv.calls());
    rig.until("the watchdog shown", |s| {
        find(s, "web1").and_then(|d| d.last_guest_event.as_deref()) == Some("watchdog fired (action: pause)")
    })
    .await;
    let metrics = rig.engine.metrics_text();
    assert!(metrics.contains("virtwarden_guest_events_total{domain=\"web1\",kind=\"watchdog\"} 1"), "{metrics}");
    assert_eq!(changes(&hv, "web1"), ["resume"], "only a resume, never a reset or a destroy");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_error_is_answered_with_a_resume_but_enospc_is_reported_and_never_reset() {
    let hv = MemHv::new().with_domain("db1", DomainState::Running, StateReason::Booted).with_domain(
        "full1",
        DomainState::Running,
        StateReason::Booted,
    );
    let rig = rig(&hv, "  domains:\n    - name: db1\n    - name: full1\n");
    rig.until("both seen running", |s| running(s, "db1") && running(s, "full1")).await;

    // db1: a real I/O error paused the guest; resuming is what an operator does first.
    hv.set_state("db1", DomainState::Paused, StateReason::IoError);
    let eio = GuestEventKind::IoError {
        device: "vda".into(),
        path: "/srv/vm/db1.qcow2".into(),
        action: IoErrorAction::Pause,
        reason: "eio".into(),
    };
    hv.guest_event("db1", eio);
    assert!(hv.wait_calls("resume", "db1", 1, WAIT).await, "db1 not resumed; calls: {:?}", hv.calls());

    // full1: the host's disk is full. A reset cannot free space; it is reported, not acted on.
    hv.set_state("full1", DomainState::Paused, StateReason::IoError);
    let enospc = GuestEventKind::IoError {
        device: "vda".into(),
        path: "/srv/vm/full1.qcow2".into(),
        action: IoErrorAction::Pause,
        reason: "enospc".into(),
    };
    hv.guest_event("full1", enospc);
    rig.until("enospc reported", |s| {
        find(s, "full1").and_then(|d| d.last_guest_event.as_deref())
            == Some(
                "no space left on the host for vda (/srv/vm/full1.qcow2): enospc, guest paused \
                 (a host problem: free space on the host; not reset)",
            )
    })
    .await;
    // The worker handles its orders one after the other: once a later event is shown, the
    // enospc event was handled completely, and whatever it led to was already begun.
    hv.guest_event("full1", GuestEventKind::Agent { connected: false, reason: AgentReason::Channel });
    rig.until("the later event shown", |s| {
        find(s, "full1").and_then(|d| d.last_guest_event.as_deref()) == Some("guest agent disconnected (channel)")
    })
    .await;
    let acted = changes(&hv, "full1");
    assert!(!acted.iter().any(|op| op == "reset" || op == "destroy" || op == "start"), "{acted:?}");
    let metrics = rig.engine.metrics_text();
    assert!(metrics.contains("virtwarden_guest_events_total{domain=\"full1\",kind=\"io-error\"} 1"), "{metrics}");
    assert!(metrics.contains("virtwarden_guest_events_total{domain=\"db1\",kind=\"io-error\"} 1"), "{metrics}");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_control_of_qemu_makes_the_worker_look_at_once() {
    let hv = MemHv::new().with_domain("web1", DomainState::Running, StateReason::Booted);
    let rig = rig(&hv, "  domains:\n    - name: web1\n");
    rig.until("web1 seen running", |s| running(s, "web1")).await;
    let before = reads(&hv, "web1");

    // QEMU's monitor is gone and the domain crashed with it.
    hv.set_state("web1", DomainState::Crashed, StateReason::Crashed);
    hv.guest_event("web1", GuestEventKind::ControlError);

    assert!(hv.wait_until(WAIT, |hv| reads(hv, "web1") > before).await, "not looked at; calls: {:?}", hv.calls());
    assert!(hv.wait_calls("start", "web1", 1, WAIT).await, "not started again; calls: {:?}", hv.calls());
    rig.until("the crash healed", |s| {
        find(s, "web1").is_some_and(|d| d.state.starts_with("running") && d.last_guest_event.is_some())
    })
    .await;
    assert_eq!(last_guest_event(&rig, "web1").as_deref(), Some("libvirt lost control of QEMU (control error)"));
    // A crashed domain is destroyed, then started (README: `crashed` → destroy, then start).
    assert_eq!(changes(&hv, "web1"), ["destroy", "start"]);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_agent_coming_and_going_is_evidence_and_changes_nothing() {
    let hv = MemHv::new().with_domain("web1", DomainState::Running, StateReason::Booted);
    let rig = rig(&hv, "  domains:\n    - name: web1\n");
    rig.until("web1 seen running", |s| running(s, "web1")).await;

    hv.guest_event("web1", GuestEventKind::Agent { connected: true, reason: AgentReason::Channel });
    rig.until("agent connected shown", |s| {
        find(s, "web1").and_then(|d| d.last_guest_event.as_deref()) == Some("guest agent connected (channel)")
    })
    .await;
    hv.guest_event("web1", GuestEventKind::Agent { connected: false, reason: AgentReason::DomainStarted });
    rig.until("agent disconnected shown", |s| {
        find(s, "web1").and_then(|d| d.last_guest_event.as_deref()) == Some("guest agent disconnected (domain started)")
    })
    .await;
    let metrics = rig.engine.metrics_text();
    assert!(metrics.contains("virtwarden_guest_events_total{domain=\"web1\",kind=\"agent-connected\"} 1"), "{metrics}");
    assert!(
        metrics.contains("virtwarden_guest_events_total{domain=\"web1\",kind=\"agent-disconnected\"} 1"),
        "{metrics}"
    );
    assert!(changes(&hv, "web1").is_empty(), "{:?}", hv.calls());
    rig.stop().await;
}

/// A diagnosis backend that finds the same cause every time, and counts its calls.
struct MissingDisk(std::sync::atomic::AtomicUsize);

impl Explain for MissingDisk {
    fn explain(&self, _hv: &dyn Hypervisor, domain: &str, error: &str) -> Option<String> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(error.contains("Cannot access storage file"), "the explainer gets the failure: {error}");
        Some(format!("disk vda /srv/vm/{domain}.qcow2 does not exist"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_is_explained_by_the_injected_diagnosis() {
    let hv = MemHv::new().with_domain("web1", DomainState::ShutOff, StateReason::Crashed);
    hv.script(
        "start",
        "web1",
        Script::Error(ErrorKind::Other, "Cannot access storage file '/srv/vm/web1.qcow2'".into()),
        1,
    );
    let explain = Arc::new(MissingDisk(Default::default()));
    let mut backends = Backends::new(
        Arc::new(MemConnector { hv: hv.clone() }),
        virtwarden::act::remediation::Registry::with_builtins(),
    );
    backends.explain = Some(explain.clone());
    let rig = EngineRig::spawn_with(backends, inline_policy("  domains:\n    - name: web1\n"), test_config());

    let s = rig.until("the failure explained", |s| find(s, "web1").is_some_and(|d| d.diagnosis.is_some())).await;
    let d = find(&s, "web1").unwrap();
    assert_eq!(d.last_error.as_deref(), Some("start failed: disk vda /srv/vm/web1.qcow2 does not exist"));
    assert_eq!(explain.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The next attempt (after the backoff) starts it.
    rig.until("started after the failure", |s| running(s, "web1")).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_call_costs_only_its_domain() {
    let hv = MemHv::new().with_domain("stuck1", DomainState::ShutOff, StateReason::Crashed).with_domain(
        "web1",
        DomainState::ShutOff,
        StateReason::Crashed,
    );
    hv.script("start", "stuck1", Script::Hang, 1);
    let rig = rig(&hv, "  domains:\n    - name: stuck1\n    - name: web1\n");
    rig.until("web1 started while stuck1's start hangs", |s| running(s, "web1")).await;
    assert!(!running(&rig.engine.status(), "stuck1"));
    hv.release_hangs();
    rig.until("stuck1 started once its call returned", |s| running(s, "stuck1")).await;
    assert_eq!(hv.count("start", "stuck1"), 1, "a hung call is not issued again: {:?}", hv.calls());
    rig.stop().await;
}
