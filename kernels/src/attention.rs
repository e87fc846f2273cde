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
        return cuda::lse_merge(&o, &lse, parts, rows, d);
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

/// `softmax(q kᵀ/√d) v` under `mask` with our FlashAttention-2 style kernel (CUDA only; check
/// [`flash_supported`]). `q` `(b, n_h, sq, d)`, `k`/`v` `(b, n_kv, sk, d)` (views with contiguous
/// rows need no copy). Returns the output in `q`'s dtype and, if `want_lse`, the LSE `(b, n_h, sq)`
/// f32. Short query blocks (decode) split the keys across blocks and merge by LSE.
#[cfg(feature = "cuda")]
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    cuda::flash(q, k, v, mask, want_lse)
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Mask;
    use crate::cuda::{alloc, cuda_device, function, ptr, ByValue, Pod, ATTENTION_PTX};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{DType, Result, Tensor};

    const BC: usize = 64;

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Params {
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        lse: u64,
        o_part: u64,
        lse_part: u64,
        k_bstride: i64,
        k_hstride: i64,
        v_bstride: i64,
        v_hstride: i64,
        b: i32,
        n_kv: i32,
        g: i32,
        sq: i32,
        sk: i32,
        causal: i32,
        anchor_rows: i32,
        passing: i32,
        n_splits: i32,
        split_len: i32,
        scale_log2: f32,
    }
    unsafe impl Pod for Params {}

    /// `t` with contiguous rows of `d` elements: (batch stride, head stride), copying if needed.
    fn kv_view(t: &Tensor, d: usize) -> Result<(Tensor, i64, i64)> {
        let st = t.stride();
        if st[3] == 1 && st[2] == d {
            Ok((t.clone(), st[0] as i64, st[1] as i64))
        } else {
            let t = t.contiguous()?;
            let st = t.stride().to_vec();
            Ok((t, st[0] as i64, st[1] as i64))
        }
    }

    pub(super) fn flash(
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
                "flash_attention: q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if !super::flash_supported(q) || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            candle_core::bail!(
                "flash_attention runs bf16/f16 with head_dim 64/128 on CUDA, got {:?} d={d} on {:?}",
                q.dtype(),
                q.device()
            );
        }
        let dev = cuda_device(q)?;
        let stream = dev.cuda_stream();
        let q = q.contiguous()?;
        let (k, kb, kh) = kv_view(k, d)?;
        let (v, vb, vh) = kv_view(v, d)?;
        let g = n_h / n_kv;
        let rows = g * sq;
        // Short query blocks: 4 warps × 16 rows, so few rows are padding. Long ones: 4 warps × 32
        // rows (K/V fragments reused across two row tiles); APB_FLASH_TILES=w8 picks 8 warps × 16
        // rows instead (for comparisons).
        let (nw, mt) = if rows < 1024 {
            (4, 1)
        } else if std::env::var("APB_FLASH_TILES").as_deref() == Ok("w8") {
            (8, 1)
        } else {
            (4, 2)
        };
        let br = 16 * nw * mt;
        let m_blocks = rows.div_ceil(br);
        let blocks = m_blocks * n_kv * b;
        let sms = stream
            .context()
            .attribute(
                candle_core::cuda::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(crate::cuda::err)? as usize;
        // Split the keys when the grid would leave most SMs idle (decode, short queries).
        let tiles = sk.div_ceil(BC);
        let n_splits = if blocks * 2 < sms && tiles > 4 {
            (2 * sms / blocks).clamp(1, tiles.div_ceil(4)).min(64)
        } else {
            1
        };
        let split_len = tiles.div_ceil(n_splits) * BC;
        let n_splits = sk.div_ceil(split_len).max(1);
        // One split writes the output directly; several write f32 parts merged below.
        let (direct, parts) = if n_splits == 1 {
            let o = alloc(&dev, (b, n_h, sq, d), q.dtype(), &stream)?;
            let lse = if want_lse {
                Some(alloc(&dev, (b, n_h, sq), DType::F32, &stream)?)
            } else {
                None
            };
            (Some((o, lse)), None)
        } else {
            let parts = (
                alloc(&dev, (n_splits, b * n_h * sq, d), DType::F32, &stream)?,
                alloc(&dev, (n_splits, b * n_h * sq), DType::F32, &stream)?,
            );
            (None, Some(parts))
        };
        let params = Params {
            q: ptr(&q, &stream)?,
            k: ptr(&k, &stream)?,
            v: ptr(&v, &stream)?,
            o: direct.as_ref().map_or(0, |d| d.0 .1),
            lse: direct
                .as_ref()
                .and_then(|d| d.1.as_ref())
                .map_or(0, |l| l.1),
            o_part: parts.as_ref().map_or(0, |p| p.0 .1),
            lse_part: parts.as_ref().map_or(0, |p| p.1 .1),
            k_bstride: kb,
            k_hstride: kh,
            v_bstride: vb,
            v_hstride: vh,
            b: b as i32,
            n_kv: n_kv as i32,
            g: g as i32,
            sq: sq as i32,
            sk: sk as i32,
            causal: mask.causal as i32,
            anchor_rows: mask.anchor_rows.min(sq) as i32,
            passing: mask.passing_keys.min(sk) as i32,
            n_splits: n_splits as i32,
            split_len: split_len as i32,
            scale_log2: (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32,
        };
        let ty = if q.dtype() == DType::BF16 {
            "bf16"
        } else {
            "f16"
        };
        let smem = (br + 4 * BC) * d * 2;
        let f = function(
            &dev,
            ATTENTION_PTX,
            &format!(
                "flash_fwd_{ty}_d{d}_{}",
                if mt == 2 {
                    "w4m2".to_string()
                } else {
                    format!("w{nw}")
                }
            ),
            smem,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (m_blocks as u32, n_kv as u32, (b * n_splits) as u32),
            block_dim: (32 * nw as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let arg = ByValue(params);
        let mut lb = stream.launch_builder(&f);
        lb.arg(&arg);
        unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
        let Some(((op, _), (lp, _))) = parts else {
            let (o, lse) = direct.expect("one split writes directly");
            return Ok((o.0, lse.map(|l| l.0)));
        };
        let (out, out_lse) = lse_merge(&op, &lp, n_splits, b * n_h * sq, d)?;
        let out = out.reshape((b, n_h, sq, d))?.to_dtype(q.dtype())?;
        let out_lse = out_lse.reshape((b, n_h, sq))?;
        Ok((out, want_lse.then_some(out_lse)))
    }

    pub(super) fn lse_merge(
        o: &Tensor,
        lse: &Tensor,
        parts: usize,
        rows: usize,
        d: usize,
    ) -> Result<(Tensor, Tensor)> {
        let dev = cuda_device(o)?;
        let stream = dev.cuda_stream();
        let (out, out_ptr) = alloc(&dev, (rows, d), DType::F32, &stream)?;
        let (out_lse, lse_ptr) = alloc(&dev, rows, DType::F32, &stream)?;
        if rows == 0 {
            return Ok((out, out_lse));
        }
        let f = function(&dev, ATTENTION_PTX, "lse_merge_f32", 0)?;
        let (po, pl) = (ptr(o, &stream)?, ptr(lse, &stream)?);
        let (parts, rows64, d32) = (parts as i32, rows as i64, d as i32);
        let mut lb = stream.launch_builder(&f);
        lb.arg(&po)
            .arg(&pl)
            .arg(&out_ptr)
            .arg(&lse_ptr)
            .arg(&parts)
            .arg(&rows64)
            .arg(&d32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (d.clamp(32, 128) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
        Ok((out, out_lse))
    }
}
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
