//! Linear layers of a decode step's rows: `x · Wᵀ` for a few rows (one per sequence) against a
//! weight `W (n, k)`, and the MLP's `silu(x · Gᵀ) · (x · Uᵀ)` with `W = [G; U]` in one pass.
//!
//! - CUDA (bf16/f16): `linear.cu`, one weight read for up to [`MAX_ROWS`] rows at memory speed
//!   (more rows in several launches), and a row's result independent of the rows beside it
//!   (batched decode equals alone bit for bit, whatever the batch).
//! - CPU: as `(W · xᵀ)ᵀ`. candle's CPU GEMM computes `x · Wᵀ` for a few rows with a kernel that
//!   packs all of W each call (16 rows of SmolLM2 cost 9× one row), while W as the row-major left
//!   operand costs ~2–5× one row for 16, and every row comes out alike whatever their number.
//! - Elsewhere (f32 on CUDA, k not a multiple of 32): candle's GEMM.

use candle_core::{Result, Tensor, D};

/// Rows the CUDA kernel takes in one launch; more run in launches of this many (each row still
/// independent of the others).
pub const MAX_ROWS: usize = 64;

/// `x (.., k) · wᵀ` with `w (n, k)` → `(.., n)`, for a decode step's few rows.
pub fn linear_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    if x.dim(D::Minus1)? != k {
        candle_core::bail!("linear_rows: x {:?} against w {:?}", x.dims(), w.dims());
    }
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("x has a last dim") = n;
    let x2 = x.reshape(((), k))?;
    #[cfg(feature = "cuda")]
    if cuda_supported(&x2, w)? {
        return cuda::rows_linear_all(&x2, w, false)?.reshape(out_shape);
    }
    let y = if x.device().is_cpu() {
        w.matmul(&x2.t()?)?.t()?.contiguous()?
    } else {
        x2.matmul(&w.t()?)?
    };
    y.reshape(out_shape)
}

/// `silu(x · Gᵀ) · (x · Uᵀ)` for `w = [G; U]` `(2·h, k)` → `(.., h)`: the gate and up
/// projections of an MLP as one weight, for a decode step's few rows (see [`linear_rows`]).
pub fn linear_rows_silu_mul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    if n % 2 != 0 || x.dim(D::Minus1)? != k {
        candle_core::bail!(
            "linear_rows_silu_mul: x {:?} against [gate; up] {:?}",
            x.dims(),
            w.dims()
        );
    }
    #[cfg(feature = "cuda")]
    {
        let x2 = x.reshape(((), k))?;
        if cuda_supported(&x2, w)? {
            let mut out_shape = x.dims().to_vec();
            *out_shape.last_mut().expect("x has a last dim") = n / 2;
            return cuda::rows_linear_all(&x2, w, true)?.reshape(out_shape);
        }
    }
    silu_mul(&linear_rows(x, w)?)
}

/// `silu(a) · b` for `y = [a | b]` along the last dimension: the MLP's activation after a fused
/// gate|up projection.
pub fn silu_mul(y: &Tensor) -> Result<Tensor> {
    let h = y.dim(D::Minus1)? / 2;
    y.narrow(D::Minus1, 0, h)?.silu()? * y.narrow(D::Minus1, h, h)?
}

/// [`linear_rows`] (or with `silu_mul` [`linear_rows_silu_mul`]) on CUDA through one shape of
/// the kernel: `tiles` 16-row weight tiles a block (1 or 2; 2 with `silu_mul`) and `chunks`
/// (1, 2 or 4) 32-wide pieces of k each warp loads before it computes. For `apb bench linear`,
/// which times every shape; `x` must be `(m ≤ 64, k)` bf16/f16 with `k % 32 == 0`.
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub fn linear_rows_shape(
    x: &Tensor,
    w: &Tensor,
    silu_mul: bool,
    tiles: usize,
    chunks: usize,
) -> Result<Tensor> {
    if !cuda_supported(x, w)?
        || x.dim(0)? > MAX_ROWS
        || ![1, 2].contains(&tiles)
        || ![1, 2, 4].contains(&chunks)
    {
        candle_core::bail!("linear_rows_shape: unsupported operands or shape");
    }
    if silu_mul && tiles != 2 {
        candle_core::bail!("linear_rows_shape: silu_mul takes 2 tiles");
    }
    cuda::rows_linear(x, w, silu_mul, Some((tiles, chunks)))
}

#[cfg(feature = "cuda")]
fn cuda_supported(x: &Tensor, w: &Tensor) -> Result<bool> {
    use candle_core::DType;
    let (m, k) = x.dims2()?;
    Ok(x.device().is_cuda()
        && w.device().same_device(x.device())
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && w.dtype() == x.dtype()
        && m >= 1
        && k % 32 == 0
        && x.is_contiguous()
        && w.is_contiguous()
        // 16-byte loads: views must start on 8 elements (allocations are aligned).
        && x.layout().start_offset().is_multiple_of(8)
        && w.layout().start_offset().is_multiple_of(8))
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{alloc_unset, cuda_device, function, ptr, LINEAR_MODULE};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{DType, Result, Tensor};

    /// The kernel shape (weight tiles a block, k chunks in flight a warp) for `mt` n8 tiles of
    /// rows and a weight of `n` rows. Any shape gives the same bits (a block's tiles and its
    /// warps' loads do not change the order of the sums), so it may follow the rows.
    fn shape_for(mt: usize, silu_mul: bool, n: usize) -> (usize, usize) {
        // The fastest of `apb bench linear` on an H100 (bench/results/gpu-h100-linear-*.md) on
        // Llama-3.1-8B's weights that do not fit in L2 (gate|up, down, lm_head); at 17-32 rows
        // wide weights (q|k|v's 6144 rows, lm_head) read faster in 32-row blocks of 2 chunks
        // (Nsight Compute at 24 rows: q|k|v 26.5 against 29.5 µs, lm_head 384 against 404),
        // o_proj's and down's 4096 rows in 16-row blocks (18.5 against 22.5, 50.7 against 61.3).
        match (silu_mul, mt >= 8) {
            (true, false) => (2, 2),
            (true, true) => (2, 4),
            (false, false) if mt == 4 && n > 4096 => (2, 2),
            (false, false) => (1, 4),
            (false, true) => (2, 4),
        }
    }

    /// [`rows_linear`] in launches of at most [`MAX_ROWS`](super::MAX_ROWS) rows.
    pub(super) fn rows_linear_all(x: &Tensor, w: &Tensor, silu_mul: bool) -> Result<Tensor> {
        let m = x.dim(0)?;
        if m <= super::MAX_ROWS {
            return rows_linear(x, w, silu_mul, None);
        }
        let parts = (0..m)
            .step_by(super::MAX_ROWS)
            .map(|r| {
                rows_linear(
                    &x.narrow(0, r, super::MAX_ROWS.min(m - r))?,
                    w,
                    silu_mul,
                    None,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// `x (m ≤ 64, k) · wᵀ`, or with `silu_mul` the MLP's `silu(gate) · up` of `w = [gate; up]`;
    /// `shape` forces a kernel shape (see `shape_for`).
    pub(super) fn rows_linear(
        x: &Tensor,
        w: &Tensor,
        silu_mul: bool,
        shape: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let n = w.dim(0)?;
        let half = n / 2;
        let width = if silu_mul { half } else { n };
        let dev = cuda_device(x)?;
        let stream = dev.cuda_stream();
        let (px, pw) = (ptr(x, &stream)?, ptr(w, &stream)?);
        if px % 16 != 0 || pw % 16 != 0 {
            candle_core::bail!("linear_rows: operands not 16-byte aligned");
        }
        let mt = m.div_ceil(8).next_power_of_two();
        let (tiles, chunks) = shape.unwrap_or_else(|| shape_for(mt, silu_mul, n));
        let ty = if x.dtype() == DType::BF16 {
            "bf16"
        } else {
            "f16"
        };
        let name = if silu_mul {
            "rows_silu_mul"
        } else {
            "rows_linear"
        };
        // The warps' partial sums: (8 warps, tiles · mt · 4, 32 lanes) f32.
        let smem = 8 * tiles * mt * 4 * 32 * 4;
        let f = function(
            &dev,
            LINEAR_MODULE,
            &format!("{name}_{ty}_m{}_t{tiles}_u{chunks}", 8 * mt),
            smem,
        )?;
        // Every element of y is written by exactly one thread of one block.
        let (y, py) = unsafe { alloc_unset(&dev, (m, width), x.dtype(), &stream)? };
        let blocks = if silu_mul {
            half.div_ceil(16)
        } else {
            n.div_ceil(16 * tiles)
        };
        let as_i32 = |v: usize| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("linear_rows: {v}")))
        };
        let (m32, n32, k32, h32) = (as_i32(m)?, as_i32(n)?, as_i32(k)?, as_i32(half)?);
        let mut lb = stream.launch_builder(&f);
        lb.arg(&px)
            .arg(&pw)
            .arg(&py)
            .arg(&m32)
            .arg(&n32)
            .arg(&k32)
            .arg(&h32);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
        Ok(y)
    }
}
