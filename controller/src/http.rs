//! The metrics endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`. Loopback by default.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::engine::EngineHandle;

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(engine: &EngineHandle, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", engine.metrics_text())
        }
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if engine.is_ready() && engine.is_connected() => {
            respond(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: not connected or first resync pending\n".into(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Bind and serve until the process ends; returns the bound address.
pub async fn serve(addr: SocketAddr, engine: EngineHandle) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%e, "metrics accept failed");
                    continue;
                }
            };
            let engine = engine.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let r = route(&engine, &req);
                    async move { Ok::<_, Infallible>(r) }
                });
                if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                    tracing::debug!(%e, "metrics connection ended with an error");
                }
            });
        }
    });
    Ok(bound)
}
