//! The reconcile engine shared by the host service and the operator: triggers (libvirt events,
//! policy reloads, a periodic resync) only say what to look at again; one long-lived worker per
//! managed domain decides from freshly observed state and is the only actor on that domain.
//! What libvirt forgets lives in the durable memory. The engine never imports a front end.
//!
//! Files: `main_loop` (triggers → workers), `worker` (one domain), `connect` (connections and
//! reconnects), `shared` (state they share), `status_writer`, `network` (bridges, taps,
//! forwarding), `clock`, `status`, `metrics`.

pub mod clock;
pub mod connect;
mod main_loop;
pub mod metrics;
pub mod network;
mod shared;
mod startgate;
pub mod status;
mod status_writer;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::mpsc::unbounded_channel;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use virtwarden_policies::DesiredState;

use crate::act::calls::CallLimits;
use crate::act::remediation::Registry;
use crate::hypervisor::Hypervisor;
use crate::memory::MemoryStore;
use crate::observe::{ObservedNet, ObservedNetwork};
use clock::{Clock, SystemClock};
use connect::{Connection, Connector};
use metrics::Metrics;
use shared::Shared;
pub use startgate::DEFAULT_MAX_CONCURRENT_STARTS;
use status::StatusReport;

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Full resync period.
    pub resync: Duration,
    /// Where to write the status file (atomically), if anywhere.
    pub status_path: Option<PathBuf>,
    /// Where the durable memory lives (`None`: kept in memory only).
    pub data_dir: Option<PathBuf>,
    /// How long shutdown waits for in-flight actions.
    pub shutdown_grace: Duration,
    /// Concurrent blocking libvirt calls.
    pub libvirt_concurrency: usize,
    /// A libvirt read (state, XML) that takes longer is treated as hung.
    pub read_deadline: Duration,
    /// A libvirt change (start, destroy, define, …) that takes longer is treated as hung.
    pub action_deadline: Duration,
    /// How long an action waits for its record to reach the disk before going ahead anyway.
    pub memory_flush: Duration,
    /// Reconcile the host network (bridges, taps, forwarding) of this process's namespace.
    pub network: bool,
    /// When repairs of an object another writer keeps changing back are backed off.
    pub flap: crate::plan::flap::FlapSettings,
    /// At most this many starts of stopped or crashed domains at once (lower order first).
    pub max_concurrent_starts: usize,
    /// The durable memory of a domain no policy names is dropped this long after (1 h).
    pub memory_grace: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            resync: Duration::from_secs(60),
            status_path: None,
            data_dir: None,
            shutdown_grace: Duration::from_secs(30),
            libvirt_concurrency: 8,
            read_deadline: Duration::from_secs(15),
            action_deadline: Duration::from_secs(120),
            memory_flush: Duration::from_secs(2),
            network: false,
            flap: Default::default(),
            max_concurrent_starts: DEFAULT_MAX_CONCURRENT_STARTS,
            memory_grace: Duration::from_secs(3600),
        }
    }
}

/// What the engine acts through. Tests hand in fakes that record calls and inject faults.
pub struct Backends {
    /// Opens (and reopens) the hypervisor connection.
    pub connector: Arc<dyn Connector>,
    pub remediations: Registry,
    pub clock: Arc<dyn Clock>,
    /// The durable memory; `None` opens `config.data_dir` (or keeps it in memory).
    pub memory: Option<Arc<MemoryStore>>,
    /// Runs the host-network task (when `config.network`) on its backends: the front ends hand
    /// in netlink and `/proc/sys` (`virtwarden::hostnet::netlink_runner`), tests recording or
    /// fault-injecting ones through [`network::NetworkTask::run_with`]. The engine builds none.
    pub network: Option<NetworkRunner>,
    /// Says why a repair failed (diagnosis: the domain's disks, logs and the host); `None`: the
    /// failure is reported as the hypervisor worded it.
    pub explain: Option<Arc<dyn Explain>>,
    /// Runs the GET of `http` health probes (the front ends hand in hyper's client,
    /// `virtwarden::probe::http::HyperGet`); `None`: `http` probes are not run and count as no
    /// evidence.
    pub http_probe: Option<Arc<dyn crate::probe::HttpGet>>,
}

/// Why a start or repair of a domain failed, in one line, from what the host shows. Read-only;
/// the engine calls it on a blocking thread under its read deadline.
pub trait Explain: Send + Sync + 'static {
    /// The cause of `error` on `domain`, or `None` when nothing explains it.
    fn explain(&self, hv: &dyn Hypervisor, domain: &str, error: &str) -> Option<String>;
}

/// Starts the network task on its backends (see [`Backends::network`]).
pub type NetworkRunner =
    Arc<dyn Fn(network::NetworkTask) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

impl Backends {
    /// The real backends for `connector`.
    pub fn new(connector: Arc<dyn Connector>, remediations: Registry) -> Self {
        Backends {
            connector,
            remediations,
            clock: Arc::new(SystemClock::new()),
            memory: None,
            network: None,
            explain: None,
            http_probe: None,
        }
    }
}

enum Msg {
    Reload(DesiredState),
    PolicyRejected(String),
    Resync,
    Shutdown,
    /// A connection, and the reconnection's work under way until the loop has taken it.
    Connected(Connection, shared::Busy),
    ConnectionLost(String),
    /// libvirt's networks, and the listing's work under way until the loop has taken them.
    Networks(Vec<ObservedNetwork>, shared::Busy),
    /// Look at every managed domain again (the network changed under them).
    KickAll,
    /// Liveness probe: the loop answers when it is not stuck.
    Ping(oneshot::Sender<()>),
    /// Lift the quarantine of one domain.
    Release {
        domain: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// Talks to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Put a new desired state in force (a good reload). Workers of domains whose policy
    /// changed take the new policy after their current action (cancellable ones are cancelled);
    /// what is remembered (restarts, quarantine, intent) is kept.
    pub fn reload(&self, desired: DesiredState) {
        let _ = self.shared.msg.send(Msg::Reload(desired));
    }

    /// Record a rejected reload; the previous policy stays in force.
    pub fn policy_rejected(&self, error: String) {
        let _ = self.shared.msg.send(Msg::PolicyRejected(error));
    }

    pub fn resync(&self) {
        let _ = self.shared.msg.send(Msg::Resync);
    }

    /// Lift a domain's quarantine (`virtwarden release`). Ok with what was done, Err when the
    /// domain is not managed here or the engine has stopped.
    pub async fn release(&self, domain: &str) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        if self.shared.msg.send(Msg::Release { domain: domain.to_string(), reply }).is_err() {
            return Err("the engine has stopped".into());
        }
        rx.await.unwrap_or_else(|_| Err("the engine has stopped".into()))
    }

    /// `virtwarden memory confirm`: end the "memory lost" mode (see [`crate::memory::Memory::lost`]);
    /// every domain is looked at again. The text says what was done.
    pub async fn confirm_memory(&self) -> String {
        let (text, version) = self.shared.confirm_memory();
        if !self.shared.memory.flush(version, self.shared.config.memory_flush).await {
            tracing::warn!("the confirmation is not yet on disk");
        }
        let _ = self.shared.msg.send(Msg::KickAll);
        text
    }

    /// Stop: in-flight actions finish or are cancelled (bounded by the grace period).
    pub fn shutdown(&self) {
        let _ = self.shared.msg.send(Msg::Shutdown);
    }

    pub fn status(&self) -> StatusReport {
        self.shared.report()
    }

    pub fn metrics_text(&self) -> String {
        let s = &self.shared;
        for pool in [s.limits.pool(), &s.status_io] {
            let label = metrics::PoolLabel { pool: pool.name().to_string() };
            s.metrics.hung_threads.get_or_create(&label).set(pool.stats().stuck as i64);
        }
        s.metrics.encode()
    }

    /// The engine loop has ended (stopped, or never to answer again).
    pub fn is_stopped(&self) -> bool {
        self.shared.msg.is_closed()
    }

    /// Connected and one full resync done.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    pub fn is_connected(&self) -> bool {
        self.shared.hypervisor().is_some()
    }

    /// The current hypervisor connection (tests and benchmarks act on the same one).
    pub fn hypervisor(&self) -> Option<Arc<dyn Hypervisor>> {
        self.shared.hypervisor()
    }

    /// Whether the engine loop answers within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.shared.msg.send(Msg::Ping(tx)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// Whether the engine makes progress: its loop answers, its own work moves (no libvirt call
    /// waits [`STALL`] for a thread, no status or memory write hangs for [`STALL`]), and while
    /// connected, resync rounds complete (a round waits only for the managed domains, each
    /// bounded by the read deadline). A domain whose storage hangs costs only its own thread
    /// and is not a lack of progress. For the systemd watchdog and `/healthz`: a stuck engine
    /// is restarted.
    pub async fn liveness(&self) -> Result<(), String> {
        if !self.ping(Duration::from_secs(1)).await {
            return Err("the engine loop does not answer".into());
        }
        let s = &self.shared;
        let memory = s.memory.path().is_some().then(|| s.memory.io_stats());
        if let Some(why) = stalled(&s.limits.pool().stats(), &s.status_io.stats(), memory.as_ref(), STALL) {
            return Err(why);
        }
        let Some(since) = *s.connected_since.lock().unwrap_or_else(|p| p.into_inner()) else {
            return Ok(()); // reconnecting is progress
        };
        let last = s.resync.lock().unwrap_or_else(|p| p.into_inner()).last_done;
        let reference = last.map_or(since, |l| l.max(since));
        let allowed = s.config.resync * 2 + s.config.read_deadline + Duration::from_secs(10);
        let age = reference.elapsed();
        if age > allowed {
            return Err(format!("no resync completed for {}s (allowed {}s)", age.as_secs(), allowed.as_secs()));
        }
        Ok(())
    }

    /// A receiver that sees every status change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.status_version.subscribe()
    }

    /// Wait until `cond` holds for the status, up to `timeout`; the status when it held.
    /// Wakes on every status change, so callers never sleep and hope.
    pub async fn wait_for(&self, timeout: Duration, cond: impl Fn(&StatusReport) -> bool) -> Option<StatusReport> {
        let mut rx = self.shared.status_version.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            let report = self.shared.report();
            if cond(&report) {
                return Some(report);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }
}

impl EngineHandle {
    /// Wait until the engine is idle, up to `timeout`; false when it was not. Idle: the engine
    /// loop has handled what was sent to it, every domain worker is parked waiting for an order
    /// or a timer (not inside an action, a graceful-shutdown wait, a hook), no order waits to
    /// be taken, no health probe is in flight and no libvirt call is queued, running or hung in
    /// the engine's pool, no (re)connection is under way (its waits between tries aside).
    /// Timers still fire later: idle says nothing is under way *now*. The host-network task
    /// is not counted. Woken by each change, never polled.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        self.wait_activity(timeout, false).await
    }

    /// Wait until the engine is idle (see [`EngineHandle::wait_idle`]) and no domain worker has
    /// a timer armed (to look again, to probe, a health deadline): nothing happens to any
    /// domain until something from outside (a libvirt event, libvirt back after an outage, a
    /// reload, the periodic resync). False when that did not hold within `timeout`.
    pub async fn wait_quiet(&self, timeout: Duration) -> bool {
        self.wait_activity(timeout, true).await
    }

    async fn wait_activity(&self, timeout: Duration, no_timers: bool) -> bool {
        let deadline = Instant::now() + timeout;
        // Messages already sent to the engine loop are handled, their orders sent and counted.
        if !self.ping(timeout).await {
            return false;
        }
        let mut activity = self.shared.activity.subscribe();
        let mut jobs = self.shared.limits.pool().jobs();
        let idle = async {
            loop {
                let a = *activity.borrow_and_update();
                if a.busy == 0 && (!no_timers || a.timers == 0) && *jobs.borrow_and_update() == 0 {
                    return;
                }
                tokio::select! {
                    _ = activity.changed() => {}
                    _ = jobs.changed() => {}
                }
            }
        };
        tokio::time::timeout_at(deadline, idle).await.is_ok()
    }
}

/// The engine makes no progress (`/healthz` fails, the systemd watchdog is withheld) when its
/// own work waits this long: a libvirt call for a thread, a status or memory write to return.
pub const STALL: Duration = Duration::from_secs(60);

/// Why the engine's own work does not move, if it does not: a libvirt call waiting longer than
/// `bound` for a thread (every thread of the pool hung), a status or memory write in flight
/// longer than `bound`.
fn stalled(
    libvirt: &crate::blocking::PoolStats,
    status: &crate::blocking::PoolStats,
    memory: Option<&crate::blocking::PoolStats>,
    bound: Duration,
) -> Option<String> {
    let over = |d: Option<Duration>| d.filter(|d| *d > bound).map(|d| d.as_secs());
    if let Some(s) = over(libvirt.oldest_queued) {
        return Some(format!(
            "a libvirt call has waited {s}s for a thread ({} hung calls hold the pool; allowed {}s)",
            libvirt.stuck,
            bound.as_secs()
        ));
    }
    if let Some(s) = over(status.oldest_running) {
        return Some(format!("the status write has not returned for {s}s (allowed {}s)", bound.as_secs()));
    }
    if let Some(s) = memory.and_then(|m| over(m.oldest_running)) {
        return Some(format!("the memory write has not returned for {s}s (allowed {}s)", bound.as_secs()));
    }
    None
}

/// Starts engines.
pub struct Engine;

impl Engine {
    /// Start the engine on the current tokio runtime with the real clock; the memory lives in
    /// `config.data_dir`.
    pub fn spawn(
        connector: Arc<dyn Connector>,
        desired: DesiredState,
        config: EngineConfig,
        remediations: Registry,
    ) -> (EngineHandle, JoinHandle<()>) {
        Self::spawn_with(Backends::new(connector, remediations), desired, config)
    }

    /// Start the engine with the given backends.
    pub fn spawn_with(
        backends: Backends,
        desired: DesiredState,
        config: EngineConfig,
    ) -> (EngineHandle, JoinHandle<()>) {
        let (msg_tx, msg_rx) = unbounded_channel();
        let (memory, problem) = match backends.memory {
            Some(m) => (m, None),
            None => open_memory(config.data_dir.as_deref()),
        };
        let meta = StatusReport {
            pid: std::process::id(),
            uri: backends.connector.uri(),
            data_dir: config.data_dir.as_ref().map(|d| d.display().to_string()),
            ..Default::default()
        };
        let limits =
            Arc::new(CallLimits::new(config.libvirt_concurrency, config.read_deadline, config.action_deadline));
        let gate = Arc::new(startgate::StartGate::new(config.max_concurrent_starts, backends.clock.clone()));
        let http_probe = backends.http_probe;
        let shared = Arc::new_cyclic(|weak| Shared {
            prober: {
                let prober = crate::probe::Prober::new(worker::conn_guest(weak), crate::probe::DEFAULT_CONCURRENCY);
                match http_probe {
                    Some(http) => prober.with_http(http),
                    None => prober,
                }
            },
            hv: RwLock::new(None),
            book: Mutex::new(Default::default()),
            meta: Mutex::new(meta),
            status_version: watch::channel(0).0,
            activity: watch::channel(Default::default()).0,
            metrics: Metrics::default(),
            remediations: backends.remediations,
            memory,
            clock: backends.clock,
            limits,
            status_io: crate::blocking::Pool::new("status", 1, 0),
            config: config.clone(),
            ready: AtomicBool::new(false),
            reconnecting: AtomicBool::new(false),
            connected_since: Mutex::new(None),
            msg: msg_tx,
            net_snapshot: RwLock::new(None::<ObservedNet>),
            domains: RwLock::new(Default::default()),
            networks: RwLock::new(Vec::new()),
            resync: Mutex::new(Default::default()),
            net_kicks: RwLock::new(None),
            healthy: RwLock::new(Default::default()),
            startgate: gate,
            capabilities: backends.connector.capabilities(),
            explain: backends.explain,
        });
        if let Some(p) = problem {
            tracing::error!(problem = %p, "virtwarden's memory could not be loaded");
            shared.memory.report_problem(p);
        }
        let handle = EngineHandle { shared: shared.clone() };
        let task = tokio::spawn(
            main_loop::Engine::new(shared, backends.connector, backends.network, config, msg_rx).run(desired),
        );
        (handle, task)
    }
}

/// Open the durable memory in `dir`; problems are reported, never fatal: without a usable
/// directory the engine remembers in memory only and says so in status.
fn open_memory(dir: Option<&std::path::Path>) -> (Arc<MemoryStore>, Option<String>) {
    let Some(dir) = dir else {
        return (Arc::new(MemoryStore::in_memory()), None);
    };
    match MemoryStore::open(dir) {
        Ok((store, problem)) => (Arc::new(store), problem.map(|p| p.to_string())),
        Err(e) => {
            // Whatever it held cannot be read: not a clean slate either (see `Memory::lost`).
            let store = MemoryStore::in_memory();
            let why = format!("{e}; remembering in memory only");
            store.update(|m| {
                m.lost =
                    Some(crate::memory::MemoryLoss { why: why.clone(), at: store_now(), rebuilt: Default::default() })
            });
            (Arc::new(store), Some(why))
        }
    }
}

fn store_now() -> crate::plan::restart::Tick {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// A resync allocates and frees a snapshot of every domain; hand the freed pages back so an idle
/// service stays small.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocking::PoolStats;

    /// One domain whose `start` blocks until the test lets it go (an action in flight).
    struct GatedStart {
        state: Mutex<crate::observe::DomainState>,
        entered: tokio::sync::Notify,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl crate::hypervisor::DomainReader for GatedStart {
        fn observe_host(&self) -> Result<crate::observe::ObservedHost, crate::hypervisor::HypervisorError> {
            Ok(crate::observe::ObservedHost {
                domains: self.observe_domain("web")?.into_iter().collect(),
                ..Default::default()
            })
        }
        fn observe_domain(
            &self,
            name: &str,
        ) -> Result<Option<crate::observe::ObservedDomain>, crate::hypervisor::HypervisorError> {
            Ok((name == "web").then(|| crate::observe::ObservedDomain {
                name: name.into(),
                uuid: String::new(),
                state: *self.state.lock().unwrap(),
                reason: Default::default(),
                persistent: true,
                autostart: false,
                boot: Default::default(),
                interfaces: Vec::new(),
                disks: Vec::new(),
                id: None,
            }))
        }
    }

    impl crate::hypervisor::DomainControl for GatedStart {
        fn start(&self, _: &str) -> Result<(), crate::hypervisor::HypervisorError> {
            self.entered.notify_one();
            let _ = self.release.lock().unwrap().recv();
            *self.state.lock().unwrap() = crate::observe::DomainState::Running;
            Ok(())
        }
        fn shutdown(&self, name: &str) -> Result<(), crate::hypervisor::HypervisorError> {
            self.unexpected("shutdown", name)
        }
        fn destroy(&self, name: &str) -> Result<(), crate::hypervisor::HypervisorError> {
            self.unexpected("destroy", name)
        }
        fn resume(&self, name: &str) -> Result<(), crate::hypervisor::HypervisorError> {
            self.unexpected("resume", name)
        }
        fn reset(&self, name: &str) -> Result<(), crate::hypervisor::HypervisorError> {
            self.unexpected("reset", name)
        }
        fn set_autostart(&self, name: &str, _: bool) -> Result<(), crate::hypervisor::HypervisorError> {
            self.unexpected("set_autostart", name)
        }
        fn persistent_xml(&self, name: &str) -> Result<String, crate::hypervisor::HypervisorError> {
            self.unexpected("persistent_xml", name).map(|_| String::new())
        }
        fn define_xml(&self, name: &str, _: &str) -> Result<(), crate::hypervisor::HypervisorError> {
            self.unexpected("define_xml", name)
        }
    }

    impl GatedStart {
        fn unexpected(&self, op: &'static str, name: &str) -> Result<(), crate::hypervisor::HypervisorError> {
            Err(crate::hypervisor::HypervisorError::Failed {
                op,
                domain: name.into(),
                message: "not in this test".into(),
            })
        }
    }

    struct Once(Arc<GatedStart>);

    impl Connector for Once {
        fn uri(&self) -> String {
            "test:///gated".into()
        }
        fn connect(
            &self,
            _: tokio::sync::mpsc::UnboundedSender<crate::hypervisor::events::HypervisorEvent>,
        ) -> Result<Connection, crate::hypervisor::HypervisorError> {
            Ok(Connection::without_events(self.0.clone()))
        }
    }

    fn web(state: &str) -> DesiredState {
        let text = format!(
            "apiVersion: virtwarden.io/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: t\nspec:\n  domains:\n    - name: web\n      state: {state}\n"
        );
        virtwarden_policies::load_texts([(std::path::Path::new("t.yaml"), text.as_str())])
            .expect("valid policy")
            .desired
    }

    #[tokio::test]
    async fn idle_once_started_up_and_not_while_an_action_is_in_flight() {
        let wait = Duration::from_secs(15);
        let (release, gate) = std::sync::mpsc::channel();
        let hv = Arc::new(GatedStart {
            state: Mutex::new(crate::observe::DomainState::ShutOff),
            entered: tokio::sync::Notify::new(),
            release: Mutex::new(gate),
        });
        let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
        let (engine, task) =
            Engine::spawn(Arc::new(Once(hv.clone())), web("stopped"), config, Registry::with_builtins());
        // Started up with nothing to do: idle (and ready, the first resync done).
        assert!(engine.wait_idle(wait).await, "idle after start-up: {:#?}", engine.status());
        assert!(engine.is_ready());
        // The start is in flight (its worker acts, its libvirt call runs): not idle.
        engine.reload(web("running"));
        tokio::time::timeout(wait, hv.entered.notified()).await.expect("the start was called");
        assert!(!engine.wait_idle(Duration::from_millis(300)).await, "not idle while the start runs");
        assert!(!engine.wait_quiet(Duration::from_millis(10)).await);
        // It returns: idle again, the domain up.
        release.send(()).unwrap();
        assert!(engine.wait_idle(wait).await, "idle once the start returned: {:#?}", engine.status());
        let s = engine.status();
        assert!(s.domains[0].last_outcome.as_deref().is_some_and(|o| o.starts_with("ok")), "{s:#?}");
        assert_eq!(*hv.state.lock().unwrap(), crate::observe::DomainState::Running);
        // Up as its policy wants, nothing timed either: quiet.
        assert!(engine.wait_quiet(wait).await);
        engine.shutdown();
        tokio::time::timeout(wait, task).await.expect("the engine stops").unwrap();
    }

    #[test]
    fn an_unusable_data_directory_is_a_lost_memory_not_a_clean_slate() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let (store, problem) = open_memory(Some(&file.path().join("data")));
        assert!(problem.is_some_and(|p| p.contains("remembering in memory only")));
        assert!(store.snapshot().lost.is_some_and(|l| l.why.contains("cannot create data directory")));
    }

    #[test]
    fn only_the_engines_own_work_waiting_too_long_is_a_stall() {
        let bound = Duration::from_secs(60);
        let idle = PoolStats::default();
        // Hung calls that were replaced (the pool still takes work) are no stall.
        let hung = PoolStats { stuck: 16, live: 8, ..Default::default() };
        assert_eq!(stalled(&hung, &idle, Some(&idle), bound), None);
        let busy = PoolStats { oldest_queued: Some(Duration::from_secs(5)), ..hung };
        assert_eq!(stalled(&busy, &idle, Some(&idle), bound), None, "a short wait for a thread");
        let full = PoolStats { stuck: 72, live: 0, oldest_queued: Some(Duration::from_secs(61)), ..Default::default() };
        let why = stalled(&full, &idle, None, bound).expect("no thread for 61s");
        assert!(why.starts_with("a libvirt call has waited 61s for a thread (72 hung calls"), "{why}");
        let writing = PoolStats { oldest_running: Some(Duration::from_secs(90)), ..Default::default() };
        assert!(stalled(&idle, &writing, None, bound)
            .unwrap()
            .starts_with("the status write has not returned for 90s"));
        assert!(stalled(&idle, &idle, Some(&writing), bound).unwrap().starts_with("the memory write"));
    }
}
