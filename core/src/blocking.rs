//! Bounded pools of dedicated threads for blocking work that may hang: libvirt calls, checks of
//! required paths, status and memory writes each get their own pool, never tokio's shared
//! blocking pool, so hung storage costs threads of one pool and never stalls the others.
//!
//! A job whose caller stopped waiting for it (its deadline passed, or the caller was dropped)
//! is *stuck*: its thread no longer counts as one of the pool's `workers` and a replacement may
//! start, up to `max_stuck` stuck threads (so at most `workers + max_stuck` threads ever). When a
//! stuck job returns, its thread rejoins the pool if there is room, else ends. Idle threads end
//! after a while; a dropped pool lets its threads end once their jobs return.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// An idle thread ends after this long without work.
const IDLE_EXIT: Duration = Duration::from_secs(30);

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const STUCK: u8 = 2;
const DONE: u8 = 3;
const CANCELLED: u8 = 4;

/// A pool of threads for blocking work (see the module docs).
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    name: &'static str,
    workers: usize,
    max_stuck: usize,
    state: Mutex<State>,
    wake: Condvar,
    /// Jobs not yet done (queued, running or stuck), for whoever waits for the pool to be idle.
    jobs: tokio::sync::watch::Sender<usize>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Threads that count as workers (running a job in time, or idle).
    live: usize,
    idle: usize,
    /// Threads whose job's caller gave up on it.
    stuck: usize,
    /// Start times of running jobs that are not stuck, by job id.
    running: HashMap<u64, Instant>,
    next_id: u64,
    closed: bool,
}

struct Job {
    id: u64,
    queued: Instant,
    ctl: Arc<AtomicU8>,
    run: Box<dyn FnOnce() + Send>,
}

/// How busy a pool is, for liveness and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Threads that count as workers.
    pub live: usize,
    /// Threads whose job's caller gave up on it.
    pub stuck: usize,
    /// Jobs waiting for a thread.
    pub queued: usize,
    /// How long the oldest queued job has waited for a thread.
    pub oldest_queued: Option<Duration>,
    /// How long the oldest running job (not stuck) has run.
    pub oldest_running: Option<Duration>,
}

/// The job panicked (its result is lost).
#[derive(Debug, thiserror::Error)]
#[error("the blocking job panicked")]
pub struct Panicked;

impl Pool {
    /// A pool of at most `workers` threads at work, plus at most `max_stuck` threads whose
    /// callers gave up on them. Threads start when work comes.
    pub fn new(name: &'static str, workers: usize, max_stuck: usize) -> Self {
        Pool {
            inner: Arc::new(Inner {
                name,
                workers: workers.max(1),
                max_stuck,
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                jobs: tokio::sync::watch::channel(0).0,
            }),
        }
    }

    /// Run `f` on a thread of this pool.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Task<T> {
        let (started_tx, started_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let ctl = Arc::new(AtomicU8::new(QUEUED));
        let run = Box::new(move || {
            let _ = started_tx.send(());
            let _ = done_tx.send(f());
        });
        // Counted before any thread can take it, so its end never comes first.
        self.inner.jobs.send_modify(|n| *n += 1);
        let mut st = self.inner.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.queue.push_back(Job { id, queued: Instant::now(), ctl: ctl.clone(), run });
        if st.queue.len() > st.idle {
            self.inner.grow(&mut st);
        }
        drop(st);
        self.inner.wake.notify_one();
        Task { pool: self.inner.clone(), id, ctl, started: Some(started_rx), done: done_rx }
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.inner.lock();
        let now = Instant::now();
        let oldest_queued = st.queue.iter().find(|j| j.ctl.load(Ordering::Relaxed) == QUEUED).map(|j| now - j.queued);
        PoolStats {
            live: st.live,
            stuck: st.stuck,
            queued: st.queue.len(),
            oldest_queued,
            oldest_running: st.running.values().min().map(|t| now - *t),
        }
    }

    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// Sees the number of jobs not yet done (queued, running, or stuck past their caller).
    pub fn jobs(&self) -> tokio::sync::watch::Receiver<usize> {
        self.inner.jobs.subscribe()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.wake.notify_all();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start a worker thread if the bounds allow one.
    fn grow(self: &Arc<Self>, st: &mut State) {
        if st.live >= self.workers || st.stuck > self.max_stuck || st.closed {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new().name(format!("vw-{}", self.name)).spawn(move || me.work());
        match spawned {
            Ok(_) => st.live += 1,
            Err(e) => tracing::error!(pool = self.name, %e, "cannot start a thread"),
        }
    }

    fn work(self: Arc<Self>) {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.queue.pop_front() {
                if job.ctl.compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire).is_err() {
                    continue; // cancelled while queued
                }
                st.running.insert(job.id, Instant::now());
                drop(st);
                // A panic loses the result (the caller sees `Panicked`), never the thread count.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job.run));
                st = self.lock();
                st.running.remove(&job.id);
                self.jobs.send_modify(|n| *n -= 1);
                if job.ctl.swap(DONE, Ordering::AcqRel) == STUCK {
                    st.stuck -= 1;
                    if st.live >= self.workers || st.closed {
                        return;
                    }
                    st.live += 1;
                }
                continue;
            }
            if st.closed {
                st.live -= 1;
                return;
            }
            st.idle += 1;
            let (g, waited) = self.wake.wait_timeout(st, IDLE_EXIT).unwrap_or_else(|p| p.into_inner());
            st = g;
            st.idle -= 1;
            if waited.timed_out() && st.queue.is_empty() {
                st.live -= 1;
                return;
            }
        }
    }

    /// The caller gave up on job `id`: a running job's thread stops counting as a worker.
    fn give_up(self: &Arc<Self>, id: u64, ctl: &AtomicU8) {
        let mut st = self.lock();
        if ctl.compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.jobs.send_modify(|n| *n -= 1);
            return;
        }
        if ctl.compare_exchange(RUNNING, STUCK, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            st.running.remove(&id);
            st.live -= 1;
            st.stuck += 1;
            if st.stuck > self.max_stuck {
                tracing::warn!(
                    pool = self.name,
                    stuck = st.stuck,
                    max = self.max_stuck,
                    "too many hung calls: not replacing their threads"
                );
            }
            if !st.queue.is_empty() {
                self.grow(&mut st);
            }
        }
    }
}

/// A job on a pool. Dropping it gives up on the job (see the module docs).
pub struct Task<T> {
    pool: Arc<Inner>,
    id: u64,
    ctl: Arc<AtomicU8>,
    started: Option<oneshot::Receiver<()>>,
    done: oneshot::Receiver<T>,
}

impl<T> Task<T> {
    /// Wait for a thread to take the job, then at most `deadline` for its result. `None`: the
    /// deadline passed; the job is stuck from now on (keep the task to learn when it returns).
    pub async fn within(&mut self, deadline: Duration) -> Option<Result<T, Panicked>> {
        if let Some(started) = self.started.take() {
            let _ = started.await;
        }
        match tokio::time::timeout(deadline, &mut self.done).await {
            Ok(r) => Some(r.map_err(|_| Panicked)),
            Err(_) => {
                self.pool.give_up(self.id, &self.ctl);
                None
            }
        }
    }

    /// Wait for the result, however long it takes.
    pub async fn finish(mut self) -> Result<T, Panicked> {
        (&mut self.done).await.map_err(|_| Panicked)
    }

    /// Stop waiting for the job (keeping the task to learn when it returns): a queued job never
    /// runs, a running one is stuck from now on.
    pub fn abandon(&self) {
        self.pool.give_up(self.id, &self.ctl);
    }

    /// The job has returned (or panicked, or was cancelled).
    pub fn is_finished(&self) -> bool {
        matches!(self.ctl.load(Ordering::Acquire), DONE | CANCELLED)
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.pool.give_up(self.id, &self.ctl);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// A job that blocks until released, like a stat on a hung mount.
    fn hang(pool: &Pool) -> (Task<()>, mpsc::Sender<()>) {
        let (tx, rx) = mpsc::channel::<()>();
        (
            pool.spawn(move || {
                let _ = rx.recv();
            }),
            tx,
        )
    }

    #[tokio::test]
    async fn a_stuck_job_is_replaced_and_work_goes_on() {
        let pool = Pool::new("t", 1, 2);
        let (mut hung, release) = hang(&pool);
        assert!(hung.within(Duration::from_millis(50)).await.is_none(), "deadline passed");
        assert_eq!(pool.stats().stuck, 1);
        let mut ok = pool.spawn(|| 7);
        assert_eq!(ok.within(Duration::from_secs(10)).await.unwrap().unwrap(), 7, "a new thread took it");
        release.send(()).unwrap();
        hung.finish().await.unwrap();
        while pool.stats().stuck != 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.stats().live, 1, "the returned thread did not rejoin beyond the bound");
    }

    #[tokio::test]
    async fn no_more_threads_than_workers_plus_max_stuck() {
        let pool = Pool::new("t", 1, 1);
        let mut releases = Vec::new();
        for _ in 0..2 {
            let (mut t, r) = hang(&pool);
            assert!(t.within(Duration::from_millis(50)).await.is_none());
            releases.push((t, r));
        }
        // Two stuck, one more than allowed: no replacement; a new job waits in the queue.
        let queued = pool.spawn(|| ());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = pool.stats();
        assert_eq!((s.live, s.stuck, s.queued), (0, 2, 1));
        assert!(s.oldest_queued.is_some());
        for (_, r) in &releases {
            r.send(()).unwrap();
        }
        queued.finish().await.unwrap();
    }

    #[tokio::test]
    async fn a_panic_is_reported_and_a_dropped_queued_job_never_runs() {
        let pool = Pool::new("t", 1, 0);
        let mut bad = pool.spawn(|| panic!("boom"));
        assert!(bad.within(Duration::from_secs(10)).await.unwrap().is_err());
        let (mut hung, release) = hang(&pool);
        hung.started.take().unwrap().await.unwrap();
        let ran = Arc::new(AtomicU8::new(0));
        let r = ran.clone();
        drop(pool.spawn(move || r.store(1, Ordering::SeqCst)));
        release.send(()).unwrap();
        hung.within(Duration::from_secs(10)).await.unwrap().unwrap();
        assert_eq!(pool.spawn(|| 1).finish().await.unwrap(), 1);
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }
}
