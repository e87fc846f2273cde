//! The bounded queue of requests waiting for the ranks (429 beyond `--max-queued`), what the
//! engine hands back to a request's handler ([`Ev`]); the server's paths through it (queue, pick,
//! answer all on a stop) are in `state`.

use super::openai::ApiError;
use crate::engine::scheduler::{Policy, Waiting};
use crate::runner::{Generation, Job};
use axum::http::StatusCode;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tmpsc;

/// A request waiting for the ranks.
pub(super) struct Queued {
    pub(super) job: Job,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) events: tmpsc::UnboundedSender<Ev>,
    pub(super) queued_at: Instant,
    /// The scheduler's view (prompt tokens, short requests that went first).
    pub(super) wait: Waiting,
}

/// A request the engine runs: where its answer goes.
pub(super) struct Running {
    pub(super) events: tmpsc::UnboundedSender<Ev>,
    pub(super) cancel: Arc<AtomicBool>,
    /// Time it waited in the queue.
    pub(super) waited: Duration,
    pub(super) method: &'static str,
}

/// What the engine thread tells a request's handler.
pub(super) enum Ev {
    Text(String),
    Done(Box<Generation>),
    Fail(ApiError),
}

/// What the engine finds in the queue.
pub(super) enum Pick {
    Item(Box<Queued>),
    /// Nothing waits now.
    Empty,
    /// Closed and empty: stop.
    Closed,
}

/// The requests waiting for the ranks (the scheduler picks from it). Entries whose client left
/// are dropped as soon as the queue is touched, so they never hold a place a live client could
/// take.
#[derive(Default)]
pub(super) struct Queue {
    items: VecDeque<Queued>,
    /// No new entries (shutdown); the engine finishes what is queued.
    closed: bool,
}

impl Queue {
    /// Whether it takes no more entries.
    pub(super) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Entries waiting (some may have been cancelled since the last touch).
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// Drops the entries whose client left; returns how many.
    pub(super) fn drop_cancelled(&mut self) -> usize {
        let before = self.items.len();
        self.items.retain(|i| !i.cancel.load(Ordering::SeqCst));
        before - self.items.len()
    }

    /// Adds `item` at the back: 503 once closed, 429 (retry after 1 s) when `max` wait already.
    pub(super) fn push(&mut self, item: Queued, max: usize) -> Result<(), ApiError> {
        if self.closed {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping",
            ));
        }
        if self.items.len() >= max {
            return Err(ApiError::too_many(
                format!("the queue is full ({max} requests waiting); retry later"),
                1,
            ));
        }
        self.items.push_back(item);
        Ok(())
    }

    /// Takes out the entry `policy` picks, counting the overtakes it makes.
    pub(super) fn pick(&mut self, policy: &Policy) -> Option<Queued> {
        let mut waiting: Vec<Waiting> = self.items.iter().map(|i| i.wait).collect();
        let i = policy.pick(&mut waiting)?;
        for (item, w) in self.items.iter_mut().zip(waiting) {
            item.wait = w;
        }
        self.items.remove(i)
    }

    /// No more entries; returns those waiting (to be answered).
    pub(super) fn close(&mut self) -> Vec<Queued> {
        self.closed = true;
        self.items.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::PromptParts;
    use crate::runner::GenParams;
    use crate::JobSettings;

    /// A queued request of `tokens` prompt tokens, with its cancel flag.
    fn item(tokens: usize) -> (Queued, Arc<AtomicBool>) {
        let cancel = Arc::new(AtomicBool::new(false));
        let (events, _) = tmpsc::unbounded_channel();
        let job = Job {
            prompt: PromptParts {
                context: vec![1; tokens],
                query_segment: vec![],
                question: vec![],
                prefix_len: 0,
            },
            settings: JobSettings::new(crate::Method::DENSE, 1),
            params: GenParams::default(),
        };
        let q = Queued {
            job,
            cancel: cancel.clone(),
            events,
            queued_at: Instant::now(),
            wait: Waiting {
                tokens,
                overtaken: 0,
            },
        };
        (q, cancel)
    }

    fn status(r: Result<(), ApiError>) -> Option<u16> {
        r.err().map(|e| e.status().as_u16())
    }

    /// Full: 429 with Retry-After; a client that left frees its place; closed: 503, and closing
    /// hands back what waited.
    #[test]
    fn bounded_and_closed() {
        let mut q = Queue::default();
        let (a, a_cancel) = item(10);
        assert_eq!(status(q.push(a, 2)), None);
        assert_eq!(status(q.push(item(20).0, 2)), None);
        let full = q.push(item(30).0, 2).unwrap_err();
        assert_eq!((full.status().as_u16(), full.retry_after), (429, Some(1)));
        a_cancel.store(true, Ordering::SeqCst);
        assert_eq!(q.drop_cancelled(), 1);
        assert_eq!(status(q.push(item(30).0, 2)), None);
        let left: Vec<usize> = q.close().iter().map(|i| i.wait.tokens).collect();
        assert_eq!(left, [20, 30]);
        assert_eq!(status(q.push(item(40).0, 2)), Some(503));
        assert_eq!(q.len(), 0);
    }

    /// The scheduler's order through the queue: a short request overtakes waiting long ones
    /// (each long one counts it), FIFO within a class, and with one sequence at a time nothing
    /// overtakes.
    #[test]
    fn picks_in_the_policys_order() {
        let order = |max_num_seqs: usize| {
            let mut q = Queue::default();
            for t in [500, 600, 5, 700, 6] {
                q.push(item(t).0, 10).unwrap();
            }
            let policy = Policy::new(100, max_num_seqs);
            let mut out = vec![];
            while let Some(i) = q.pick(&policy) {
                out.push((i.wait.tokens, i.wait.overtaken));
            }
            out
        };
        assert_eq!(
            order(16),
            [(5, 0), (6, 0), (500, 2), (600, 2), (700, 1)],
            "short first, each long one counting the shorts that passed it"
        );
        assert_eq!(
            order(1),
            [(500, 0), (600, 0), (5, 0), (700, 0), (6, 0)],
            "one at a time: first come, first served"
        );
    }
}
