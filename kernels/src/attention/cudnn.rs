//! Hopper path: cuDNN's fused attention (what PyTorch's SDPA picks by default on sm_90), called
//! through our C++ shim (`kernels/src/cudnn_sdpa.cpp`). libcudnn.so.9 is opened at run time; if it
//! is missing, too old, or the GPU is not sm_90, [`run`] declines and the caller uses our
//! `mma.sync` kernel.
//!
//! cuDNN knows bottom-right causal and no mask; the APB mask is two such calls: anchor rows attend
//! the keys after the passing block (causal), the other rows attend all keys (causal). Shapes where
//! some row would see no key go to our kernel, which defines those rows as 0 / LSE −inf.

use super::Mask;
use crate::cuda::{alloc, cuda_device, ptr};
use candle_core::cuda::cudarc::driver::sys;
use candle_core::{DType, Result, Tensor};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// Query rows below this go to our kernel, whose split-KV schedule suits decode.
pub const MIN_ROWS: usize = 128;

/// Must match `ApbSdpa` in cudnn_sdpa.cpp.
#[repr(C)]
struct CudnnSdpa {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    stream: *mut c_void,
    b: i64,
    hq: i64,
    hkv: i64,
    sq: i64,
    sk: i64,
    d: i64,
    q_stride: [i64; 4],
    k_stride: [i64; 4],
    v_stride: [i64; 4],
    o_stride: [i64; 4],
    scale: f32,
    dtype: i32,
    causal: i32,
    device: i32,
}

extern "C" {
    fn apb_cudnn_available(err: *mut c_char, len: usize) -> c_int;
    fn apb_cudnn_sdpa(
        p: *const CudnnSdpa,
        ws: *mut c_void,
        ws_bytes: i64,
        ws_needed: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// Which attention kernel `APB_ATTENTION` asks for: `auto` (default: cuDNN on sm_90 where it
/// loads, else ours), `mma` (ours everywhere, for comparisons), `cudnn` (fail rather than fall back).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Choice {
    Auto,
    Mma,
    Cudnn,
}

pub fn choice() -> Choice {
    static C: OnceLock<Choice> = OnceLock::new();
    *C.get_or_init(|| match std::env::var("APB_ATTENTION").as_deref() {
        Ok("mma") => Choice::Mma,
        Ok("cudnn") => Choice::Cudnn,
        _ => Choice::Auto,
    })
}

/// Whether libcudnn loaded (once per process); the reason if not.
pub fn loaded() -> std::result::Result<(), String> {
    static L: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    L.get_or_init(|| {
        let mut err = [0 as c_char; 512];
        // SAFETY: the shim writes at most `len` bytes, NUL-terminated.
        let rc = unsafe { apb_cudnn_available(err.as_mut_ptr(), err.len()) };
        if rc == 0 {
            Ok(())
        } else {
            // SAFETY: NUL-terminated by the shim.
            Err(unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned())
        }
    })
    .clone()
}

/// Whether this path can run on `device`: sm_90 and libcudnn loaded.
pub fn usable(device: &candle_core::Device) -> Result<bool> {
    let candle_core::Device::Cuda(dev) = device else {
        return Ok(false);
    };
    Ok(is_hopper(dev)? && loaded().is_ok())
}

fn is_hopper(dev: &candle_core::cuda_backend::CudaDevice) -> Result<bool> {
    let major = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(crate::cuda::err)?;
    Ok(major == 9)
}

/// Whether this path computes `mask` over `sq` queries and `sk` keys: every row must see a key.
pub(crate) fn covers(mask: Mask, sq: usize, sk: usize) -> bool {
    let a = mask.anchor_rows.min(sq);
    let p = if a > 0 { mask.passing_keys } else { 0 };
    sk > 0 && if mask.causal { sk >= sq + p } else { a == 0 }
}

/// Attention by cuDNN, or `None` where this path does not apply (not sm_90, cuDNN missing, short
/// queries, masks it does not [`covers`]); if `forced`, those are errors instead (and short queries
/// run here). Operands as in [`super::attention`], already checked.
pub(crate) fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    want_lse: bool,
    forced: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let decline = |why: String| -> Result<Option<(Tensor, Option<Tensor>)>> {
        if forced {
            candle_core::bail!("APB_ATTENTION=cudnn: {why}")
        }
        Ok(None)
    };
    let (b, n_h, sq, d) = q.dims4()?;
    let (_, n_kv, sk, _) = k.dims4()?;
    if [q, k, v].iter().any(|t| t.stride()[3] != 1) {
        return decline("a strided head dimension".into());
    }
    if !covers(mask, sq, sk) {
        return decline(format!(
            "mask {mask:?} with sq {sq}, sk {sk} leaves rows without keys"
        ));
    }
    if !is_hopper(&cuda_device(q)?)? {
        return decline("the GPU is not sm_90".into());
    }
    if let Err(e) = loaded() {
        return decline(e);
    }
    if sq < MIN_ROWS && !forced {
        return Ok(None);
    }
    // Rows [0, a) attend keys [p, p + a + off), rows [a, sq) keys [0, sk) (both bottom-right
    // causal when `causal`); with `off = sk − sq − p ≥ 0` no row is empty.
    let a = mask.anchor_rows.min(sq);
    let p = if a > 0 { mask.passing_keys } else { 0 };
    let off = sk as i64 - sq as i64 - p as i64;
    let dev = cuda_device(q)?;
    let stream = dev.cuda_stream();
    stream
        .context()
        .bind_to_thread()
        .map_err(crate::cuda::err)?;
    // Token-major output, returned as a head-major view: the transpose before o_proj is free.
    // (Measured on H100: cuDNN runs equally fast with a head-major output.)
    let o = alloc(&dev, (b, sq, n_h, d), q.dtype(), &stream)?
        .0
        .transpose(1, 2)?;
    let mut lses = Vec::new();
    let mut call = |rows: (usize, usize), keys: (usize, usize)| -> Result<()> {
        let (r0, nr) = rows;
        let (k0, nk) = keys;
        let (qs, os) = (q.narrow(2, r0, nr)?, o.narrow(2, r0, nr)?);
        let (ks, vs) = (k.narrow(2, k0, nk)?, v.narrow(2, k0, nk)?);
        let lse = if want_lse {
            Some(alloc(&dev, (b, n_h, nr), DType::F32, &stream)?)
        } else {
            None
        };
        let stride = |t: &Tensor| -> [i64; 4] {
            let s = t.stride();
            [s[0] as i64, s[1] as i64, s[2] as i64, s[3] as i64]
        };
        let mut params = CudnnSdpa {
            q: ptr(&qs, &stream)?,
            k: ptr(&ks, &stream)?,
            v: ptr(&vs, &stream)?,
            o: ptr(&os, &stream)?,
            lse: lse.as_ref().map_or(0, |l| l.1),
            stream: stream.cu_stream() as *mut c_void,
            b: b as i64,
            hq: n_h as i64,
            hkv: n_kv as i64,
            sq: nr as i64,
            sk: nk as i64,
            d: d as i64,
            q_stride: stride(&qs),
            k_stride: stride(&ks),
            v_stride: stride(&vs),
            o_stride: stride(&os),
            scale: (1.0 / (d as f64).sqrt()) as f32,
            dtype: if q.dtype() == DType::BF16 { 0 } else { 1 },
            causal: mask.causal as i32,
            device: stream.context().ordinal() as i32,
        };
        // Unit dims: any stride is valid, cuDNN wants the packed one.
        for (st, h, s) in [
            (&mut params.q_stride, n_h, nr),
            (&mut params.o_stride, n_h, nr),
            (&mut params.k_stride, n_kv, nk),
            (&mut params.v_stride, n_kv, nk),
        ] {
            if h == 1 {
                st[1] = (s * d) as i64;
            }
            if b == 1 {
                st[0] = (h * s * d) as i64;
            }
        }
        let mut err = [0 as c_char; 1024];
        let mut need = 0i64;
        let mut ws: Option<(Tensor, u64)> = None;
        loop {
            let (wp, wb) = ws.as_ref().map_or((std::ptr::null_mut(), 0), |w| {
                (w.1 as *mut c_void, w.0.elem_count() as i64 * 4)
            });
            // SAFETY: every pointer is a live device buffer of the described shape on `stream`,
            // kept alive by the tensors above until after the launch is queued.
            let rc =
                unsafe { apb_cudnn_sdpa(&params, wp, wb, &mut need, err.as_mut_ptr(), err.len()) };
            match rc {
                0 => break,
                2 if ws.is_none() => {
                    ws = Some(alloc(
                        &dev,
                        (need as usize).div_ceil(4),
                        DType::F32,
                        &stream,
                    )?)
                }
                _ => {
                    // SAFETY: NUL-terminated by the shim.
                    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
                        .to_string_lossy()
                        .into_owned();
                    candle_core::bail!("{msg}")
                }
            }
        }
        if let Some((l, _)) = lse {
            lses.push(l);
        }
        Ok(())
    };
    if a > 0 {
        call((0, a), (p, (a as i64 + off) as usize))?;
    }
    if a < sq {
        call((a, sq - a), (0, sk))?;
    }
    let lse = if want_lse {
        Some(if lses.len() == 1 {
            lses.pop().expect("one part")
        } else {
            Tensor::cat(&lses, 2)?
        })
    } else {
        None
    };
    Ok(Some((o, lse)))
}
