//! The engine under faults, on libvirt's real test driver with faults injected around it
//! (virtwarden_tests::faulty): one actor per domain across a reload, retries that repeat only
//! single idempotent calls, a domain's own error that keeps the connection, a hung call that
//! stalls only its domain, a repair interrupted by a lost connection that does not count, what
//! is remembered across an engine restart and across libvirtd forgetting why domains are off.

use std::sync::Arc;
use std::time::Duration;

use virtwarden::act::remediation::Registry;
use virtwarden::engine::status::{DomainStatus, StatusReport};
use virtwarden::engine::{Backends, EngineConfig};
use virtwarden::hypervisor::{DomainControl, DomainReader};
use virtwarden::libvirt::events::start_event_loop;
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::DomainState;
use virtwarden_policies::DesiredState;
use virtwarden_tests::faulty::{Fault, Faulty, FaultyConnector};
use virtwarden_tests::rig::EngineRig;
use virtwarden_tests::testbed_uri;

const WAIT: Duration = Duration::from_secs(15);

fn policy(spec: &str) -> DesiredState {
    virtwarden_tests::inline_policy(spec)
}

fn find<'a>(r: &'a StatusReport, name: &str) -> Option<&'a DomainStatus> {
    r.domains.iter().find(|d| d.name == name)
}

fn running(r: &StatusReport, name: &str) -> bool {
    find(r, name).is_some_and(|d| d.state.starts_with("running"))
}

/// The shared engine rig, with the fault-injecting wrapper and its connector.
struct Rig {
    faulty: Arc<Faulty>,
    connector: Arc<FaultyConnector>,
    inner: EngineRig,
}

impl std::ops::Deref for Rig {
    type Target = EngineRig;
    fn deref(&self) -> &EngineRig {
        &self.inner
    }
}

fn config(data: Option<&std::path::Path>) -> EngineConfig {
    EngineConfig {
        resync: Duration::from_secs(3600),
        read_deadline: Duration::from_millis(500),
        data_dir: data.map(|d| d.to_path_buf()),
        ..Default::default()
    }
}

fn spawn_on(faulty: Arc<Faulty>, desired: DesiredState, config: EngineConfig, registry: Registry) -> Rig {
    let connector = FaultyConnector::new(faulty.clone());
    let calls = faulty.clone();
    let inner = EngineRig::spawn_with(Backends::new(connector.clone(), registry), desired, config)
        .with_context(move || format!("calls: {:?}", calls.calls()));
    Rig { faulty, connector, inner }
}

fn open() -> Arc<Faulty> {
    start_event_loop();
    Faulty::new(Arc::new(LibvirtHost::open(&testbed_uri()).unwrap()))
}

impl Rig {
    /// Wait for the recorded calls to satisfy `cond` (they change without a status change).
    async fn until_calls(&self, what: &str, cond: impl Fn(&Faulty) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(&self.faulty) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}; calls: {:?}",
                self.faulty.calls()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn state(&self, name: &str) -> DomainState {
        self.faulty.inner.observe_domain(name).unwrap().unwrap().state
    }

    async fn stop(self) {
        self.faulty.release_hangs();
        self.inner.stop().await;
    }
}

fn hook(dir: &std::path::Path, body: &str) -> String {
    let path = dir.join("hook.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_graceful_shutdown_cancels_it_one_actor_remains() {
    let faulty = open();
    // The guest ignores the ACPI request: the worker waits for it, up to shutdownTimeout (long,
    // so that a slow machine cannot reach it before the reload; a cancelled wait ends at once).
    faulty.arm("shutdown", "web2", Fault::Ignore, 1);
    let stopped = "  domains:\n    - name: web2\n      state: stopped\n      shutdownTimeout: 1m\n";
    let r = spawn_on(faulty, policy(stopped), config(None), Registry::with_builtins());
    r.until_calls("shutdown requested", |f| f.count("shutdown", "web2") == 1).await;
    // The policy changes mid-wait: the wait is cancelled, the old action does not go on to
    // destroy the domain after its timeout, the new policy is in force.
    r.engine.reload(policy("  domains:\n    - name: web2\n      state: running\n"));
    let s = r
        .until("the wait cancelled", |s| {
            find(s, "web2").is_some_and(|d| d.last_outcome.as_deref().is_some_and(|o| o.starts_with("cancelled")))
        })
        .await;
    assert_eq!(find(&s, "web2").unwrap().last_action.as_deref(), Some("shut down (destroy after 1m)"));
    // Once the engine is idle nothing of the old action is under way (a shutdown wait still
    // running would keep its worker busy, then destroy after the timeout): the domain
    // still runs and was never destroyed.
    r.until_idle().await;
    assert_eq!(r.faulty.count("destroy", "web2"), 0, "{:?}", r.faulty.calls());
    assert_eq!(r.state("web2"), DomainState::Running);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_hook_kills_the_hook_and_its_action_ends() {
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let finished = dir.path().join("finished");
    let script = hook(dir.path(), &format!("echo $$ > {}\nsleep 30\ntouch {}", started.display(), finished.display()));
    let faulty = open();
    let spec = format!(
        "  domains:\n    - name: web2\n      restart: always\n      remediation:\n        - action: exec\n          command: [\"{script}\"]\n          timeout: 60s\n"
    );
    let r = spawn_on(faulty, policy(&spec), config(None), Registry::with_builtins());
    r.until("ready", |_| r.engine.is_ready()).await;
    r.faulty.inner.destroy("web2").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !started.exists() {
        assert!(tokio::time::Instant::now() < deadline, "the hook never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid: i32 = loop {
        if let Ok(p) = std::fs::read_to_string(&started).unwrap_or_default().trim().parse() {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    r.engine.reload(policy("  domains:\n    - name: web2\n      restart: never\n"));
    r.until("the repair cancelled", |s| {
        find(s, "web2").is_some_and(|d| d.last_outcome.as_deref().is_some_and(|o| o.starts_with("cancelled")))
    })
    .await;
    // The hook process is killed (reaped by its runner), it never finishes, and the
    // interrupted repair does not count as a restart.
    let alive = || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| !st.contains(") Z "));
    let deadline = tokio::time::Instant::now() + WAIT;
    while alive() {
        assert!(tokio::time::Instant::now() < deadline, "the hook {pid} was not killed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!finished.exists());
    let s = r.engine.status();
    assert_eq!(find(&s, "web2").unwrap().restarts, 0, "{s:#?}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_repeats_one_idempotent_call_never_the_hook_or_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hook.log");
    let script = hook(dir.path(), &format!("echo ran >> {}", log.display()));
    let faulty = open();
    // After the hook, bring-up's start meets a held job lock twice, then works.
    faulty.arm("start", "web2", Fault::Transient, 2);
    let spec = format!(
        "  domains:\n    - name: web2\n      restart: always\n      remediation:\n        - action: exec\n          command: [\"{script}\"]\n"
    );
    let r = spawn_on(faulty, policy(&spec), config(None), Registry::with_builtins());
    r.until("ready", |_| r.engine.is_ready()).await;
    r.faulty.inner.destroy("web2").unwrap();
    let s = r.until("web2 running again", |s| running(s, "web2") && find(s, "web2").unwrap().restarts == 1).await;
    assert_eq!(find(&s, "web2").unwrap().last_outcome.as_deref(), Some("ok: running again"));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ran\n", "the hook ran once");
    assert_eq!(r.faulty.count("start", "web2"), 3, "the start call alone was repeated");
    r.stop().await;

    // A reset is never repeated: one transient error fails the step, the ladder goes on later.
    let faulty = open();
    faulty.arm("reset", "db1", Fault::Transient, 1);
    let spec = "  domains:\n    - name: db1\n      restart: always\n      backoff: {initialDelay: 50ms}\n      remediation:\n        - action: reset\n        - action: destroy-start\n          after: 1\n";
    let r = spawn_on(faulty, policy(spec), config(None), Registry::with_builtins());
    r.until("ready", |_| r.engine.is_ready()).await;
    // An admin pause, undone under `always` by the ladder: reset first, then destroy-start.
    r.faulty.inner.connection().lookup_domain_by_name("db1").unwrap().suspend().unwrap();
    let s = r.until("db1 running again", |s| running(s, "db1") && find(s, "db1").unwrap().restarts == 2).await;
    assert_eq!(r.faulty.count("reset", "db1"), 1, "{:?}", r.faulty.calls());
    assert_eq!(find(&s, "db1").unwrap().last_action.as_deref(), Some("destroy-start (attempt 2)"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_error_of_one_domain_keeps_the_connection() {
    let faulty = open();
    faulty.arm("start", "web2", Fault::SystemError, 1);
    let spec = "  domains:\n    - name: web2\n      restart: always\n      backoff: {initialDelay: 50ms}\n    - name: db1\n      restart: always\n";
    let r = spawn_on(faulty, policy(spec), config(None), Registry::with_builtins());
    r.until("ready", |_| r.engine.is_ready()).await;
    r.faulty.inner.destroy("web2").unwrap();
    let s = r
        .until("web2 healed on its second attempt", |s| running(s, "web2") && find(s, "web2").unwrap().restarts == 2)
        .await;
    assert!(find(&s, "web2").unwrap().last_error.as_deref().unwrap_or("").contains("Cannot get interface MTU"));
    assert_eq!(r.connector.connects.load(std::sync::atomic::Ordering::SeqCst), 1, "no reconnect");
    assert!(s.connected);
    r.faulty.inner.destroy("db1").unwrap();
    r.until("db1 healed too", |s| running(s, "db1") && find(s, "db1").unwrap().restarts == 1).await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_call_stalls_only_its_domain() {
    let faulty = open();
    faulty.arm("observe", "web2", Fault::Hang, 1);
    let spec = "  domains:\n    - name: web2\n      restart: always\n    - name: db1\n      restart: always\n";
    // A read deadline a starved machine keeps for db1's reads (only web2's call is to hang).
    let config = EngineConfig { read_deadline: Duration::from_secs(2), ..config(None) };
    let r = spawn_on(faulty, policy(spec), config, Registry::with_builtins());
    // READY does not wait for the hung domain beyond its deadline.
    r.until("ready despite the hung call", |_| r.engine.is_ready()).await;
    let s = r
        .until("web2 reported hung", |s| {
            find(s, "web2").is_some_and(|d| d.notes.iter().any(|n| n.contains("did not return within")))
        })
        .await;
    assert!(s.connected);
    let d = find(&s, "web2").unwrap();
    assert_eq!(d.state, "stalled", "{d:#?}");
    assert!(d.stalled.as_deref().is_some_and(|w| w.contains("`observe` did not return within")), "{d:#?}");
    assert!(d.stalled_since.is_some());
    let metrics = r.engine.metrics_text();
    assert!(metrics.contains("virtwarden_domain_stalled{domain=\"web2\"} 1"), "{metrics}");
    assert!(metrics.contains("virtwarden_stalled_domains 1"), "{metrics}");
    assert!(metrics.contains("virtwarden_hung_threads{pool=\"libvirt\"} 1"), "{metrics}");
    r.faulty.inner.destroy("db1").unwrap();
    r.until("db1 healed while web2 hangs", |s| running(s, "db1") && find(s, "db1").unwrap().restarts == 1).await;
    // web2 is not asked anything else until its call returns.
    let asked = r.faulty.count("observe", "web2") + r.faulty.count("state", "web2");
    r.engine.resync();
    r.until("another round", |s| {
        find(s, "web2").is_some_and(|d| d.notes.iter().any(|n| n.contains("has not returned")))
    })
    .await;
    assert_eq!(r.faulty.count("observe", "web2") + r.faulty.count("state", "web2"), asked);
    r.faulty.release_hangs();
    r.engine.resync();
    let s = r.until("web2 observed again", |s| find(s, "web2").is_some_and(|d| d.state.starts_with("running"))).await;
    assert_eq!(find(&s, "web2").unwrap().stalled, None, "no longer stalled");
    // The released thread returns on its own time (a new one observed web2): idle means no call
    // is hung in the pool any more.
    r.until_idle().await;
    let metrics = r.engine.metrics_text();
    assert!(metrics.contains("virtwarden_domain_stalled{domain=\"web2\"} 0"), "{metrics}");
    assert!(metrics.contains("virtwarden_hung_threads{pool=\"libvirt\"} 0"), "{metrics}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_memory_leaves_an_admin_stop_down_until_confirmed() {
    let data = tempfile::tempdir().unwrap();
    let faulty = open();
    let spec = "  domains:\n    - name: web2\n      restart: on-failure\n    - name: web1\n      restart: always\n";
    let r = spawn_on(faulty.clone(), policy(spec), config(Some(data.path())), Registry::with_builtins());
    r.until("ready", |_| r.engine.is_ready()).await;
    r.faulty.inner.destroy("web2").unwrap();
    r.until("the admin stop is remembered", |s| {
        find(s, "web2").is_some_and(|d| d.remembered.as_deref().is_some_and(|m| m.starts_with("stopped on purpose")))
    })
    .await;
    r.stop().await;

    // The memory is corrupted, an interrupted write left its temporary file, and libvirtd
    // restarted too (every inactive domain is `shut off (unknown)`); web1 went down meanwhile.
    std::fs::write(data.path().join("memory.json"), b"{\"format\": 1, \"domains\": {\"web2\"").unwrap();
    let temp = data.path().join(".memory.json.q1W2e3.tmp");
    std::fs::write(&temp, b"{").unwrap();
    faulty.inner.destroy("web1").unwrap();
    faulty.forget_reasons();

    let r = spawn_on(faulty.clone(), policy(spec), config(Some(data.path())), Registry::with_builtins());
    // web1 (`restart: always`) starts whatever the memory says; web2 is reported and left down.
    let s = r.until("web1 started", |s| running(s, "web1")).await;
    let s = if find(&s, "web2").is_some_and(|d| d.notes.iter().any(|n| n.contains("memory was lost"))) {
        s
    } else {
        r.until("web2 held", |s| find(s, "web2").is_some_and(|d| d.notes.iter().any(|n| n.contains("memory was lost"))))
            .await
    };
    let lost = s.memory_lost.as_deref().expect("status shows the mode");
    assert!(lost.contains("memory.json is not valid") && lost.contains("virtwarden memory confirm"), "{lost}");
    assert!(!temp.exists(), "the interrupted write's temporary file is removed at start");
    assert!(r.engine.metrics_text().contains("virtwarden_memory_lost 1"));
    assert_eq!(r.state("web2"), DomainState::ShutOff);
    assert_eq!(r.faulty.count("start", "web2"), 0, "an admin's stop is not undone on a lost memory");
    // The mode outlives a restart of virtwarden (it is kept in the new memory file).
    r.stop().await;
    let r = spawn_on(faulty, policy(spec), config(Some(data.path())), Registry::with_builtins());
    r.until("still lost after a restart", |s| s.memory_lost.is_some() && r.engine.is_ready()).await;
    assert_eq!(r.faulty.count("start", "web2"), 0);
    // An admin confirms: web2 is started by its policy again, the mode ends.
    let said = r.engine.confirm_memory().await;
    assert!(said.starts_with("confirmed"), "{said}");
    let s = r.until("web2 started once confirmed", |s| running(s, "web2")).await;
    assert_eq!(s.memory_lost, None);
    assert!(r.engine.metrics_text().contains("virtwarden_memory_lost 0"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_interrupted_by_a_lost_connection_is_not_counted() {
    let faulty = open();
    faulty.arm("start", "web2", Fault::ConnectionLost, 1);
    let spec = "  domains:\n    - name: web2\n      restart: always\n      backoff: {maxRestarts: 3}\n";
    let r = spawn_on(faulty, policy(spec), config(None), Registry::with_builtins());
    r.until("ready", |_| r.engine.is_ready()).await;
    r.faulty.inner.destroy("web2").unwrap();
    let s = r
        .until("healed after reconnecting", |s| {
            running(s, "web2") && r.connector.connects.load(std::sync::atomic::Ordering::SeqCst) == 2
        })
        .await;
    let d = find(&s, "web2").unwrap();
    assert_eq!(d.restarts, 1, "only the attempt that could finish counts: {d:#?}");
    assert_eq!(d.consecutive_failures, 0, "{d:#?}");
    assert_eq!(d.last_error, None, "an interruption is not the domain's error: {d:#?}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_survives_an_engine_restart_until_released() {
    let data = tempfile::tempdir().unwrap();
    let faulty = open();
    faulty.inner.destroy("web2").unwrap();
    let spec = "  domains:\n    - name: web2\n      restart: always\n      backoff: {initialDelay: 10ms, maxDelay: 40ms, maxRestarts: 2}\n";
    let mut broken = Registry::with_builtins();
    broken.register(
        virtwarden_policies::RemediationAction::Start,
        Box::new(virtwarden_tests::BrokenStart("could not open disk image: Permission denied")),
    );
    let r = spawn_on(faulty.clone(), policy(spec), config(Some(data.path())), broken);
    r.until("quarantined", |s| find(s, "web2").is_some_and(|d| d.quarantined.is_some())).await;
    r.stop().await;

    // A new engine (virtwarden restarted) with working starts: still quarantined, not started.
    let r = spawn_on(faulty, policy(spec), config(Some(data.path())), Registry::with_builtins());
    let s = r
        .until("seen after the restart", |s| {
            r.engine.is_ready() && find(s, "web2").is_some_and(|d| d.state.starts_with("shut off"))
        })
        .await;
    let d = find(&s, "web2").unwrap();
    assert!(d.quarantined.as_deref().unwrap().starts_with("2 restarts within 1h"), "{d:#?}");
    assert!(d.quarantined_since.is_some());
    assert_eq!(d.restarts, 2, "the history came back");
    assert_eq!(r.state("web2"), DomainState::ShutOff);
    assert_eq!(r.faulty.count("start", "web2"), 0, "not started after the restart");
    let said = r.engine.release("web2").await.unwrap();
    assert!(said.starts_with("released web2"), "{said}");
    r.until("started once released", |s| running(s, "web2")).await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_stop_stays_honoured_when_libvirtd_forgets_it_and_a_new_domain_starts() {
    let data = tempfile::tempdir().unwrap();
    let faulty = open();
    let spec = "  domains:\n    - name: web2\n      restart: on-failure\n";
    let r = spawn_on(faulty, policy(spec), config(Some(data.path())), Registry::with_builtins());
    r.until("ready", |_| r.engine.is_ready()).await;
    r.faulty.inner.destroy("web2").unwrap();
    r.until("the admin stop is seen", |s| {
        find(s, "web2")
            .is_some_and(|d| d.remembered.as_deref().is_some_and(|m| m.starts_with("stopped on purpose (destroyed)")))
    })
    .await;
    // libvirtd restarts: it reports every inactive domain as `shut off (unknown)`.
    r.faulty.forget_reasons();
    r.connector.close();
    r.until("reconnected", |s| s.connected && r.connector.connects.load(std::sync::atomic::Ordering::SeqCst) == 2)
        .await;
    // A domain never seen before, in the same state, is started (host boot).
    r.engine.reload(policy(
        "  domains:\n    - name: web2\n      restart: on-failure\n    - name: web1\n      restart: on-failure\n",
    ));
    let s = r.until("web1 started", |s| running(s, "web1")).await;
    let d = find(&s, "web2").unwrap();
    assert_eq!(d.state, "shut off (unknown)");
    assert!(
        d.notes.iter().any(|n| n.contains("remembered: stopped on purpose (destroyed)") && n.contains("honoured")),
        "{d:#?}"
    );
    assert_eq!(r.state("web2"), DomainState::ShutOff);
    assert_eq!(r.faulty.count("start", "web2"), 0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_keeps_undoing_autostart_is_backed_off_and_reported() {
    let data = tempfile::tempdir().unwrap();
    let faulty = open();
    let mut cfg = config(Some(data.path()));
    cfg.flap = virtwarden::plan::flap::FlapSettings {
        threshold: 3,
        window: Duration::from_secs(60),
        initial_delay: Duration::from_secs(30),
        max_delay: Duration::from_secs(300),
        quiet: Duration::from_secs(600),
    };
    let r = spawn_on(
        faulty,
        policy("  domains:\n    - name: db1\n      autostart: true\n"),
        cfg,
        Registry::with_builtins(),
    );
    let autostart = |r: &Rig| r.faulty.inner.observe_domain("db1").unwrap().unwrap().autostart;
    r.until("first repair", |_| autostart(&r)).await;
    // Another writer turns it off again and again; each resync repairs it, until the third
    // revert within a minute (the first repair is virtwarden's own): then it backs off, says so.
    for n in 2..=4 {
        r.faulty.inner.set_autostart("db1", false).unwrap();
        r.engine.resync();
        r.until(&format!("repair {n}"), |_| autostart(&r)).await;
    }
    let s = r.until("reported as flapping", |s| find(s, "db1").is_some_and(|d| !d.flapping.is_empty())).await;
    assert!(
        find(&s, "db1").unwrap().flapping[0]
            .starts_with("another writer keeps changing domain db1 autostart; backing off 30s"),
        "{s:#?}"
    );
    r.faulty.inner.set_autostart("db1", false).unwrap();
    r.engine.resync();
    let s = r
        .until("the next repair held", |s| {
            find(s, "db1").is_some_and(|d| d.notes.iter().any(|n| n.contains("set autostart on held until")))
        })
        .await;
    assert!(!autostart(&r), "not fought over while backing off: {s:#?}");
    let metrics = r.engine.metrics_text();
    assert!(metrics.contains("virtwarden_writer_conflicts_total{kind=\"autostart\"} 1"), "{metrics}");
    assert!(metrics.contains("virtwarden_backed_off_objects{kind=\"autostart\"} 1"), "{metrics}");
    r.stop().await;
    // The backoff is remembered across a restart.
    let memory: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.path().join("memory.json")).unwrap()).unwrap();
    assert!(memory["domains"]["db1"]["flap"]["records"][0]["key"]["kind"] == "autostart", "{memory}");
}

/// Issue 18: editing a policy's autostart back and forth (through the operator or a reload) is
/// no other writer: every repair is towards a new desired value, so none counts as a revert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_of_autostart_are_never_taken_for_another_writer() {
    let faulty = open();
    let mut cfg = config(None);
    cfg.flap = virtwarden::plan::flap::FlapSettings { threshold: 2, ..Default::default() };
    let r = spawn_on(
        faulty,
        policy("  domains:\n    - name: db1\n      autostart: true\n"),
        cfg,
        Registry::with_builtins(),
    );
    let autostart = |r: &Rig| r.faulty.inner.observe_domain("db1").unwrap().unwrap().autostart;
    r.until("first repair", |_| autostart(&r)).await;
    for n in 0..6 {
        let on = n % 2 == 1;
        r.engine.reload(policy(&format!("  domains:\n    - name: db1\n      autostart: {on}\n")));
        r.until(&format!("edit {n} applied"), |_| autostart(&r) == on).await;
    }
    let s = r.engine.status();
    let d = find(&s, "db1").unwrap();
    assert!(d.flapping.is_empty(), "{d:#?}");
    assert!(d.notes.iter().all(|n| !n.contains("held until")), "{d:#?}");
    assert!(!r.engine.metrics_text().contains("virtwarden_writer_conflicts_total{kind=\"autostart\"}"));
    r.stop().await;
}

/// Issue 18: the memory of a domain no policy names is dropped after the grace period (1 h by
/// default, short here); a managed domain's is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_domains_no_policy_names_is_dropped_after_the_grace_period() {
    use virtwarden::memory::{DomainMemory, MemoryStore};
    let memory = Arc::new(MemoryStore::in_memory());
    memory.update(|m| {
        for name in ["db1", "renamed-away"] {
            m.domains.insert(name.into(), DomainMemory::default());
        }
    });
    let faulty = open();
    let connector = FaultyConnector::new(faulty.clone());
    let mut backends = Backends::new(connector, Registry::with_builtins());
    backends.memory = Some(memory.clone());
    let cfg = EngineConfig { memory_grace: Duration::from_millis(300), ..config(None) };
    let rig = EngineRig::spawn_with(backends, policy("  domains:\n    - name: db1\n"), cfg);
    let engine = rig.engine.clone();
    let has = |name: &str| memory.read(|m| m.domains.contains_key(name));
    // Marked at once, kept through the grace period, dropped at a resync after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while has("renamed-away") {
        assert!(tokio::time::Instant::now() < deadline, "never dropped: {:#?}", memory.snapshot());
        engine.resync();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(has("db1"), "a managed domain keeps its memory: {:#?}", memory.snapshot());
    rig.stop().await;
}
