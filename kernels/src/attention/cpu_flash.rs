//! Fused attention for CPU prefill (f32): FlashAttention's tiling on the CPU. Each task owns a
//! block of query rows of one head and walks its visible key tiles with an online softmax, so the
//! `(rows × keys)` score matrix never exists; tile products go through `gemm` (single-threaded
//! per tile, tasks spread over the cores). Same masks and results as [`super::attention`].

use super::chunked::{exp_sum, fast_exp, row_max};
use super::Mask;
use candle_core::{DType, Result, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};

const BQ: usize = 64;
const BK: usize = 256;

/// Shapes of one call.
pub(super) struct Dims {
    pub b: usize,
    pub n_h: usize,
    pub n_kv: usize,
    pub sq: usize,
    pub sk: usize,
    pub d: usize,
}

/// [`attention`] on CPU tensors (copied to contiguous f32), returning tensors in `q`'s dtype.
pub(super) fn attention_tensors(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, n_h, sq, d) = q.dims4()?;
    let (_, n_kv, sk, _) = k.dims4()?;
    let flat =
        |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
    let dims = Dims {
        b,
        n_h,
        n_kv,
        sq,
        sk,
        d,
    };
    let (o, l) = attention(&flat(q)?, &flat(k)?, &flat(v)?, &dims, mask);
    let out = Tensor::from_vec(o, (b, n_h, sq, d), q.device())?.to_dtype(q.dtype())?;
    let lse = if want_lse {
        Some(Tensor::from_vec(l, (b, n_h, sq), q.device())?)
    } else {
        None
    };
    Ok((out, lse))
}

/// `q`: `(b, n_h, sq, d)`, `k`/`v`: `(b, n_kv, sk, d)`, all contiguous. Returns output
/// `(b, n_h, sq, d)` and LSE `(b, n_h, sq)`.
pub(super) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dm: &Dims,
    mask: Mask,
) -> (Vec<f32>, Vec<f32>) {
    let Dims {
        b,
        n_h,
        n_kv,
        sq,
        sk,
        d,
    } = *dm;
    let g = n_h / n_kv;
    let mut out = vec![0f32; b * n_h * sq * d];
    let mut lse = vec![f32::NEG_INFINITY; b * n_h * sq];
    let q_blocks = sq.div_ceil(BQ);
    let n_tasks = b * n_h * q_blocks;
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(n_tasks)
        .max(1);
    // Tasks write disjoint row ranges of `out`/`lse`; share them as raw addresses.
    let (out_addr, lse_addr) = (out.as_mut_ptr() as usize, lse.as_mut_ptr() as usize);
    let scale = 1.0 / (d as f32).sqrt();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut sc = vec![0f32; BQ * BK];
                let mut acc = vec![0f32; BQ * d];
                let mut m = [0f32; BQ];
                let mut l = [0f32; BQ];
                loop {
                    let t = next.fetch_add(1, Ordering::Relaxed);
                    if t >= n_tasks {
                        break;
                    }
                    let (bh, qb) = (t / q_blocks, t % q_blocks);
                    let (bi, h) = (bh / n_h, bh % n_h);
                    let kh = bi * n_kv + h / g;
                    let i0 = qb * BQ;
                    let rows = BQ.min(sq - i0);
                    let qp = &q[(bh * sq + i0) * d..(bh * sq + i0 + rows) * d];
                    let kp = &k[kh * sk * d..(kh + 1) * sk * d];
                    let vp = &v[kh * sk * d..(kh + 1) * sk * d];
                    let ranges: Vec<(usize, usize)> =
                        (i0..i0 + rows).map(|i| mask.key_range(i, sq, sk)).collect();
                    let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
                    let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
                    m[..rows].fill(f32::NEG_INFINITY);
                    l[..rows].fill(0.0);
                    acc[..rows * d].fill(0.0);
                    let mut k0 = lo;
                    while k0 < hi {
                        let kw = BK.min(hi - k0);
                        // sc[r, j] = scale · q[r] · k[k0 + j]
                        unsafe {
                            gemm::gemm(
                                rows,
                                kw,
                                d,
                                sc.as_mut_ptr(),
                                1,
                                BK as isize,
                                false,
                                qp.as_ptr(),
                                1,
                                d as isize,
                                kp.as_ptr().add(k0 * d),
                                d as isize,
                                1,
                                0.0,
                                scale,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        for r in 0..rows {
                            let (a, z) = ranges[r];
                            let (a, z) = (a.max(k0).min(k0 + kw) - k0, z.max(k0).min(k0 + kw) - k0);
                            let row = &mut sc[r * BK..r * BK + kw];
                            if a >= z {
                                row.fill(0.0);
                                continue;
                            }
                            let tile_max = row_max(&row[a..z]);
                            let m_new = if tile_max > m[r] { tile_max } else { m[r] };
                            let corr = fast_exp(m[r] - m_new);
                            if corr != 1.0 {
                                l[r] *= corr;
                                acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= corr);
                            }
                            l[r] += exp_sum(&mut row[a..z], m_new);
                            row[..a].fill(0.0);
                            row[z..].fill(0.0);
                            m[r] = m_new;
                        }
                        // acc += sc · v[k0 .. k0 + kw]
                        unsafe {
                            gemm::gemm(
                                rows,
                                d,
                                kw,
                                acc.as_mut_ptr(),
                                1,
                                d as isize,
                                true,
                                sc.as_ptr(),
                                1,
                                BK as isize,
                                vp.as_ptr().add(k0 * d),
                                1,
                                d as isize,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        k0 += kw;
                    }
                    for r in 0..rows {
                        let row = (bh * sq + i0 + r) * d;
                        // Safety: task `t` alone writes rows i0..i0+rows of head bh.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut((out_addr as *mut f32).add(row), d)
                        };
                        if l[r] > 0.0 {
                            let inv = 1.0 / l[r];
                            o.iter_mut()
                                .zip(&acc[r * d..(r + 1) * d])
                                .for_each(|(o, a)| *o = a * inv);
                            unsafe {
                                *(lse_addr as *mut f32).add(bh * sq + i0 + r) = m[r] + l[r].ln()
                            };
                        }
                    }
                }
            });
        }
    });
    (out, lse)
}
