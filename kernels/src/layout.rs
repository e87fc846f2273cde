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
    use crate::cuda::{alloc, cuda_device, function, ptr, LAYOUT_PTX};
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
    let f = function(&dev, LAYOUT_PTX, "copy_rows_16b", 0)?;
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
