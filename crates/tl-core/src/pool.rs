//! A small persistent thread pool for the decode-sized parallel loops:
//! workers spin for a while after each job, then park, so that the next
//! matmul of a decode step (tens of microseconds later) starts without a
//! wake-up through the kernel. [`crate::matmul`] measures it against rayon.
//!
//! A job is `f(chunk)` for chunk indices `0..n`; the calling thread works on
//! it too. Chunks are claimed one at a time from a shared counter, so a
//! thread that finishes early takes more and none idles while chunks remain.
//!
//! The counter lives in one `AtomicU64` *ticket*, `generation:32 | n:16 |
//! next:16`: a worker claims chunk `next` of generation `g` with a
//! compare-exchange that fails if the caller has moved on to another job,
//! so a late worker can never run a chunk of a job that has returned. The
//! caller returns only when all `n` chunks are done, and a worker
//! dereferences the job only while holding an unfinished chunk of it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most chunks one generation can count (16 bits); [`ThreadPool::run`]
/// splits larger jobs.
const MAX_CHUNKS: usize = 0xFFFF;

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

type Job<'a> = &'a (dyn Fn(usize) + Sync);

fn gen_of(t: u64) -> u32 {
    (t >> 32) as u32
}
fn n_of(t: u64) -> usize {
    ((t >> 16) & 0xFFFF) as usize
}
fn next_of(t: u64) -> usize {
    (t & 0xFFFF) as usize
}

struct Shared {
    ticket: AtomicU64,
    /// Points at a [`Job`] on the stack of the thread inside `run`.
    job: AtomicPtr<()>,
    done: AtomicUsize,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    panicked: AtomicBool,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            ticket: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        })
    }

    /// Claims and runs chunks of generation `g` until none are left.
    fn work(&self, g: u32, job: *const Job<'_>) {
        let mut cur = self.ticket.load(Ordering::Acquire);
        loop {
            if gen_of(cur) != g || next_of(cur) >= n_of(cur) {
                return;
            }
            match self.ticket.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: we hold chunk `next` of generation `g`, not yet
                    // counted in `done`, so the caller of `run` for `g` is
                    // still inside `run` and its job reference is alive; the
                    // pointer was published for `g` (see the module docs).
                    let f = unsafe { *job };
                    let chunk = next_of(cur);
                    if catch_unwind(AssertUnwindSafe(|| f(chunk))).is_err() {
                        self.panicked.store(true, Ordering::Relaxed);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    cur = self.ticket.load(Ordering::Acquire);
                }
                Err(now) => cur = now,
            }
        }
    }
}

/// A fixed set of worker threads plus the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    threads: usize,
    /// One job at a time; a second caller (another thread, or a job that
    /// calls back into the pool) runs its job inline instead of waiting.
    submit: Mutex<()>,
    handles: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// A pool of `threads` threads in all: `threads - 1` workers and the
    /// caller. Returns an error if a worker thread cannot be spawned.
    pub fn new(threads: usize) -> std::io::Result<ThreadPool> {
        let shared = Shared::new();
        let threads = threads.max(1);
        let mut handles = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            let s = Arc::clone(&shared);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("tl-worker-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(ThreadPool {
            shared,
            threads,
            submit: Mutex::new(()),
            handles,
        })
    }

    /// The process-wide pool: `TL_NUM_THREADS` threads, or one per core.
    /// Falls back to the calling thread alone if no thread can be spawned.
    pub fn global() -> &'static ThreadPool {
        static POOL: OnceLock<ThreadPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let n = default_threads();
            ThreadPool::new(n).unwrap_or_else(|_| ThreadPool {
                shared: Shared::new(),
                threads: 1,
                submit: Mutex::new(()),
                handles: Vec::new(),
            })
        })
    }

    /// Threads that work on a job, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(c)` for every `c` in `0..n`, spread over the pool; returns
    /// when all have run.
    ///
    /// # Panics
    ///
    /// Re-raises (as a new panic) a panic of `f` on a worker thread.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        let guard = match self.submit.try_lock() {
            Ok(g) if self.threads > 1 && n > 1 => g,
            _ => {
                (0..n).for_each(f);
                return;
            }
        };
        let mut start = 0;
        while start < n {
            let len = (n - start).min(MAX_CHUNKS);
            let shifted = |c: usize| f(start + c);
            self.run_batch(len, &shifted);
            start += len;
        }
        drop(guard);
        if self.shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a thread-pool job panicked on a worker thread");
        }
    }

    fn run_batch(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        let job: Job<'_> = f;
        let job_ptr = &job as *const Job<'_>;
        s.done.store(0, Ordering::Relaxed);
        s.job.store(job_ptr as *mut (), Ordering::Release);
        let g = gen_of(s.ticket.load(Ordering::Relaxed)).wrapping_add(1);
        // Publishes the job: a worker that sees generation `g` sees the
        // job pointer and the zeroed `done` too.
        s.ticket
            .store((u64::from(g) << 32) | ((n as u64) << 16), Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = s.lock.lock();
            s.wake.notify_all();
        }
        s.work(g, job_ptr);
        // The chunks still running elsewhere are at most one per worker.
        while s.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _lock = self.shared.lock.lock();
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

static REQUESTED_THREADS: OnceLock<usize> = OnceLock::new();

/// Sets the size of the global pool (e.g. from a `--threads` flag). Must be
/// called before the pool's first use; returns false if it is too late.
pub fn configure_global_threads(threads: usize) -> bool {
    threads > 0 && REQUESTED_THREADS.set(threads).is_ok()
}

fn default_threads() -> usize {
    if let Some(&n) = REQUESTED_THREADS.get() {
        return n;
    }
    std::env::var("TL_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn worker(s: &Shared) {
    let mut seen = 0u32;
    loop {
        let spin_from = Instant::now();
        let mut spins = 0u32;
        let g = loop {
            let t = s.ticket.load(Ordering::Acquire);
            if gen_of(t) != seen {
                break gen_of(t);
            }
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || spin_from.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // Park. `sleepers` is raised before the ticket is read again,
            // and `run` reads `sleepers` after storing a new ticket (both
            // SeqCst), so either this thread sees the new job or `run` sees
            // a sleeper and notifies under the lock.
            let mut lock = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while gen_of(s.ticket.load(Ordering::SeqCst)) == seen
                && !s.shutdown.load(Ordering::SeqCst)
            {
                lock = s.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
        };
        seen = g;
        let job = s.job.load(Ordering::Acquire) as *const Job<'_>;
        s.work(g, job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once() {
        let pool = ThreadPool::new(3).unwrap_or_else(|e| panic!("{e}"));
        for n in [1usize, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|c| {
                hits[c].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{n}");
        }
    }

    #[test]
    fn more_chunks_than_a_generation_counts() {
        let pool = ThreadPool::new(2).unwrap_or_else(|e| panic!("{e}"));
        let n = MAX_CHUNKS + 10;
        let sum = AtomicUsize::new(0);
        pool.run(n, &|c| {
            sum.fetch_add(c, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), n * (n - 1) / 2);
    }

    #[test]
    fn jobs_after_parking_and_nested_jobs_run() {
        let pool = ThreadPool::new(2).unwrap_or_else(|e| panic!("{e}"));
        let count = AtomicUsize::new(0);
        pool.run(4, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 3);
        // A job that submits to the same pool runs the inner one inline.
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 4 + 12);
    }

    #[test]
    fn concurrent_callers_share_the_pool() {
        let pool = ThreadPool::new(2).unwrap_or_else(|e| panic!("{e}"));
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        pool.run(5, &|c| {
                            total.fetch_add(c, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 10);
    }
}
