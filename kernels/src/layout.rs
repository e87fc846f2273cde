//! Layout changes at memory speed: the (b, s, h, d) ↔ (b, h, s, d) transposes around attention.

use candle_core::{Result, Tensor};

/// `t` as a contiguous tensor. On CUDA, a tensor of up to 4 dimensions whose innermost dimension
/// is contiguous (rows of a multiple of 16 bytes, 16-byte aligned) is copied by our kernel, 16
/// bytes per thread; candle's generic strided copy computes every element's offset on its own and
/// ran at about a tenth of memory bandwidth on these transposes. Anything else goes to
/// [`Tensor::contiguous`].
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        return Ok(t.clone());
    }
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        if let Some(out) = cuda_copy_rows(t)? {
            return Ok(out);
        }
    }
    t.contiguous()
}

#[cfg(feature = "cuda")]
fn cuda_copy_rows(t: &Tensor) -> Result<Option<Tensor>> {
    use crate::cuda::{alloc, cuda_device, function, ptr, LAYOUT_MODULE};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::DType;
    let (dims, stride) = (t.dims(), t.stride());
    let rank = dims.len();
    let es = t.dtype().size_in_bytes();
    let supported = matches!(
        t.dtype(),
        DType::BF16 | DType::F16 | DType::F32 | DType::U32
    );
    if !supported || !(2..=4).contains(&rank) || stride[rank - 1] != 1 {
        return Ok(None);
    }
    let row_bytes = dims[rank - 1] * es;
    let aligned = row_bytes.is_multiple_of(16)
        && (t.layout().start_offset() * es).is_multiple_of(16)
        && stride[..rank - 1]
            .iter()
            .all(|s| (s * es).is_multiple_of(16));
    if !aligned {
        return Ok(None);
    }
    // Outer dimensions padded to three.
    let mut n = [1usize; 3];
    let mut s = [0usize; 3];
    for i in 0..rank - 1 {
        n[3 - (rank - 1) + i] = dims[i];
        s[3 - (rank - 1) + i] = stride[i] * es;
    }
    let dev = cuda_device(t)?;
    let stream = dev.cuda_stream();
    let (out, out_ptr) = alloc(&dev, dims, t.dtype(), &stream)?;
    let chunks_per_row = (row_bytes / 16) as i64;
    let total = (n[0] * n[1] * n[2]) as i64 * chunks_per_row;
    if total == 0 {
        return Ok(Some(out));
    }
    let f = function(&dev, LAYOUT_MODULE, "copy_rows_16b", 0)?;
    let src = ptr(t, &stream)?;
    let (n1, n2) = (n[1] as i64, n[2] as i64);
    let (s0, s1, s2) = (s[0] as i64, s[1] as i64, s[2] as i64);
    let mut lb = stream.launch_builder(&f);
    lb.arg(&src)
        .arg(&out_ptr)
        .arg(&n1)
        .arg(&n2)
        .arg(&s0)
        .arg(&s1)
        .arg(&s2)
        .arg(&chunks_per_row)
        .arg(&total);
    let cfg = LaunchConfig {
        grid_dim: ((total as u64).div_ceil(256).min(1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
    Ok(Some(out))
}

/// Writes one decode step's new rows into each sequence's own cache buffer: row `i` of `src`
/// `(1, n_kv, rows, d)` goes to position `dst[i].1` of buffer `dst[i].0` `(1, n_kv, cap, d)`
/// (None: row `i` is not kept here). The buffers are written in place: on CUDA by one kernel for
/// every row (a decode step of many sequences would otherwise cost two copies per row and
/// layer), elsewhere by one `slice_set` per row.
pub fn write_rows(src: &Tensor, dst: &[Option<(Tensor, usize)>]) -> Result<()> {
    let (b, n_kv, rows, d) = src.dims4()?;
    if b != 1 || rows != dst.len() {
        candle_core::bail!("write_rows: src {:?} for {} rows", src.dims(), dst.len());
    }
    for (buf, pos) in dst.iter().flatten() {
        let (bb, h, cap, dd) = buf.dims4()?;
        if (bb, h, dd) != (1, n_kv, d) || *pos >= cap || buf.dtype() != src.dtype() {
            candle_core::bail!(
                "write_rows: buffer {:?} {:?} at {pos} for rows {:?} {:?}",
                buf.dims(),
                buf.dtype(),
                src.dims(),
                src.dtype()
            );
        }
    }
    #[cfg(feature = "cuda")]
    if src.device().is_cuda() {
        return cuda_write_rows(src, dst);
    }
    for (i, x) in dst.iter().enumerate() {
        if let Some((buf, pos)) = x {
            buf.slice_set(&src.narrow(2, i, 1)?.contiguous()?, 2, *pos)?;
        }
    }
    Ok(())
}

/// layout.cu `RowDst`.
#[cfg(feature = "cuda")]
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RowDst {
    base: u64,
    hstride_bytes: i64,
    offset_bytes: i64,
}

/// layout.cu `RowDsts`: the table of one launch, by value (nothing uploaded).
#[cfg(feature = "cuda")]
#[repr(C)]
#[derive(Clone, Copy)]
struct RowDsts([RowDst; crate::attention::ROWS_BY_VALUE]);
#[cfg(feature = "cuda")]
unsafe impl crate::cuda::Pod for RowDsts {}
// layout.cu's layout: a pointer and two i64 a row.
#[cfg(feature = "cuda")]
const _: () = assert!(std::mem::size_of::<RowDsts>() == 24 * crate::attention::ROWS_BY_VALUE);

#[cfg(feature = "cuda")]
fn cuda_write_rows(src: &Tensor, dst: &[Option<(Tensor, usize)>]) -> Result<()> {
    use crate::attention::ROWS_BY_VALUE;
    use crate::cuda::{cuda_device, function, ptr, ByValue, LAYOUT_MODULE};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    let (_, n_kv, rows, d) = src.dims4()?;
    if rows == 0 {
        return Ok(());
    }
    let dev = cuda_device(src)?;
    let stream = dev.cuda_stream();
    let src = src.contiguous()?;
    let elem = src.dtype().size_in_bytes();
    let f = function(&dev, LAYOUT_MODULE, "write_rows", 0)?;
    let ps = ptr(&src, &stream)?;
    let (b32, row_bytes) = (rows as i32, (d * elem) as i32);
    for (c, chunk) in dst.chunks(ROWS_BY_VALUE).enumerate() {
        let mut table = RowDsts([RowDst::default(); ROWS_BY_VALUE]);
        for (x, t) in chunk.iter().zip(table.0.iter_mut()) {
            if let Some((buf, pos)) = x {
                let st = buf.stride();
                if st[3] != 1 || st[2] != d {
                    candle_core::bail!("write_rows: a cache buffer with strides {st:?}");
                }
                *t = RowDst {
                    base: ptr(buf, &stream)?,
                    hstride_bytes: (st[1] * elem) as i64,
                    offset_bytes: (pos * d * elem) as i64,
                };
            }
        }
        let row0 = (c * ROWS_BY_VALUE) as i32;
        let arg = ByValue(table);
        let mut lb = stream.launch_builder(&f);
        lb.arg(&ps).arg(&arg).arg(&b32).arg(&row0).arg(&row_bytes);
        let cfg = LaunchConfig {
            grid_dim: (chunk.len() as u32, n_kv as u32, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        // The buffers are the caller's (alive until it returns): the launch is queued by then.
        unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
    }
    Ok(())
}

/// Splits a fused projection `qkv` `(b, s, (n_h + 2·n_kv)·d)` into head-major `q` `(b, n_h, s, d)`
/// and `k`, `v` `(b, n_kv, s, d)`, all contiguous, with RoPE (rotate-half form; `cos`/`sin`
/// `(s, d/2)`) applied to `q` and `k`. On CUDA one kernel reads the projections once and writes
/// each output once; elsewhere (and as the kernel's reference) split, transpose and candle-nn's
/// `rope`.
pub fn rope_split(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    n_h: usize,
    n_kv: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, s, w) = qkv.dims3()?;
    let slots = n_h + 2 * n_kv;
    if slots == 0 || w % slots != 0 || !(w / slots).is_multiple_of(2) {
        candle_core::bail!("rope_split: width {w} is not {slots} heads of an even size");
    }
    let d = w / slots;
    if cos.dims2()? != (s, d / 2) || sin.dims2()? != (s, d / 2) {
        candle_core::bail!(
            "rope_split: cos {:?} / sin {:?}, want ({s}, {})",
            cos.dims(),
            sin.dims(),
            d / 2
        );
    }
    #[cfg(feature = "cuda")]
    if qkv.device().is_cuda() && qkv.is_contiguous() && d <= 256 {
        return cuda_rope_split(qkv, cos, sin, (b, s, n_h, n_kv, d));
    }
    let heads = |off: usize, n: usize| -> Result<Tensor> {
        contiguous(
            &qkv.narrow(2, off * d, n * d)?
                .reshape((b, s, n, d))?
                .transpose(1, 2)?,
        )
    };
    let q = candle_nn::rotary_emb::rope(&heads(0, n_h)?, cos, sin)?;
    let k = candle_nn::rotary_emb::rope(&heads(n_h, n_kv)?, cos, sin)?;
    let v = heads(n_h + n_kv, n_kv)?;
    Ok((q, k, v))
}

#[cfg(feature = "cuda")]
fn cuda_rope_split(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    (b, s, n_h, n_kv, d): (usize, usize, usize, usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    use crate::cuda::{alloc, cuda_device, function, ptr, LAYOUT_MODULE};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::DType;
    let name = match qkv.dtype() {
        DType::BF16 => "rope_split_bf16",
        DType::F16 => "rope_split_f16",
        DType::F32 => "rope_split_f32",
        dt => candle_core::bail!("rope_split: unsupported dtype {dt:?}"),
    };
    let dev = cuda_device(qkv)?;
    let stream = dev.cuda_stream();
    let cos = cos.to_dtype(qkv.dtype())?.contiguous()?;
    let sin = sin.to_dtype(qkv.dtype())?.contiguous()?;
    let (q, qp) = alloc(&dev, (b, n_h, s, d), qkv.dtype(), &stream)?;
    let (k, kp) = alloc(&dev, (b, n_kv, s, d), qkv.dtype(), &stream)?;
    let (v, vp) = alloc(&dev, (b, n_kv, s, d), qkv.dtype(), &stream)?;
    if b * s == 0 {
        return Ok((q, k, v));
    }
    let f = function(&dev, LAYOUT_MODULE, name, 0)?;
    let (src, cp, sp) = (ptr(qkv, &stream)?, ptr(&cos, &stream)?, ptr(&sin, &stream)?);
    let (s32, nh32, nkv32, d32) = (s as i32, n_h as i32, n_kv as i32, d as i32);
    let mut lb = stream.launch_builder(&f);
    lb.arg(&src)
        .arg(&cp)
        .arg(&sp)
        .arg(&qp)
        .arg(&kp)
        .arg(&vp)
        .arg(&s32)
        .arg(&nh32)
        .arg(&nkv32)
        .arg(&d32);
    const SLOTS_PER_BLOCK: usize = 8;
    let cfg = LaunchConfig {
        grid_dim: (
            (b * s) as u32,
            (n_h + 2 * n_kv).div_ceil(SLOTS_PER_BLOCK) as u32,
            1,
        ),
        block_dim: ((d / 2) as u32, SLOTS_PER_BLOCK as u32, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
    Ok((q, k, v))
}
