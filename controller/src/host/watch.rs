//! Watching policy files and directories. Editors replace files by renaming, so the parent
//! directory is watched; bursts of changes are debounced into one reload. (Not
//! notify-debouncer-mini: it debounces every inotify event, and notify watches IN_OPEN, so our
//! own reading of the files on reload would trigger the next reload, forever. Filtering the
//! event kinds first needs the few lines below.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time after the last change before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Keeps the watcher alive.
pub struct PolicyWatcher {
    _watcher: RecommendedWatcher,
}

/// Calls `on_change` (debounced) whenever something under `paths` that could be a policy changes.
pub fn watch(paths: &[PathBuf], on_change: mpsc::UnboundedSender<()>) -> notify::Result<PolicyWatcher> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let wanted: Vec<PathBuf> = paths.iter().map(|p| absolute(p)).collect();
    let filter = wanted.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            // Reading the files (our own reload) produces access events: only changes count.
            let change = matches!(
                event.kind,
                notify::EventKind::Create(_) | notify::EventKind::Modify(_) | notify::EventKind::Remove(_)
            );
            if change && event.paths.iter().any(|p| relevant(p, &filter)) {
                let _ = raw_tx.send(());
            }
        }
    })?;
    for p in &wanted {
        let dir = if p.is_dir() {
            p.clone()
        } else {
            p.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"))
        };
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Debounce: wait until no change arrived for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if on_change.send(()).is_err() {
                return;
            }
        }
    });
    Ok(PolicyWatcher { _watcher: watcher })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A change matters if it is a watched file, or a YAML file inside a watched directory.
fn relevant(changed: &Path, wanted: &[PathBuf]) -> bool {
    wanted.iter().any(|w| {
        if changed == w {
            return true;
        }
        let in_dir = changed.parent() == Some(w.as_path());
        let yaml = changed.extension().is_some_and(|e| e == "yaml" || e == "yml");
        in_dir && yaml
    })
}
