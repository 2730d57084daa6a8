//! The event-driven engine against libvirt's test driver (in-process, no daemon): real
//! lifecycle events, real state reasons. The test acts on the engine's own connection because a
//! node-file test driver keeps its state per connection.

use std::sync::Arc;
use std::time::Duration;

use virtwarden::act::remediation::Registry;
use virtwarden::engine::status::{DomainStatus, StatusReport};
use virtwarden::engine::{Backends, Engine, EngineConfig, EngineHandle};
use virtwarden::hypervisor::{DomainControl, DomainReader};
use virtwarden::libvirt::connect::SharedConnector;
use virtwarden::libvirt::events::start_event_loop;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::DomainState;
use virtwarden_policies::DesiredState;
use virtwarden_tests::rig::EngineRig;
use virtwarden_tests::{testbed_uri, FlakyConnector};

const WAIT: Duration = Duration::from_secs(10);

fn policy(spec: &str) -> DesiredState {
    virtwarden_tests::inline_policy(spec)
}

/// The shared engine rig, with the test driver's connection the test acts on.
struct Rig {
    host: Arc<LibvirtHost>,
    inner: EngineRig,
}

impl std::ops::Deref for Rig {
    type Target = EngineRig;
    fn deref(&self) -> &EngineRig {
        &self.inner
    }
}

async fn rig(desired: DesiredState) -> Rig {
    start_event_loop();
    let host = Arc::new(LibvirtHost::open(&testbed_uri()).unwrap());
    let connector = Arc::new(SharedConnector { host: host.clone() });
    let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
    let inner = EngineRig::spawn_with(Backends::new(connector, Registry::with_builtins()), desired, config);
    inner.until_ready().await;
    Rig { host, inner }
}

fn domain<'a>(r: &'a StatusReport, name: &str) -> &'a DomainStatus {
    r.domains.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} not in status: {r:#?}"))
}

impl Rig {
    fn state(&self, name: &str) -> DomainState {
        self.host.observe_domain(name).unwrap().unwrap().state
    }

    async fn stop(self) {
        self.inner.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroyed_domain_is_restarted_under_always() {
    let r = rig(policy("  domains:\n    - name: web2\n      restart: always\n")).await;
    r.host.destroy("web2").unwrap();
    let s = r
        .until("web2 restarted", |s| domain(s, "web2").restarts == 1 && domain(s, "web2").state.starts_with("running"))
        .await;
    let d = domain(&s, "web2");
    assert_eq!(d.last_outcome.as_deref(), Some("ok: running again"));
    assert_eq!(d.last_action.as_deref(), Some("start (attempt 1)"));
    // The failure as the engine saw it: the lifecycle event (`stopped/destroyed`), or the state
    // reason when a look noticed first (`shut off (destroyed)`).
    let failure = d.last_failure.as_deref().unwrap();
    assert!(failure.starts_with("stopped/destroyed") || failure.starts_with("shut off (destroyed)"), "{d:#?}");
    assert_eq!(r.state("web2"), DomainState::Running);
    r.stop().await;
}

/// Issue 18: a domain never started since libvirtd started (`shut off (unknown)`: host boot,
/// first install, a new policy) is started, not restarted: no failure, no count, no backoff
/// step — so the operator's first `virsh destroy` is repaired at once, not after `initialDelay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_of_a_never_started_domain_is_no_restart_and_no_backoff_step() {
    let spec =
        "  domains:\n    - name: web1\n      restart: always\n      backoff: { initialDelay: 1h, maxDelay: 1h }\n";
    let r = rig(policy(spec)).await;
    let s = r.until("web1 started", |s| domain(s, "web1").state.starts_with("running")).await;
    let d = domain(&s, "web1");
    assert_eq!((d.restarts, d.restarts_in_window, d.consecutive_failures), (0, 0, 0), "{d:#?}");
    assert_eq!(d.last_failure, None, "a first start follows no failure: {d:#?}");
    assert_eq!(d.last_action.as_deref(), Some("start (first start)"));
    assert_eq!(d.next_retry, None);
    assert!(
        r.engine.metrics_text().lines().all(|l| !l.starts_with("virtwarden_restarts_total{")),
        "no restart counted"
    );

    // The operator's first test: destroyed right after, back at once (an hour's backoff otherwise).
    r.host.destroy("web1").unwrap();
    let s = r
        .until("web1 restarted without backoff", |s| {
            domain(s, "web1").restarts == 1 && domain(s, "web1").state.starts_with("running")
        })
        .await;
    let d = domain(&s, "web1");
    assert_eq!(d.last_action.as_deref(), Some("start (attempt 1)"));
    // The failure as the engine saw it: the lifecycle event (`stopped/destroyed`), or the state
    // reason when a look noticed first (`shut off (destroyed)`).
    let failure = d.last_failure.as_deref().unwrap();
    assert!(failure.starts_with("stopped/destroyed") || failure.starts_with("shut off (destroyed)"), "{d:#?}");
    r.stop().await;
}

/// Issue 18: a restart waiting for backoff says so in status, with its delay and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_waiting_for_backoff_is_shown_with_its_delay() {
    let spec =
        "  domains:\n    - name: web2\n      restart: always\n      backoff: { initialDelay: 1h, maxDelay: 1h }\n";
    let r = rig(policy(spec)).await;
    r.host.destroy("web2").unwrap();
    r.until("web2 restarted", |s| domain(s, "web2").restarts == 1 && domain(s, "web2").state.starts_with("running"))
        .await;
    // Down again soon after a restart: this one waits.
    r.host.destroy("web2").unwrap();
    let s = r.until("web2 backing off", |s| domain(s, "web2").backoff.is_some()).await;
    let d = domain(&s, "web2");
    let text = d.backoff.as_deref().unwrap();
    assert!(text.starts_with("restart in 3"), "about an hour (3600 s plus jitter): {text}");
    assert!(text.ends_with(" s, backoff after 1 restart in 10m"), "{text}");
    assert_eq!(d.restarts, 1);
    assert!(d.next_retry.is_some());
    let table = virtwarden::engine::status::render_text(&s);
    assert!(table.contains("BACKOFF: restart in 3"), "{table}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_honours_admin_destroy_and_guest_shutdown_never_only_reports() {
    let r = rig(policy(
        "  domains:\n    - name: web2\n      restart: on-failure\n    - name: db1\n      restart: on-failure\n    - name: batch1\n      restart: never\n",
    ))
    .await;
    r.host.destroy("web2").unwrap();
    r.host.shutdown("db1").unwrap();
    r.host.destroy("batch1").unwrap();
    let s = r
        .until("all three stops seen", |s| {
            domain(s, "web2").state == "shut off (destroyed)"
                && domain(s, "db1").state == "shut off (shutdown)"
                && domain(s, "batch1").state == "shut off (destroyed)"
        })
        .await;
    for name in ["web2", "db1", "batch1"] {
        assert_eq!(domain(&s, name).restarts, 0, "{name} must not be restarted");
        assert_eq!(r.state(name), DomainState::ShutOff);
    }
    assert!(domain(&s, "web2").notes[0].contains("stopped on purpose; honoured (restart: on-failure)"));
    assert!(domain(&s, "batch1").notes[0].contains("restart: never → left off"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmanaged_domains_are_never_touched() {
    let r = rig(policy("  domains:\n    - name: web2\n      restart: always\n")).await;
    r.host.destroy("db1").unwrap(); // no policy names db1
    r.host.destroy("web2").unwrap();
    r.until("web2 restarted", |s| domain(s, "web2").restarts == 1).await;
    // Events are handled in order, so db1's was handled before web2's restart.
    assert_eq!(r.state("db1"), DomainState::ShutOff);
    assert!(r.engine.status().domains.iter().all(|d| d.name != "db1"));
    r.engine.resync();
    r.until("a resync pass", |s| domain(s, "web2").state.starts_with("running")).await;
    assert_eq!(r.state("db1"), DomainState::ShutOff);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_then_crash_loop_walks_the_ladder_then_quarantines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hook.log");
    let hook = dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$VIRTWARDEN_DOMAIN $VIRTWARDEN_ATTEMPT $1 reason=$VIRTWARDEN_REASON\" >> {}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let spec = format!(
        "  domains:\n    - name: web2\n      restart: always\n      backoff: {{ initialDelay: 10ms, maxDelay: 40ms, resetAfter: 10m, maxRestarts: 4, window: 1h }}\n      remediation:\n        - action: start\n        - action: destroy-start\n          after: 1\n        - action: exec\n          after: 2\n          command: [\"{}\", \"from-test\"]\n          timeout: 5s\n",
        hook.display()
    );
    let r = rig(policy(&spec)).await;
    // A guest that dies every time it comes up: kill it after each restart.
    for n in 1..=4u32 {
        r.host.destroy("web2").unwrap();
        r.until(&format!("restart {n}"), |s| {
            domain(s, "web2").restarts == n && domain(s, "web2").state.starts_with("running")
        })
        .await;
    }
    r.host.destroy("web2").unwrap();
    let s = r.until("quarantine", |s| domain(s, "web2").quarantined.is_some()).await;
    let d = domain(&s, "web2");
    assert_eq!(d.restarts, 4);
    assert!(d.quarantined.as_deref().unwrap().starts_with("4 restarts within 1h"), "{d:#?}");
    assert_eq!(r.state("web2"), DomainState::ShutOff, "quarantined domains stay down");
    let metrics = r.engine.metrics_text();
    assert!(metrics.contains("virtwarden_domain_quarantined{domain=\"web2\"} 1"), "{metrics}");
    assert!(metrics.contains("virtwarden_quarantined_domains 1"), "{metrics}");
    // Steps: attempt 1 start (immediate), 2 destroy-start, 3 and 4 exec (the hook ran twice).
    let hook_log = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = hook_log.lines().collect();
    assert_eq!(lines.len(), 2, "{hook_log}");
    // The reason: the lifecycle event, or the state when a look noticed first.
    assert!(
        lines[0].starts_with("web2 3 from-test reason=stopped/destroyed")
            || lines[0].starts_with("web2 3 from-test reason=shut off (destroyed)"),
        "{hook_log}"
    );
    assert!(lines[1].starts_with("web2 4 from-test"), "{hook_log}");

    // A reload does not lift a quarantine; `virtwarden release` does, and the domain is
    // restarted again.
    r.engine.reload(policy(&spec));
    r.engine.resync();
    r.until("reload seen", |s| domain(s, "web2").quarantined.is_some()).await;
    assert_eq!(r.state("web2"), DomainState::ShutOff, "still quarantined after a reload");
    let said = r.engine.release("web2").await.expect("released");
    assert!(said.starts_with("released web2 (was quarantined: 4 restarts within 1h"), "{said}");
    r.until("restart after reload", |s| {
        domain(s, "web2").quarantined.is_none() && domain(s, "web2").state.starts_with("running")
    })
    .await;
    let metrics = r.engine.metrics_text();
    assert!(metrics.contains("virtwarden_domain_quarantined{domain=\"web2\"} 0"), "{metrics}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_drift_is_repaired_and_metrics_count_it() {
    let r = rig(policy("  domains:\n    - name: db1\n      autostart: true\n")).await;
    r.until("autostart set", |s| domain(s, "db1").last_outcome.as_deref() == Some("ok")).await;
    assert!(r.host.observe_domain("db1").unwrap().unwrap().autostart);
    let metrics = r.engine.metrics_text();
    assert!(metrics.contains("virtwarden_actions_total{kind=\"set-autostart\",result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("virtwarden_drift_detected_total{kind=\"set-autostart\"} 1"), "{metrics}");
    r.stop().await;
}

/// Hands out the same test-driver connection on every connect, counting connects, and keeps
/// the event sender so the test can announce a lost connection the way libvirt's close
/// callback does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_connection_loss_resyncs_and_keeps_healing() {
    start_event_loop();
    let host = Arc::new(LibvirtHost::open(&testbed_uri()).unwrap());
    let connector = Arc::new(FlakyConnector::new(host.clone(), 2));
    let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
    let desired = policy("  domains:\n    - name: web2\n      restart: always\n");
    let (engine, task) = Engine::spawn(connector.clone(), desired, config, Registry::with_builtins());
    // Two failed connects first (backoff), then connected.
    engine.wait_for(WAIT, |s| s.connected).await.expect("connected after retries");
    assert_eq!(connector.connects.lock().unwrap().len(), 1);

    // libvirt says the connection closed; while it is down the domain dies.
    connector.fail_next.store(1, std::sync::atomic::Ordering::SeqCst);
    let tx = connector.connects.lock().unwrap()[0].clone();
    tx.send(virtwarden::libvirt::events::HypervisorEvent::ConnectionClosed { reason: "end of file" }).unwrap();
    engine.wait_for(WAIT, |s| !s.connected).await.expect("disconnect noticed");
    host.destroy("web2").unwrap();
    // After reconnecting, the resync finds web2 down and restarts it exactly once.
    let s = engine
        .wait_for(WAIT, |s| {
            s.connected && domain(s, "web2").restarts == 1 && domain(s, "web2").state.starts_with("running")
        })
        .await
        .unwrap_or_else(|| panic!("no recovery after reconnect: {:#?}", engine.status()));
    assert_eq!(connector.connects.lock().unwrap().len(), 2);
    assert_eq!(domain(&s, "web2").restarts, 1, "no duplicate start");
    // Events flow on the new subscription: a crash after the reconnect is still healed.
    host.destroy("web2").unwrap();
    engine
        .wait_for(WAIT, |s| domain(s, "web2").restarts == 2 && domain(s, "web2").state.starts_with("running"))
        .await
        .expect("healed after reconnect");
    engine.shutdown();
    task.await.unwrap();
}

fn find<'a>(r: &'a StatusReport, name: &str) -> Option<&'a DomainStatus> {
    r.domains.iter().find(|d| d.name == name)
}

async fn broken_start_engine(host: &Arc<LibvirtHost>, spec: &str) -> (EngineHandle, tokio::task::JoinHandle<()>) {
    let mut registry = Registry::with_builtins();
    registry.register(
        virtwarden_policies::RemediationAction::Start,
        Box::new(virtwarden_tests::BrokenStart("could not open disk image /img/web2.img: Permission denied")),
    );
    let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
    Engine::spawn(Arc::new(SharedConnector { host: host.clone() }), policy(spec), config, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_starts_back_off_and_escalate_up_the_ladder() {
    start_event_loop();
    let host = Arc::new(LibvirtHost::open(&testbed_uri()).unwrap());
    host.destroy("web2").unwrap();
    let spec = "  domains:\n    - name: web2\n      restart: always\n      backoff: { initialDelay: 20ms, maxDelay: 80ms, maxRestarts: 5 }\n      remediation:\n        - action: start\n        - action: destroy-start\n          after: 2\n";
    let (engine, task) = broken_start_engine(&host, spec).await;
    // Attempts 1 and 2 use the broken `start`; attempt 3 escalates to destroy-start, which works.
    let s = engine
        .wait_for(WAIT, |s| find(s, "web2").is_some_and(|d| d.state.starts_with("running")))
        .await
        .unwrap_or_else(|| panic!("{:#?}", engine.status()));
    let d = domain(&s, "web2");
    assert_eq!(d.restarts, 3, "{d:#?}");
    assert_eq!(d.last_action.as_deref(), Some("destroy-start (attempt 3)"));
    assert!(d.last_error.as_deref().unwrap().contains("Permission denied"), "{d:#?}");
    engine.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_starts_end_quarantined_with_the_reason() {
    start_event_loop();
    let host = Arc::new(LibvirtHost::open(&testbed_uri()).unwrap());
    host.destroy("web2").unwrap();
    let spec = "  domains:\n    - name: web2\n      restart: always\n      backoff: { initialDelay: 10ms, maxDelay: 40ms, maxRestarts: 3 }\n";
    let (engine, task) = broken_start_engine(&host, spec).await;
    let s = engine
        .wait_for(WAIT, |s| find(s, "web2").is_some_and(|d| d.quarantined.is_some()))
        .await
        .unwrap_or_else(|| panic!("{:#?}", engine.status()));
    let d = domain(&s, "web2");
    assert_eq!(d.restarts, 3);
    assert_eq!(d.next_retry, None, "no retry is scheduled once quarantined");
    assert!(d.last_outcome.as_deref().unwrap().contains("Permission denied"), "{d:#?}");
    assert_eq!(host.observe_domain("web2").unwrap().unwrap().state, DomainState::ShutOff);
    let metrics = engine.metrics_text();
    assert!(metrics.contains("virtwarden_quarantined_domains 1"), "{metrics}");
    engine.shutdown();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_answers_liveness_pings_until_it_stops() {
    let r = rig(policy("  domains:\n    - name: web2\n")).await;
    assert!(r.engine.ping(Duration::from_secs(5)).await);
    let engine = r.engine.clone();
    r.stop().await;
    assert!(!engine.ping(Duration::from_millis(200)).await, "a stopped engine does not answer");
}
