//! A layer's residual add with the RMSNorm that follows it: `x' = x + a`, `h = rms_norm(x') · w`.
//! On CUDA (bf16/f16) one kernel (`norm.cu`) instead of an add and a norm; elsewhere those two
//! candle ops, exactly as unfused.

use candle_core::{Result, Tensor, D};

/// `(x + a, rms_norm(x + a) · w)` over the last dimension, `eps` inside the square root.
pub fn add_rms_norm(x: &Tensor, a: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let d = x.dim(D::Minus1)?;
    if a.dims() != x.dims() || w.dims() != [d] {
        candle_core::bail!(
            "add_rms_norm: x {:?}, a {:?}, weight {:?}",
            x.dims(),
            a.dims(),
            w.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && matches!(
            x.dtype(),
            candle_core::DType::BF16 | candle_core::DType::F16
        )
        && a.dtype() == x.dtype()
        && w.dtype() == x.dtype()
    {
        return cuda::add_rms_norm(&x.contiguous()?, &a.contiguous()?, &w.contiguous()?, eps);
    }
    let s = (x + a)?;
    let h = candle_nn::ops::rms_norm(&s, w, eps)?;
    Ok((s, h))
}

#[cfg(feature = "cuda")]
mod cuda {
    use crate::cuda::{alloc_unset, cuda_device, function, ptr, NORM_MODULE};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{DType, Result, Tensor};

    pub(super) fn add_rms_norm(
        x: &Tensor,
        a: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let d = w.dim(0)?;
        let rows = x.elem_count() / d.max(1);
        let dev = cuda_device(x)?;
        let stream = dev.cuda_stream();
        // Every element of both outputs is written.
        let ((s, ps), (h, ph)) = unsafe {
            (
                alloc_unset(&dev, x.shape().clone(), x.dtype(), &stream)?,
                alloc_unset(&dev, x.shape().clone(), x.dtype(), &stream)?,
            )
        };
        if rows == 0 {
            return Ok((s, h));
        }
        let ty = if x.dtype() == DType::BF16 {
            "bf16"
        } else {
            "f16"
        };
        let f = function(&dev, NORM_MODULE, &format!("add_rms_norm_{ty}"), 0)?;
        let (px, pa, pw) = (ptr(x, &stream)?, ptr(a, &stream)?, ptr(w, &stream)?);
        let d32 = i32::try_from(d)
            .map_err(|_| candle_core::Error::Msg(format!("add_rms_norm: width {d}")))?;
        let mut lb = stream.launch_builder(&f);
        lb.arg(&px)
            .arg(&pa)
            .arg(&pw)
            .arg(&ps)
            .arg(&ph)
            .arg(&d32)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (
                d.div_ceil(8).next_power_of_two().clamp(32, 1024) as u32,
                1,
                1,
            ),
            shared_mem_bytes: 0,
        };
        unsafe { lb.launch(cfg) }.map_err(crate::cuda::err)?;
        Ok((s, h))
    }
}
