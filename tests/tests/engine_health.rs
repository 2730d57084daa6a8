//! Guest health in the engine, against libvirt's test driver (in-process) and real local TCP
//! listeners standing in for the guest's service (the policy's `address` points at 127.0.0.1):
//! a healthy guest whose service dies is reset and heals; a guest that never passes within
//! `bootTimeout` is judged "boot failed", reset, and quarantined once resets keep failing; a
//! domain without `health` is never probed or touched; a paused guest is not probed.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use virtwarden::act::remediation::Registry;
use virtwarden::engine::connect::Connector;
use virtwarden::engine::status::{DomainStatus, HealthPhase, StatusReport};
use virtwarden::engine::{Backends, EngineConfig};
use virtwarden::hypervisor::{DomainControl, DomainReader};
use virtwarden::libvirt::connect::SharedConnector;
use virtwarden::libvirt::events::start_event_loop;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::DomainState;
use virtwarden_policies::DesiredState;
use virtwarden_tests::rig::EngineRig;
use virtwarden_tests::{testbed_uri, FlakyConnector};

const WAIT: Duration = Duration::from_secs(20);

fn policy(spec: &str) -> DesiredState {
    virtwarden_tests::inline_policy(spec)
}

/// web2 probed over TCP at 127.0.0.1:`port`: 1 s period, 2 failures, 2 s to boot; a short
/// backoff and at most `max` restarts an hour.
fn probed(port: u16, max: u32) -> String {
    format!(
        "  domains:
    - name: web2
      restart: always
      backoff: {{initialDelay: 100ms, maxDelay: 200ms, resetAfter: 1h, maxRestarts: {max}, window: 1h}}
      health:
        probe: {{tcp: {{port: {port}}}}}
        address: 127.0.0.1
        period: 1s
        timeout: 500ms
        failureThreshold: 2
        bootTimeout: 2s
    - name: db1
      restart: always
"
    )
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
    rig_through(desired, |host| Arc::new(SharedConnector { host })).await.0
}

/// The engine on its own test-driver connection, reached through the connector `via` makes;
/// ready when returned.
async fn rig_through<C: Connector + 'static>(
    desired: DesiredState,
    via: impl FnOnce(Arc<LibvirtHost>) -> Arc<C>,
) -> (Rig, Arc<C>) {
    start_event_loop();
    let host = Arc::new(LibvirtHost::open(&testbed_uri()).unwrap());
    let connector = via(host.clone());
    let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
    let backends = Backends::new(connector.clone(), Registry::with_builtins());
    let inner = EngineRig::spawn_with(backends, desired, config).with_wait(WAIT);
    inner.until_ready().await;
    (Rig { host, inner }, connector)
}

fn domain<'a>(r: &'a StatusReport, name: &str) -> &'a DomainStatus {
    r.domains.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} not in status: {r:#?}"))
}

fn phase(r: &StatusReport, name: &str) -> Option<HealthPhase> {
    domain(r, name).health.as_ref().map(|h| h.phase)
}

impl Rig {
    async fn stop(self) {
        self.inner.stop().await;
    }
}

/// A free local port, and a listener on it (the guest's service).
fn service() -> (u16, TcpListener) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    (l.local_addr().unwrap().port(), l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_dies_guest_is_reset_and_heals_when_it_answers_again() {
    let (port, listener) = service();
    let r = rig(policy(&probed(port, 5))).await;
    let s = r.until("web2 healthy", |s| phase(s, "web2") == Some(HealthPhase::Healthy)).await;
    let h = domain(&s, "web2").health.clone().unwrap();
    assert_eq!(h.address.as_deref(), Some("127.0.0.1"));
    assert!(h.last_probe.as_deref().unwrap().ends_with(": ok"), "{h:?}");
    assert_eq!(phase(&s, "db1"), None, "db1 has no health: never probed");
    let metrics = r.engine.metrics_text();
    assert!(metrics.contains("virtwarden_guest_health{domain=\"web2\",state=\"healthy\"} 1"), "{metrics}");

    // The service dies: two failed probes make it unhealthy; the default first step is a reset.
    drop(listener);
    let s = r.until("web2 reset", |s| domain(s, "web2").last_action.as_deref() == Some("reset (attempt 1)")).await;
    let d = domain(&s, "web2");
    assert!(d.last_failure.as_deref().unwrap().starts_with("unhealthy (probe: tcp 127.0.0.1:"), "{d:#?}");
    assert!(d.last_failure.as_deref().unwrap().contains("connection refused"), "{d:#?}");
    assert_eq!(d.restarts, 1);
    let metrics = r.engine.metrics_text();
    assert!(metrics.contains("virtwarden_probe_failures_total{domain=\"web2\",reason=\"refused\"}"), "{metrics}");

    // After the reset it boots again; the service answers again → healthy, no more resets.
    let _back = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let s = r.until("web2 healthy again", |s| phase(s, "web2") == Some(HealthPhase::Healthy)).await;
    assert_eq!(domain(&s, "web2").restarts, 1, "{:#?}", domain(&s, "web2"));
    assert_eq!(domain(&s, "db1").restarts, 0);
    assert_eq!(r.host.observe_domain("web2").unwrap().unwrap().state, DomainState::Running);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_answering_guest_is_boot_failed_reset_then_quarantined() {
    // Nothing listens: every boot fails. 2 restarts allowed, the third is refused.
    let (port, listener) = service();
    drop(listener);
    let r = rig(policy(&probed(port, 2))).await;
    // web2 was running before the engine watched it and never passed: a missed boot deadline
    // may as well be a wrong probe, so it is reported, not reset.
    let s = r.until("reported", |s| domain(s, "web2").notes.iter().any(|n| n.contains("reported, not reset"))).await;
    assert_eq!(domain(&s, "web2").restarts, 0, "{:#?}", domain(&s, "web2"));
    assert_eq!(phase(&s, "web2"), Some(HealthPhase::BootFailed));
    // Once it boots under watch (an admin destroys it; restart: always starts it), the boot is judged.
    r.host.destroy("web2").unwrap();
    let s = r
        .until("boot failed", |s| {
            domain(s, "web2").last_failure.as_deref().is_some_and(|f| f.starts_with("boot failed: "))
        })
        .await;
    let f = domain(&s, "web2").last_failure.clone().unwrap();
    assert!(f.starts_with("boot failed: no probe passed within 2s"), "{f}");
    assert!(f.contains("last probe: tcp 127.0.0.1:"), "{f}");
    let s = r.until("quarantined", |s| domain(s, "web2").quarantined.is_some()).await;
    let d = domain(&s, "web2");
    assert_eq!(d.restarts, 2, "{d:#?}");
    assert!(d.quarantined.as_deref().unwrap().starts_with("2 restarts within 1h"), "{d:#?}");
    // Probing stops while quarantined; the domain is left running as it is.
    let h = d.health.as_ref().unwrap();
    assert_eq!(h.phase, HealthPhase::Suspended, "{h:?}");
    assert!(h.detail.as_deref().unwrap().contains("quarantined"), "{h:?}");
    assert_eq!(r.host.observe_domain("web2").unwrap().unwrap().state, DomainState::Running);

    // Fixed in place and released: judged afresh (a new boot window), healthy without a reset.
    let _fixed = TcpListener::bind(("127.0.0.1", port)).unwrap();
    r.engine.release("web2").await.expect("released");
    let s = r.until("healthy after release", |s| phase(s, "web2") == Some(HealthPhase::Healthy)).await;
    assert!(domain(&s, "web2").quarantined.is_none());
    assert_eq!(domain(&s, "web2").restarts, 2, "not reset again: {:#?}", domain(&s, "web2"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_guest_is_not_probed_and_not_reset() {
    let (port, listener) = service();
    let r =
        rig(policy(&probed(port, 5).replace("restart: always\n      backoff", "restart: on-failure\n      backoff")))
            .await;
    r.until("web2 healthy", |s| phase(s, "web2") == Some(HealthPhase::Healthy)).await;
    r.host.connection().lookup_domain_by_name("web2").unwrap().suspend().unwrap();
    let s = r.until("suspended", |s| phase(s, "web2") == Some(HealthPhase::Suspended)).await;
    assert!(domain(&s, "web2").health.as_ref().unwrap().detail.as_deref().unwrap().starts_with("paused ("));
    // The service dies while paused: no probe runs, so nothing is judged or reset, however long.
    drop(listener);
    let probes_before = probe_count(&r.engine.metrics_text());
    // Quiet: no probe in flight and no timer armed that could start one, so none runs until
    // something from outside (a libvirt event, a reload) moves the domain, however long.
    // A probe already in flight when the pause was seen may still finish and count (it is not
    // aborted); none more.
    r.until_quiet().await;
    assert!(probe_count(&r.engine.metrics_text()) <= probes_before + 1, "no probes while paused");
    let s = r.engine.status();
    assert_eq!(domain(&s, "web2").restarts, 0);
    assert_eq!(r.host.observe_domain("web2").unwrap().unwrap().state, DomainState::Paused);
    r.stop().await;
}

/// How many probes ran (the histogram's count; probes have run whenever this is asked, so a
/// missing series is a failure, not zero).
fn probe_count(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("virtwarden_probe_duration_seconds_count{probe=\"tcp\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tcp probe count in the metrics:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_drivers_made_up_addresses_are_never_probed() {
    let r = rig(policy(
        "  domains:\n    - name: web2\n      health: {probe: {tcp: {port: 80}}, period: 1s, timeout: 500ms}\n",
    ))
    .await;
    let s = r
        .until("a probe failed", |s| domain(s, "web2").health.as_ref().is_some_and(|h| h.last_probe_ok == Some(false)))
        .await;
    let probe = domain(&s, "web2").health.clone().unwrap().last_probe.unwrap();
    assert!(probe.contains("no address: "), "{probe}");
    assert!(probe.contains("libvirt's test driver makes addresses up; give `address` in the policy"), "{probe}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_outage_suspends_probing_and_resets_nobody() {
    let (port, listener) = service();
    let (r, connector) = rig_through(policy(&probed(port, 5)), |h| Arc::new(FlakyConnector::new(h, 0))).await;
    r.until("web2 healthy", |s| phase(s, "web2") == Some(HealthPhase::Healthy)).await;

    // libvirtd goes away for a while; meanwhile the guest's service stops answering.
    connector.drop_connection(usize::MAX);
    let s = r.until("suspended while disconnected", |s| phase(s, "web2") == Some(HealthPhase::Suspended)).await;
    let h = domain(&s, "web2").health.clone().unwrap();
    assert_eq!(h.detail.as_deref(), Some("libvirt disconnected"), "{h:?}");
    drop(listener);
    let probes = probe_count(&r.engine.metrics_text());
    // Quiet (the reconnection only waits between tries): no probe in flight and no worker
    // timer armed that could start one, so none runs until libvirt is back.
    // (A probe in flight when the connection dropped may still finish and count; none more.)
    r.until_quiet().await;
    assert!(probe_count(&r.engine.metrics_text()) <= probes + 1, "no probes while libvirt is away");

    // libvirt is back and so is the service: judged afresh, healthy, never reset.
    let _back = TcpListener::bind(("127.0.0.1", port)).unwrap();
    connector.fail_next.store(0, std::sync::atomic::Ordering::SeqCst);
    let s =
        r.until("healthy after the outage", |s| s.connected && phase(s, "web2") == Some(HealthPhase::Healthy)).await;
    assert_eq!(domain(&s, "web2").restarts, 0, "{:#?}", domain(&s, "web2"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_missed_while_libvirt_was_away_is_a_new_boot() {
    let (port, _listener) = service();
    let (r, connector) = rig_through(policy(&probed(port, 5)), |h| Arc::new(FlakyConnector::new(h, 0))).await;
    let s = r.until("web2 healthy", |s| phase(s, "web2") == Some(HealthPhase::Healthy)).await;
    let healthy_since = domain(&s, "web2").health.clone().unwrap().since.unwrap();

    // While libvirt is away (no events), an admin restarts web2.
    connector.drop_connection(usize::MAX);
    r.until("disconnect seen", |s| !s.connected).await;
    let restarted_at = r.engine.status().updated.expect("status has a time");
    r.host.destroy("web2").unwrap();
    r.host.start("web2").unwrap();
    connector.fail_next.store(0, std::sync::atomic::Ordering::SeqCst);
    // Back: the new runtime id says it is another boot, judged from its start.
    let s = r
        .until("healthy again on the new boot", |s| {
            s.connected
                && domain(s, "web2")
                    .health
                    .as_ref()
                    .is_some_and(|h| h.phase == HealthPhase::Healthy && h.since.is_some_and(|t| t > restarted_at))
        })
        .await;
    assert!(healthy_since < restarted_at);
    assert_eq!(domain(&s, "web2").restarts, 0, "virtwarden restarted nothing: {:#?}", domain(&s, "web2"));
    r.stop().await;
}
