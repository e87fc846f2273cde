//! Fused attention (`flash_attention`, CUDA) and the f32 log-sum-exp merge of partial results
//! (`lse_merge`, CPU and CUDA). The mask is numbers, never a matrix: bottom-right causal plus APB's
//! anchor rule (see [`Mask`]).

use candle_core::{DType, Device, Result, Tensor, D};

/// Which keys each query row may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mask {
    /// Bottom-right-aligned causal mask.
    pub causal: bool,
    /// The first `anchor_rows` query rows do not see the first `passing_keys` keys (APB).
    pub anchor_rows: usize,
    pub passing_keys: usize,
}

impl Mask {
    pub fn causal() -> Self {
        Self {
            causal: true,
            anchor_rows: 0,
            passing_keys: 0,
        }
    }
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

/// Whether [`flash_attention`] runs these operands: CUDA, bf16/f16, head_dim 64 or 128.
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
        return mma::lse_merge(&o, &lse, parts, rows, d);
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

/// `softmax(q kᵀ/√d) v` under `mask`, fused on the GPU (CUDA only; check [`flash_supported`]):
/// cuDNN's kernel on Hopper where it applies ([`cudnn`]), else our FlashAttention-2 style kernel. `q` `(b, n_h, sq, d)`, `k`/`v` `(b, n_kv, sk, d)` (views with contiguous
/// rows need no copy). Returns the output in `q`'s dtype and, if `want_lse`, the LSE `(b, n_h, sq)`
/// f32 (the output may be a strided view). Short query blocks (decode) split the keys across blocks
/// and merge by LSE.
#[cfg(feature = "cuda")]
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, n_h, _, d) = q.dims4()?;
    let (bk, n_kv, sk, dk) = k.dims4()?;
    if bk != b || dk != d || v.dims4()? != (b, n_kv, sk, d) || n_kv == 0 || n_h % n_kv != 0 {
        candle_core::bail!(
            "flash_attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if !flash_supported(q) || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!(
            "flash_attention runs bf16/f16 with head_dim 64/128 on CUDA, got {:?} d={d} on {:?}",
            q.dtype(),
            q.device()
        );
    }
    let choice = cudnn::choice();
    if choice != cudnn::Choice::Mma {
        if let Some(out) = cudnn::run(q, k, v, mask, want_lse, choice == cudnn::Choice::Cudnn)? {
            return Ok(out);
        }
    }
    mma::flash(q, k, v, mask, want_lse)
}

#[cfg(feature = "cuda")]
pub mod cudnn;
#[cfg(feature = "cuda")]
pub(crate) mod mma;

/// Plain reference with an explicit boolean mask, in f64, for tests: `mask(i, j)` says whether
/// query row `i` sees key `j`. Inputs as in [`attention`]. Returns `(out, lse)` flattened in the
/// layouts `(b, n_h, sq, d)` and `(b, n_h, sq)`.
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: impl Fn(usize, usize) -> bool,
) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
    let flat = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f64>()
    };
    let (qv, kv, vv) = (flat(q)?, flat(k)?, flat(v)?);
    let (b, n_h, sq, d) = q.dims4()?;
    let (n_kv, sk) = (k.dim(1)?, k.dim(2)?);
    let g = n_h / n_kv;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; b * n_h * sq * d];
    let mut lse = vec![f64::NEG_INFINITY; b * n_h * sq];
    for bi in 0..b {
        for h in 0..n_h {
            let kh = bi * n_kv + h / g;
            for i in 0..sq {
                let row = (bi * n_h + h) * sq + i;
                let qi = &qv[row * d..(row + 1) * d];
                let s: Vec<Option<f64>> = (0..sk)
                    .map(|j| {
                        mask(i, j).then(|| {
                            qi.iter()
                                .zip(&kv[(kh * sk + j) * d..])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                * scale
                        })
                    })
                    .collect();
                let m = s
                    .iter()
                    .flatten()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = s.iter().flatten().map(|x| (x - m).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    if let Some(sj) = sj {
                        let p = (sj - m).exp() / z;
                        for x in 0..d {
                            out[row * d + x] += p * vv[(kh * sk + j) * d + x];
                        }
                    }
                }
                lse[row] = m + z.ln();
            }
        }
    }
    Ok((out, lse))
}
