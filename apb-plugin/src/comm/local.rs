//! Ranks as threads of one process: a collective is a rendezvous on shared state, tensors are
//! shared, not copied.

use super::Communicator;
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One rank of a single-process group.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    seq: AtomicU64,
}

/// Builds `world` connected ranks.
pub struct LocalGroup;

impl LocalGroup {
    /// `world` ranks of one process, to hand to one thread each.
    pub fn ranks(world: usize) -> Vec<Arc<LocalComm>> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| {
                Arc::new(LocalComm {
                    rank,
                    shared: shared.clone(),
                    seq: AtomicU64::new(0),
                })
            })
            .collect()
    }
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One collective: per-rank contributions (`Some(None)` = arrived with nothing to send) and how
/// many ranks have taken the result.
type Round = (Vec<Option<Option<Tensor>>>, usize);

#[derive(Default)]
struct State {
    /// Collective number → its round.
    rounds: HashMap<u64, Round>,
    aborted: Option<String>,
}

/// A safety net: a collective that waits this long for the other ranks fails instead of hanging
/// (long prefills between collectives on slow CPUs stay far below it).
const STALL_TIMEOUT: Duration = Duration::from_secs(1800);

impl LocalComm {
    /// Contributes `t` to the next collective and returns every rank's contribution.
    fn exchange(&self, t: Option<Tensor>) -> Result<Vec<Option<Tensor>>> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let world = self.shared.world;
        let mut st = self
            .shared
            .state
            .lock()
            .map_err(|_| Error::Comm("group state poisoned".into()))?;
        if let Some(why) = &st.aborted {
            return Err(Error::Comm(format!("group aborted: {why}")));
        }
        st.rounds
            .entry(seq)
            .or_insert_with(|| (vec![None; world], 0))
            .0[self.rank] = Some(t);
        self.shared.cv.notify_all();
        let start = std::time::Instant::now();
        loop {
            if let Some(why) = &st.aborted {
                return Err(Error::Comm(format!("group aborted: {why}")));
            }
            let round = st
                .rounds
                .get(&seq)
                .expect("round exists until all ranks took it");
            if round.0.iter().all(|s| s.is_some()) {
                break;
            }
            if start.elapsed() > STALL_TIMEOUT {
                let why = format!(
                    "rank {} waited {:?} in collective #{seq}",
                    self.rank, STALL_TIMEOUT
                );
                st.aborted = Some(why.clone());
                self.shared.cv.notify_all();
                return Err(Error::Comm(why));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, Duration::from_millis(200))
                .map_err(|_| Error::Comm("group state poisoned".into()))?
                .0;
        }
        let round = st.rounds.get_mut(&seq).expect("round exists");
        let out: Vec<Option<Tensor>> = round.0.iter().map(|s| s.clone().flatten()).collect();
        round.1 += 1;
        if round.1 == world {
            st.rounds.remove(&seq);
        }
        Ok(out)
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        self.exchange(Some(t.clone()))?
            .into_iter()
            .map(|t| t.ok_or_else(|| Error::Comm("missing contribution".into())))
            .collect()
    }
    fn broadcast(&self, t: Option<&Tensor>, root: usize) -> Result<Tensor> {
        let mine = if self.rank == root {
            Some(
                t.ok_or_else(|| Error::Comm("broadcast root has no tensor".into()))?
                    .clone(),
            )
        } else {
            None
        };
        self.exchange(mine)?
            .swap_remove(root)
            .ok_or_else(|| Error::Comm(format!("rank {root} sent nothing")))
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(None).map(|_| ())
    }
    fn abort(&self, why: &str) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.aborted.get_or_insert_with(|| why.to_string());
        }
        self.shared.cv.notify_all();
    }
}
