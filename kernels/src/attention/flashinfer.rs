//! FlashInfer's Hopper prefill (FA3-style: wgmma, TMA, producer/consumer warpgroups), compiled
//! from its header-only sources into `kernels/src/flashinfer_sm90.cu` and called for one [`Piece`]
//! at a time. Single sequence per call: a batch runs one call per sequence.

use super::piece::Piece;
use crate::cuda::ptr;
use candle_core::cuda::cudarc::driver::CudaStream;
use candle_core::{DType, Result, Tensor};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Arc;

/// Must match `ApbFiParams` in flashinfer_sm90.cu (160 bytes).
#[repr(C)]
struct ApbFiParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    lse_scratch: u64,
    lse_layout: i32,
    qo_len: i32,
    kv_len: i32,
    num_qo_heads: i32,
    num_kv_heads: i32,
    head_dim: i32,
    q_stride_n: i64,
    q_stride_h: i64,
    k_stride_n: i64,
    k_stride_h: i64,
    v_stride_n: i64,
    v_stride_h: i64,
    o_stride_n: i64,
    o_stride_h: i64,
    causal: i32,
    sm_scale: f32,
    dtype: i32,
    stream: *mut c_void,
}

const _: () = assert!(std::mem::size_of::<ApbFiParams>() == 160);

extern "C" {
    fn apb_fi_prefill(p: *const ApbFiParams, err: *mut c_char, len: usize) -> c_int;
}

/// Runs `p` on `stream`, one call per sequence of the batch: `p.o` (and `p.lse`) written in place.
pub(super) fn run_piece(p: &Piece, stream: &Arc<CudaStream>) -> Result<()> {
    let (b, n_h, nr, d) = p.q.dims4()?;
    let (_, n_kv, nk, _) = p.k.dims4()?;
    let es = p.q.dtype().size_in_bytes() as u64;
    let (qs, ks, vs, os) = (p.q.stride(), p.k.stride(), p.v.stride(), p.o.stride());
    let base = |t: &Tensor| ptr(t, stream);
    let (q0, k0, v0, o0) = (base(p.q)?, base(p.k)?, base(p.v)?, base(p.o)?);
    for bi in 0..b as u64 {
        let at = |p0: u64, st: &[usize]| p0 + bi * st[0] as u64 * es;
        let params = ApbFiParams {
            q: at(q0, qs),
            k: at(k0, ks),
            v: at(v0, vs),
            o: at(o0, os),
            // (b, n_h, rows) f32: this sequence's (n_h, rows) block, FlashInfer's layout 0.
            lse: p.lse.map_or(0, |l| l.1 + bi * (n_h * nr * 4) as u64),
            lse_scratch: 0,
            lse_layout: 0,
            qo_len: nr as i32,
            kv_len: nk as i32,
            num_qo_heads: n_h as i32,
            num_kv_heads: n_kv as i32,
            head_dim: d as i32,
            q_stride_n: qs[2] as i64,
            q_stride_h: qs[1] as i64,
            k_stride_n: ks[2] as i64,
            k_stride_h: ks[1] as i64,
            v_stride_n: vs[2] as i64,
            v_stride_h: vs[1] as i64,
            o_stride_n: os[2] as i64,
            o_stride_h: os[1] as i64,
            causal: p.causal as i32,
            sm_scale: (1.0 / (d as f64).sqrt()) as f32,
            dtype: if p.q.dtype() == DType::BF16 { 1 } else { 0 },
            stream: stream.cu_stream() as *mut c_void,
        };
        let mut err = [0 as c_char; 512];
        // SAFETY: every pointer is a live device buffer of the described shape on `stream`, kept
        // alive by the caller's tensors until after the launch is queued.
        let rc = unsafe { apb_fi_prefill(&params, err.as_mut_ptr(), err.len()) };
        if rc != 0 {
            // SAFETY: NUL-terminated by the wrapper.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            candle_core::bail!("FlashInfer prefill: {msg}")
        }
    }
    Ok(())
}
