//! Attention, in one place: the mask type ([`Mask`]), the one entry point ([`attention`]) that
//! checks shapes and dispatches, the log-sum-exp merge of partial results ([`lse_merge`]), and the
//! f64 reference every path is tested against ([`reference_attention`]).
//!
//! Paths, by device and shape:
//! - CUDA, bf16/f16, head_dim 64/128 ([`flash_supported`]): on sm_90 a fused Hopper kernel for
//!   prefill blocks (`hopper` (sm_90 only): FlashInfer's FA3-style prefill or cuDNN's SDPA), else our
//!   FlashAttention-2 kernel (`mma.rs`, attention.cu), which also runs decode with split keys.
//! - CPU prefill (≥ 16 query rows): the tiled CPU kernel (`cpu_flash.rs`).
//! - Anything else (decode on the CPU, other dtypes): chunked f32 (`chunked.rs`).
//!
//! The mask is numbers, never a matrix: bottom-right causal (query row `i` of `sq` sees key `j` of
//! `sk` iff `j <= i + sk - sq`) plus APB's rule that the first `anchor_rows` rows skip the first
//! `passing_keys` keys.

use candle_core::{DType, Result, Tensor, D};

mod chunked;
mod cpu_flash;
mod cpu_rows;
mod reference;
pub use reference::reference_attention;

/// From this many query rows on, CPU attention uses the tiled kernel; decode steps use the
/// chunked path, which reads strided cache views without copying them.
const CPU_FUSED_MIN_ROWS: usize = 16;

/// Which keys each query row may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mask {
    /// Bottom-right-aligned causal mask.
    pub causal: bool,
    /// The first `anchor_rows` query rows do not see the first `passing_keys` keys (APB).
    pub anchor_rows: usize,
    /// Passing keys before the anchor (APB).
    pub passing_keys: usize,
}

impl Mask {
    /// Plain causal, aligned bottom-right (new rows are the last keys).
    pub fn causal() -> Self {
        Self {
            causal: true,
            anchor_rows: 0,
            passing_keys: 0,
        }
    }
    /// No mask: every row attends every key.
    pub fn full() -> Self {
        Self {
            causal: false,
            anchor_rows: 0,
            passing_keys: 0,
        }
    }
    /// APB: causal, anchor rows skip the passing block at the front of the keys.
    pub fn apb(anchor_rows: usize, passing_keys: usize) -> Self {
        Self {
            causal: true,
            anchor_rows,
            passing_keys,
        }
    }

    /// Visible key range `[lo, hi)` of query row `i` (of `sq`) over `sk` keys.
    pub fn key_range(&self, i: usize, sq: usize, sk: usize) -> (usize, usize) {
        let hi = if self.causal {
            (i + 1 + sk).saturating_sub(sq).min(sk)
        } else {
            sk
        };
        let lo = if i < self.anchor_rows {
            self.passing_keys.min(sk)
        } else {
            0
        };
        (lo, hi.max(lo))
    }
}

/// Whether [`attention`] runs these operands fused on the GPU: CUDA, bf16/f16, head_dim 64 or 128.
pub fn flash_supported(q: &Tensor) -> bool {
    q.device().is_cuda()
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && matches!(q.dims().last(), Some(64 | 128))
}

/// Merges `parts` partial attention results: `o` `(parts, rows, d)` and `lse` `(parts, rows)`, f32
/// (natural log). Returns `(rows, d)` and `(rows,)`. Parts with LSE `-inf` weigh 0; a row no part
/// saw comes out 0 with LSE `-inf`.
pub fn lse_merge(o: &Tensor, lse: &Tensor) -> Result<(Tensor, Tensor)> {
    let (parts, rows, d) = o.dims3()?;
    if lse.dims2()? != (parts, rows) {
        candle_core::bail!("lse_merge: o {:?} and lse {:?}", o.dims(), lse.dims());
    }
    let o = o.to_dtype(DType::F32)?.contiguous()?;
    let lse = lse.to_dtype(DType::F32)?.contiguous()?;
    #[cfg(feature = "cuda")]
    if o.device().is_cuda() {
        return mma::lse_merge(&o, &lse, parts, rows, d, DType::F32);
    }
    let _ = d;
    // -inf → -1e30 keeps `lse − m` finite where some part attended and −inf where none did.
    let m = lse.max_keepdim(0)?.maximum(-1e30f32)?;
    let w = lse.broadcast_sub(&m)?.exp()?;
    let den = w.sum_keepdim(0)?;
    let out_lse = (m + den.log()?)?.squeeze(0)?;
    let w = w
        .broadcast_div(&den.maximum(1e-30f32)?)?
        .unsqueeze(D::Minus1)?;
    Ok((o.broadcast_mul(&w)?.sum(0)?, out_lse))
}

/// `softmax(q kᵀ / √d) v` under `mask`.
///
/// `q`: `(b, n_h, sq, d)`; `k`, `v`: `(b, n_kv, sk, d)` with `n_h % n_kv == 0` (views with
/// strided rows are fine). Returns the output `(b, n_h, sq, d)` in `q`'s dtype (possibly a strided
/// view). A row that sees no key gets output 0.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask) -> Result<Tensor> {
    Ok(attend(q, k, v, mask, false)?.0)
}

/// [`attention`] and the natural-log log-sum-exp of the scaled scores `(b, n_h, sq)` in f32
/// (`-inf` for a row that sees no key): what partial results are merged by.
pub fn attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
) -> Result<(Tensor, Tensor)> {
    let (out, lse) = attend(q, k, v, mask, true)?;
    let lse = lse.ok_or_else(|| candle_core::Error::Msg("attention returned no LSE".into()))?;
    Ok((out, lse))
}

/// The dispatcher behind both: the fused kernel for the device, the LSE only when asked for.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, n_h, sq, d) = q.dims4()?;
    let (bk, n_kv, sk, dk) = k.dims4()?;
    if bk != b || dk != d || v.dims4()? != (b, n_kv, sk, d) || n_kv == 0 || n_h % n_kv != 0 {
        candle_core::bail!(
            "attention shapes: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if flash_supported(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        use hopper::Kernel;
        let forced = hopper::choice();
        let kernels: Vec<Kernel> = match forced {
            Kernel::Mma => vec![],
            Kernel::Auto => hopper::auto_order(d).to_vec(),
            k => vec![k],
        };
        for kernel in kernels {
            let force = forced != Kernel::Auto;
            if let Some(out) = hopper::run(kernel, q, k, v, mask, want_lse, force)? {
                return Ok(out);
            }
        }
        return mma::flash(q, k, v, mask, want_lse);
    }
    if q.device().is_cpu() && sq >= CPU_FUSED_MIN_ROWS {
        return cpu_flash::attention_tensors(q, k, v, mask, want_lse);
    }
    chunked::attention(q, k, v, mask, want_lse)
}

/// Whether [`attention_rows`] runs all rows of `q` in one fused call (not row by row): where
/// callers batch a decode step's cache writes and attention for every sequence at once.
pub fn rows_fused(q: &Tensor) -> bool {
    flash_supported(q) || (q.device().is_cpu() && q.dtype() == DType::F32)
}

/// The decode rows of many sequences in one call: row `i` of `q` `(1, n_h, rows, d)` (its one new
/// token) attends every key of `kv[i]` (`(1, n_kv, len_i, d)`, typically views of that sequence's
/// cache; None: this rank holds none of it, output 0 and LSE `-inf`). Returns the output
/// `(1, n_h, rows, d)` in `q`'s dtype and the LSE `(1, n_h, rows)` in f32.
///
/// Where [`flash_supported`], one kernel for all rows over a table of their caches (row by row,
/// a decode step of 32 sequences launched ~10 small kernels per row and layer and took 10× its
/// memory roofline); each row's keys are split by its own length alone, so a row comes out the
/// same whatever rows run beside it. On the CPU in f32 one call for all rows (`cpu_rows.rs`),
/// likewise batch-invariant. Elsewhere row by row through [`attention`]. [`rows_fused`] says
/// which.
pub fn attention_rows(q: &Tensor, kv: &[Option<(Tensor, Tensor)>]) -> Result<(Tensor, Tensor)> {
    let (b, n_h, rows, d) = q.dims4()?;
    if b != 1 || rows != kv.len() {
        candle_core::bail!("attention_rows: q {:?} for {} rows", q.dims(), kv.len());
    }
    for (k, v) in kv.iter().flatten() {
        let (bk, n_kv, sk, dk) = k.dims4()?;
        if bk != 1 || dk != d || v.dims4()? != (1, n_kv, sk, d) || n_kv == 0 || n_h % n_kv != 0 {
            candle_core::bail!(
                "attention_rows: q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
    }
    #[cfg(feature = "cuda")]
    if flash_supported(q)
        && kv
            .iter()
            .flatten()
            .all(|(k, v)| k.dtype() == q.dtype() && v.dtype() == q.dtype())
        && kv
            .iter()
            .flatten()
            .map(|(k, _)| k.dim(1))
            .collect::<Result<std::collections::BTreeSet<_>>>()?
            .len()
            <= 1
    {
        let q = q.squeeze(0)?.unsqueeze(2)?.transpose(0, 1)?.contiguous()?; // (rows, n_h, 1, d)
        let (out, lse) = mma::flash_rows(&q, kv)?;
        return Ok((
            out.squeeze(2)?.transpose(0, 1)?.unsqueeze(0)?,
            lse.squeeze(2)?.transpose(0, 1)?.unsqueeze(0)?,
        ));
    }
    if cpu_rows::supported(q, kv) {
        return cpu_rows::attention_rows(q, kv);
    }
    let mut outs = Vec::with_capacity(rows);
    let mut lses = Vec::with_capacity(rows);
    for (i, x) in kv.iter().enumerate() {
        let qi = q.narrow(2, i, 1)?;
        let (o, l) = match x {
            Some((k, v)) => attention_with_lse(&qi, k, v, Mask::full())?,
            None => (
                qi.zeros_like()?,
                Tensor::full(f32::NEG_INFINITY, (1, n_h, 1), q.device())?,
            ),
        };
        outs.push(o);
        lses.push(l);
    }
    Ok((Tensor::cat(&outs, 2)?, Tensor::cat(&lses, 2)?))
}

#[cfg(feature = "cuda")]
mod cudnn;
#[cfg(feature = "cuda")]
mod flashinfer;
#[cfg(feature = "cuda")]
pub mod hopper;
#[cfg(feature = "cuda")]
pub(crate) mod mma;
#[cfg(feature = "cuda")]
mod piece;
#[cfg(feature = "cuda")]
pub(crate) use mma::ROWS_BY_VALUE;
