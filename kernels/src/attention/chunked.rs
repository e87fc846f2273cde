//! Chunked f32 attention (any device) and the CPU math shared with [`super::cpu_flash`]: a
//! vectorisable `exp`, row max / exp-sum, masked softmax. Queries are processed in chunks so
//! memory stays `O(chunk · sk)`; GQA folds each KV group's query heads into rows, so K and V are
//! never repeated.

use super::Mask;
use candle_core::{DType, Result, Tensor, D};

/// Query rows per chunk: bounds the score buffer to `heads · CHUNK · sk` floats.
const CHUNK: usize = 256;

/// Attention computed in f32 on any device, `CHUNK` query rows at a time (scores materialised
/// per chunk): decode steps on the CPU (strided cache views read without copies) and GPU operands
/// the fused kernels do not take. Operands checked by [`super::attention`].
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, n_h, sq, d) = q.dims4()?;
    let (_, n_kv, sk, _) = k.dims4()?;
    let g = n_h / n_kv;
    let scale = 1.0 / (d as f64).sqrt();
    let out_dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?;
    // No `.contiguous()`: cache views are strided along the sequence and matmul reads them as they
    // are; copying a long cache per layer per decode step would dominate decode time.
    let k = k.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;
    // GPU matmuls want plain row-major operands (views of packed K|V are not); copies are cheap there.
    let (k, v) = if q.device().is_cpu() {
        (k, v)
    } else {
        (k.contiguous()?, v.contiguous()?)
    };
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for r0 in (0..sq).step_by(CHUNK) {
        let c = CHUNK.min(sq - r0);
        // Keys any row of this chunk can see.
        let lo = (r0..r0 + c)
            .map(|i| mask.key_range(i, sq, sk).0)
            .min()
            .unwrap_or(0);
        let hi = (r0..r0 + c)
            .map(|i| mask.key_range(i, sq, sk).1)
            .max()
            .unwrap_or(0);
        let kw = hi.saturating_sub(lo);
        // (b, n_kv, g·c, d): rows of one KV group are its g query heads × c positions.
        let qc = (q.narrow(2, r0, c)?.reshape((b, n_kv, g * c, d))? * scale)?;
        let (oc, lc) = if kw == 0 {
            (
                Tensor::zeros((b, n_kv, g * c, d), DType::F32, q.device())?,
                Tensor::full(f32::NEG_INFINITY, (b, n_kv, g * c), q.device())?,
            )
        } else {
            let kc = k.narrow(2, lo, kw)?;
            let vc = v.narrow(2, lo, kw)?;
            let scores = qc.matmul(&kc.t()?)?; // (b, n_kv, g·c, kw)
            let range = |row: usize| {
                let i = r0 + row % c;
                let (a, z) = mask.key_range(i, sq, sk);
                (a.saturating_sub(lo).min(kw), z.saturating_sub(lo).min(kw))
            };
            let (p, lse) = if scores.device().is_cpu() {
                masked_softmax(&scores, range)?
            } else {
                masked_softmax_on_device(&scores, c, range)?
            };
            (p.matmul(&vc)?, lse)
        };
        outs.push(oc.reshape((b, n_h, c, d))?);
        lses.push(lc.reshape((b, n_h, c))?);
    }
    let out = Tensor::cat(&outs, 2)?.to_dtype(out_dtype)?;
    let lse = if want_lse {
        Some(Tensor::cat(&lses, 2)?)
    } else {
        None
    };
    Ok((out, lse))
}

/// Softmax over the last axis restricted to `range(row)` of each row (others get probability 0),
/// in one pass over the buffer. Returns the probabilities and each row's log-sum-exp.
fn masked_softmax(
    scores: &Tensor,
    range: impl Fn(usize) -> (usize, usize) + Sync,
) -> Result<(Tensor, Tensor)> {
    let dims = scores.dims().to_vec();
    let (rows_per_mat, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let device = scores.device().clone();
    let mut buf: Vec<f32> = scores.flatten_all()?.to_vec1()?;
    let n_rows = buf.len() / w.max(1);
    let mut lse = vec![f32::NEG_INFINITY; n_rows];
    let work = |(r, (row, l)): (usize, (&mut [f32], &mut f32))| {
        let (a, z) = range(r % rows_per_mat);
        let m = row_max(&row[a..z]);
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        let sum = exp_sum(&mut row[a..z], m);
        let inv = 1.0 / sum;
        row[a..z].iter_mut().for_each(|x| *x *= inv);
        row[..a].fill(0.0);
        row[z..].fill(0.0);
        *l = m + sum.ln();
    };
    parallel_rows(&mut buf, &mut lse, w, &work);
    let p = Tensor::from_vec(buf, dims.as_slice(), &device)?;
    let lse = Tensor::from_vec(lse, &dims[..dims.len() - 1], &device)?;
    Ok((p, lse))
}

/// [`masked_softmax`] with tensor ops, so the scores stay on their device (GPU): the mask is a
/// `(c, kw)` additive bias shared by the `g` query heads folded into the rows.
fn masked_softmax_on_device(
    scores: &Tensor,
    c: usize,
    range: impl Fn(usize) -> (usize, usize),
) -> Result<(Tensor, Tensor)> {
    let (b, n_kv, gc, kw) = scores.dims4()?;
    let g = gc / c;
    let mut bias = vec![f32::NEG_INFINITY; c * kw];
    for r in 0..c {
        let (a, z) = range(r);
        bias[r * kw + a..r * kw + z].fill(0.0);
    }
    let bias = Tensor::from_vec(bias, (c, kw), scores.device())?;
    let s = scores.reshape((b, n_kv, g, c, kw))?.broadcast_add(&bias)?;
    // Rows that see nothing have max −inf: clamp it so exp gives 0 instead of NaN.
    let m = s.max_keepdim(D::Minus1)?.maximum(-1e30f32)?;
    let e = s.broadcast_sub(&m)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let p = e
        .broadcast_div(&sum.maximum(1e-30f32)?)?
        .reshape((b, n_kv, gc, kw))?;
    let lse = (m + sum.log()?)?.reshape((b, n_kv, gc))?;
    Ok((p, lse))
}

/// `e^x` for `x <= 0` within 1e-6 relative, written so the compiler vectorises it: Cody-Waite
/// reduction `x = n·ln2 + r` (`|r| <= ln2/2`, ln2 split in two for exactness), `e^r` by its Taylor
/// series to degree 7, and `2^n` built in the exponent bits.
#[inline(always)]
pub(crate) fn fast_exp(x_in: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x_in.max(-87.0);
    // Round to nearest by the 1.5·2^23 trick: no libm call, so the loop vectorises.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `2^n` from `t`'s bits (`t` = MAGIC + n exactly, one ulp = 1): integer ops with no
    // float-to-int conversion or overflow check, which would keep the loop scalar in test builds.
    let e = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23) * p;
    if x_in < -87.0 {
        0.0
    } else {
        e
    }
}

/// Lanes of the manual reductions below: float sums and maxima only vectorise when the
/// accumulation order is spelled out.
const LANES: usize = 8;

/// Defines `$name` to run `$body` compiled for AVX-512 or AVX2 when this CPU has them (the
/// build's baseline is SSE2, four lanes): the same arithmetic in the same order on every path, so
/// the bits do not depend on the CPU (Rust never fuses a multiply and an add on its own).
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: this CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: this CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

simd_dispatch!(
    /// The largest element (−inf for an empty slice).
    fn row_max(v: &[f32]) -> f32 = row_max_body
);
simd_dispatch!(
    /// Replaces each `x` by `e^(x − m)` and returns the sum.
    fn exp_sum(v: &mut [f32], m: f32) -> f32 = exp_sum_body
);

#[inline(always)]
fn row_max_body(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    tail.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

#[inline(always)]
fn exp_sum_body(v: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in chunks.by_ref() {
        for i in 0..LANES {
            c[i] = fast_exp(c[i] - m);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = fast_exp(*x - m);
        sum += *x;
    }
    sum
}

/// Runs `work` over rows on all cores (plain scoped threads: rows are independent).
fn parallel_rows<F>(buf: &mut [f32], lse: &mut [f32], w: usize, work: &F)
where
    F: Fn((usize, (&mut [f32], &mut f32))) + Sync,
{
    let n_rows = lse.len();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(n_rows.max(1));
    if threads <= 1 || n_rows * w < 1 << 16 {
        buf.chunks_mut(w)
            .zip(lse.iter_mut())
            .enumerate()
            .for_each(work);
        return;
    }
    let per = n_rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, (bchunk, lchunk)) in buf.chunks_mut(per * w).zip(lse.chunks_mut(per)).enumerate() {
            s.spawn(move || {
                bchunk
                    .chunks_mut(w)
                    .zip(lchunk.iter_mut())
                    .enumerate()
                    .for_each(|(r, x)| work((t * per + r, x)));
            });
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_softmax_matches_cpu_softmax() {
        use candle_core::{Device, Tensor};
        // (b=1, n_kv=2, g·c = 3·4 rows, kw=7), causal-like ranges with one fully masked row.
        let v: Vec<f32> = (0..2 * 12 * 7)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.3)
            .collect();
        let s = Tensor::from_vec(v, (1, 2, 12, 7), &Device::Cpu).unwrap();
        let range = |row: usize| match row % 4 {
            0 => (3, 3),
            r => (1, 3 + r),
        };
        let (p1, l1) = super::masked_softmax(&s, range).unwrap();
        let (p2, l2) = super::masked_softmax_on_device(&s, 4, range).unwrap();
        let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in f(&p1).iter().zip(f(&p2)) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        for (a, b) in f(&l1).iter().zip(f(&l2)) {
            assert!(a == &b || (a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(f(&l2).iter().step_by(4).all(|x| *x == f32::NEG_INFINITY));
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (super::fast_exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(super::fast_exp(-100.0), 0.0);
        assert_eq!(super::fast_exp(0.0), 1.0);
    }
}
