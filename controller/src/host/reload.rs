//! Reloading the policy files: one reload per change, whoever notices it first (the file watch,
//! SIGHUP, or `virtwarden reload` through the control socket). The files' fingerprint (content,
//! owner and mode of every file, of the directories and their ancestors) is taken before each
//! load; a trigger that finds the fingerprint of the last load changes nothing.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Local};
use tokio::sync::watch;
use virtwarden_policies::{load_paths_with, DesiredState, TrustMode, TrustedOwners};

use crate::engine::EngineHandle;

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The policy files changed (debounced watch).
    Watch,
    /// SIGHUP.
    Signal,
    /// `virtwarden reload` (systemd's `ExecReload=`): waits for the verdict.
    Request,
}

/// The last reload's result, for systemd's STATUS= line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LastReload {
    pub at: Option<DateTime<Local>>,
    /// `Err` holds the first line of the rejection.
    pub result: Option<Result<(), String>>,
}

impl LastReload {
    /// `last reload OK at 10:02:03` or `reload FAILED at 10:02:03 (…); last good policy in force`.
    pub fn describe(&self) -> Option<String> {
        let at = self.at.map(|t| t.format("%H:%M:%S").to_string()).unwrap_or_default();
        match self.result.as_ref()? {
            Ok(()) => Some(format!("last reload OK at {at}")),
            Err(why) => Some(format!("reload FAILED at {at} ({why}); last good policy in force")),
        }
    }
}

/// Loads the policy files and remembers what it loaded last.
pub struct Reloader {
    paths: Vec<PathBuf>,
    /// The fingerprint the last load read (`None`: it could not be taken) and its verdict.
    last: Option<(Option<u64>, Result<String, String>)>,
    outcome: watch::Sender<LastReload>,
}

impl Reloader {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Reloader { paths, last: None, outcome: watch::Sender::new(LastReload::default()) }
    }

    pub fn subscribe(&self) -> watch::Receiver<LastReload> {
        self.outcome.subscribe()
    }

    /// The load at start; its error text is the located report.
    pub async fn load_at_start(&mut self) -> Result<DesiredState, String> {
        let fp = fingerprint_blocking(self.paths.clone()).await;
        let loaded = load_blocking(self.paths.clone()).await;
        if let Ok(d) = &loaded {
            self.last = Some((fp, Ok(summary(d))));
        }
        loaded
    }

    /// Reload unless the files are the ones loaded last. `Ok` says what is in force, `Err` why
    /// the files were rejected (the last good policy stays). An explicit reload (signal,
    /// request) of files rejected last time checks them again: a fixed owner above them does
    /// not show in the files themselves.
    pub async fn reload(&mut self, engine: &EngineHandle, trigger: Trigger) -> Result<String, String> {
        let fp = fingerprint_blocking(self.paths.clone()).await;
        if let (Some(fp), Some((Some(last_fp), verdict))) = (fp, &self.last) {
            if fp == *last_fp && (trigger == Trigger::Watch || verdict.is_ok()) {
                if trigger == Trigger::Watch {
                    tracing::info!(
                        "policy files unchanged since the last load (already reloaded); not reloading again"
                    );
                } else {
                    tracing::info!(?trigger, "policy files unchanged since the last load; resyncing only");
                    engine.resync();
                }
                return verdict.clone();
            }
        }
        if trigger == Trigger::Watch {
            tracing::info!("policy files changed: reloading");
        }
        let verdict = match load_blocking(self.paths.clone()).await {
            Ok(desired) => {
                let text = summary(&desired);
                tracing::info!(policies = ?desired.policies, domains = desired.domains.len(), "policies reloaded");
                engine.reload(desired);
                self.outcome.send_replace(LastReload { at: Some(Local::now()), result: Some(Ok(())) });
                Ok(text)
            }
            Err(text) => {
                for line in text.lines().filter(|l| !l.starts_with(' ')) {
                    tracing::error!(error = %line, "policy reload rejected; the last good policy stays in force");
                }
                let first = text.lines().next().unwrap_or_default().to_string();
                self.outcome.send_replace(LastReload { at: Some(Local::now()), result: Some(Err(first)) });
                engine.policy_rejected(text.clone());
                engine.resync();
                Err(text)
            }
        };
        self.last = Some((fp, verdict.clone()));
        verdict
    }
}

fn summary(d: &DesiredState) -> String {
    if d.policies.is_empty() {
        "no policy loaded (nothing managed)".into()
    } else {
        format!("policies in force: {} ({} domains)", d.policies.join(", "), d.domains.len())
    }
}

async fn load_blocking(paths: Vec<PathBuf>) -> Result<DesiredState, String> {
    // Policy files are checked like sshd's StrictModes on every load: at start a violation exits 2,
    // on a reload the last good policy stays.
    match tokio::task::spawn_blocking(move || {
        load_paths_with(&paths, TrustMode::Enforce(TrustedOwners::of_this_process()))
    })
    .await
    {
        Ok(Ok(loaded)) => Ok(loaded.desired),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("policy loading failed: {e}")),
    }
}

async fn fingerprint_blocking(paths: Vec<PathBuf>) -> Option<u64> {
    tokio::task::spawn_blocking(move || fingerprint(&paths)).await.ok().flatten()
}

/// Content, owner and mode of every file directly in the given directories (and of given files),
/// and owner and mode of the directories and their ancestors. `None` when something cannot be
/// read (then every trigger reloads, and the load reports the problem).
pub fn fingerprint(paths: &[PathBuf]) -> Option<u64> {
    let mut h = DefaultHasher::new();
    for path in paths {
        path.hash(&mut h);
        for ancestor in path.ancestors().skip(1) {
            meta_hash(ancestor, &mut h)?;
        }
        let meta = std::fs::metadata(path).ok()?;
        if meta.is_dir() {
            meta_hash(path, &mut h)?;
            let mut entries: Vec<PathBuf> =
                std::fs::read_dir(path).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
            entries.sort();
            for entry in entries {
                file_hash(&entry, &mut h)?;
            }
        } else {
            file_hash(path, &mut h)?;
        }
    }
    Some(h.finish())
}

fn meta_hash(path: &Path, h: &mut DefaultHasher) -> Option<()> {
    let m = std::fs::metadata(path).ok()?;
    (m.uid(), m.gid(), m.mode()).hash(h);
    Some(())
}

fn file_hash(path: &Path, h: &mut DefaultHasher) -> Option<()> {
    path.hash(h);
    let m = std::fs::metadata(path).ok()?;
    (m.uid(), m.gid(), m.mode(), m.len()).hash(h);
    if m.is_file() {
        std::fs::read(path).ok()?.hash(h);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_fingerprint_changes_with_content_mode_and_new_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vec![dir.path().to_path_buf()];
        let empty = fingerprint(&paths).unwrap();
        assert_eq!(fingerprint(&paths), Some(empty), "reading changes nothing");
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "x: 1\n").unwrap();
        let one = fingerprint(&paths).unwrap();
        assert_ne!(one, empty);
        std::fs::write(&file, "x: 2\n").unwrap();
        let two = fingerprint(&paths).unwrap();
        assert_ne!(two, one);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_ne!(fingerprint(&paths).unwrap(), two, "a mode change can make a file untrusted");
    }
}
