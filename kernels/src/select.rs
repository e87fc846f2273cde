//! Choosing on the device: retaining-head post-processing (max-pool + candidate mask
//! `pool5_mask`, top-k positions per KV head `topk_positions`, packing the chosen K|V rows into the
//! all-gather buffer `gather_kv`) and greedy decoding's pick (`argmax_rows`). Each has a CPU
//! implementation (the CPU path and the GPU tests' reference).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Max-pool (5, stride 1, padding 2) over the sequence and candidate masking of scores
/// `(seq, n_kv)` → `(n_kv, seq)` f32; positions outside `[lo, hi)` become `-inf`. Rows at or past
/// `hi` (rank 0's question probe, padding) never enter a pool: they are not context. Rows before
/// `lo` (the anchor) do, as in the reference, which pools the whole sequence.
pub fn pool5_mask(scores: &Tensor, lo: usize, hi: usize) -> Result<Tensor> {
    scores
        .to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&Pool5Mask { lo, hi })
}

struct Pool5Mask {
    lo: usize,
    hi: usize,
}

impl CustomOp1 for Pool5Mask {
    fn name(&self) -> &'static str {
        "pool5-mask"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (seq, n_kv) = layout.shape().dims2()?;
        let x = match storage {
            CpuStorage::F32(v) => &v[layout.start_offset()..],
            _ => candle_core::bail!("pool5-mask expects f32"),
        };
        let mut out = vec![f32::NEG_INFINITY; seq * n_kv];
        for h in 0..n_kv {
            let hi = self.hi.min(seq);
            for i in self.lo.min(seq)..hi {
                let (a, z) = (i.saturating_sub(2), (i + 3).min(hi));
                out[h * seq + i] = (a..z)
                    .map(|j| x[j * n_kv + h])
                    .fold(f32::NEG_INFINITY, f32::max);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n_kv, seq))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
        let (seq, n_kv) = layout.shape().dims2()?;
        let dev = storage.device.clone();
        let x = storage
            .as_cuda_slice::<f32>()?
            .slice(layout.start_offset()..);
        let out = dev.alloc_zeros::<f32>(seq * n_kv)?;
        let func = crate::cuda::function(&dev, crate::cuda::SELECT_MODULE, "pool5_mask_f32", 0)?;
        // `hi` past the sequence would let the kernel read past the scores: clamp, as the CPU path.
        let (s, k, lo, hi) = (
            seq as u32,
            n_kv as u32,
            self.lo as u32,
            self.hi.min(seq) as u32,
        );
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&x);
        b.arg(&out);
        b.arg(&s);
        b.arg(&k);
        b.arg(&lo);
        b.arg(&hi);
        unsafe { b.launch(LaunchConfig::for_num_elems(s * k)) }
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((n_kv, seq)),
        ))
    }
}

/// Order-preserving map of a score to an integer key (larger score → larger key; NaN lowest),
/// the same on CPU and GPU so both pick the same positions.
fn radix_key(x: f32) -> u32 {
    if x.is_nan() {
        return 0;
    }
    let u = x.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// Per row of `scores` `(rows, seq)` f32: the `k` positions of `[lo, hi)` with the highest scores
/// (ties → lower position), ascending, as `(rows, k)` u32. With fewer than `k` candidates all are
/// taken and the list is padded by repeating its last entry (an empty range gives `min(lo, seq-1)`).
pub fn topk_positions(scores: &Tensor, lo: usize, hi: usize, k: usize) -> Result<Tensor> {
    let (rows, seq) = scores.dims2()?;
    let scores = scores.to_dtype(DType::F32)?.contiguous()?;
    #[cfg(feature = "cuda")]
    if scores.device().is_cuda() {
        return cuda_topk(&scores, rows, seq, lo, hi, k);
    }
    let (hi, lo) = (hi.min(seq), lo.min(hi.min(seq)));
    let mut out = Vec::with_capacity(rows * k);
    for row in scores.to_vec2::<f32>()? {
        let mut idx: Vec<u32> = (lo as u32..hi as u32).collect();
        if idx.len() > k {
            let key = |i: &u32| radix_key(row[*i as usize]);
            idx.select_nth_unstable_by(k, |a, b| key(b).cmp(&key(a)).then(a.cmp(b)));
            idx.truncate(k);
            idx.sort_unstable();
        }
        let last = idx
            .last()
            .copied()
            .unwrap_or(lo.min(seq.saturating_sub(1)) as u32);
        idx.resize(k, last);
        out.extend(idx);
    }
    Tensor::from_vec(out, (rows, k), scores.device())
}

#[cfg(feature = "cuda")]
fn cuda_topk(
    scores: &Tensor,
    rows: usize,
    seq: usize,
    lo: usize,
    hi: usize,
    k: usize,
) -> Result<Tensor> {
    use crate::cuda::{alloc, cuda_device, function, ptr, SELECT_MODULE};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    let dev = cuda_device(scores)?;
    let stream = dev.cuda_stream();
    let (out, out_ptr) = alloc(&dev, (rows, k), DType::U32, &stream)?;
    if rows == 0 || k == 0 {
        return Ok(out);
    }
    let f = function(&dev, SELECT_MODULE, "topk_positions_f32", 0)?;
    let sp = ptr(scores, &stream)?;
    let (seq, lo, hi, k) = (seq as u32, lo as u32, hi as u32, k as u32);
    let mut lb = stream.launch_builder(&f);
    lb.arg(&sp)
        .arg(&out_ptr)
        .arg(&seq)
        .arg(&lo)
        .arg(&hi)
        .arg(&k);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
    Ok(out)
}

/// The passing block to all-gather: `(1, n_kv, k, 2d)` holding, per KV head `h` and pick `i`,
/// `K[0, h, picks[h, i]]` followed by `V[0, h, picks[h, i]]`. `k`, `v`: `(1, n_kv, s, d)`;
/// `picks`: `(n_kv, k)` u32.
pub fn gather_kv(k: &Tensor, v: &Tensor, picks: &Tensor) -> Result<Tensor> {
    let (b, n_kv, _s, d) = k.dims4()?;
    let (pn, kk) = picks.dims2()?;
    if b != 1 || pn != n_kv || v.dims4()? != k.dims4()? || k.dtype() != v.dtype() {
        candle_core::bail!(
            "gather_kv: k {:?}, v {:?}, picks {:?}",
            k.dims(),
            v.dims(),
            picks.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if k.device().is_cuda() {
        return cuda_gather(k, v, picks, n_kv, kk, d);
    }
    let _ = (kk, d);
    // Strided k/v views (rows of a larger block) cat to a strided result; index_select needs
    // contiguous rows.
    let kv = Tensor::cat(&[k, v], 3)?.contiguous()?;
    let heads = (0..n_kv)
        .map(|h| kv.narrow(1, h, 1)?.index_select(&picks.get(h)?, 2))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&heads, 1)
}

#[cfg(feature = "cuda")]
fn cuda_gather(
    k: &Tensor,
    v: &Tensor,
    picks: &Tensor,
    n_kv: usize,
    kk: usize,
    d: usize,
) -> Result<Tensor> {
    use crate::cuda::{alloc, cuda_device, function, ptr, SELECT_MODULE};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    let rows_ok = |t: &Tensor| t.stride()[3] == 1 && t.stride()[2] == d;
    let k = if rows_ok(k) {
        k.clone()
    } else {
        k.contiguous()?
    };
    let v = if rows_ok(v) {
        v.clone()
    } else {
        v.contiguous()?
    };
    let picks = picks.to_dtype(DType::U32)?.contiguous()?;
    let dev = cuda_device(&k)?;
    let stream = dev.cuda_stream();
    let (out, out_ptr) = alloc(&dev, (1, n_kv, kk, 2 * d), k.dtype(), &stream)?;
    let n = n_kv * kk * 2 * d;
    if n == 0 {
        return Ok(out);
    }
    let name = match k.dtype().size_in_bytes() {
        2 => "gather_kv_u16",
        4 => "gather_kv_u32",
        _ => candle_core::bail!("gather_kv: unsupported dtype {:?}", k.dtype()),
    };
    let f = function(&dev, SELECT_MODULE, name, 0)?;
    let (kp, vp, pp) = (ptr(&k, &stream)?, ptr(&v, &stream)?, ptr(&picks, &stream)?);
    let (n_kv, kk, d32) = (n_kv as u32, kk as u32, d as u32);
    let (ks, vs) = (k.stride()[1] as i64, v.stride()[1] as i64);
    let mut lb = stream.launch_builder(&f);
    lb.arg(&kp)
        .arg(&vp)
        .arg(&pp)
        .arg(&out_ptr)
        .arg(&n_kv)
        .arg(&kk)
        .arg(&d32)
        .arg(&ks)
        .arg(&vs);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).min(65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
    Ok(out)
}

/// Index of the largest of `xs`: the lowest on ties, NaN never chosen unless it comes first (a
/// plain scan from index 0). Greedy decoding's choice, and [`argmax_rows`]' reference.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// [`argmax`] of every row of `x` `(rows, n)` f32 → `(rows)` u32, where `x` is: a decode step
/// then brings back one id per greedy row instead of its logits (128256 f32 for Llama-3, which
/// the host then scanned).
pub fn argmax_rows(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&ArgmaxRows)
}

struct ArgmaxRows;

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, n) = layout.shape().dims2()?;
        let x = match storage {
            CpuStorage::F32(v) => &v[layout.start_offset()..],
            _ => candle_core::bail!("argmax-rows expects f32"),
        };
        let out = (0..rows).map(|r| argmax(&x[r * n..(r + 1) * n])).collect();
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
        let (rows, n) = layout.shape().dims2()?;
        let dev = storage.device.clone();
        let x = storage
            .as_cuda_slice::<f32>()?
            .slice(layout.start_offset()..);
        let out = dev.alloc_zeros::<u32>(rows)?;
        if rows > 0 {
            let func =
                crate::cuda::function(&dev, crate::cuda::SELECT_MODULE, "argmax_rows_f32", 0)?;
            let n32 = i32::try_from(n)
                .map_err(|_| candle_core::Error::Msg(format!("argmax-rows: {n} columns")))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x).arg(&out).arg(&n32);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(rows),
        ))
    }
}
