//! Grammar masks computed beside the forward.
//!
//! The mask that applies to a sequence's next sampled token depends only
//! on the tokens it has committed, all known before the step's forward
//! starts; so the scheduler hands the step's constraints to these threads
//! when the forward starts and takes them back, masks computed, before it
//! samples. On a GPU the host is idle during the forward and the masks
//! cost the step nothing; on the CPU they compete with the forward's own
//! threads (docs/BENCHMARKS.md measures both).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use tl_model::constrain::{Constraint, MaskTime};

/// A constraint on its way: `slot` says whose it is.
pub(crate) struct Job {
    pub slot: usize,
    pub c: Box<Constraint>,
}

/// A constraint back, its next mask prepared.
pub(crate) struct Done {
    pub slot: usize,
    pub c: Box<Constraint>,
    pub time: MaskTime,
}

pub(crate) struct MaskWorkers {
    txs: Vec<Sender<Job>>,
    rx: Receiver<Done>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
}

// Constraints move between threads.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Job>();
    send::<Done>();
};

impl MaskWorkers {
    /// `n` threads (at least one); an error when the system has none to
    /// give.
    pub fn new(n: usize) -> std::io::Result<MaskWorkers> {
        let (done_tx, rx) = channel::<Done>();
        let mut txs = Vec::new();
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            let (tx, jobs) = channel::<Job>();
            let done = done_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("tl-masks-{i}"))
                .spawn(move || work(jobs, done))?;
            txs.push(tx);
            handles.push(h);
        }
        Ok(MaskWorkers {
            txs,
            rx,
            handles,
            next: 0,
        })
    }

    /// Hands `job` to the next thread; gives it back if that thread is gone.
    pub fn send(&mut self, job: Job) -> Result<(), Job> {
        let i = self.next % self.txs.len();
        self.next = self.next.wrapping_add(1);
        self.txs[i].send(job).map_err(|e| e.0)
    }

    /// The next finished job; `None` when every thread is gone.
    pub fn recv(&self) -> Option<Done> {
        self.rx.recv().ok()
    }
}

impl Drop for MaskWorkers {
    fn drop(&mut self) {
        self.txs.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn work(jobs: Receiver<Job>, done: Sender<Done>) {
    while let Ok(mut job) = jobs.recv() {
        // A panic inside the grammar engine fails that sequence's pick, not
        // the thread.
        if catch_unwind(AssertUnwindSafe(|| job.c.prepare())).is_err() {
            job.c
                .fail_pending("the grammar's mask computation panicked");
        }
        let time = job.c.take_time();
        if done
            .send(Done {
                slot: job.slot,
                c: job.c,
                time,
            })
            .is_err()
        {
            return;
        }
    }
}
