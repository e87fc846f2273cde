//! Loading our modules once per CUDA context and launching on candle's stream, so kernels are
//! ordered with candle's own ops. Raw device pointers are taken through cudarc, which records the
//! reads/writes for candle's cross-stream tracking.

use candle_core::cuda::cudarc::driver::{
    sys, CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{CudaStorage, DType, Device, Result, Shape, Storage, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Our compiled modules, by name: fatbins (kernels/build.rs), so an A100 or H100 loads machine
/// code instead of compiling PTX first.
macro_rules! module {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".fatbin")),
        )
    };
}
pub(crate) type Module = (&'static str, &'static [u8]);
pub(crate) const ATTENTION_MODULE: Module = module!("attention");
pub(crate) const LAYOUT_MODULE: Module = module!("layout");
pub(crate) const LINEAR_MODULE: Module = module!("linear");
pub(crate) const NORM_MODULE: Module = module!("norm");
pub(crate) const SELECT_MODULE: Module = module!("select");

type ModuleKey = (usize, &'static str);
static MODULES: Mutex<Option<HashMap<ModuleKey, Arc<CudaModule>>>> = Mutex::new(None);

pub(crate) fn err(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// `name` from `module` (loaded on first use in this device's context), with at least
/// `smem` bytes of dynamic shared memory allowed.
pub(crate) fn function(
    dev: &CudaDevice,
    module: Module,
    name: &str,
    smem: usize,
) -> Result<CudaFunction> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let key = (ctx.cu_ctx() as usize, module.0);
    let m = {
        let mut guard = MODULES.lock().expect("module cache");
        let map = guard.get_or_insert_with(HashMap::new);
        match map.get(&key) {
            Some(m) => m.clone(),
            None => {
                // A copy: the driver reads the image from an aligned buffer.
                let image = Ptx::from_binary(module.1.to_vec());
                let m = ctx.load_module(image).map_err(err)?;
                map.insert(key, m.clone());
                m
            }
        }
    };
    let f = m.load_function(name).map_err(err)?;
    if smem > 48 * 1024 {
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(err)?;
    }
    Ok(f)
}

pub(crate) fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        d => candle_core::bail!("expected a CUDA tensor, got one on {d:?}"),
    }
}

/// The device address of `t`'s first element (its storage must be CUDA). `t` must stay alive and
/// unmodified until the launch that uses the address is queued.
pub(crate) fn ptr(t: &Tensor, stream: &Arc<CudaStream>) -> Result<u64> {
    let (st, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*st else {
        candle_core::bail!("expected a CUDA tensor")
    };
    let off = layout.start_offset();
    macro_rules! addr {
        ($t:ty) => {{
            let s = cs.as_cuda_slice::<$t>()?;
            let (p, _sync) = s.device_ptr(stream);
            p + (off * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match t.dtype() {
        DType::BF16 => addr!(half::bf16),
        DType::F16 => addr!(half::f16),
        DType::F32 => addr!(f32),
        DType::U32 => addr!(u32),
        dt => candle_core::bail!("unsupported dtype {dt:?} for our kernels"),
    })
}

/// A new zero-filled tensor of `dtype` on `dev`, and its address.
pub(crate) fn alloc(
    dev: &CudaDevice,
    shape: impl Into<Shape>,
    dtype: DType,
    stream: &Arc<CudaStream>,
) -> Result<(Tensor, u64)> {
    alloc_with(dev, shape.into(), dtype, stream, true)
}

/// [`alloc`] without the zero fill (one memset kernel less), for outputs a kernel writes whole.
///
/// # Safety
/// The caller's kernel must write every element before anything reads the tensor.
pub(crate) unsafe fn alloc_unset(
    dev: &CudaDevice,
    shape: impl Into<Shape>,
    dtype: DType,
    stream: &Arc<CudaStream>,
) -> Result<(Tensor, u64)> {
    alloc_with(dev, shape.into(), dtype, stream, false)
}

fn alloc_with(
    dev: &CudaDevice,
    shape: Shape,
    dtype: DType,
    stream: &Arc<CudaStream>,
    zero: bool,
) -> Result<(Tensor, u64)> {
    let n = shape.elem_count();
    macro_rules! mk {
        ($t:ty) => {{
            // Unset memory is only handed to kernels that overwrite it (`alloc_unset`'s contract).
            let mut s = if zero {
                dev.alloc_zeros::<$t>(n)?
            } else {
                unsafe { dev.alloc::<$t>(n)? }
            };
            let p = s.device_ptr_mut(stream).0;
            (CudaStorage::wrap_cuda_slice(s, dev.clone()), p)
        }};
    }
    let (st, p) = match dtype {
        DType::BF16 => mk!(half::bf16),
        DType::F16 => mk!(half::f16),
        DType::F32 => mk!(f32),
        DType::U32 => mk!(u32),
        dt => candle_core::bail!("unsupported dtype {dt:?} for our kernels"),
    };
    let t = Tensor::from_storage(
        Storage::Cuda(st),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok((t, p))
}

/// Marker for plain-old-data kernel parameter structs.
///
/// # Safety
/// The type must be `#[repr(C)]` with exactly the layout of the kernel's parameter struct.
pub(crate) unsafe trait Pod: Copy {}
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct ByValue<T: Pod>(pub T);
unsafe impl<T: Pod> DeviceRepr for ByValue<T> {}
