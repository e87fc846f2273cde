//! cuDNN's fused attention (what PyTorch's SDPA picks by default on sm_90), called through our C++
//! shim (`kernels/src/cudnn_sdpa.cpp`) for one [`Piece`] at a time. libcudnn.so.9 is opened at run
//! time; where it is missing or older than 9.3 this kernel is unavailable.

use super::piece::Piece;
use crate::cuda::{alloc, ptr};
use candle_core::cuda::cudarc::driver::CudaStream;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Result, Tensor};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, OnceLock};

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

/// Runs `p` on `stream`: `p.o` (and `p.lse`) written in place.
pub(super) fn run_piece(p: &Piece, dev: &CudaDevice, stream: &Arc<CudaStream>) -> Result<()> {
    let (qs, ks, vs, os) = (p.q, p.k, p.v, p.o);
    let (b, n_h, nr, d) = qs.dims4()?;
    let (_, n_kv, nk, _) = ks.dims4()?;
    let stride = |t: &Tensor| -> [i64; 4] {
        let s = t.stride();
        [s[0] as i64, s[1] as i64, s[2] as i64, s[3] as i64]
    };
    let mut params = CudnnSdpa {
        q: ptr(qs, stream)?,
        k: ptr(ks, stream)?,
        v: ptr(vs, stream)?,
        o: ptr(os, stream)?,
        lse: p.lse.map_or(0, |l| l.1),
        stream: stream.cu_stream() as *mut c_void,
        b: b as i64,
        hq: n_h as i64,
        hkv: n_kv as i64,
        sq: nr as i64,
        sk: nk as i64,
        d: d as i64,
        q_stride: stride(qs),
        k_stride: stride(ks),
        v_stride: stride(vs),
        o_stride: stride(os),
        scale: (1.0 / (d as f64).sqrt()) as f32,
        dtype: if qs.dtype() == DType::BF16 { 0 } else { 1 },
        causal: p.causal as i32,
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
        let rc = unsafe { apb_cudnn_sdpa(&params, wp, wb, &mut need, err.as_mut_ptr(), err.len()) };
        match rc {
            0 => break,
            2 if ws.is_none() => {
                ws = Some(alloc(dev, (need as usize).div_ceil(4), DType::F32, stream)?)
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
    Ok(())
}
