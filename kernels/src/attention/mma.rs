//! Our FlashAttention-2 style kernel (`mma.sync`, attention.cu): runs on sm_80 and newer, every
//! mask, and splits the keys across blocks for short queries (decode).

use super::Mask;
use crate::cuda::{alloc, alloc_unset, cuda_device, function, ptr, ByValue, Pod, ATTENTION_MODULE};
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

/// Operands already checked by [`super::attention`].
pub(crate) fn flash(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    want_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, n_h, sq, d) = q.dims4()?;
    let (_, n_kv, sk, _) = k.dims4()?;
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
        ATTENTION_MODULE,
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
    let (out, out_lse) = lse_merge(&op, &lp, n_splits, b * n_h * sq, d, q.dtype())?;
    let out = out.reshape((b, n_h, sq, d))?;
    let out_lse = out_lse.reshape((b, n_h, sq))?;
    Ok((out, want_lse.then_some(out_lse)))
}

/// Keys per split for a decode row of `sk` keys: at least 16 tiles (1024 keys), at most 16
/// splits. A function of the row alone, so its result does not depend on the rows beside it.
/// Shorter splits cost more than they gain: 25 rows of 4K keys on an H100 read their K/V at
/// 2.54 TB/s with 4-tile splits, 2.74 with 16 (`apb bench attention --decode-rows`, 2026-12-06);
/// long rows stream at the copy bandwidth either way. `APB_DECODE_SPLIT="tiles,splits"` sets both
/// bounds for the process (tuning).
fn row_split_len(sk: usize) -> usize {
    static BOUNDS: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    let (min_tiles, max_splits) = *BOUNDS.get_or_init(|| {
        std::env::var("APB_DECODE_SPLIT")
            .ok()
            .and_then(|v| {
                let (t, s) = v.split_once(',')?;
                Some((t.trim().parse().ok()?, s.trim().parse().ok()?))
            })
            .filter(|&(t, s)| t > 0 && s > 0)
            .unwrap_or((16, 16))
    });
    sk.div_ceil(BC).div_ceil(max_splits).max(min_tiles) * BC
}

/// Rows a `flash_rows_*` launch takes (attention.cu `ROWS_BY_VALUE`): their table travels in
/// the kernel's parameters, so a step uploads nothing.
pub(crate) const ROWS_BY_VALUE: usize = 64;

/// One decode row's keys and values (attention.cu `RowKv`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RowKv {
    k: u64,
    v: u64,
    k_hstride: i64,
    v_hstride: i64,
    sk: i32,
    split_len: i32,
}

/// attention.cu `RowsParams`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RowsParams {
    p: Params,
    rows: [RowKv; ROWS_BY_VALUE],
}
unsafe impl Pod for RowsParams {}
// attention.cu's layout: 7 pointers, 4 i64, 10 i32 and an f32 (136 bytes with padding), then
// 64 rows of 40 bytes; under the 4 KB of kernel parameters.
const _: () = assert!(std::mem::size_of::<RowsParams>() == 136 + ROWS_BY_VALUE * 40);
const _: () = assert!(std::mem::size_of::<RowsParams>() <= 4096);

/// Decode rows over separate caches, one launch per [`ROWS_BY_VALUE`] rows: `q` `(rows, n_h, 1,
/// d)` contiguous, row `i` attending every key of `kv[i]` (`(1, n_kv, len, d)` views; None:
/// none). Returns the output `(rows, n_h, 1, d)` in `q`'s dtype and the LSE `(rows, n_h, 1)`
/// (f32). A row's result depends on its own keys alone (its split length is a function of its
/// length; empty splits weigh exactly 0), so the launch it lands in does not matter.
pub(crate) fn flash_rows(q: &Tensor, kv: &[Option<(Tensor, Tensor)>]) -> Result<(Tensor, Tensor)> {
    let (b, n_h, _, d) = q.dims4()?;
    let dev = cuda_device(q)?;
    let stream = dev.cuda_stream();
    let n_kv = kv
        .iter()
        .flatten()
        .map(|(k, _)| k.dim(1))
        .next()
        .transpose()?
        .unwrap_or(n_h);
    if b == 0 {
        return Ok((
            q.zeros_like()?,
            Tensor::zeros((0, n_h, 1), DType::F32, q.device())?,
        ));
    }
    let g = n_h / n_kv;
    let ty = if q.dtype() == DType::BF16 {
        "bf16"
    } else {
        "f16"
    };
    // A block's 16 query rows (attention.cu `flash_decode`), two K/V tile buffers.
    let br = 16;
    let smem = (br + 4 * BC) * d * 2;
    let f = function(
        &dev,
        ATTENTION_MODULE,
        &format!("flash_rows_{ty}_d{d}"),
        smem,
    )?;
    let q_at = ptr(q, &stream)?;
    let elem = q.dtype().size_in_bytes();
    let mut outs = Vec::with_capacity(b.div_ceil(ROWS_BY_VALUE));
    for (c, chunk) in kv.chunks(ROWS_BY_VALUE).enumerate() {
        let rows = chunk.len();
        let mut table = [RowKv::default(); ROWS_BY_VALUE];
        // Views copied to contiguous rows (rare: caches are) must live until the launch.
        let mut keep = Vec::new();
        let mut n_splits = 1;
        for (x, row) in chunk.iter().zip(table.iter_mut()) {
            *row = match x {
                Some((k, v)) => {
                    let sk = k.dim(2)?;
                    let (k, _, kh) = kv_view(k, d)?;
                    let (v, _, vh) = kv_view(v, d)?;
                    let split = row_split_len(sk);
                    n_splits = n_splits.max(sk.div_ceil(split));
                    let r = RowKv {
                        k: ptr(&k, &stream)?,
                        v: ptr(&v, &stream)?,
                        k_hstride: kh,
                        v_hstride: vh,
                        sk: sk as i32,
                        split_len: split as i32,
                    };
                    keep.push((k, v));
                    r
                }
                None => RowKv {
                    split_len: BC as i32,
                    ..Default::default()
                },
            };
        }
        // Always through f32 parts (at least two splits, the second empty for short rows), so
        // every row takes one path whatever its neighbours' lengths.
        let n_splits = n_splits.max(2);
        // Every block writes its rows of its split, an empty split 0 with LSE -inf.
        let (op, lp) = unsafe {
            (
                alloc_unset(&dev, (n_splits, rows * n_h, d), DType::F32, &stream)?,
                alloc_unset(&dev, (n_splits, rows * n_h), DType::F32, &stream)?,
            )
        };
        let params = RowsParams {
            p: Params {
                q: q_at + (c * ROWS_BY_VALUE * n_h * d * elem) as u64,
                k: 0,
                v: 0,
                o: 0,
                lse: 0,
                o_part: op.1,
                lse_part: lp.1,
                k_bstride: 0,
                k_hstride: 0,
                v_bstride: 0,
                v_hstride: 0,
                b: rows as i32,
                n_kv: n_kv as i32,
                g: g as i32,
                sq: 1,
                sk: 0,
                causal: 0,
                anchor_rows: 0,
                passing: 0,
                n_splits: n_splits as i32,
                split_len: 0,
                scale_log2: (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32,
            },
            rows: table,
        };
        let cfg = LaunchConfig {
            grid_dim: (
                (g as u32).div_ceil(br as u32),
                n_kv as u32,
                (rows * n_splits) as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let arg = ByValue(params);
        let mut lb = stream.launch_builder(&f);
        lb.arg(&arg);
        unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
        drop(keep);
        outs.push(lse_merge(&op.0, &lp.0, n_splits, rows * n_h, d, q.dtype())?);
    }
    let (out, lse) = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        let (o, l): (Vec<_>, Vec<_>) = outs.into_iter().unzip();
        (Tensor::cat(&o, 0)?, Tensor::cat(&l, 0)?)
    };
    Ok((out.reshape((b, n_h, 1, d))?, lse.reshape((b, n_h, 1))?))
}

/// The merge of f32 parts into `out_dtype` (f32, bf16 or f16) and f32 LSEs.
pub(super) fn lse_merge(
    o: &Tensor,
    lse: &Tensor,
    parts: usize,
    rows: usize,
    d: usize,
    out_dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(o)?;
    let stream = dev.cuda_stream();
    let name = match out_dtype {
        DType::F32 => "lse_merge_f32",
        DType::BF16 => "lse_merge_bf16",
        DType::F16 => "lse_merge_f16",
        dt => candle_core::bail!("lse_merge: no {dt:?} output"),
    };
    // One block a row writes all of it and its LSE.
    let ((out, out_ptr), (out_lse, lse_ptr)) = unsafe {
        (
            alloc_unset(&dev, (rows, d), out_dtype, &stream)?,
            alloc_unset(&dev, rows, DType::F32, &stream)?,
        )
    };
    if rows == 0 {
        return Ok((out, out_lse));
    }
    let f = function(&dev, ATTENTION_MODULE, name, 0)?;
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
