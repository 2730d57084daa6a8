//! `make bench-health` (part 1, the cost): 1,000 probed domains at a 10 s period must cost at
//! most 1 % of one core. Real local listeners stand in for the guests — 1,000 HTTP servers on
//! 127.0.x.y:80 in a child process — and this process drives one health state machine per
//! domain through the real prober, as the engine will. CPU is this process's getrusage over
//! the measured window (the servers' CPU is the child's, not counted). Runs in a private
//! network namespace (`unshare --net`): the host's is never touched.
//!
//! BENCH_HEALTH_DOMAINS (default 1000), BENCH_HEALTH_SECS measured per probe kind (default 30),
//! BENCH_HEALTH_KINDS (default `http,tcp,none`; `none`: the state machines and timers alone).
//!
//! On loopback the kernel runs both ends of every TCP exchange in this process's context, so
//! the figure also carries the stand-in guest's side of the handshake: an upper bound.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virtwarden::guest::{AddressSource, GuestAccess, GuestInterface};
use virtwarden::hypervisor::HypervisorError;
use virtwarden::observe::guest_devices::GuestDevices;
use virtwarden::plan::health::{wake_at, HealthMonitor, HealthSettings, ProbeResult, Step};
use virtwarden::probe::http::HyperGet;
use virtwarden::probe::{ProbeSpec, Prober, DEFAULT_CONCURRENCY};
use virtwarden_policies::{HttpProbe, Probe, TcpProbe};

const PERIOD: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(2);
const PORT: u16 = 80;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The i-th guest's address: 127.0.x.y, skipping .0 and .255.
fn guest_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1 + (i / 250) as u8, 0, 1 + (i % 250) as u8))
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// User and system CPU time of this process.
fn cpu_times() -> (Duration, Duration) {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

fn cpu_time() -> Duration {
    let (u, s) = cpu_times();
    u + s
}

fn main() {
    if std::env::var_os("VW_BENCH_HEALTH_SERVE").is_some() {
        serve(env_num("BENCH_HEALTH_DOMAINS", 1000) as usize);
        return;
    }
    if std::env::var_os("VW_BENCH_NETNS").is_none() {
        let exe = std::env::current_exe().expect("bench path");
        match Command::new("unshare").args(["--net", "--"]).arg(exe).env("VW_BENCH_NETNS", "1").status() {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("bench-health failed or could not create a private network namespace ({s})"),
            Err(e) => panic!("bench-health: cannot run unshare ({e}); install util-linux"),
        }
        return;
    }
    let ok = Command::new("ip").args(["link", "set", "lo", "up"]).status().is_ok_and(|s| s.success());
    assert!(ok, "cannot bring up lo in the private namespace");
    raise_fd_limit();
    let n = env_num("BENCH_HEALTH_DOMAINS", 1000) as usize;
    let secs = env_num("BENCH_HEALTH_SECS", 30);
    let kinds = std::env::var("BENCH_HEALTH_KINDS").unwrap_or_else(|_| "http,tcp,none".into());
    let mut servers = ServerFarm::start(n);
    println!(
        "bench-health: {n} domains, period {}s, timeout {}s, at most {DEFAULT_CONCURRENCY} probes at once; \
         {secs}s measured per kind after {}s warm-up",
        PERIOD.as_secs(),
        TIMEOUT.as_secs(),
        (PERIOD * 2).as_secs()
    );
    for kind in kinds.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let probe = match kind {
            "http" => Some(Probe::Http(HttpProbe { port: PORT, path: Some("/healthz".into()) })),
            "tcp" => Some(Probe::Tcp(TcpProbe { port: PORT })),
            // The state machines, timers and scheduling alone: every probe passes at once.
            "none" => None,
            other => panic!("unknown kind {other} (http, tcp, none)"),
        };
        run(kind, probe, n, Duration::from_secs(secs));
    }
    servers.stop();
}

/// Addresses come from the policy in this bench: libvirt is never asked.
struct NoLibvirt;

impl GuestAccess for NoLibvirt {
    fn guest_devices(&self, domain: &str) -> Result<GuestDevices, HypervisorError> {
        Err(HypervisorError::Failed { op: "devices", domain: domain.into(), message: "not in this bench".into() })
    }
    fn interface_addresses(&self, domain: &str, _: AddressSource) -> Result<Vec<GuestInterface>, HypervisorError> {
        Err(HypervisorError::Failed { op: "domifaddr", domain: domain.into(), message: "not in this bench".into() })
    }
    fn agent_ping(&self, domain: &str, _: Duration) -> Result<(), HypervisorError> {
        Err(HypervisorError::Failed { op: "guest-ping", domain: domain.into(), message: "not in this bench".into() })
    }
}

/// What the domain tasks record while the window is open.
#[derive(Default)]
struct Tally {
    measuring: AtomicBool,
    latencies: Mutex<Vec<Duration>>,
    failures: AtomicU64,
    verdicts: AtomicU64,
}

fn run(kind: &str, probe: Option<Probe>, n: usize, measure: Duration) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let prober = Arc::new(Prober::new(Arc::new(NoLibvirt), DEFAULT_CONCURRENCY).with_http(Arc::new(HyperGet)));
    let tally = Arc::new(Tally::default());
    let epoch = Instant::now();
    let settings = HealthSettings { period: PERIOD, timeout: TIMEOUT, failure_threshold: 3, boot_timeout: PERIOD * 30 };
    rt.block_on(async {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let spec = ProbeSpec {
                    domain: format!("vm{i:04}"),
                    probe: probe.clone().unwrap_or(Probe::Tcp(TcpProbe { port: PORT })),
                    address: Some(guest_ip(i)),
                    timeout: TIMEOUT,
                };
                tokio::spawn(domain_task(spec, probe.is_some(), settings, prober.clone(), tally.clone(), epoch))
            })
            .collect();
        tokio::time::sleep(PERIOD * 2).await;
        let (cpu0, sys0, wall0) = (cpu_time(), cpu_times().1, Instant::now());
        tally.measuring.store(true, Ordering::SeqCst);
        tokio::time::sleep(measure).await;
        tally.measuring.store(false, Ordering::SeqCst);
        let (cpu, sys, wall) = (cpu_time() - cpu0, cpu_times().1 - sys0, wall0.elapsed());
        for t in tasks {
            t.abort();
        }
        let samples = std::mem::take(&mut *tally.latencies.lock().unwrap_or_else(|p| p.into_inner()));
        let count = samples.len();
        let pct = cpu.as_secs_f64() / wall.as_secs_f64() * 100.0;
        println!(
            "{kind:<5} probes {count} ({:.0}/s), failures {}, verdicts {}: CPU {:.3} s over {:.1} s = {pct:.2} % of one core \
             (target ≤ 1 %: {}), {:.1} µs CPU per probe ({:.0} % in the kernel)",
            count as f64 / wall.as_secs_f64(),
            tally.failures.load(Ordering::SeqCst),
            tally.verdicts.load(Ordering::SeqCst),
            cpu.as_secs_f64(),
            wall.as_secs_f64(),
            if pct <= 1.0 { "met" } else { "MISSED" },
            cpu.as_secs_f64() * 1e6 / count.max(1) as f64,
            sys.as_secs_f64() / cpu.as_secs_f64().max(1e-9) * 100.0,
        );
        if count > 0 && kind != "none" {
            common::report(&format!("{kind} probe latency"), samples);
        }
    });
}

/// One domain as the engine will drive it: its state machine says when to probe.
async fn domain_task(
    spec: ProbeSpec,
    really_probe: bool,
    settings: HealthSettings,
    prober: Arc<Prober>,
    tally: Arc<Tally>,
    epoch: Instant,
) {
    // Domains start at different times on a real host: spread them over one period.
    tokio::time::sleep(PERIOD.mul_f64(fastrand::f64())).await;
    let mut m = HealthMonitor::new(settings);
    m.started(epoch.elapsed());
    loop {
        match m.poll(epoch.elapsed(), || None) {
            Step::Probe(ticket) => {
                let r = if really_probe {
                    prober.probe(&spec).await
                } else {
                    ProbeResult { target: String::new(), address: None, latency: Duration::ZERO, outcome: Ok(()) }
                };
                if tally.measuring.load(Ordering::Relaxed) {
                    if r.outcome.is_err() {
                        tally.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    tally.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(r.latency);
                }
                if m.probe_done(epoch.elapsed(), ticket, &r).is_some() {
                    tally.verdicts.fetch_add(1, Ordering::Relaxed);
                }
            }
            Step::WaitUntil(at) => {
                // As the engine will: wake on the quantum, so probes due close together share a wake-up.
                tokio::time::sleep(wake_at(at).saturating_sub(epoch.elapsed())).await
            }
            Step::Verdict(_) => {
                tally.verdicts.fetch_add(1, Ordering::Relaxed);
            }
            Step::Idle => return,
        }
    }
}

/// The stand-in guests: a child process serving HTTP on every guest address.
struct ServerFarm(Child);

impl ServerFarm {
    fn start(n: usize) -> Self {
        let exe = std::env::current_exe().expect("bench path");
        let mut child = Command::new(exe)
            .env("VW_BENCH_HEALTH_SERVE", "1")
            .env("BENCH_HEALTH_DOMAINS", n.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the server farm");
        let stdout = child.stdout.take().expect("farm stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        assert_eq!(line.trim(), "ready", "the server farm did not start");
        ServerFarm(child)
    }

    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Child: bind every guest address and answer each connection with `200 OK`.
fn serve(n: usize) {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        for i in 0..n {
            let listener = tokio::net::TcpListener::bind(SocketAddr::new(guest_ip(i), PORT)).await.expect("bind");
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        // A TCP probe closes at once (read returns 0); an HTTP probe sends its request.
                        if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                            let _ =
                                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                        }
                    });
                }
            });
        }
        println!("ready");
        std::future::pending::<()>().await;
    });
}
