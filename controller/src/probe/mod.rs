//! Probing guests from the host (virtwarden's network namespace): HTTP GET, TCP connect and
//! the guest agent's ping, asynchronous, each bounded by its timeout, at most a fixed number
//! at a time. Every probe returns a [`ProbeResult`]; nothing here panics or returns an error.

pub mod address;
pub mod http;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use virtwarden_policies::{Health, Probe};

use crate::guest::GuestAccess;
use crate::plan::health::{ProbeFailure, ProbeResult};

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

/// Runs probes with bounded concurrency and remembers discovered addresses.
pub struct Prober {
    guest: Arc<dyn GuestAccess>,
    permits: Arc<Semaphore>,
    /// Discovered (not policy) addresses, kept until a probe at that address fails.
    addresses: Mutex<HashMap<String, IpAddr>>,
}

impl Prober {
    pub fn new(guest: Arc<dyn GuestAccess>, concurrency: usize) -> Self {
        Prober { guest, permits: Arc::new(Semaphore::new(concurrency.max(1))), addresses: Mutex::new(HashMap::new()) }
    }

    /// Forget a discovered address (the domain restarted: it may get another lease).
    pub fn forget_address(&self, domain: &str) {
        self.cache().remove(domain);
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, IpAddr>> {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut address = spec.address;
        let run = self.run(spec, permit, &mut address);
        let outcome = match tokio::time::timeout_at(deadline, run).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ProbeFailure::Timeout(spec.timeout)),
        };
        let discovered = spec.address.is_none();
        if discovered && outcome.is_err() {
            // The guest may have moved; look again next time.
            self.forget_address(&spec.domain);
        }
        let address = if matches!(spec.probe, Probe::GuestAgentPing(_)) { None } else { address };
        ProbeResult { target: spec.target(address), address, latency: started.elapsed(), outcome }
    }

    async fn run(
        &self,
        spec: &ProbeSpec,
        permit: OwnedSemaphorePermit,
        address: &mut Option<IpAddr>,
    ) -> Result<(), ProbeFailure> {
        let port = match &spec.probe {
            Probe::GuestAgentPing(_) => {
                let guest = self.guest.clone();
                let (domain, timeout) = (spec.domain.clone(), spec.timeout);
                let (r, _permit) = blocking(permit, move || guest.agent_ping(&domain, timeout)).await?;
                return r.map_err(|e| ProbeFailure::Agent(e.detail()));
            }
            Probe::Http(h) => h.port,
            Probe::Tcp(t) => t.port,
        };
        // A separate statement: the cache's guard must not live across the await below.
        let cached = self.cache().get(&spec.domain).copied();
        let _permit = if address.is_some() {
            permit
        } else if let Some(a) = cached {
            *address = Some(a);
            permit
        } else {
            let guest = self.guest.clone();
            let domain = spec.domain.clone();
            let (found, permit) = blocking(permit, move || address::discover(guest.as_ref(), &domain)).await?;
            let (a, source) = found.map_err(ProbeFailure::NoAddress)?;
            tracing::debug!(domain = %spec.domain, address = %a, source = source.word(), "guest address found");
            self.cache().insert(spec.domain.clone(), a);
            *address = Some(a);
            permit
        };
        let Some(ip) = *address else {
            return Err(ProbeFailure::NoAddress("not found".into()));
        };
        let addr = SocketAddr::new(ip, port);
        match &spec.probe {
            Probe::Http(h) => http::http_get(addr, h.path.as_deref().unwrap_or("/")).await,
            _ => http::tcp_connect(addr).await,
        }
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Condvar;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use virtwarden_policies::{GuestAgentPing, HttpProbe, TcpProbe};

    use super::*;
    use crate::guest::{AddressSource, GuestInterface};
    use crate::hypervisor::HypervisorError;
    use crate::observe::guest_devices::GuestDevices;

    const MAC: &str = "52:54:00:00:00:01";

    /// A guest whose addresses come from `arp` only, whose agent answers when `agent_ok`, and
    /// whose agent pings block while `hold` is set (to observe concurrency).
    #[derive(Default)]
    struct FakeGuest {
        arp: Mutex<Vec<IpAddr>>,
        agent_ok: bool,
        lookups: AtomicUsize,
        hold: Mutex<bool>,
        released: Condvar,
        running: AtomicUsize,
        most: AtomicUsize,
    }

    impl GuestAccess for FakeGuest {
        fn guest_devices(&self, _: &str) -> Result<GuestDevices, HypervisorError> {
            Ok(GuestDevices { macs: vec![MAC.into()], ..Default::default() })
        }
        fn interface_addresses(
            &self,
            domain: &str,
            source: AddressSource,
        ) -> Result<Vec<GuestInterface>, HypervisorError> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            match source {
                AddressSource::Agent => Err(HypervisorError::Failed {
                    op: "domifaddr",
                    domain: domain.into(),
                    message: "Guest agent is not responding".into(),
                }),
                AddressSource::Lease => Ok(Vec::new()),
                AddressSource::Arp => Ok(vec![GuestInterface {
                    name: "vnet0".into(),
                    mac: Some(MAC.into()),
                    addrs: self.arp.lock().unwrap().clone(),
                }]),
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
    }

    fn spec(probe: Probe, address: Option<IpAddr>) -> ProbeSpec {
        ProbeSpec { domain: "web".into(), probe, address, timeout: Duration::from_secs(2) }
    }

    fn prober(guest: Arc<FakeGuest>) -> Prober {
        Prober::new(guest, DEFAULT_CONCURRENCY)
    }

    /// An HTTP server on 127.0.0.1 answering `/healthz` 200, `/moved` 302, anything else 503.
    async fn http_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let status = if head.starts_with("GET /healthz ") {
                        "200 OK"
                    } else if head.starts_with("GET /moved ") {
                        "302 Found\r\nLocation: /healthz"
                    } else {
                        "503 Service Unavailable"
                    };
                    let _ = s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
                });
            }
        });
        addr
    }

    fn http(port: u16, path: &str) -> Probe {
        Probe::Http(HttpProbe { port, path: Some(path.into()) })
    }

    #[tokio::test]
    async fn http_2xx_and_3xx_pass_5xx_fails_with_the_status() {
        let server = http_server().await;
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
        assert_eq!(
            p.probe(&spec(http(closed.port(), "/"), Some(closed.ip()))).await.outcome,
            Err(ProbeFailure::Refused)
        );
    }

    #[tokio::test]
    async fn a_server_that_accepts_and_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted by the kernel's backlog, never read or answered.
        let mut s = spec(http(addr.port(), "/"), Some(addr.ip()));
        s.timeout = Duration::from_millis(200);
        let r = prober(Arc::default()).probe(&s).await;
        assert_eq!(r.outcome, Err(ProbeFailure::Timeout(Duration::from_millis(200))));
        assert_eq!(r.describe(), format!("http://{addr}/: no answer within 200ms"));
        drop(listener);
    }

    #[tokio::test]
    async fn a_server_that_does_not_speak_http_fails_as_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
            }
        });
        let r = prober(Arc::default()).probe(&spec(http(addr.port(), "/"), Some(addr.ip()))).await;
        assert!(matches!(r.outcome, Err(ProbeFailure::Http(_))), "{r:?}");
    }

    #[tokio::test]
    async fn the_address_is_discovered_by_mac_cached_and_looked_up_again_after_a_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let guest = Arc::new(FakeGuest { arp: Mutex::new(vec![addr.ip()]), ..Default::default() });
        let p = prober(guest.clone());
        let s = spec(Probe::Tcp(TcpProbe { port: addr.port() }), None);
        let r = p.probe(&s).await;
        assert_eq!((r.outcome, r.address), (Ok(()), Some(addr.ip())));
        assert_eq!(guest.lookups.load(Ordering::SeqCst), 3, "agent, lease, then ARP");
        assert_eq!(p.probe(&s).await.outcome, Ok(()));
        assert_eq!(guest.lookups.load(Ordering::SeqCst), 3, "cached");
        drop(listener);
        assert_eq!(p.probe(&s).await.outcome, Err(ProbeFailure::Refused));
        p.probe(&s).await;
        assert_eq!(guest.lookups.load(Ordering::SeqCst), 6, "looked up again after the failure");
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
        // The three blocked calls time out as probes but keep their slots: the others wait.
        let first: Vec<ProbeResult> =
            futures_util::future::join_all(tasks.into_iter().take(3)).await.into_iter().map(Result::unwrap).collect();
        assert!(first.iter().all(|r| r.outcome == Err(ProbeFailure::Timeout(Duration::from_millis(50)))), "{first:?}");
        assert_eq!(guest.running.load(Ordering::SeqCst), 3);
        *guest.hold.lock().unwrap() = false;
        guest.released.notify_all();
        assert_eq!(guest.most.load(Ordering::SeqCst), 3);
    }
}
