//! The decode rows of many sequences on the CPU (f32), in one call: each row's one query attends
//! its own sequence's cache, read in place through the cache view's strides (no copies). One task
//! per row and KV head (its `g` query heads share the keys) on rayon's pool, both products by
//! `gemm` on the task's thread.
//! Row by row through the general path, a decode step of 16 sequences spent more time in the
//! ~10 small tensor ops per row and layer than in its projections. Each task's arithmetic is
//! sequential and fixed, so a row comes out bit for bit the same whatever rows run beside it.

use super::chunked::{exp_sum, row_max};
use candle_core::{DType, Result, Storage, Tensor};

/// Below this many multiply-adds a call runs on the calling thread (starting threads costs more).
const INLINE_WORK: usize = 1 << 16;

/// One cache view: its data, offset and strides over `(head, position, dim)`.
struct View<'a> {
    data: &'a [f32],
    at: usize,
    head: usize,
    pos: usize,
    len: usize,
}

impl View<'_> {
    #[inline(always)]
    fn row(&self, h: usize, j: usize, d: usize) -> &[f32] {
        let s = self.at + h * self.head + j * self.pos;
        &self.data[s..s + d]
    }
}

/// Whether [`attention_rows`] takes these operands: f32 on the CPU, caches with contiguous rows
/// and one KV head count.
pub(super) fn supported(q: &Tensor, kv: &[Option<(Tensor, Tensor)>]) -> bool {
    let mut heads = kv.iter().flatten().map(|(k, _)| k.dims()[1]);
    let first = heads.next();
    q.device().is_cpu()
        && q.dtype() == DType::F32
        && heads.all(|h| Some(h) == first)
        && kv.iter().flatten().all(|(k, v)| {
            [k, v]
                .iter()
                .all(|t| t.dtype() == DType::F32 && t.layout().stride()[3] == 1)
        })
}

/// `q` `(1, n_h, rows, d)`; `kv[i]` `(1, n_kv, len_i, d)` or None (output 0, LSE `-inf`).
/// Operands checked by [`super::attention_rows`] and [`supported`].
pub(super) fn attention_rows(
    q: &Tensor,
    kv: &[Option<(Tensor, Tensor)>],
) -> Result<(Tensor, Tensor)> {
    let (_, n_h, rows, d) = q.dims4()?;
    // (rows, n_h, d): each row's heads side by side.
    let qv: Vec<f32> = q
        .squeeze(0)?
        .transpose(0, 1)?
        .contiguous()?
        .flatten_all()?
        .to_vec1()?;
    let held: Vec<_> = kv
        .iter()
        .map(|x| {
            x.as_ref()
                .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        })
        .collect();
    let mut views = Vec::with_capacity(rows);
    let mut n_kv = 1;
    for (x, t) in held.iter().zip(kv) {
        let (Some(((ks, kl), (vs, vl))), Some((k, _))) = (x, t) else {
            views.push(None);
            continue;
        };
        n_kv = k.dim(1)?;
        views.push(Some((view(ks, kl)?, view(vs, vl)?)));
    }
    let g = n_h / n_kv;
    let mut out = vec![0f32; rows * n_h * d];
    let mut lse = vec![f32::NEG_INFINITY; rows * n_h];
    let tasks = rows * n_kv;
    let work: usize = views.iter().flatten().map(|(k, _)| k.len).sum::<usize>() * n_h * d;
    let scale = 1.0 / (d as f32).sqrt();
    // Tasks write disjoint (row, head group) ranges of `out` / `lse`; shared as raw addresses.
    let (out_addr, lse_addr) = (out.as_mut_ptr() as usize, lse.as_mut_ptr() as usize);
    let task = |scores: &mut Vec<f32>, t: usize| {
        let (r, kh) = (t / n_kv, t % n_kv);
        let Some((k, v)) = &views[r] else { return };
        let h0 = r * n_h + kh * g;
        // SAFETY: task (r, kh) alone writes heads h0..h0+g of row r.
        let o =
            unsafe { std::slice::from_raw_parts_mut((out_addr as *mut f32).add(h0 * d), g * d) };
        let l = unsafe { std::slice::from_raw_parts_mut((lse_addr as *mut f32).add(h0), g) };
        one_group(&qv[h0 * d..(h0 + g) * d], k, v, kh, d, scale, scores, o, l);
    };
    if work < INLINE_WORK {
        let mut scores = Vec::new();
        (0..tasks).for_each(|t| task(&mut scores, t));
    } else {
        use rayon::prelude::*;
        (0..tasks)
            .into_par_iter()
            .for_each_init(Vec::new, |scores, t| task(scores, t));
    }
    drop(held);
    let out = Tensor::from_vec(out, (rows, n_h, d), q.device())?
        .transpose(0, 1)?
        .unsqueeze(0)?;
    let lse = Tensor::from_vec(lse, (rows, n_h), q.device())?
        .t()?
        .unsqueeze(0)?;
    Ok((out, lse))
}

/// The `g` query heads `q` `(g, d)` of one row over KV head `kh`: outputs `o` `(g, d)`, LSEs `l`.
/// Both products through `gemm` on this thread (its runtime-chosen SIMD kernels).
#[allow(clippy::too_many_arguments)]
fn one_group(
    q: &[f32],
    k: &View<'_>,
    v: &View<'_>,
    kh: usize,
    d: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    o: &mut [f32],
    l: &mut [f32],
) {
    let (n, g) = (k.len, l.len());
    if n == 0 {
        return;
    }
    let (k0, v0) = (k.row(kh, 0, d).as_ptr(), v.row(kh, 0, d).as_ptr());
    // The last key's row must be in bounds too (slices check it).
    let _ = (k.row(kh, n - 1, d), v.row(kh, n - 1, d));
    scores.clear();
    scores.resize(g * n, 0.0);
    // SAFETY: every operand's extent was checked above: q (g × d), K/V rows 0..n of head kh.
    unsafe {
        // scores (g × n) = scale · q (g × d) · Kᵀ (d × n)
        gemm::gemm(
            g,
            n,
            d,
            scores.as_mut_ptr(),
            1,
            n as isize,
            false,
            q.as_ptr(),
            1,
            d as isize,
            k0,
            k.pos as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    // Each head's probabilities, normalised before the product with V.
    for (s, lh) in scores.chunks_exact_mut(n).zip(l.iter_mut()) {
        let m = row_max(s);
        let sum = exp_sum(s, m);
        *lh = m + sum.ln();
        let inv = 1.0 / sum;
        s.iter_mut().for_each(|p| *p *= inv);
    }
    unsafe {
        // o (g × d) = p (g × n) · V (n × d)
        gemm::gemm(
            g,
            d,
            n,
            o.as_mut_ptr(),
            1,
            d as isize,
            false,
            scores.as_ptr(),
            1,
            n as isize,
            v0,
            1,
            v.pos as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A CPU cache view `(1, n_kv, len, d)` read in place.
fn view<'a>(s: &'a Storage, l: &candle_core::Layout) -> Result<View<'a>> {
    let Storage::Cpu(c) = s else {
        candle_core::bail!("attention_rows: a CPU cache expected")
    };
    let st = l.stride();
    Ok(View {
        data: c.as_slice::<f32>()?,
        at: l.start_offset(),
        head: st[1],
        pos: st[2],
        len: l.dims()[2],
    })
}
