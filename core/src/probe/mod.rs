//! Probing guests from the host (virtwarden's network namespace): HTTP GET, TCP connect and
//! the guest agent's ping, asynchronous, each bounded by its timeout, at most a fixed number
//! at a time. Every probe returns a [`ProbeResult`]; nothing here panics or returns an error.

pub mod address;
pub mod connect;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use virtwarden_policies::{Health, Probe};

use crate::guest::{AddressSource, GuestAccess};
use crate::observe::host_addrs::HostView;
use crate::plan::health::{ProbeFailure, ProbeResult};
use address::{AddressError, BoundNic};

/// Probes running at once by default: enough for 1,000 guests at a 10 s period with 2 s
/// timeouts even if every probe times out (1,000 / 10 s × 2 s = 200 would queue; 64 keeps the
/// host's sockets and libvirt's worker threads bounded, queued probes wait their turn).
pub const DEFAULT_CONCURRENCY: usize = 64;

/// One probe to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub domain: String,
    pub probe: Probe,
    /// The policy's address; absent: discovered through libvirt.
    pub address: Option<IpAddr>,
    pub timeout: Duration,
}

impl ProbeSpec {
    pub fn from_policy(domain: &str, h: &Health) -> Self {
        ProbeSpec {
            domain: domain.to_string(),
            probe: h.probe.clone(),
            address: h.address,
            timeout: h.timeout().as_std(),
        }
    }

    /// What is probed, for reports: `http://10.0.0.2:80/healthz`, `tcp 10.0.0.2:22`, `guest agent`.
    pub fn target(&self, addr: Option<IpAddr>) -> String {
        let at = |port: u16| match addr {
            Some(a) => SocketAddr::new(a, port).to_string(),
            None => format!("port {port}"),
        };
        match &self.probe {
            Probe::Http(h) => {
                let path = h.path.as_deref().unwrap_or("/");
                match addr {
                    Some(_) => format!("http://{}{path}", at(h.port)),
                    None => format!("http {} ({path})", at(h.port)),
                }
            }
            Probe::Tcp(t) => format!("tcp {}", at(t.port)),
            Probe::GuestAgentPing(_) => "guest agent".into(),
        }
    }
}

/// The GET of an `http` probe: a backend, like the hypervisor (hyper's client in the
/// `virtwarden` crate, `probe::http::HyperGet`; the front ends hand it to the engine).
pub trait HttpGet: Send + Sync + 'static {
    /// `GET path` on `addr`; passes on a 2xx or 3xx status (redirects are not followed).
    /// Timeouts are the caller's.
    fn get<'a>(&'a self, addr: SocketAddr, path: &'a str) -> BoxFuture<'a, Result<(), ProbeFailure>>;
}

/// What the prober remembers of one domain between probes.
#[derive(Debug, Clone, Default)]
struct Known {
    /// The discovered (not policy) address, kept until a probe at it fails or conflicts.
    discovered: Option<IpAddr>,
    /// Its NICs as the host saw them when they were last read (once per boot).
    nics: Option<Vec<BoundNic>>,
    /// The address its probes use now (policy or discovered): another domain's claim on it
    /// is refused.
    in_use: Option<IpAddr>,
}

/// Runs probes with bounded concurrency and remembers discovered addresses.
pub struct Prober {
    guest: Arc<dyn GuestAccess>,
    /// `None`: `http` probes are not run (no evidence either way; see [`Prober::with_http`]).
    http: Option<Arc<dyn HttpGet>>,
    permits: Arc<Semaphore>,
    known: Mutex<HashMap<String, Known>>,
}

impl Prober {
    pub fn new(guest: Arc<dyn GuestAccess>, concurrency: usize) -> Self {
        Prober {
            guest,
            http: None,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Run `http` probes through `http`.
    pub fn with_http(mut self, http: Arc<dyn HttpGet>) -> Self {
        self.http = Some(http);
        self
    }

    /// Forget a discovered address (the domain restarted: it may get another lease, its taps
    /// are new).
    pub fn forget_address(&self, domain: &str) {
        self.known().remove(domain);
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Addresses other managed domains' probes use.
    fn others(&self, domain: &str) -> Vec<IpAddr> {
        self.known().iter().filter(|(d, _)| d.as_str() != domain).filter_map(|(_, k)| k.in_use).collect()
    }

    /// Run one probe. Waits for a free slot first; the timeout counts from when it starts.
    pub async fn probe(&self, spec: &ProbeSpec) -> ProbeResult {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            // The semaphore is never closed; report rather than panic if it ever were.
            return ProbeResult {
                target: spec.target(spec.address),
                address: spec.address,
                latency: Duration::ZERO,
                outcome: Err(ProbeFailure::Network("prober shut down".into())),
            };
        };
        let started = Instant::now();
        let deadline = started + spec.timeout;
        let mut aimed: Option<(IpAddr, Option<Vec<BoundNic>>)> = None;
        let run = self.run(spec, permit, &mut aimed);
        let mut outcome = match tokio::time::timeout_at(deadline, run).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ProbeFailure::Timeout(spec.timeout)),
        };
        // The address moved to another MAC while we probed: whatever answered (or did not) was
        // perhaps not the domain. No evidence.
        if let Some((ip, Some(nics))) = aimed.clone() {
            if outcome.as_ref().err().is_none_or(ProbeFailure::is_evidence) {
                let guest = self.guest.clone();
                let after = tokio::task::spawn_blocking(move || guest.neighbours()).await;
                if let Ok(Ok(neighbours)) = after {
                    let view = HostView { neighbours, ..HostView::default() };
                    if let Some(c) = address::neighbour_conflict(ip, &nics, &view) {
                        outcome = Err(ProbeFailure::Conflict(format!("{c} (seen after the probe)")));
                    }
                }
            }
        }
        let discovered = spec.address.is_none();
        if discovered && outcome.as_ref().err().is_some_and(ProbeFailure::is_evidence) {
            // The guest may have moved; look again next time. Not after a conflict: the
            // address stays the domain's and is checked again (a new lookup would find the
            // other MAC's entry and call the domain's address unknown — a failure).
            if let Some(k) = self.known().get_mut(&spec.domain) {
                k.discovered = None;
            }
        }
        if let Err(ProbeFailure::Conflict(c)) = &outcome {
            tracing::debug!(domain = %spec.domain, conflict = %c, "address conflict: the probe is no evidence");
        }
        let address = aimed.map(|(a, _)| a).or(spec.address);
        let address = if matches!(spec.probe, Probe::GuestAgentPing(_)) { None } else { address };
        ProbeResult { target: spec.target(address), address, latency: started.elapsed(), outcome }
    }

    async fn run(
        &self,
        spec: &ProbeSpec,
        permit: OwnedSemaphorePermit,
        aimed: &mut Option<(IpAddr, Option<Vec<BoundNic>>)>,
    ) -> Result<(), ProbeFailure> {
        let port = match &spec.probe {
            Probe::GuestAgentPing(_) => {
                let guest = self.guest.clone();
                let (domain, timeout) = (spec.domain.clone(), spec.timeout);
                let (r, _permit) = blocking(permit, move || guest.agent_ping(&domain, timeout)).await?;
                // libvirt's error may carry the agent's (the guest's) own words.
                return r.map_err(|e| ProbeFailure::Agent(crate::guest_text::clean(&e.detail(), 240)));
            }
            Probe::Http(h) => h.port,
            Probe::Tcp(t) => t.port,
        };
        // A separate statement: the map's guard must not live across the await below.
        let known = self.known().get(&spec.domain).cloned().unwrap_or_default();
        let others = self.others(&spec.domain);
        let guest = self.guest.clone();
        let (domain, policy) = (spec.domain.clone(), spec.address);
        let (resolved, _permit) =
            blocking(permit, move || resolve(guest.as_ref(), &domain, policy, &known, &others)).await?;
        let (ip, nics, source) = resolved?;
        if let Some(source) = source {
            tracing::debug!(domain = %spec.domain, address = %ip, source = source.word(), "guest address found");
        }
        {
            let mut map = self.known();
            let k = map.entry(spec.domain.clone()).or_default();
            if spec.address.is_none() {
                k.discovered = Some(ip);
            }
            k.in_use = Some(ip);
            if nics.is_some() {
                k.nics = nics.clone();
            }
        }
        *aimed = Some((ip, nics));
        let addr = SocketAddr::new(ip, port);
        match &spec.probe {
            Probe::Http(h) => match &self.http {
                Some(http) => http.get(addr, h.path.as_deref().unwrap_or("/")).await,
                None => Err(ProbeFailure::Unsupported("no HTTP client was given to the prober".into())),
            },
            _ => connect::tcp_connect(addr).await,
        }
    }
}

/// An address to probe, the domain's NICs it was checked against, and where it was found
/// (absent when it was not discovered just now).
type Resolved = (IpAddr, Option<Vec<BoundNic>>, Option<AddressSource>);

/// The address to probe, checked against what the host sees now: the policy's, the one found
/// before, or a new discovery. With the domain's NICs (absent when they could not be read for a
/// policy address: then it is probed unchecked, as the operator wrote it) and, for a new
/// discovery, where it was found.
fn resolve(
    guest: &dyn GuestAccess,
    domain: &str,
    policy: Option<IpAddr>,
    known: &Known,
    others: &[IpAddr],
) -> Result<Resolved, ProbeFailure> {
    let chosen = policy.map(|a| (a, false)).or(known.discovered.map(|a| (a, true)));
    let Some((ip, discovered)) = chosen else {
        let found = address::discover(guest, domain, others).map_err(failure)?;
        return Ok((found.address, Some(found.nics), Some(found.source)));
    };
    let nics = match &known.nics {
        Some(n) => Some(n.clone()),
        None => match address::read_nics(guest, domain) {
            Ok((n, _)) => Some(n),
            Err(e) => {
                tracing::debug!(domain, error = %e, "cannot read the domain's NICs; the policy's address is not checked");
                None
            }
        },
    };
    if let Some(n) = &nics {
        let neighbours = guest.neighbours().unwrap_or_default();
        let view = HostView { neighbours, ..HostView::default() };
        address::check_binding(ip, n, &view, others, discovered).map_err(failure)?;
    }
    Ok((ip, nics, None))
}

fn failure(e: AddressError) -> ProbeFailure {
    match e {
        AddressError::NotFound(t) => ProbeFailure::NoAddress(t),
        AddressError::Untrusted(t) => ProbeFailure::Untrusted(t),
        AddressError::Conflict(t) => ProbeFailure::Conflict(t),
    }
}

/// Run a blocking libvirt call on a blocking thread. The permit travels with it, so a call
/// that outlives the probe's timeout still counts against the concurrency bound until it ends.
async fn blocking<T: Send + 'static>(
    permit: OwnedSemaphorePermit,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<(T, OwnedSemaphorePermit), ProbeFailure> {
    tokio::task::spawn_blocking(move || (f(), permit))
        .await
        .map_err(|e| ProbeFailure::Network(format!("probe task failed: {e}")))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Condvar;

    use tokio::net::TcpListener;
    use virtwarden_policies::{GuestAgentPing, HttpProbe, TcpProbe};

    use super::*;
    use crate::guest::GuestInterface;
    use crate::hypervisor::HypervisorError;
    use crate::observe::arp::ArpEntry;
    use crate::observe::guest_devices::{GuestDevices, Nic};
    use crate::observe::host_addrs::HostAddr;

    const MAC: &str = "52:54:00:00:00:01";

    /// A guest with one NIC (tap vnet0 on br0, where the host holds 10.77.0.1/24) whose
    /// agent reports `agent` (an error when absent), whose neighbour entries are `neighbours`,
    /// whose agent answers pings when `agent_ok`, and whose pings block while `hold` is set.
    #[derive(Default)]
    struct FakeGuest {
        agent: Mutex<Option<Vec<GuestInterface>>>,
        neighbours: Mutex<Vec<ArpEntry>>,
        agent_ok: bool,
        lookups: AtomicUsize,
        hold: Mutex<bool>,
        released: Condvar,
        running: AtomicUsize,
        most: AtomicUsize,
    }

    fn neighbour(ip: &str, mac: &str, dev: &str) -> ArpEntry {
        ArpEntry { ip: ip.parse().unwrap(), mac: mac.into(), device: dev.into() }
    }

    impl GuestAccess for FakeGuest {
        fn guest_devices(&self, _: &str) -> Result<GuestDevices, HypervisorError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            Ok(GuestDevices {
                macs: vec![MAC.into()],
                nics: vec![Nic { mac: MAC.into(), tap: Some("vnet0".into()), bridge: Some("br0".into()) }],
                ..Default::default()
            })
        }
        fn interface_addresses(
            &self,
            domain: &str,
            source: AddressSource,
        ) -> Result<Vec<GuestInterface>, HypervisorError> {
            match (source, self.agent.lock().unwrap().clone()) {
                (AddressSource::Agent, None) => Err(HypervisorError::Failed {
                    op: "domifaddr",
                    domain: domain.into(),
                    message: "Guest agent is not responding".into(),
                }),
                (AddressSource::Agent, Some(ifaces)) => Ok(ifaces),
                _ => Ok(Vec::new()),
            }
        }
        fn agent_ping(&self, domain: &str, _: Duration) -> Result<(), HypervisorError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            let mut hold = self.hold.lock().unwrap();
            while *hold {
                hold = self.released.wait(hold).unwrap();
            }
            self.running.fetch_sub(1, Ordering::SeqCst);
            if self.agent_ok {
                Ok(())
            } else {
                Err(HypervisorError::Failed {
                    op: "guest-ping",
                    domain: domain.into(),
                    message: "Guest agent is not responding: QEMU guest agent is not connected".into(),
                })
            }
        }
        fn host_view(&self) -> std::io::Result<HostView> {
            let addr = |ip: &str, prefix, dev: &str| HostAddr { ip: ip.parse().unwrap(), prefix, dev: dev.into() };
            Ok(HostView {
                addrs: vec![addr("127.0.0.1", 8, "lo"), addr("10.77.0.1", 24, "br0")],
                bridge_of: HashMap::from([("vnet0".into(), "br0".into())]),
                links: ["vnet0".to_string(), "br0".to_string()].into(),
                neighbours: self.neighbours()?,
            })
        }
        fn neighbours(&self) -> std::io::Result<Vec<ArpEntry>> {
            Ok(self.neighbours.lock().unwrap().clone())
        }
    }

    fn spec(probe: Probe, address: Option<IpAddr>) -> ProbeSpec {
        ProbeSpec { domain: "web".into(), probe, address, timeout: Duration::from_secs(2) }
    }

    fn prober(guest: Arc<FakeGuest>) -> Prober {
        Prober::new(guest, DEFAULT_CONCURRENCY).with_http(Arc::new(StatusLine))
    }

    /// The HTTP GET of these tests, no server behind it: the path decides (`/healthz` 200,
    /// `/moved` 302, `/never` no answer, anything else 503). The real one (hyper's) is the `virtwarden` crate's,
    /// tested there against a server (`probe/http.rs`); here only the prober's part is.
    struct StatusLine;

    impl HttpGet for StatusLine {
        fn get<'a>(&'a self, _addr: SocketAddr, path: &'a str) -> BoxFuture<'a, Result<(), ProbeFailure>> {
            Box::pin(async move {
                match path {
                    "/healthz" | "/moved" => Ok(()),
                    "/never" => std::future::pending().await,
                    _ => Err(ProbeFailure::HttpStatus(503)),
                }
            })
        }
    }

    #[tokio::test]
    async fn without_an_http_client_an_http_probe_is_not_run_and_no_evidence() {
        let p = Prober::new(Arc::new(FakeGuest::default()), DEFAULT_CONCURRENCY);
        let r = p.probe(&spec(http(8080, "/healthz"), Some(Ipv4Addr::LOCALHOST.into()))).await;
        assert!(matches!(r.outcome, Err(ProbeFailure::Unsupported(_))), "{r:?}");
        assert!(!r.outcome.unwrap_err().is_evidence());
    }

    fn http(port: u16, path: &str) -> Probe {
        Probe::Http(HttpProbe { port, path: Some(path.into()) })
    }

    #[tokio::test]
    async fn http_2xx_and_3xx_pass_5xx_fails_with_the_status() {
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080));
        let p = prober(Arc::default());
        let ip = Some(server.ip());
        let ok = p.probe(&spec(http(server.port(), "/healthz"), ip)).await;
        assert_eq!(ok.outcome, Ok(()));
        assert_eq!(ok.target, format!("http://{server}/healthz"));
        assert_eq!(ok.address, ip);
        assert_eq!(p.probe(&spec(http(server.port(), "/moved"), ip)).await.outcome, Ok(()));
        let sick = p.probe(&spec(http(server.port(), "/other"), ip)).await;
        assert_eq!(sick.outcome, Err(ProbeFailure::HttpStatus(503)));
        assert_eq!(sick.describe(), format!("http://{server}/other: HTTP status 503"));
    }

    #[tokio::test]
    async fn tcp_accepted_passes_and_a_closed_port_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let p = prober(Arc::default());
        let r = p.probe(&spec(Probe::Tcp(TcpProbe { port: open.port() }), Some(open.ip()))).await;
        assert_eq!(r.outcome, Ok(()));
        assert_eq!(r.target, format!("tcp {open}"));
        let r = p.probe(&spec(Probe::Tcp(TcpProbe { port: closed.port() }), Some(closed.ip()))).await;
        assert_eq!(r.outcome, Err(ProbeFailure::Refused));
    }

    #[tokio::test]
    async fn an_http_get_that_never_answers_times_out() {
        // The prober bounds the client's call (the real client's own behaviour on a silent or
        // non-HTTP server is tested with it, in the `virtwarden` crate).
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080));
        let mut s = spec(http(addr.port(), "/never"), Some(addr.ip()));
        s.timeout = Duration::from_millis(200);
        let r = prober(Arc::default()).probe(&s).await;
        assert_eq!(r.outcome, Err(ProbeFailure::Timeout(Duration::from_millis(200))));
        assert_eq!(r.describe(), format!("http://{addr}/never: no answer within 200ms"));
    }

    /// A listener on 127.0.0.1 counting the connections it accepts.
    async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn the_address_is_found_in_the_neighbour_table_of_the_taps_bridge_only_and_kept_through_a_conflict() {
        let guest = Arc::new(FakeGuest::default());
        // The guest's MAC seen on another interface says nothing about this domain.
        *guest.neighbours.lock().unwrap() = vec![neighbour("10.77.0.2", MAC, "eth0")];
        let p = prober(guest.clone());
        let mut s = spec(Probe::Tcp(TcpProbe { port: 9 }), None);
        s.timeout = Duration::from_millis(300);
        let r = p.probe(&s).await;
        assert!(matches!(&r.outcome, Err(ProbeFailure::NoAddress(t)) if t.contains("ARP: none")), "{r:?}");
        *guest.neighbours.lock().unwrap() = vec![neighbour("10.77.0.2", MAC, "br0")];
        let r = p.probe(&s).await;
        assert_eq!(r.address, Some("10.77.0.2".parse().unwrap()), "{r:?}");
        // Another MAC takes the address over: a conflict for as long as it lasts, the address
        // is kept (not looked up again: the other MAC's entry would make it "unknown").
        *guest.neighbours.lock().unwrap() = vec![neighbour("10.77.0.2", "02:00:00:00:00:66", "br0")];
        for _ in 0..3 {
            let r = p.probe(&s).await;
            assert!(matches!(&r.outcome, Err(ProbeFailure::Conflict(_))), "{r:?}");
            assert_eq!(r.address, None);
        }
        // Gone: the neighbour table forgot it; a failed probe then makes the next one look again.
        guest.neighbours.lock().unwrap().clear();
        let r = p.probe(&s).await;
        assert!(r.outcome.as_ref().err().is_some_and(ProbeFailure::is_evidence) || r.outcome.is_ok(), "{r:?}");
        if r.outcome.is_err() {
            let before = guest.lookups.load(Ordering::SeqCst);
            p.probe(&s).await;
            assert!(guest.lookups.load(Ordering::SeqCst) > before, "looked up again after the failure");
        }
    }

    #[tokio::test]
    async fn a_found_address_is_kept_and_rechecked_without_another_lookup() {
        let guest = Arc::new(FakeGuest::default());
        *guest.neighbours.lock().unwrap() = vec![neighbour("10.77.0.2", MAC, "br0")];
        let known = Known { discovered: Some("10.77.0.2".parse().unwrap()), nics: None, in_use: None };
        let nics = vec![BoundNic { mac: MAC.into(), bridge: Some("br0".into()) }];
        let cached = Known { nics: Some(nics.clone()), ..known.clone() };
        let (ip, _, source) = resolve(guest.as_ref(), "web", None, &cached, &[]).unwrap();
        assert_eq!((ip.to_string().as_str(), source), ("10.77.0.2", None));
        assert_eq!(guest.lookups.load(Ordering::SeqCst), 0, "no libvirt call for a known address");
        *guest.neighbours.lock().unwrap() = vec![neighbour("10.77.0.2", "02:00:00:00:00:66", "br0")];
        let r = resolve(guest.as_ref(), "web", None, &cached, &[]);
        assert!(matches!(&r, Err(ProbeFailure::Conflict(t)) if t.contains("02:00:00:00:00:66")), "{r:?}");
    }

    #[tokio::test]
    async fn an_agent_claiming_loopback_the_hosts_or_another_domains_address_is_not_probed() {
        let (listener, accepted) = counting_listener().await;
        let guest = Arc::new(FakeGuest::default());
        let p = prober(guest.clone());
        // Another managed domain probes 10.77.0.3.
        let other = ProbeSpec {
            domain: "db".into(),
            ..spec(Probe::Tcp(TcpProbe { port: 9 }), Some("10.77.0.3".parse().unwrap()))
        };
        let mut other = other;
        other.timeout = Duration::from_millis(200);
        p.probe(&other).await;
        let claims = [
            ("127.0.0.1", "not probed: guest agent reports 127.0.0.1 on eth0: loopback", false),
            (
                "10.77.0.1",
                "not probed: guest agent reports 10.77.0.1 on eth0: an address of this host's own (br0)",
                true,
            ),
            ("10.77.0.3", "not probed: guest agent reports 10.77.0.3 on eth0: used by another managed domain", true),
            (
                "192.0.2.1",
                "not probed: guest agent reports 192.0.2.1 on eth0: outside br0's networks (10.77.0.1/24)",
                false,
            ),
        ];
        for (ip, text, conflict) in claims {
            *guest.agent.lock().unwrap() = Some(vec![GuestInterface {
                name: "eth0\u{1b}[2J".into(),
                mac: Some(MAC.into()),
                addrs: vec![ip.parse().unwrap()],
            }]);
            let r = p.probe(&spec(Probe::Tcp(TcpProbe { port: listener.port() }), None)).await;
            let want =
                if conflict { ProbeFailure::Conflict(text.into()) } else { ProbeFailure::Untrusted(text.into()) };
            assert_eq!(r.outcome, Err(want));
            assert_eq!(r.address, None);
            assert!(!r.outcome.as_ref().unwrap_err().is_evidence());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "the host's loopback service was never probed");
    }

    #[tokio::test]
    async fn a_policy_address_answered_by_another_mac_on_the_bridge_is_a_conflict_and_not_probed() {
        let (listener, accepted) = counting_listener().await;
        let guest = Arc::new(FakeGuest::default());
        let p = prober(guest.clone());
        let s = spec(Probe::Tcp(TcpProbe { port: listener.port() }), Some(listener.ip()));
        assert_eq!(p.probe(&s).await.outcome, Ok(()));
        // The listener counts on its own task: let it see the first connection.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while accepted.load(Ordering::SeqCst) == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the first probe connected");
        *guest.neighbours.lock().unwrap() = vec![neighbour("127.0.0.1", "02:00:00:00:00:66", "br0")];
        let r = p.probe(&s).await;
        assert_eq!(
            r.outcome,
            Err(ProbeFailure::Conflict(
                "127.0.0.1 is answered by 02:00:00:00:00:66 on br0, not by the domain's 52:54:00:00:00:01".into()
            ))
        );
        // A connection the second probe made would be in the listener's backlog by now.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "only the first probe connected");
    }

    #[tokio::test]
    async fn an_address_nowhere_to_be_found_is_reported_with_where_we_looked() {
        let p = prober(Arc::default());
        let r = p.probe(&spec(http(80, "/healthz"), None)).await;
        assert_eq!(r.address, None);
        assert_eq!(r.target, "http port 80 (/healthz)");
        let Err(ProbeFailure::NoAddress(text)) = &r.outcome else { panic!("{r:?}") };
        assert_eq!(
            text,
            "nothing known for 52:54:00:00:00:01 (guest agent: domifaddr web: Guest agent is not responding; \
             DHCP lease: none; ARP: none)"
        );
    }

    #[tokio::test]
    async fn agent_ping_answered_or_not() {
        let ok = prober(Arc::new(FakeGuest { agent_ok: true, ..Default::default() }));
        let r = ok.probe(&spec(Probe::GuestAgentPing(GuestAgentPing {}), None)).await;
        assert_eq!((r.outcome, r.target.as_str()), (Ok(()), "guest agent"));
        let dead = prober(Arc::default());
        let r = dead.probe(&spec(Probe::GuestAgentPing(GuestAgentPing {}), None)).await;
        assert_eq!(
            r.outcome,
            Err(ProbeFailure::Agent(
                "guest-ping web: Guest agent is not responding: QEMU guest agent is not connected".into()
            ))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_than_the_bound_run_at_once_even_past_their_timeout() {
        let guest = Arc::new(FakeGuest { agent_ok: true, hold: Mutex::new(true), ..Default::default() });
        let p = Arc::new(Prober::new(guest.clone(), 3));
        let mut s = spec(Probe::GuestAgentPing(GuestAgentPing {}), None);
        s.timeout = Duration::from_millis(50);
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                tokio::spawn({
                    let (p, s) = (p.clone(), s.clone());
                    async move { p.probe(&s).await }
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while guest.running.load(Ordering::SeqCst) < 3 {
            assert!(std::time::Instant::now() < deadline, "three pings never started");
            tokio::task::yield_now().await;
        }
        // The three blocked calls time out as probes but keep their slots: the others wait. Which
        // three tasks got the slots is the scheduler's choice, so take the first three to finish.
        let mut pending: futures_util::stream::FuturesUnordered<_> = tasks.into_iter().collect();
        let mut first = Vec::new();
        while first.len() < 3 {
            let next = tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut pending));
            let r = next.await.expect("three probes time out while their calls hold the slots");
            first.push(r.expect("a probe task").expect("the probe task did not panic"));
        }
        assert!(first.iter().all(|r| r.outcome == Err(ProbeFailure::Timeout(Duration::from_millis(50)))), "{first:?}");
        assert_eq!(guest.running.load(Ordering::SeqCst), 3);
        assert_eq!(pending.len(), 7, "the other seven still wait for a slot");
        *guest.hold.lock().unwrap() = false;
        guest.released.notify_all();
        let rest = tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::collect::<Vec<_>>(pending))
            .await
            .expect("the others run once the slots are free");
        assert_eq!(rest.len(), 7);
        assert_eq!(guest.most.load(Ordering::SeqCst), 3);
    }
}
