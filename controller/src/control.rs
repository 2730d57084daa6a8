//! The control socket `<state-dir>/control.sock` (owner-only): how `virtwarden release NAME`
//! `virtwarden memory confirm` and `virtwarden reload` (systemd's `ExecReload=`) reach a running service. One JSON request
//! per line, one JSON answer per line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::engine::EngineHandle;

/// Name of the socket inside the state directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// What a client asks: `{"release":"vm1"}`, `"confirmMemory"` or `"reload"`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Request {
    /// Lift the quarantine of this domain.
    Release(String),
    /// End the "memory lost" mode (`virtwarden memory confirm`).
    ConfirmMemory,
    /// Read the policy files again and answer with the verdict.
    Reload,
}

/// A reload asked through the socket: the service answers with what the policies now are
/// (`Ok`) or why the files were rejected and the last good policy kept (`Err`).
pub type ReloadReply = oneshot::Sender<Result<String, String>>;

/// What the service answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub message: String,
}

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

/// Serve the control socket until the process ends. An old socket file is replaced. Reload
/// requests go to `reloads`; without it (the operator, whose policies come from the API
/// server) they are refused.
pub fn serve(
    state_dir: &Path,
    engine: EngineHandle,
    reloads: Option<mpsc::UnboundedSender<ReloadReply>>,
) -> std::io::Result<PathBuf> {
    let path = state_dir.join(CONTROL_SOCKET);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let engine = engine.clone();
                    let reloads = reloads.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, engine, reloads).await {
                            tracing::debug!(%e, "control connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(%e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    Ok(path)
}

async fn handle(
    stream: UnixStream,
    engine: EngineHandle,
    reloads: Option<mpsc::UnboundedSender<ReloadReply>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let answer = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Release(domain)) => {
            tracing::info!(domain = %domain, "release requested");
            match engine.release(&domain).await {
                Ok(message) => Answer { ok: true, message },
                Err(message) => Answer { ok: false, message },
            }
        }
        Ok(Request::ConfirmMemory) => {
            tracing::info!("memory confirmation requested");
            Answer { ok: true, message: engine.confirm_memory().await }
        }
        Ok(Request::Reload) => match reload(reloads).await {
            Ok(message) => Answer { ok: true, message },
            Err(message) => Answer { ok: false, message },
        },
        Err(e) => Answer { ok: false, message: format!("bad request: {e}") },
    };
    let mut text = serde_json::to_string(&answer).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

async fn reload(reloads: Option<mpsc::UnboundedSender<ReloadReply>>) -> Result<String, String> {
    let Some(reloads) = reloads else {
        return Err("this service takes no policy files (the operator reads HostPolicy resources)".into());
    };
    let (reply, verdict) = oneshot::channel();
    if reloads.send(reply).is_err() {
        return Err("the service is stopping".into());
    }
    verdict.await.unwrap_or_else(|_| Err("the service is stopping".into()))
}

/// Ask a running service to release `domain`. `Ok(None)` when no service listens there.
pub fn request_release(state_dir: &Path, domain: &str) -> std::io::Result<Option<Answer>> {
    request(state_dir, &Request::Release(domain.to_string()))
}

/// Ask a running service to end its "memory lost" mode. `Ok(None)` when no service listens.
pub fn request_confirm_memory(state_dir: &Path) -> std::io::Result<Option<Answer>> {
    request(state_dir, &Request::ConfirmMemory)
}

/// Ask a running service to reload its policy files and wait for its verdict. `Ok(None)` when
/// no service listens there.
pub fn request_reload(state_dir: &Path) -> std::io::Result<Option<Answer>> {
    request(state_dir, &Request::Reload)
}

fn request(state_dir: &Path, request: &Request) -> std::io::Result<Option<Answer>> {
    use std::io::{BufRead, Write};
    let path = state_dir.join(CONTROL_SOCKET);
    let stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    // A reload reads and checks every policy file; a release waits for the engine's loop.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut text = serde_json::to_string(request).map_err(std::io::Error::other)?;
    text.push('\n');
    (&stream).write_all(text.as_bytes())?;
    let mut line = String::new();
    std::io::BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(line.trim()).map(Some).map_err(std::io::Error::other)
}
