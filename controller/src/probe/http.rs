//! The HTTP probe's GET through hyper's client (2xx and 3xx pass): the engine's
//! [`HttpGet`] backend, wired in by the front ends (`service.rs`). Timeouts are the caller's;
//! this only classifies what happened.

use std::net::SocketAddr;

use futures_util::future::BoxFuture;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{header, Request};
use hyper_util::rt::TokioIo;
use virtwarden_core::probe::connect::connect;
use virtwarden_core::probe::HttpGet;

use crate::plan::health::ProbeFailure;

/// HTTP probes through hyper.
#[derive(Debug, Clone, Copy, Default)]
pub struct HyperGet;

impl HttpGet for HyperGet {
    fn get<'a>(&'a self, addr: SocketAddr, path: &'a str) -> BoxFuture<'a, Result<(), ProbeFailure>> {
        Box::pin(http_get(addr, path))
    }
}

/// `GET path` on `addr`; passes on a 2xx or 3xx status (redirects are not followed).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(), ProbeFailure> {
    let stream = connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let http_err = |e: hyper::Error| ProbeFailure::Http(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http_err)?;
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, concat!("virtwarden-probe/", env!("CARGO_PKG_VERSION")))
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeFailure::Http(e.to_string()))?;
    // The connection future does the I/O and may finish (the server closed) in the same poll
    // that delivered the answer: then the answer is still waiting in `send`.
    let mut conn = std::pin::pin!(conn);
    let mut send = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        biased;
        r = &mut send => r,
        c = &mut conn => match c {
            Err(e) => return Err(http_err(e)),
            Ok(()) => send.await,
        },
    }
    .map_err(http_err)?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(ProbeFailure::HttpStatus(status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

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

    #[tokio::test]
    async fn http_2xx_and_3xx_pass_5xx_fails_with_the_status() {
        let server = http_server().await;
        let get = HyperGet;
        assert_eq!(get.get(server, "/healthz").await, Ok(()));
        assert_eq!(get.get(server, "/moved").await, Ok(()));
        assert_eq!(get.get(server, "/other").await, Err(ProbeFailure::HttpStatus(503)));
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert_eq!(HyperGet.get(closed, "/").await, Err(ProbeFailure::Refused));
    }

    #[tokio::test]
    async fn a_server_that_accepts_and_never_answers_is_still_waited_for() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted by the kernel's backlog, never read or answered: the caller's timeout ends it.
        let r = tokio::time::timeout(Duration::from_millis(200), HyperGet.get(addr, "/")).await;
        assert!(r.is_err(), "{r:?}");
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
        let r = HyperGet.get(addr, "/").await;
        assert!(matches!(r, Err(ProbeFailure::Http(_))), "{r:?}");
    }
}
