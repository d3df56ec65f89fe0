//! Background preparation of batches: worker threads run numbered jobs ahead of the training
//! thread, which receives the results in job order.
//!
//! Worker `w` of `W` takes jobs `w, w + W, w + 2W, …` and hands each result to its own bounded
//! queue; the reader takes job `i` from queue `i % W`. So the order is the jobs' order
//! whatever the timing (a seeded run is the same with 0, 1 or 8 workers, as long as each job
//! draws from its own seed), at most `W × depth` results wait in memory, and an error reaches
//! the reader at the job that failed. Dropping the reader early (a `fit` that stops or fails)
//! closes the queues: each worker stops at its next hand-over, and the drop waits for them,
//! so no thread outlives the epoch.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::{Error, Result};

/// Results of jobs `0..jobs`, computed by worker threads, yielded in order.
pub(crate) struct Prefetcher<T: Send + 'static> {
    queues: Vec<Receiver<Result<T>>>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
    jobs: usize,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts `workers` threads (at least one) running `job(i)` for `i` in `0..jobs`, each
    /// keeping at most `depth` (at least one) finished results waiting.
    pub(crate) fn start(
        jobs: usize,
        workers: usize,
        depth: usize,
        job: impl Fn(usize) -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        let workers = workers.clamp(1, jobs.max(1));
        let job = Arc::new(job);
        let mut queues = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (send, receive) = sync_channel(depth.max(1));
            let job = Arc::clone(&job);
            let handle = std::thread::Builder::new()
                .name(format!("batch-worker-{w}"))
                .spawn(move || run_worker(w, workers, jobs, &*job, &send))
                .map_err(|e| Error::InvalidArgument(format!("cannot start a data worker: {e}")))?;
            queues.push(receive);
            handles.push(handle);
        }
        Ok(Self {
            queues,
            workers: handles,
            next: 0,
            jobs,
        })
    }
}

fn run_worker<T>(
    w: usize,
    workers: usize,
    jobs: usize,
    job: &(dyn Fn(usize) -> Result<T> + Send + Sync),
    send: &SyncSender<Result<T>>,
) {
    for i in (w..jobs).step_by(workers) {
        let result = job(i);
        let failed = result.is_err();
        // The reader is gone (dropped early): stop. After an error, stop too: the reader
        // ends the epoch there.
        if send.send(result).is_err() || failed {
            return;
        }
    }
}

impl<T: Send + 'static> Iterator for Prefetcher<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.next >= self.jobs {
            return None;
        }
        let queue = &self.queues[self.next % self.queues.len()];
        let i = self.next;
        self.next += 1;
        Some(queue.recv().unwrap_or_else(|_| {
            // The worker ended without handing over job `i`: it panicked.
            self.next = self.jobs;
            Err(Error::InvalidArgument(format!(
                "the data worker preparing batch {i} stopped unexpectedly"
            )))
        }))
    }
}

impl<T: Send + 'static> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        // Closing the queues makes every blocked `send` fail, so each worker returns after
        // at most the job it is running.
        self.queues.clear();
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn results_come_in_job_order_whatever_the_workers() {
        for workers in [1, 2, 3, 8] {
            let got: Vec<usize> = Prefetcher::start(20, workers, 2, |i| {
                // Later jobs finish sooner: order must not follow timing.
                std::thread::sleep(std::time::Duration::from_micros(((20 - i) * 50) as u64));
                Ok(i * i)
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
            assert_eq!(got, (0..20).map(|i| i * i).collect::<Vec<_>>(), "{workers}");
        }
    }

    #[test]
    fn an_error_arrives_at_its_job_and_ends_the_work() {
        let mut it = Prefetcher::start(10, 2, 1, |i| {
            if i == 3 {
                Err(Error::InvalidArgument("record 3 is corrupt".into()))
            } else {
                Ok(i)
            }
        })
        .unwrap();
        for i in 0..3 {
            assert_eq!(it.next().unwrap().unwrap(), i);
        }
        let err = it.next().unwrap().unwrap_err().to_string();
        assert!(err.contains("record 3"), "{err}");
    }

    #[test]
    fn dropping_the_reader_stops_the_workers_and_bounds_the_work() {
        let started = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&started);
        let mut it = Prefetcher::start(1000, 2, 2, move |i| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(i)
        })
        .unwrap();
        assert_eq!(it.next().unwrap().unwrap(), 0);
        drop(it); // joins the workers
        let done = started.load(Ordering::SeqCst);
        // Each worker ran at most its queue's depth ahead, plus the job it was on.
        assert!(done <= 1 + 2 * (2 + 1), "{done} jobs ran");
        // No job runs after the drop returned.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(started.load(Ordering::SeqCst), done);
    }
}
