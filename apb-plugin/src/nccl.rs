//! [`Communicator`] over NCCL: one process per GPU, collectives on the rank's candle stream, so
//! they are ordered with the kernels around them without extra synchronisation. Set
//! `NCCL_NVLS_ENABLE=0` in the environment (NVLink SHARP multicast is not used).
//!
//! Every rank must pass tensors of the same shape and dtype to `all_gather` (APB and ring blocks
//! are padded to equal sizes for this). `broadcast` sends the shape first, so other ranks need not
//! know it. A dead peer cannot be detected from inside a collective; the process launcher
//! (`apb` host) kills the whole group when one rank exits, so nothing hangs.

use crate::comm::Communicator;
use crate::{Error, Result};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};
use cudarc::driver::CudaSlice;
use cudarc::nccl::safe::{Comm, Id};
use std::sync::Mutex;

/// The 128-byte NCCL unique id that rank 0 creates and the rendezvous hands to every rank.
pub type UniqueId = [u8; 128];

pub fn unique_id() -> Result<UniqueId> {
    let id = Id::new().map_err(|e| Error::Comm(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().map(|c| c as u8))
}

pub struct NcclComm {
    comm: Mutex<Option<Comm>>,
    dev: CudaDevice,
    rank: usize,
    world: usize,
    aborted: Mutex<Option<String>>,
}

// The NCCL communicator handle is used behind the mutex, one collective at a time.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Comm(format!("NCCL {what}: {e:?}"))
}

impl NcclComm {
    /// Joins the group `id` as `rank` of `world` on `device` (blocks until all ranks joined).
    pub fn new(device: &Device, rank: usize, world: usize, id: UniqueId) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(Error::Comm(format!(
                "NCCL needs a CUDA device, got {device:?}"
            )));
        };
        let id = Id::uninit(id.map(|b| b as _));
        let comm =
            Comm::from_rank(dev.cuda_stream(), rank, world, id).map_err(|e| nccl_err("init", e))?;
        Ok(Self {
            comm: Mutex::new(Some(comm)),
            dev: dev.clone(),
            rank,
            world,
            aborted: Mutex::new(None),
        })
    }

    fn with_comm<T>(&self, f: impl FnOnce(&Comm) -> Result<T>) -> Result<T> {
        if let Some(why) = self.aborted.lock().ok().and_then(|a| a.clone()) {
            return Err(Error::Comm(format!("group aborted: {why}")));
        }
        let guard = self
            .comm
            .lock()
            .map_err(|_| Error::Comm("NCCL communicator poisoned".into()))?;
        let comm = guard
            .as_ref()
            .ok_or_else(|| Error::Comm("NCCL communicator aborted".into()))?;
        f(comm)
    }

    /// All-gathers `t` (contiguous, same shape on every rank) as `(world, ..t.shape)`.
    fn gather_stacked(&self, t: &Tensor) -> Result<Tensor> {
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
                let mut dst: CudaSlice<$ty> = self.dev.alloc_zeros::<$ty>(n * self.world)?;
                self.with_comm(|c| {
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

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let all = self.gather_stacked(t)?;
        (0..self.world)
            .map(|r| Ok(all.get(r)?))
            .collect::<Result<Vec<_>>>()
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
        let h = self.gather_stacked(&header)?.get(root)?.to_vec1::<u32>()?;
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
        Ok(self.gather_stacked(&mine)?.get(root)?)
    }
    fn barrier(&self) -> Result<()> {
        let one = Tensor::new(&[1u32], &Device::Cuda(self.dev.clone()))?;
        self.gather_stacked(&one)?.flatten_all()?.to_vec1::<u32>()?;
        Ok(())
    }
    fn abort(&self, why: &str) {
        if let Ok(mut a) = self.aborted.lock() {
            a.get_or_insert_with(|| why.to_string());
        }
        // Dropping the communicator aborts it (ncclCommAbort), failing pending collectives.
        if let Ok(mut c) = self.comm.try_lock() {
            c.take();
        }
    }
}
