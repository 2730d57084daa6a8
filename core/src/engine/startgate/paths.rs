//! Whether the paths that waiting starts require (`requires.paths`) exist: checked on a pool of
//! their own ([`CHECK_THREADS`] at work, at most [`MAX_HUNG_CHECKS`] hung) with a deadline, at
//! most one check per path at a time (a path whose check hangs is not checked again until it
//! returns), so a hung NFS mount stalls neither the gate nor anything else; again every 500 ms while
//! a start waits for them, and at once when the mount table changes. Why poll at all: mounting
//! on a mount point makes no inotify event in its parent directory, and a file appearing on a
//! network filesystem makes none anywhere; `/proc/self/mountinfo` (pollable for POLLPRI) tells
//! of mounts at once, the poll covers the rest.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use crate::blocking::Pool;

/// How often watched paths are checked again.
pub(super) const POLL: Duration = Duration::from_millis(500);
/// A check that takes longer says "not answering" (and is not started again until it returns).
pub(super) const CHECK_DEADLINE: Duration = Duration::from_secs(2);
/// Threads checking paths at once.
pub(crate) const CHECK_THREADS: usize = 4;
/// Threads of hung checks that are replaced (one per path at most); beyond this, checks of
/// other paths queue until a hung one returns.
pub(crate) const MAX_HUNG_CHECKS: usize = 64;

/// What the last check of a path found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    Exists,
    Missing,
    /// The check has not returned within its deadline (storage hung).
    NotAnswering,
}

/// A check's report: the path, what was found, whether the check has finished.
type Report = (String, Found, bool);

pub(super) struct PathWatch {
    watched: BTreeSet<String>,
    found: HashMap<String, Found>,
    /// Checks in flight (at most one per path).
    checking: HashSet<String>,
    tx: UnboundedSender<Report>,
    rx: UnboundedReceiver<Report>,
    mounts: Option<AsyncFd<std::fs::File>>,
    next_poll: Instant,
    pool: Pool,
}

impl PathWatch {
    pub(super) fn new() -> Self {
        let (tx, rx) = unbounded_channel();
        PathWatch {
            watched: BTreeSet::new(),
            found: HashMap::new(),
            checking: HashSet::new(),
            tx,
            rx,
            mounts: open_mount_table(),
            next_poll: Instant::now(),
            pool: Pool::new("paths", CHECK_THREADS, MAX_HUNG_CHECKS),
        }
    }

    /// Watch exactly `paths`. A newly watched path is checked now and counts as missing until
    /// the check says otherwise.
    pub(super) fn set(&mut self, paths: BTreeSet<String>) {
        if paths == self.watched {
            return;
        }
        self.found.retain(|p, _| paths.contains(p));
        let new: Vec<String> = paths.iter().filter(|p| !self.watched.contains(*p)).cloned().collect();
        if self.watched.is_empty() {
            self.next_poll = Instant::now() + POLL;
        }
        self.watched = paths;
        for p in new {
            self.check(p);
        }
    }

    /// What the last check of a watched path found (`None`: not checked yet).
    pub(super) fn found(&self, path: &str) -> Option<Found> {
        self.found.get(path).copied()
    }

    /// How many watched paths have a check that does not return.
    pub(super) fn not_answering(&self) -> usize {
        self.watched.iter().filter(|p| self.found(p) == Some(Found::NotAnswering)).count()
    }

    /// The watched paths not known to exist.
    pub(super) fn missing(&self) -> HashSet<String> {
        self.watched.iter().filter(|p| self.found(p) != Some(Found::Exists)).cloned().collect()
    }

    /// Wait until what is known about a watched path may have changed; true when it did.
    /// Never returns while nothing is watched. Cancel-safe: state changes only after a wait.
    pub(super) async fn changed(&mut self) -> bool {
        if self.watched.is_empty() && self.checking.is_empty() {
            std::future::pending::<()>().await;
        }
        let watching = !self.watched.is_empty();
        let (mounts, next_poll, rx) = (&self.mounts, self.next_poll, &mut self.rx);
        let mount_change = async {
            match mounts {
                Some(fd) if watching => match fd.ready(Interest::PRIORITY).await {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(_) => std::future::pending().await,
                },
                _ => std::future::pending().await,
            }
        };
        let poll = async {
            if watching {
                tokio::time::sleep_until(next_poll).await
            } else {
                std::future::pending().await
            }
        };
        enum Woke {
            Report(Report),
            Mounts,
            Poll,
        }
        let woke = tokio::select! {
            Some(r) = rx.recv() => Woke::Report(r),
            _ = mount_change => Woke::Mounts,
            _ = poll => Woke::Poll,
        };
        match woke {
            Woke::Report((path, found, done)) => {
                if done {
                    self.checking.remove(&path);
                }
                if !self.watched.contains(&path) {
                    return false;
                }
                if found == Found::NotAnswering {
                    tracing::warn!(%path, deadline = ?CHECK_DEADLINE, "checking a required path does not return (storage hung?)");
                }
                self.found.insert(path, found) != Some(found)
            }
            Woke::Mounts => {
                tracing::debug!("mount table changed: checking required paths");
                self.check_all();
                false
            }
            Woke::Poll => {
                self.next_poll = Instant::now() + POLL;
                self.check_all();
                false
            }
        }
    }

    fn check_all(&mut self) {
        let paths: Vec<String> = self.watched.iter().filter(|p| !self.checking.contains(*p)).cloned().collect();
        for p in paths {
            self.check(p);
        }
    }

    /// Check `path` on the paths pool; report "not answering" at the deadline and the answer
    /// whenever it comes. A path already being checked is not checked twice.
    fn check(&mut self, path: String) {
        if !self.checking.insert(path.clone()) {
            return;
        }
        let tx = self.tx.clone();
        let p = path.clone();
        let mut call = self.pool.spawn(move || crate::observe::paths::exists(&p));
        tokio::spawn(async move {
            let exists = match call.within(CHECK_DEADLINE).await {
                Some(r) => r.unwrap_or(false),
                None => {
                    let _ = tx.send((path.clone(), Found::NotAnswering, false));
                    call.finish().await.unwrap_or(false)
                }
            };
            let _ = tx.send((path, if exists { Found::Exists } else { Found::Missing }, true));
        });
    }
}

/// `/proc/self/mountinfo`, registered for POLLPRI (the kernel flags it on every mount and
/// unmount in this mount namespace). `None` when it cannot be watched: the poll still works.
fn open_mount_table() -> Option<AsyncFd<std::fs::File>> {
    let file = match std::fs::File::open("/proc/self/mountinfo") {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(%e, "cannot open /proc/self/mountinfo; required paths are polled only");
            return None;
        }
    };
    // SAFETY: the File keeps its descriptor open, unchanged, for as long as the AsyncFd owns it.
    match unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) } {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::debug!(%e, "cannot watch the mount table; required paths are polled only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until_found(w: &mut PathWatch, path: &str, want: Found) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while w.found(path) != Some(want) {
                w.changed().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{path} never found {want:?}"));
    }

    #[tokio::test]
    async fn a_watched_path_is_missing_until_checked_and_found_once_created() {
        let dir = tempfile::tempdir().unwrap();
        let there = dir.path().join("there").display().to_string();
        let later = dir.path().join("later").display().to_string();
        std::fs::write(&there, b"").unwrap();
        let mut w = PathWatch::new();
        w.set([there.clone(), later.clone()].into());
        assert_eq!(w.missing(), HashSet::from([there.clone(), later.clone()]), "unchecked counts as missing");
        until_found(&mut w, &there, Found::Exists).await;
        until_found(&mut w, &later, Found::Missing).await;
        assert_eq!(w.missing(), HashSet::from([later.clone()]));
        // Created while watched: the poll finds it.
        std::fs::write(&later, b"").unwrap();
        until_found(&mut w, &later, Found::Exists).await;
        assert!(w.missing().is_empty());
        // No longer watched: forgotten.
        w.set(BTreeSet::new());
        assert_eq!(w.found(&there), None);
    }
}
