//! [`Communicator`] over NCCL: one process per GPU. Blocking collectives run on the rank's candle
//! stream, so they are ordered with the kernels around them without extra synchronisation.
//! Transfers that may be in flight ([`Communicator::all_gather_pending`], `ring_pass`) run on a
//! second stream with a second communicator (its id all-gathered over the first at start), so
//! they overlap the kernels queued after them. The ordering is explicit, not left to cudarc's
//! per-buffer events (our raw-pointer kernels record those before the kernel is queued, not
//! behind it): the transfer stream first waits for everything queued on the compute stream (the
//! input's producer, the receive buffers' allocation), an event is recorded behind the
//! transfer, and [`Pending::wait`] makes the compute stream wait for it. Receive buffers are
//! allocated on the compute stream and the inputs are held until the wait, so no memory is
//! freed or reused while the transfer may still touch it. `APB_NCCL_OVERLAP=0` in every rank's
//! environment runs them on the compute stream instead (for comparisons).
//! Set `NCCL_NVLS_ENABLE=0` in the environment (NVLink SHARP multicast is not used).
//!
//! Every rank must pass tensors of the same shape and dtype to `all_gather`, `ring_pass` and
//! `all_to_all` (blocks are padded to equal sizes for this). `ring_pass` and `all_to_all` are
//! grouped `ncclSend`/`ncclRecv`. `broadcast` sends the shape first, so other ranks need not
//! know it.
//!
//! A peer that stalls (alive, but never joins a collective) or dies leaves the others spinning in
//! an NCCL kernel. [`NcclComm::watch`] bounds that: each collective records an event behind it,
//! and a watchdog thread calls the host's handler when the oldest unfinished collective has been
//! at the head of the stream for longer than the timeout, after aborting the communicator
//! (`ncclCommAbort`) unless a call blocked on the host still holds it (the first collective
//! connects the peers and blocks there; the handler's process exit ends that). The `apb` host
//! also kills the group when a rank process exits.

use crate::comm::{Communicator, Pending};
use crate::{Error, Result};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use cudarc::driver::{sys::CUevent_flags, CudaEvent, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The 128-byte NCCL unique id that rank 0 creates and the rendezvous hands to every rank.
pub type UniqueId = [u8; 128];

/// A fresh group id (rank 0 makes it; the host hands it to the other ranks).
pub fn unique_id() -> Result<UniqueId> {
    let id = Id::new().map_err(|e| Error::Comm(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().map(|c| c as u8))
}

/// One rank of an NCCL group (one process per GPU).
pub struct NcclComm {
    inner: Arc<Inner>,
    dev: CudaDevice,
    /// Where transfers in flight run (the side communicator's stream).
    side_stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

/// What the watchdog thread shares with the rank.
struct Inner {
    comm: Mutex<Option<Comm>>,
    /// The communicator of transfers in flight, on the side stream.
    side: Mutex<Option<Comm>>,
    aborted: Mutex<Option<String>>,
    /// Collectives called and not yet seen finished, oldest first (only while watched); the
    /// event comes once the call has enqueued its kernel (the first call on a communicator may
    /// block on the host until every peer joins it).
    pending: Mutex<VecDeque<(&'static str, Option<CudaEvent>)>>,
    watched: AtomicBool,
    stop: AtomicBool,
}

// The NCCL communicator handle is used behind the mutex, one call at a time; CUDA events may be
// queried from any thread.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Comm(format!("NCCL {what}: {e:?}"))
}

impl Inner {
    fn abort(&self, why: &str) {
        if let Ok(mut a) = self.aborted.lock() {
            a.get_or_insert_with(|| why.to_string());
        }
        // Dropping a communicator aborts it (ncclCommAbort), failing pending collectives.
        for comm in [&self.comm, &self.side] {
            if let Ok(mut c) = comm.try_lock() {
                if let Some(c) = c.take() {
                    // cudarc panics if the abort itself reports an error; we are failing anyway.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(c)));
                }
            }
        }
    }
}

/// The environment switch for transfers in flight on NCCL ([`NcclComm::new`]): `0` turns them off.
pub const OVERLAP_ENV: &str = "APB_NCCL_OVERLAP";

impl NcclComm {
    /// Joins the group `id` as `rank` of `world` on `device` (blocks until all ranks joined).
    /// Transfers in flight get their own stream unless `APB_NCCL_OVERLAP=0` is in every rank's
    /// environment ([`Self::new_with`]); then they complete on the compute stream.
    pub fn new(device: &Device, rank: usize, world: usize, id: UniqueId) -> Result<Self> {
        let overlap = std::env::var(OVERLAP_ENV).map_or(true, |v| v != "0");
        Self::new_with(device, rank, world, id, overlap)
    }

    /// [`Self::new`] with the transfer stream on or off (`overlap`: a second communicator on a
    /// second stream for `all_gather_pending` and `ring_pass`; every rank must pass the same).
    /// Its ordering is tested on one GPU by `tests/nccl_one_gpu.rs` (passed on an H100).
    pub fn new_with(
        device: &Device,
        rank: usize,
        world: usize,
        id: UniqueId,
        overlap: bool,
    ) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(Error::Comm(format!(
                "NCCL needs a CUDA device, got {device:?}"
            )));
        };
        let id = Id::uninit(id.map(|b| b as _));
        let comm =
            Comm::from_rank(dev.cuda_stream(), rank, world, id).map_err(|e| nccl_err("init", e))?;
        let side_stream = dev
            .cuda_stream()
            .context()
            .new_stream()
            .map_err(|e| Error::Comm(format!("creating the transfer stream: {e:?}")))?;
        let me = Self {
            inner: Arc::new(Inner {
                comm: Mutex::new(Some(comm)),
                side: Mutex::new(None),
                aborted: Mutex::new(None),
                pending: Mutex::new(VecDeque::new()),
                watched: AtomicBool::new(false),
                stop: AtomicBool::new(false),
            }),
            dev: dev.clone(),
            side_stream: side_stream.clone(),
            rank,
            world,
        };
        if !overlap {
            return Ok(me);
        }
        // The side communicator: rank 0's new id, all-gathered over the first.
        let side_id = if rank == 0 { unique_id()? } else { [0u8; 128] };
        let ids = Tensor::new(side_id.map(u32::from).to_vec(), device)?;
        let got = me.gather_stacked(&ids, false)?.get(0)?.to_vec1::<u32>()?;
        let side_id = Id::uninit(std::array::from_fn(|i| got[i] as u8 as _));
        let side =
            Comm::from_rank(side_stream, rank, world, side_id).map_err(|e| nccl_err("init", e))?;
        *me.inner.side.lock().expect("fresh mutex") = Some(side);
        Ok(me)
    }

    /// The stream transfers in flight run on (tests queue work there to show the waits).
    pub fn transfer_stream(&self) -> Arc<CudaStream> {
        self.side_stream.clone()
    }

    /// Whether transfers in flight have their own stream and communicator.
    pub fn overlaps(&self) -> bool {
        self.inner.side.lock().is_ok_and(|s| s.is_some())
    }

    /// Starts the stall watchdog: when a collective has not finished `timeout` after it became
    /// the oldest unfinished one (after the previous one finished, or after it was enqueued), the
    /// communicator is aborted and `on_stall` gets a message naming it. The handler decides what
    /// happens to the process (the `apb` host stops every rank and exits non-zero).
    pub fn watch(self, timeout: Duration, on_stall: impl FnOnce(String) + Send + 'static) -> Self {
        self.inner.watched.store(true, Ordering::SeqCst);
        let inner = self.inner.clone();
        let ctx = self.dev.cuda_stream().context().clone();
        let rank = self.rank;
        let poll = (timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(200));
        std::thread::spawn(move || {
            let _ = ctx.bind_to_thread();
            let mut head_since: Option<Instant> = None;
            while !inner.stop.load(Ordering::SeqCst) {
                std::thread::sleep(poll);
                let Ok(mut q) = inner.pending.lock() else {
                    return;
                };
                while q
                    .front()
                    .is_some_and(|(_, ev)| ev.as_ref().is_some_and(|e| e.is_complete()))
                {
                    q.pop_front();
                    head_since = None;
                }
                let Some(&(op, _)) = q.front() else {
                    continue;
                };
                if head_since.get_or_insert_with(Instant::now).elapsed() > timeout {
                    drop(q);
                    let why = format!(
                        "rank {rank}: NCCL {op} did not finish within {}s (a peer stalled or died)",
                        timeout.as_secs_f64()
                    );
                    inner.abort(&why);
                    on_stall(why);
                    return;
                }
            }
        });
        self
    }

    /// Runs `f` with the main communicator, or with `side` the one of transfers in flight,
    /// tracked by the watchdog (an event behind it on its stream).
    fn with_comm<T>(
        &self,
        op: &'static str,
        side: bool,
        f: impl FnOnce(&Comm) -> Result<T>,
    ) -> Result<T> {
        if let Some(why) = self.inner.aborted.lock().ok().and_then(|a| a.clone()) {
            return Err(Error::Comm(format!("group aborted: {why}")));
        }
        let which = if side {
            &self.inner.side
        } else {
            &self.inner.comm
        };
        let guard = which
            .lock()
            .map_err(|_| Error::Comm("NCCL communicator poisoned".into()))?;
        let comm = guard
            .as_ref()
            .ok_or_else(|| Error::Comm("NCCL communicator aborted".into()))?;
        let watched = self.inner.watched.load(Ordering::SeqCst);
        if watched {
            if let Ok(mut q) = self.inner.pending.lock() {
                q.push_back((op, None));
            }
        }
        let out = f(comm);
        if watched {
            let ev = comm
                .stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING));
            if let Ok(mut q) = self.inner.pending.lock() {
                // Our entry is the newest: a rank issues its collectives from one thread.
                match (&out, ev) {
                    (Ok(_), Ok(ev)) => {
                        if let Some(last) = q.back_mut() {
                            last.1 = Some(ev);
                        }
                    }
                    (_, ev) => {
                        q.pop_back();
                        ev.map_err(|e| Error::Comm(format!("recording a CUDA event: {e:?}")))?;
                    }
                }
            }
        }
        out
    }

    /// Makes the transfer stream wait for all work queued so far on the compute stream (before a
    /// transfer in flight: its input's producer and its buffers' allocation).
    fn side_after_compute(&self) -> Result<()> {
        self.side_stream
            .join(&self.dev.cuda_stream())
            .map_err(|e| Error::Comm(format!("ordering the transfer stream: {e:?}")))
    }

    /// `out` once the transfers queued on the transfer stream so far are done: the compute stream
    /// waits for them in [`Pending::wait`]; `keep` (their inputs and outputs) lives until then.
    fn in_flight<T: Send + 'static>(&self, keep: Vec<Tensor>, out: T) -> Result<Pending<T>> {
        let done = self
            .side_stream
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| Error::Comm(format!("recording a CUDA event: {e:?}")))?;
        let compute = self.dev.cuda_stream();
        Ok(Pending::new(move || {
            compute
                .wait(&done)
                .map_err(|e| Error::Comm(format!("waiting for a transfer: {e:?}")))?;
            drop(keep);
            Ok(out)
        }))
    }

    /// All-gathers `t` (contiguous, same shape on every rank) as `(world, ..t.shape)`; with
    /// `side`, on the transfer stream (the caller orders it: [`Self::in_flight`]).
    fn gather_stacked(&self, t: &Tensor, side: bool) -> Result<Tensor> {
        let t = t.contiguous()?;
        let mut shape = vec![self.world];
        shape.extend(t.dims());
        let n = t.elem_count();
        let (st, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            return Err(Error::Comm("NCCL all_gather of a non-CUDA tensor".into()));
        };
        let off = layout.start_offset();
        macro_rules! go {
            ($ty:ty) => {{
                let src = cs.as_cuda_slice::<$ty>()?.slice(off..off + n);
                // Uninitialised: the gather writes every element. On the compute stream, whose
                // kernels read and free it.
                let mut dst: CudaSlice<$ty> =
                    unsafe { self.dev.cuda_stream().alloc::<$ty>(n * self.world) }
                        .map_err(|e| Error::Comm(format!("NCCL all_gather: allocating: {e:?}")))?;
                if side {
                    self.side_after_compute()?;
                }
                self.with_comm("all_gather", side, |c| {
                    c.all_gather(&src, &mut dst)
                        .map(|_| ())
                        .map_err(|e| nccl_err("all_gather", e))
                })?;
                CudaStorage::wrap_cuda_slice(dst, self.dev.clone())
            }};
        }
        let out = match t.dtype() {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            DType::F16 => go!(half::f16),
            DType::U32 => go!(u32),
            dt => return Err(Error::Comm(format!("NCCL all_gather: dtype {dt:?}"))),
        };
        drop(st);
        Ok(Tensor::from_storage(
            Storage::Cuda(out),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

impl NcclComm {
    /// Grouped point-to-point on the rank's stream: each `(peer, tensor)` of `sends` goes to its
    /// peer, and one tensor of `shape` and `dtype` (that of the sends) comes from each peer of
    /// `recv_from`, in that order.
    fn p2p(
        &self,
        op: &'static str,
        side: bool,
        sends: &[(usize, Tensor)],
        recv_from: &[usize],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Vec<Tensor>> {
        let n: usize = shape.iter().product();
        let sends = sends
            .iter()
            .map(|(peer, t)| {
                if t.dtype() != dtype || t.dims() != shape {
                    return Err(Error::Comm(format!(
                        "NCCL {op}: every part must be {shape:?} {dtype:?}, got {:?} {:?}",
                        t.dims(),
                        t.dtype()
                    )));
                }
                Ok((*peer, t.contiguous()?))
            })
            .collect::<Result<Vec<_>>>()?;
        let guards: Vec<_> = sends.iter().map(|(_, t)| t.storage_and_layout()).collect();
        macro_rules! go {
            ($ty:ty) => {{
                // Uninitialised: every element is written by its receive before anyone reads it.
                let mut dsts = recv_from
                    .iter()
                    .map(|_| {
                        unsafe { self.dev.cuda_stream().alloc::<$ty>(n) }
                            .map_err(|e| Error::Comm(format!("NCCL {op}: allocating: {e:?}")))
                    })
                    .collect::<std::result::Result<Vec<CudaSlice<$ty>>, _>>()?;
                if side {
                    self.side_after_compute()?;
                }
                let mut srcs = Vec::with_capacity(guards.len());
                for (st, layout) in &guards {
                    let Storage::Cuda(cs) = &**st else {
                        return Err(Error::Comm(format!("NCCL {op} of a non-CUDA tensor")));
                    };
                    let off = layout.start_offset();
                    srcs.push(cs.as_cuda_slice::<$ty>()?.slice(off..off + n));
                }
                self.with_comm(op, side, |c| {
                    // cudarc ends the group in Drop and panics if that fails: contain it.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let mut g = c.group();
                        for ((peer, _), src) in sends.iter().zip(srcs) {
                            g.send(src, *peer as i32)?;
                        }
                        for (peer, dst) in recv_from.iter().zip(dsts.iter_mut()) {
                            g.recv(dst.slice_mut(..), *peer as i32)?;
                        }
                        Ok::<_, cudarc::nccl::result::NcclError>(())
                    }));
                    match r {
                        Ok(r) => r.map_err(|e| nccl_err(op, e)),
                        Err(_) => Err(Error::Comm(format!("NCCL {op}: group end failed"))),
                    }
                })?;
                dsts.into_iter()
                    .map(|d| CudaStorage::wrap_cuda_slice(d, self.dev.clone()))
                    .collect::<Vec<_>>()
            }};
        }
        let outs = match dtype {
            DType::F32 => go!(f32),
            DType::BF16 => go!(half::bf16),
            DType::F16 => go!(half::f16),
            DType::U32 => go!(u32),
            dt => return Err(Error::Comm(format!("NCCL {op}: dtype {dt:?}"))),
        };
        drop(guards);
        Ok(outs
            .into_iter()
            .map(|o| {
                Tensor::from_storage(
                    Storage::Cuda(o),
                    shape,
                    candle_core::op::BackpropOp::none(),
                    false,
                )
            })
            .collect())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let all = self.gather_stacked(t, false)?;
        (0..self.world)
            .map(|r| Ok(all.get(r)?))
            .collect::<Result<Vec<_>>>()
    }
    /// On the transfer stream: kernels queued after this call overlap it; [`Pending::wait`]
    /// makes the compute stream wait for it.
    fn all_gather_pending(&self, t: &Tensor) -> Result<Pending<Vec<Tensor>>> {
        if !self.overlaps() {
            return Ok(Pending::ready(self.all_gather(t)?));
        }
        let t = t.contiguous()?;
        let all = self.gather_stacked(&t, true)?;
        let parts = (0..self.world)
            .map(|r| Ok(all.get(r)?))
            .collect::<Result<Vec<_>>>()?;
        self.in_flight(vec![t, all], parts)
    }
    fn broadcast(&self, t: Option<&Tensor>, root: usize) -> Result<Tensor> {
        // Header: dtype code, rank count, dims (at most 6), as u32 on the device.
        let header = match (self.rank == root, t) {
            (true, Some(t)) => {
                let code = match t.dtype() {
                    DType::F32 => 0u32,
                    DType::BF16 => 1,
                    DType::F16 => 2,
                    DType::U32 => 3,
                    dt => return Err(Error::Comm(format!("NCCL broadcast: dtype {dt:?}"))),
                };
                let mut h = vec![code, t.rank() as u32];
                h.extend(t.dims().iter().map(|d| *d as u32));
                h.resize(8, 0);
                h
            }
            (true, None) => return Err(Error::Comm("broadcast root has no tensor".into())),
            _ => vec![0u32; 8],
        };
        let header = Tensor::new(header, &Device::Cuda(self.dev.clone()))?;
        let h = self
            .gather_stacked(&header, false)?
            .get(root)?
            .to_vec1::<u32>()?;
        let dims: Vec<usize> = h[2..2 + h[1] as usize]
            .iter()
            .map(|d| *d as usize)
            .collect();
        let dtype = [DType::F32, DType::BF16, DType::F16, DType::U32][h[0] as usize];
        // Small payloads (tokens, decode outputs): an all-gather keeps one code path.
        let mine = match t {
            Some(t) if self.rank == root => t.clone(),
            _ => Tensor::zeros(dims.as_slice(), dtype, &Device::Cuda(self.dev.clone()))?,
        };
        Ok(self.gather_stacked(&mine, false)?.get(root)?)
    }
    fn barrier(&self) -> Result<()> {
        let one = Tensor::new(&[1u32], &Device::Cuda(self.dev.clone()))?;
        self.gather_stacked(&one, false)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        Ok(())
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why);
    }
    fn ring_pass(&self, t: &Tensor) -> Result<Pending> {
        let (next, prev) = (
            (self.rank + 1) % self.world,
            (self.rank + self.world - 1) % self.world,
        );
        if !self.overlaps() {
            let mut got = self.p2p(
                "ring_pass",
                false,
                &[(next, t.clone())],
                &[prev],
                t.dims(),
                t.dtype(),
            )?;
            return Ok(Pending::ready(got.remove(0)));
        }
        // On the transfer stream: the attention queued next overlaps it.
        let t = t.contiguous()?;
        let got = self
            .p2p(
                "ring_pass",
                true,
                &[(next, t.clone())],
                &[prev],
                t.dims(),
                t.dtype(),
            )?
            .remove(0);
        self.in_flight(vec![t, got.clone()], got)
    }
    fn all_to_all(&self, parts: &[Tensor]) -> Result<Vec<Tensor>> {
        if parts.len() != self.world {
            return Err(Error::Comm(format!(
                "all_to_all needs {} parts, got {}",
                self.world,
                parts.len()
            )));
        }
        if let Some(p) = parts
            .iter()
            .find(|p| p.dims() != parts[0].dims() || p.dtype() != parts[0].dtype())
        {
            return Err(Error::Comm(format!(
                "all_to_all: parts of one shape and dtype, got {:?} {:?} and {:?} {:?}",
                parts[0].dims(),
                parts[0].dtype(),
                p.dims(),
                p.dtype()
            )));
        }
        let others: Vec<usize> = (0..self.world).filter(|&r| r != self.rank).collect();
        let sends: Vec<(usize, Tensor)> = others.iter().map(|&r| (r, parts[r].clone())).collect();
        let mut got = self
            .p2p(
                "all_to_all",
                false,
                &sends,
                &others,
                parts[0].dims(),
                parts[0].dtype(),
            )?
            .into_iter();
        Ok((0..self.world)
            .map(|r| {
                if r == self.rank {
                    parts[r].clone()
                } else {
                    got.next().expect("one receive per other rank")
                }
            })
            .collect())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        // Release the communicator here, on the owner's thread while its CUDA context lives, not
        // whenever the watchdog thread lets go of `inner` (its abort then fails and cudarc panics).
        for comm in [&self.inner.side, &self.inner.comm] {
            if let Ok(mut c) = comm.lock() {
                drop(c.take());
            }
        }
    }
}
