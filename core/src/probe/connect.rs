//! The TCP side of the network probes: a TCP connect probe, and the connection an HTTP probe
//! (a backend: [`super::HttpGet`]) talks over. Timeouts are the caller's; these only classify
//! what happened.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::plan::health::ProbeFailure;

/// Connect to `addr`; the connection is closed again at once.
pub async fn tcp_connect(addr: SocketAddr) -> Result<(), ProbeFailure> {
    connect(addr).await.map(drop)
}

/// A probe connection. It is closed with a reset, as health checkers do: no FIN exchange and no
/// TIME_WAIT socket left on the host for every probe (1,000 guests every 10 s would keep 6,000).
pub async fn connect(addr: SocketAddr) -> Result<TcpStream, ProbeFailure> {
    let stream = TcpStream::connect(addr).await.map_err(connect_failure)?;
    let _ = stream.set_zero_linger();
    Ok(stream)
}

fn connect_failure(e: std::io::Error) -> ProbeFailure {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => ProbeFailure::Refused,
        _ => ProbeFailure::Network(e.to_string()),
    }
}
