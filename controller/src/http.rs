//! The metrics and health endpoint both front ends serve: `/metrics` (Prometheus text),
//! `/healthz` (the engine does its job), `/readyz` (it may be counted on). Loopback by default,
//! and bounded: a header-read (and keep-alive idle) timeout, a connection cap that sheds the
//! oldest connection, and backoff when accepting fails (out of descriptors).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::engine::EngineHandle;

/// What the endpoint asks of the process; the engine answers through [`EngineHandle`].
pub trait Probes: Clone + Send + Sync + 'static {
    /// `Err(why)` when the process no longer does its job: `/healthz` answers 503, and a
    /// supervisor (systemd, kubelet) should restart it.
    fn live(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// `Err(why)` while the process should not be counted on yet: `/readyz` answers 503.
    fn ready(&self) -> Result<(), String>;
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
}

impl Probes for EngineHandle {
    /// The engine loop answers, and resync rounds complete ([`EngineHandle::liveness`]).
    async fn live(&self) -> Result<(), String> {
        self.liveness().await
    }

    fn ready(&self) -> Result<(), String> {
        match (self.is_connected(), self.is_ready()) {
            (false, _) => Err("not connected to libvirt".into()),
            (true, false) => Err("first resync pending".into()),
            (true, true) => Ok(()),
        }
    }

    fn metrics(&self) -> String {
        self.metrics_text()
    }
}

/// The endpoint's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpConfig {
    /// A client must send a request's headers within this long, on a new connection and between
    /// requests on a kept-alive one; then the connection is closed.
    pub header_timeout: Duration,
    /// Open connections at most; one more sheds the oldest.
    pub max_connections: usize,
    /// `/healthz` answers 503 when the liveness check takes longer than this.
    pub probe_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout: Duration::from_secs(10),
            max_connections: 64,
            probe_timeout: Duration::from_secs(2),
        }
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn route<P: Probes>(probes: &P, path: &str, probe_timeout: Duration) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => {
            respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", probes.metrics())
        }
        "/healthz" => match tokio::time::timeout(probe_timeout, probes.live()).await {
            Ok(Ok(())) => respond(StatusCode::OK, TEXT, "ok\n".into()),
            Ok(Err(why)) => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("not live: {why}\n")),
            Err(_) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not live: the liveness check did not finish within {probe_timeout:?}\n"),
            ),
        },
        "/readyz" => match probes.ready() {
            Ok(()) => respond(StatusCode::OK, TEXT, "ready\n".into()),
            Err(why) => respond(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("not ready: {why}\n")),
        },
        _ => respond(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

/// Bind `addr` and serve with the default limits until the process ends; the bound address.
pub async fn serve<P: Probes>(addr: SocketAddr, probes: P) -> std::io::Result<SocketAddr> {
    serve_with(addr, probes, HttpConfig::default()).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with<P: Probes>(addr: SocketAddr, probes: P, config: HttpConfig) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, probes, config));
    Ok(bound)
}

/// How long a new connection waits for a shed one to let go of its slot.
const SHED_WAIT: Duration = Duration::from_secs(1);

async fn accept_loop<P: Probes>(listener: TcpListener, probes: P, config: HttpConfig) {
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    // Shed handles of the open connections, oldest first.
    let mut open: VecDeque<oneshot::Sender<()>> = VecDeque::new();
    let mut backoff = AcceptBackoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(e) => {
                if let Some(delay) = backoff.after(&e) {
                    tokio::time::sleep(delay).await;
                }
                continue;
            }
        };
        open.retain(|shed| !shed.is_closed());
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Full: close the oldest connection (an idle keep-alive or a slow client) rather
                // than refuse the newest, so a pile of idle connections cannot starve a scrape.
                if let Some(oldest) = open.pop_front() {
                    let _ = oldest.send(());
                }
                match tokio::time::timeout(SHED_WAIT, slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => continue,
                }
            }
        };
        let (shed_tx, shed_rx) = oneshot::channel();
        open.push_back(shed_tx);
        tokio::spawn(serve_connection(stream, probes.clone(), config, permit, shed_rx));
    }
}

async fn serve_connection<P: Probes>(
    stream: TcpStream,
    probes: P,
    config: HttpConfig,
    _slot: OwnedSemaphorePermit,
    shed: oneshot::Receiver<()>,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let probes = probes.clone();
        async move { Ok::<_, Infallible>(route(&probes, req.uri().path(), config.probe_timeout).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(%e, "metrics connection ended with an error");
        },
        _ = shed => tracing::debug!("metrics connection shed: too many open connections"),
    }
}

/// When accepting fails for lack of resources (descriptors, memory, buffers) the listener stays
/// readable, so trying again at once would spin: wait, doubling from 10 ms to 1 s, and say so
/// once per streak. Errors that concern only the one connection are retried at once.
#[derive(Debug, Default)]
struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn after(&mut self, e: &std::io::Error) -> Option<Duration> {
        let per_connection = matches!(
            e.raw_os_error(),
            Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EINTR | libc::EPROTO | libc::EPERM)
        );
        if per_connection {
            tracing::debug!(%e, "metrics accept failed for one connection");
            return None;
        }
        let delay = self.next.unwrap_or(Self::FIRST);
        if self.next.is_none() {
            tracing::warn!(%e, "metrics endpoint cannot accept connections; backing off");
        }
        self.next = Some((delay * 2).min(Self::MAX));
        Some(delay)
    }

    fn reset(&mut self) {
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Probes whose liveness is set by the test: `None` never answers.
    #[derive(Clone)]
    struct Fake(Option<Result<(), String>>);

    impl Probes for Fake {
        async fn live(&self) -> Result<(), String> {
            match &self.0 {
                Some(r) => r.clone(),
                None => std::future::pending().await,
            }
        }
        fn ready(&self) -> Result<(), String> {
            Err("first resync pending".into())
        }
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
    }

    async fn start(probes: Fake, config: HttpConfig) -> SocketAddr {
        serve_with("127.0.0.1:0".parse().unwrap(), probes, config).await.unwrap()
    }

    /// One request on its own connection: (status code, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_do_not_starve_metrics_and_are_closed_after_the_header_timeout() {
        let config = HttpConfig { header_timeout: Duration::from_millis(1500), ..HttpConfig::default() };
        let addr = start(Fake(Some(Ok(()))), config).await;
        let opened = Instant::now();
        let mut idle = Vec::new();
        for i in 0..300 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            if i % 2 == 0 {
                // Half of them start a request and never finish its headers (slowloris).
                s.write_all(b"GET /metr").await.unwrap();
            }
            idle.push(s);
        }
        let scrape = tokio::time::timeout(Duration::from_secs(5), get(addr, "/metrics")).await;
        assert_eq!(scrape.expect("/metrics answered while 300 connections idle"), (200, "# EOF\n".into()));
        let mut last_close = Duration::ZERO;
        for mut s in idle {
            let mut buf = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
            // Closed by the server: end of stream, or a reset; a slowloris may get a 408 first.
            match r.expect("the server closes every idle connection") {
                Ok(0) | Err(_) => {}
                Ok(_) => {
                    let rest = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut Vec::new())).await;
                    assert!(rest.is_ok(), "closed after its answer");
                }
            }
            last_close = last_close.max(opened.elapsed());
        }
        // The connections still held (the newest, up to the cap) were closed by the timeout.
        assert!(last_close >= config.header_timeout, "closed after {last_close:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_cap_the_oldest_connections_are_shed() {
        let config =
            HttpConfig { header_timeout: Duration::from_secs(60), max_connections: 16, ..HttpConfig::default() };
        let addr = start(Fake(Some(Ok(()))), config).await;
        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Accepted in order after the 100: the scrape sheds one more.
        assert_eq!(get(addr, "/metrics").await.0, 200);
        let newest = idle.split_off(100 - 15);
        for mut s in idle {
            let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut [0u8; 8])).await;
            assert!(matches!(r, Ok(Ok(0) | Err(_))), "an old connection was shed: {r:?}");
        }
        for s in &newest {
            let r = s.try_read(&mut [0u8; 8]);
            assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "still open: {r:?}");
        }
    }

    #[tokio::test]
    async fn healthz_fails_when_the_liveness_check_fails_or_does_not_answer() {
        let config = HttpConfig { probe_timeout: Duration::from_millis(200), ..HttpConfig::default() };
        let ok = start(Fake(Some(Ok(()))), config).await;
        assert_eq!(get(ok, "/healthz").await, (200, "ok\n".into()));
        let failing = start(Fake(Some(Err("the engine loop does not answer".into()))), config).await;
        assert_eq!(get(failing, "/healthz").await, (503, "not live: the engine loop does not answer\n".into()));
        let stuck = start(Fake(None), config).await;
        assert_eq!(
            get(stuck, "/healthz").await,
            (503, "not live: the liveness check did not finish within 200ms\n".into())
        );
        assert_eq!(get(ok, "/readyz").await, (503, "not ready: first resync pending\n".into()));
        assert_eq!(get(ok, "/nope").await.0, 404);
    }

    #[test]
    fn accept_errors_for_lack_of_resources_back_off_and_per_connection_ones_do_not() {
        let mut b = AcceptBackoff::default();
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let delays: Vec<Duration> = (0..9).filter_map(|_| b.after(&emfile)).collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(b.after(&std::io::Error::from_raw_os_error(libc::ECONNABORTED)), None);
        b.reset();
        assert_eq!(b.after(&emfile), Some(Duration::from_millis(10)));
    }
}
