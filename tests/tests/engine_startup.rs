//! Start ordering in `run`: the engine against libvirt's test driver (in-process). The order in
//! which domains start and stop is read from libvirt's own lifecycle events on the engine's
//! connection (a node-file test driver keeps its state per connection); what a waiting start
//! waits for is read from the engine's status.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use virtwarden::act::calls::Calls;
use virtwarden::act::remediation::{Registry, Remediation, RemediationContext, StepFuture};
use virtwarden::engine::connect::{Connection, Connector};
use virtwarden::engine::status::{render_text, DomainStatus, StatusReport};
use virtwarden::engine::{Backends, EngineConfig};
use virtwarden::hypervisor::events::{HypervisorEvent, LifecycleKind};
use virtwarden::hypervisor::{DomainReader, HypervisorError};
use virtwarden::libvirt::events::{start_event_loop, subscribe};
use virtwarden::libvirt::LibvirtHost;
use virtwarden::observe::DomainState;
use virtwarden_policies::{DesiredState, RemediationAction};
use virtwarden_tests::rig::EngineRig;

const STARTED: LifecycleKind = LifecycleKind::Started;
const STOPPED: LifecycleKind = LifecycleKind::Stopped;
const WAIT: Duration = Duration::from_secs(20);

fn policy(domains: &str) -> DesiredState {
    virtwarden_tests::inline_policy(&format!(
        "  domains:
{domains}"
    ))
}

/// Hands the engine the test's connection, and the test a copy of every event the engine gets
/// (libvirt accepts one subscription of this kind per connection).
struct TeeConnector {
    host: Arc<LibvirtHost>,
    test: UnboundedSender<HypervisorEvent>,
}

impl Connector for TeeConnector {
    fn uri(&self) -> String {
        self.host.uri().to_string()
    }

    fn connect(&self, events: UnboundedSender<HypervisorEvent>) -> Result<Connection, HypervisorError> {
        let (tx, mut rx) = unbounded_channel();
        let subscription = subscribe(&self.host, tx).map_err(|e| HypervisorError::Failed {
            op: "subscribe",
            domain: String::new(),
            message: e.to_string(),
        })?;
        let test = self.test.clone();
        // Ends when the subscription is dropped.
        std::thread::spawn(move || {
            while let Some(ev) = rx.blocking_recv() {
                let _ = test.send(ev.clone());
                let _ = events.send(ev);
            }
        });
        Ok(Connection::new(self.host.clone(), Some(subscription)))
    }
}

/// An engine on a test-driver host with these domains (running or shut off), and the host's
/// lifecycle events as the test sees them.
struct Rig {
    inner: EngineRig,
    events: UnboundedReceiver<HypervisorEvent>,
    host: Arc<LibvirtHost>,
    _dir: tempfile::TempDir,
}

fn host(domains: &[(&str, bool)]) -> (Arc<LibvirtHost>, tempfile::TempDir) {
    start_event_loop();
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.xml");
    std::fs::write(&node, virtwarden_tests::node_xml(domains)).unwrap();
    (Arc::new(LibvirtHost::open(&format!("test://{}", node.display())).unwrap()), dir)
}

async fn rig(domains: &[(&str, bool)], desired: DesiredState, max_starts: usize, registry: Registry) -> Rig {
    let (host, dir) = host(domains);
    let (test, events) = unbounded_channel();
    let config =
        EngineConfig { resync: Duration::from_secs(3600), max_concurrent_starts: max_starts, ..Default::default() };
    let connector = Arc::new(TeeConnector { host: host.clone(), test });
    let inner = EngineRig::spawn_with(Backends::new(connector, registry), desired, config).with_wait(WAIT);
    Rig { inner, events, host, _dir: dir }
}

impl std::ops::Deref for Rig {
    type Target = EngineRig;
    fn deref(&self) -> &EngineRig {
        &self.inner
    }
}

fn domain<'a>(r: &'a StatusReport, name: &str) -> &'a DomainStatus {
    r.domains.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} not in status: {r:#?}"))
}

impl Rig {
    /// The next `n` lifecycle events of kind `event`, in arrival order, with when each arrived.
    async fn events(&mut self, event: LifecycleKind, n: usize) -> Vec<(String, Instant)> {
        let mut got = Vec::new();
        while got.len() < n {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Ok(Some(HypervisorEvent::Lifecycle(e))) if e.kind == event => got.push((e.domain, e.received)),
                Ok(Some(_)) => {}
                _ => panic!("only {} of {n} events arrived: {got:?}\nstatus: {:#?}", got.len(), self.engine.status()),
            }
        }
        got
    }

    fn state(&self, name: &str) -> DomainState {
        self.host.observe_domain(name).unwrap().unwrap().state
    }

    async fn stop(self) {
        self.inner.stop().await;
    }
}

fn names(events: &[(String, Instant)]) -> Vec<&str> {
    events.iter().map(|(d, _)| d.as_str()).collect()
}

/// What `name` waits for, as one line ("" before the engine tracks it).
fn waits(r: &StatusReport, name: &str) -> String {
    r.domains.iter().find(|d| d.name == name).map(|d| d.waiting_for.join(", ")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_starts_order_groups_in_order_after_their_dependencies_and_delay() {
    // Policy order is not start order: the engine sorts by group, then `after`.
    let desired = policy(
        "    - name: web1\n      restart: always\n      startup: {after: [app1]}\n    - name: app1\n      restart: always\n      startup: {order: 2, after: [app0]}\n    - name: app0\n      restart: always\n      startup: {order: 2}\n    - name: db1\n      restart: always\n      startup: {order: 1, delay: 1s}\n    - name: db2\n      restart: always\n      startup: {order: 1}\n",
    );
    let domains = [("db1", false), ("db2", false), ("app0", false), ("app1", false), ("web1", false)];
    let mut r = rig(&domains, desired, 8, Registry::with_builtins()).await;
    // While group 1's delay runs, the next group says what it waits for.
    let s = r.until("app0 waits for db1's delay", |s| waits(s, "app0").contains("delay after db1")).await;
    assert_eq!(waits(&s, "app0"), "order group 1 (+1s delay after db1)");
    let text = render_text(&s);
    assert!(text.contains("waits for order group 1 (+1s delay after db1)"), "{text}");
    let started = r.events(STARTED, 5).await;
    let order = names(&started);
    assert!(order[..2].contains(&"db1") && order[..2].contains(&"db2"), "{order:?}");
    assert_eq!(&order[2..], ["app0", "app1", "web1"]);
    let at: HashMap<&str, Instant> = started.iter().map(|(d, t)| (d.as_str(), *t)).collect();
    let gap = at["app0"].duration_since(at["db1"]);
    // The delay counts from db1's start returning, the gap from its event being delivered (which
    // a loaded machine may hold back): a margin, yet far from the few ms without any delay.
    assert!(gap >= Duration::from_millis(700), "group 2 started {gap:?} after db1, whose delay is 1s");
    let s = r.until("all running, nothing waits", |s| s.domains.iter().all(|d| d.state.starts_with("running"))).await;
    assert!(s.domains.iter().all(|d| d.waiting_for.is_empty()), "{s:#?}");
    // One start each, and a first start is no restart (issue 18): a wait is not an attempt.
    assert!(
        s.domains.iter().all(|d| d.restarts == 0 && d.last_action.as_deref() == Some("start (first start)")),
        "{s:#?}"
    );
    r.stop().await;
}

/// The built-in `start`, counting how many run at once. Each start waits (up to a deadline)
/// until `meet` starts run together, so that parallelism is observed without timing guesses.
struct CountingStart {
    builtin: Registry,
    active: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    meet: usize,
}

impl Remediation for CountingStart {
    fn run<'a>(&'a self, ctx: &'a RemediationContext, calls: &'a Calls) -> StepFuture<'a> {
        Box::pin(async move {
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.active.load(Ordering::SeqCst) < self.meet && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Give a start beyond the bound the chance to show up.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let result = self.builtin.get(RemediationAction::Start)?.run(ctx, calls).await;
            self.active.fetch_sub(1, Ordering::SeqCst);
            result
        })
    }
}

fn counting(meet: usize) -> (Registry, Arc<AtomicUsize>) {
    let most = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::with_builtins();
    let start =
        CountingStart { builtin: Registry::with_builtins(), active: Default::default(), most: most.clone(), meet };
    registry.register(RemediationAction::Start, Box::new(start));
    (registry, most)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_starts_bounds_a_mass_start() {
    let names_: Vec<String> = (0..6).map(|i| format!("vm{i}")).collect();
    let domains: Vec<(&str, bool)> = names_.iter().map(|n| (n.as_str(), false)).collect();
    let spec: String = names_.iter().map(|n| format!("    - name: {n}\n      restart: always\n")).collect();
    let (registry, most) = counting(2);
    let mut r = rig(&domains, policy(&spec), 2, registry).await;
    r.events(STARTED, 6).await;
    assert_eq!(most.load(Ordering::SeqCst), 2, "two starts at a time, never more");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scarce_start_slots_go_to_the_lowest_order_then_policy_order() {
    let desired = policy(
        "    - name: d\n      restart: always\n    - name: c\n      restart: always\n      startup: {order: 2}\n    - name: b\n      restart: always\n      startup: {order: 2}\n    - name: a\n      restart: always\n      startup: {order: 1}\n",
    );
    let (registry, most) = counting(1);
    let mut r = rig(&[("a", false), ("b", false), ("c", false), ("d", false)], desired, 1, registry).await;
    let s = r.until("b waits for a slot", |s| waits(s, "b").contains("start slot")).await;
    assert_eq!(waits(&s, "b"), "a start slot (1 at a time, --max-concurrent-starts)");
    let started = r.events(STARTED, 4).await;
    assert_eq!(names(&started), ["a", "c", "b", "d"]);
    assert_eq!(most.load(Ordering::SeqCst), 1);
    r.stop().await;
}

/// The built-in `start`, except for the domains in `broken`: their start fails.
struct StartUnless {
    builtin: Registry,
    broken: Arc<Mutex<Vec<String>>>,
}

impl Remediation for StartUnless {
    fn run<'a>(&'a self, ctx: &'a RemediationContext, calls: &'a Calls) -> StepFuture<'a> {
        Box::pin(async move {
            if self.broken.lock().unwrap().contains(&ctx.domain) {
                return Err(virtwarden::hypervisor::HypervisorError::Failed {
                    op: "start",
                    domain: ctx.domain.clone(),
                    message: "could not open disk image: Permission denied".into(),
                }
                .into());
            }
            self.builtin.get(RemediationAction::Start)?.run(ctx, calls).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_start_says_what_it_waits_for_and_goes_once_it_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("images/web1.qcow2");
    let desired = policy(&format!(
        "    - name: db1\n      restart: always\n      backoff: {{initialDelay: 10ms, maxDelay: 20ms, maxRestarts: 1}}\n    - name: web1\n      restart: always\n      startup:\n        after: [db1]\n        requires: {{paths: [{}]}}\n    - name: other\n      restart: always\n",
        image.display()
    ));
    let broken = Arc::new(Mutex::new(vec!["db1".to_string()]));
    let mut registry = Registry::with_builtins();
    registry.register(
        RemediationAction::Start,
        Box::new(StartUnless { builtin: Registry::with_builtins(), broken: broken.clone() }),
    );
    let mut r = rig(&[("db1", false), ("web1", false), ("other", false)], desired, 8, registry).await;
    // db1 cannot start and ends quarantined: web1 keeps waiting (do no harm) and says why.
    let s = r.until("web1 waits for a quarantined db1", |s| waits(s, "web1").contains("db1 (quarantined)")).await;
    assert_eq!(waits(&s, "web1"), format!("db1 (quarantined), {}", image.display()));
    let text = render_text(&s);
    assert!(text.contains(&format!("waits for db1 (quarantined), {}", image.display())), "{text}");
    let web1 = domain(&s, "web1");
    assert_eq!((web1.restarts, web1.consecutive_failures), (0, 0), "waiting is not an attempt: {web1:#?}");
    assert_eq!(names(&r.events(STARTED, 1).await), ["other"], "an unrelated domain is not held up");
    assert_eq!(r.state("web1"), DomainState::ShutOff);
    let metrics = r.engine.metrics_text();
    assert!(metrics.contains("virtwarden_waiting_starts 1"), "{metrics}");

    // db1 fixed and released: it starts; web1 now waits only for its path.
    broken.lock().unwrap().clear();
    r.engine.release("db1").await.expect("released");
    assert_eq!(names(&r.events(STARTED, 1).await), ["db1"]);
    let s = r.until("web1 waits for its path only", |s| waits(s, "web1") == image.display().to_string()).await;
    assert!(domain(&s, "web1").state.starts_with("shut off"));
    // The storage appears: web1 starts without waiting for a resync (once an hour here).
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    std::fs::write(&image, b"").unwrap();
    assert_eq!(names(&r.events(STARTED, 1).await), ["web1"]);
    let s = r.until("web1 running, no longer waiting", |s| domain(s, "web1").state.starts_with("running")).await;
    r.until("web1's wait cleared", |s| waits(s, "web1").is_empty()).await;
    assert!(r.engine.metrics_text().contains("virtwarden_waiting_starts 0"));
    // Started once, after its waits: a first start, no restart (issue 18).
    assert_eq!(domain(&s, "web1").restarts, 0);
    assert_eq!(domain(&s, "web1").last_action.as_deref(), Some("start (first start)"));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_waits_for_a_dependency_to_pass_its_health_probe() {
    // db1's service is a local listener the test opens later (the policy's address is 127.0.0.1).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let desired = policy(&format!(
        "    - name: db1\n      restart: always\n      health:\n        probe: {{tcp: {{port: {port}}}}}\n        address: 127.0.0.1\n        period: 1s\n        timeout: 500ms\n        bootTimeout: 1h\n    - name: web1\n      restart: always\n      startup: {{after: [db1]}}\n"
    ));
    let mut r = rig(&[("db1", true), ("web1", false)], desired, 8, Registry::with_builtins()).await;
    r.until("web1 waits for db1's probe", |s| waits(s, "web1") == "db1 (not healthy yet)").await;
    r.until("db1 seen running", |s| domain(s, "db1").state.starts_with("running")).await;
    assert_eq!(r.state("web1"), DomainState::ShutOff);
    let _service = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    assert_eq!(names(&r.events(STARTED, 1).await), ["web1"]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_for_state_stopped_go_in_reverse_start_order() {
    let running = policy(
        "    - name: db1\n      restart: on-failure\n      startup: {order: 1}\n    - name: app1\n      restart: on-failure\n      startup: {order: 2}\n    - name: web1\n      restart: on-failure\n      startup: {order: 2, after: [app1]}\n    - name: batch\n      restart: on-failure\n",
    );
    let domains = [("db1", true), ("app1", true), ("web1", true), ("batch", true)];
    let mut r = rig(&domains, running, 8, Registry::with_builtins()).await;
    r.until("ready", |_| r.engine.is_ready()).await;
    r.engine.reload(policy(
        "    - name: db1\n      state: stopped\n      restart: on-failure\n      startup: {order: 1}\n    - name: app1\n      state: stopped\n      restart: on-failure\n      startup: {order: 2}\n    - name: web1\n      state: stopped\n      restart: on-failure\n      startup: {order: 2, after: [app1]}\n    - name: batch\n      state: stopped\n      restart: on-failure\n",
    ));
    let stopped = r.events(STOPPED, 4).await;
    assert_eq!(names(&stopped), ["batch", "web1", "app1", "db1"]);
    r.stop().await;
}
