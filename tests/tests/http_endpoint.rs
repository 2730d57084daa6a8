//! The metrics/health endpoint in front of a real engine on libvirt's test driver: `/healthz`
//! follows the engine loop's liveness, `/readyz` its readiness.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use virtwarden::act::remediation::Registry;
use virtwarden::engine::{Engine, EngineConfig};
use virtwarden::libvirt::connect::SharedConnector;
use virtwarden::libvirt::events::start_event_loop;
use virtwarden::libvirt::LibvirtHost;
use virtwarden_tests::testbed_uri;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_once_the_engine_no_longer_answers() {
    start_event_loop();
    let host = Arc::new(LibvirtHost::open(&testbed_uri()).unwrap());
    let config = EngineConfig { resync: Duration::from_secs(3600), ..Default::default() };
    let (engine, task) =
        Engine::spawn(Arc::new(SharedConnector { host }), Default::default(), config, Registry::with_builtins());
    let addr = virtwarden::http::serve("127.0.0.1:0".parse().unwrap(), engine.clone()).await.unwrap();
    assert!(engine.wait_for(Duration::from_secs(10), |_| engine.is_ready()).await.is_some());
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
    let (code, metrics) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("virtwarden_connected 1"), "{metrics}");
    assert!(metrics.contains("virtwarden_ready 1"), "{metrics}");

    engine.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    assert_eq!(get(addr, "/healthz").await, (503, "not live: the engine loop does not answer\n".into()));
}
