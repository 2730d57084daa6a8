//! Writes the status file whenever the status changed, at most every 50 ms, atomically and
//! readable by its owner only, on a thread of its own (`Shared::status_io`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::shared::Shared;
use super::status;

pub(super) async fn run(shared: Arc<Shared>, path: PathBuf) {
    let p = path.clone();
    let left = shared.status_io.spawn(move || crate::fsutil::remove_leftover_temps(&p)).finish().await;
    for f in left.unwrap_or_default() {
        tracing::info!(file = %f.display(), "removed the temporary file of an interrupted status write");
    }
    let mut rx = shared.status_version.subscribe();
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let report = shared.report();
        let p = path.clone();
        // Its own thread: a hung libvirt call or path check never delays it.
        match shared.status_io.spawn(move || status::write_atomically(&p, &report)).finish().await {
            Ok(Err(e)) => tracing::warn!(%e, "status write failed"),
            Err(e) => tracing::warn!(%e, "status write task failed"),
            Ok(Ok(())) => {}
        }
    }
}
