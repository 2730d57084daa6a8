//! The memory file `<data-dir>/memory.json`: loaded at start, written atomically (temp file +
//! fsync + rename) by one writer task that batches concurrent updates (group commit), so a mass
//! crash costs one fsync per batch, not one per domain. A corrupt file is set aside and
//! reported, never a crash and never silently empty.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::model::{Memory, FORMAT};
use crate::fsutil::{ensure_private_dir, write_atomically};

/// The file inside the data directory.
pub const MEMORY_FILE: &str = "memory.json";
/// Written next to it once it has been written: a memory file missing beside this marker was
/// lost (deleted), not never written.
pub const MEMORY_MARKER: &str = "memory.json.written";

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create data directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot read {}: {source}; starting without remembered state", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is not valid ({source}); set aside as {}, starting without remembered state", path.display(), aside.display())]
    Corrupt { path: PathBuf, aside: PathBuf, source: serde_json::Error },
    #[error("{} is not valid ({source}) and could not be set aside ({rename}); starting without remembered state", path.display())]
    CorruptKept { path: PathBuf, source: serde_json::Error, rename: std::io::Error },
    #[error("{} has format {found}, this virtwarden reads format {FORMAT}; set aside as {}", path.display(), aside.display())]
    Format { path: PathBuf, found: u32, aside: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

struct Inner {
    memory: Memory,
    version: u64,
}

/// The durable memory of one engine.
pub struct MemoryStore {
    /// `None`: kept in memory only (tests, or no data directory).
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
    written: watch::Sender<u64>,
    wake: Notify,
    problem: Mutex<Option<String>>,
    /// The writer's own thread: never behind libvirt calls or path checks.
    io: crate::blocking::Pool,
}

impl MemoryStore {
    /// Memory that is never written anywhere.
    pub fn in_memory() -> Self {
        Self::with(None, Memory::empty())
    }

    fn with(path: Option<PathBuf>, memory: Memory) -> Self {
        MemoryStore {
            path,
            inner: Mutex::new(Inner { memory, version: 0 }),
            written: watch::channel(0).0,
            wake: Notify::new(),
            problem: Mutex::new(None),
            io: crate::blocking::Pool::new("memory", 1, 0),
        }
    }

    /// Open the memory in `dir` (created 0700 if missing). A file that cannot be read or parsed
    /// is reported in the second value and, when corrupt, renamed aside; the store then starts
    /// empty. Only a directory that cannot be created is an error.
    ///
    /// A memory that was lost — corrupt, unreadable, of another format, or missing beside its
    /// [`MEMORY_MARKER`] — is recorded as lost in the new one ([`Memory::lost`]). Temporary
    /// files of interrupted writes are removed.
    pub fn open(dir: &Path) -> Result<(Self, Option<MemoryError>), MemoryError> {
        ensure_private_dir(dir).map_err(|source| MemoryError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join(MEMORY_FILE);
        for left in crate::fsutil::remove_leftover_temps(&path) {
            tracing::info!(file = %left.display(), "removed the temporary file of an interrupted memory write");
        }
        let deleted = !path.exists() && dir.join(MEMORY_MARKER).exists();
        let (mut memory, problem) = load(&path, true);
        let why = match &problem {
            Some(p) => Some(p.to_string()),
            None if deleted => {
                Some(format!("{} is missing although it had been written ({MEMORY_MARKER} is there)", path.display()))
            }
            None => None,
        };
        if let Some(why) = why {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            tracing::error!(%why, "virtwarden's memory is lost: domains that are down stay down until it is rebuilt or `virtwarden memory confirm`");
            memory.lost = Some(crate::memory::MemoryLoss { why, at: now, rebuilt: Default::default() });
        }
        let store = Self::with(Some(path), memory);
        if let Some(p) = &problem {
            *store.problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.to_string());
        }
        Ok((store, problem))
    }

    /// Read the memory in `dir` without changing anything (one-shot commands).
    pub fn read_only(dir: &Path) -> (Memory, Option<MemoryError>) {
        load(&dir.join(MEMORY_FILE), false)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A copy of everything remembered.
    pub fn snapshot(&self) -> Memory {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).memory.clone()
    }

    /// Read something under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&Memory) -> R) -> R {
        f(&self.inner.lock().unwrap_or_else(|e| e.into_inner()).memory)
    }

    /// Change the memory; returns `f`'s result and the version to [`flush`](Self::flush) for.
    pub fn update<R>(&self, f: impl FnOnce(&mut Memory) -> R) -> (R, u64) {
        let (r, v) = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let r = f(&mut inner.memory);
            inner.version += 1;
            (r, inner.version)
        };
        self.wake.notify_one();
        (r, v)
    }

    /// Wait until `version` is on disk, at most `timeout`. False when it is not (the write
    /// failed or is slow); callers go on and the problem is reported in status.
    pub async fn flush(&self, version: u64, timeout: Duration) -> bool {
        if self.path.is_none() {
            return true;
        }
        let mut rx = self.written.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|w| *w >= version)).await.is_ok_and(|r| r.is_ok())
    }

    /// Record a problem for status (e.g. the data directory is unusable).
    pub fn report_problem(&self, text: String) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
    }

    /// The writer's thread (a write that never returns shows in its stats).
    pub fn io_stats(&self) -> crate::blocking::PoolStats {
        self.io.stats()
    }

    /// The last load or write problem, if it has not been resolved by a later write.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Write the current memory now (blocking). Returns the version written.
    pub fn write_now(&self) -> Result<u64, MemoryError> {
        let Some(path) = &self.path else {
            return Ok(self.inner.lock().unwrap_or_else(|e| e.into_inner()).version);
        };
        let (bytes, version) = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let bytes = serde_json::to_vec_pretty(&inner.memory)
                .map_err(|e| MemoryError::Write { path: path.clone(), source: std::io::Error::other(e) })?;
            (bytes, inner.version)
        };
        match write_atomically(path, &bytes) {
            Ok(()) => {
                if let Some(marker) = path.parent().map(|d| d.join(MEMORY_MARKER)).filter(|m| !m.exists()) {
                    if let Err(e) = std::fs::write(&marker, b"") {
                        tracing::warn!(%e, marker = %marker.display(), "cannot mark the memory as written");
                    }
                }
                let mut problem = self.problem.lock().unwrap_or_else(|e| e.into_inner());
                if problem.as_deref().is_some_and(|p| p.starts_with("cannot write")) {
                    *problem = None;
                }
                drop(problem);
                self.written.send_modify(|w| *w = (*w).max(version));
                Ok(version)
            }
            Err(source) => {
                let e = MemoryError::Write { path: path.clone(), source };
                *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// The writer: whenever the memory changed, write it (batching what changed meanwhile).
    /// Failed writes are retried with backoff and reported; healing does not wait for them.
    pub async fn run_writer(self: std::sync::Arc<Self>) {
        if self.path.is_none() {
            return;
        }
        let mut retry = Duration::from_millis(100);
        loop {
            let pending = {
                let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                inner.version > *self.written.borrow()
            };
            if !pending {
                self.wake.notified().await;
                continue;
            }
            let me = self.clone();
            match self.io.spawn(move || me.write_now()).finish().await {
                Ok(Ok(_)) => retry = Duration::from_millis(100),
                Ok(Err(e)) => {
                    tracing::error!(%e, retry_in = ?retry, "cannot persist virtwarden's memory");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(10));
                }
                Err(e) => tracing::error!(%e, "memory writer task failed"),
            }
        }
    }
}

fn load(path: &Path, set_aside: bool) -> (Memory, Option<MemoryError>) {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Memory::empty(), None),
        Err(source) => return (Memory::empty(), Some(MemoryError::Read { path: path.to_path_buf(), source })),
    };
    let aside = || {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
        path.with_file_name(format!("{MEMORY_FILE}.corrupt-{stamp}"))
    };
    match serde_json::from_slice::<Memory>(&bytes) {
        Ok(m) if m.format == FORMAT => (m, None),
        Ok(m) => {
            let aside = aside();
            if set_aside {
                let _ = std::fs::rename(path, &aside);
            }
            (Memory::empty(), Some(MemoryError::Format { path: path.to_path_buf(), found: m.format, aside }))
        }
        Err(source) => {
            if !set_aside {
                return (
                    Memory::empty(),
                    Some(MemoryError::Corrupt { path: path.to_path_buf(), aside: path.to_path_buf(), source }),
                );
            }
            let aside = aside();
            match std::fs::rename(path, &aside) {
                Ok(()) => (Memory::empty(), Some(MemoryError::Corrupt { path: path.to_path_buf(), aside, source })),
                Err(rename) => {
                    (Memory::empty(), Some(MemoryError::CorruptKept { path: path.to_path_buf(), source, rename }))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::memory::model::Quarantine;
    use crate::memory::model::Tick;

    fn quarantined(m: &mut Memory) {
        let d = m.domains.entry("web1".into()).or_default();
        d.restarts.quarantine = Some(Quarantine { reason: "10 restarts within 1h".into(), since: Tick::from_secs(9) });
    }

    #[tokio::test]
    async fn survives_a_reopen_and_batches_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, problem) = MemoryStore::open(dir.path()).unwrap();
        assert!(problem.is_none());
        let store = Arc::new(store);
        tokio::spawn(store.clone().run_writer());
        let (_, v) = store.update(quarantined);
        assert!(store.flush(v, Duration::from_secs(5)).await, "written");
        let (again, problem) = MemoryStore::open(dir.path()).unwrap();
        assert!(problem.is_none());
        assert_eq!(again.snapshot(), store.snapshot());
        assert!(again.snapshot().domains["web1"].restarts.quarantine.is_some());
    }

    #[test]
    fn a_corrupt_file_is_set_aside_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MEMORY_FILE), b"{\"format\": 1, \"domains\": {\"web1\": ").unwrap();
        let (store, problem) = MemoryStore::open(dir.path()).unwrap();
        let problem = problem.expect("reported");
        assert!(problem.to_string().contains("is not valid"), "{problem}");
        let memory = store.snapshot();
        assert!(memory.domains.is_empty(), "nothing of it is believed");
        assert!(memory.lost.is_some_and(|l| l.why.contains("is not valid")), "recorded as lost");
        assert!(store.problem().is_some(), "kept for status");
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert!(names.iter().any(|n| n.starts_with("memory.json.corrupt-")), "{names:?}");
        assert!(!names.iter().any(|n| n == MEMORY_FILE), "the corrupt file is not reused: {names:?}");
    }

    #[test]
    fn a_lost_memory_is_recorded_as_lost_and_leftover_temp_files_go() {
        let dir = tempfile::tempdir().unwrap();
        // Never written: a fresh start, nothing lost.
        let (store, _) = MemoryStore::open(dir.path()).unwrap();
        assert!(store.snapshot().lost.is_none());
        store.update(quarantined);
        store.write_now().unwrap();
        assert!(dir.path().join(MEMORY_MARKER).exists());
        drop(store);
        // Deleted beside its marker, with a temporary file of an interrupted write left over.
        std::fs::remove_file(dir.path().join(MEMORY_FILE)).unwrap();
        let temp = dir.path().join(".memory.json.Ab12Cd.tmp");
        std::fs::write(&temp, b"{\"format\": 1, \"dom").unwrap();
        let (store, problem) = MemoryStore::open(dir.path()).unwrap();
        assert!(problem.is_none());
        let lost = store.snapshot().lost.expect("a deleted memory is lost");
        assert!(lost.why.contains("is missing although it had been written"), "{}", lost.why);
        assert!(!temp.exists(), "the interrupted write's temporary file is removed");
        // The loss is remembered across a restart until confirmed.
        store.write_now().unwrap();
        drop(store);
        let (store, _) = MemoryStore::open(dir.path()).unwrap();
        assert!(store.snapshot().lost.is_some());
        // Corrupt: lost as well.
        drop(store);
        std::fs::write(dir.path().join(MEMORY_FILE), b"{").unwrap();
        let (store, _) = MemoryStore::open(dir.path()).unwrap();
        assert!(store.snapshot().lost.expect("corrupt").why.contains("is not valid"));
    }

    #[test]
    fn read_only_never_changes_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MEMORY_FILE), b"not json").unwrap();
        let (m, problem) = MemoryStore::read_only(dir.path());
        assert!(problem.is_some());
        assert_eq!(m, Memory::empty());
        assert_eq!(std::fs::read(dir.path().join(MEMORY_FILE)).unwrap(), b"not json");
    }

    #[test]
    fn a_failed_write_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = MemoryStore::open(&dir.path().join("d")).unwrap();
        store.update(quarantined);
        std::fs::remove_dir_all(dir.path().join("d")).unwrap();
        assert!(store.write_now().is_err());
        assert!(store.problem().unwrap().starts_with("cannot write"), "{:?}", store.problem());
    }
}
