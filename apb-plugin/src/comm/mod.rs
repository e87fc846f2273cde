//! Collectives between ranks. Backends call only the [`Communicator`] trait; three implement it:
//! [`LocalGroup`] (ranks as threads of one process, sharing tensors), [`HostComm`] (rank
//! processes over sockets, tensors through host memory: CPU clusters, GPUs without NCCL, tests)
//! and NCCL (`crate::nccl`, one process per GPU).
//!
//! Failure model: when a rank fails or panics it [`aborts`](Communicator::abort) the group, and
//! every rank waiting in (or later entering) a collective gets an error instead of hanging.

use crate::{Error, Result};
use candle_core::Tensor;

mod host;
mod local;

pub use host::HostComm;
pub use local::{LocalComm, LocalGroup};

/// Collectives and point-to-point transfers between the ranks of one request.
pub trait Communicator: Send + Sync {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Every rank's `t`, in rank order. All ranks must call it (in the same order of collectives).
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;
    /// [`all_gather`](Self::all_gather) that may still be in flight when it returns: work queued
    /// before [`Pending::wait`] can overlap it. The default completes at once (threads share
    /// tensors; NCCL runs it on the compute stream for now); [`HostComm`] receives in the
    /// background.
    fn all_gather_pending(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        Ok(Pending::ready(self.all_gather(t)?))
    }
    /// `root`'s tensor on every rank (`t` is ignored elsewhere).
    fn broadcast(&self, t: Option<&Tensor>, root: usize) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Marks the group failed: collectives on every rank return an error from now on.
    fn abort(&self, why: &str);

    /// One step of a ring: sends `t` to rank `rank + 1` and receives rank `rank − 1`'s (both
    /// wrapping). Every rank passes the same shape. The transfer may still be in flight when this
    /// returns: work queued before [`Pending::wait`] can overlap it.
    ///
    /// The default goes through [`all_gather`](Self::all_gather) (world× the traffic; free for
    /// threads of one process, which share tensors); NCCL overrides it with send/recv.
    fn ring_pass(&self, t: &Tensor) -> Result<Pending> {
        let (rank, world) = (self.rank(), self.world_size());
        let mut all = self.all_gather(t)?;
        Ok(Pending::ready(all.swap_remove((rank + world - 1) % world)))
    }

    /// All-to-all: `parts[r]` goes to rank `r`; returns what every rank sent to this one, in
    /// rank order. Every rank passes `world` parts of one shape.
    ///
    /// The default goes through [`all_gather`](Self::all_gather) of the stacked parts; NCCL
    /// overrides it with grouped send/recv.
    fn all_to_all(&self, parts: &[Tensor]) -> Result<Vec<Tensor>> {
        let world = self.world_size();
        if parts.len() != world {
            return Err(Error::Comm(format!(
                "all_to_all needs {world} parts, got {}",
                parts.len()
            )));
        }
        let all = self.all_gather(&Tensor::stack(parts, 0)?)?;
        all.iter().map(|from| Ok(from.get(self.rank())?)).collect()
    }
}

/// A transfer that may still be in flight ([`Communicator::ring_pass`],
/// [`Communicator::all_gather_pending`]).
pub struct Pending<T = Tensor>(Box<dyn FnOnce() -> Result<T> + Send>);

impl<T: Send + 'static> Pending<T> {
    /// A transfer that has already completed.
    pub fn ready(t: T) -> Self {
        Self(Box::new(move || Ok(t)))
    }

    /// A transfer completed by `finish` (e.g. making the compute stream wait for it).
    pub fn new(finish: impl FnOnce() -> Result<T> + Send + 'static) -> Self {
        Self(Box::new(finish))
    }

    /// The received data, safe to use from here on.
    pub fn wait(self) -> Result<T> {
        (self.0)()
    }
}
