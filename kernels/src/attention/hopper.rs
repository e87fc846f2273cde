//! The sm_90 (Hopper) attention path, shared by its two fused kernels: FlashInfer's FA3-style
//! prefill ([`super::flashinfer`], wgmma + TMA, warp-specialised) and cuDNN's SDPA
//! ([`super::cudnn`], what PyTorch runs by default). Both know two masks, none and bottom-right
//! causal; this file cuts our [`Mask`] into [`Piece`]s they run, allocates the outputs and picks the
//! kernel. Shapes where some row would see no key, short query blocks (decode) and other GPUs go
//! to our `mma.sync` kernel.
//!
//! The APB mask is two pieces: anchor rows attend the keys after the passing block (causal),
//! the other rows attend all keys (causal).

pub use super::piece::Piece;
use super::Mask;
use crate::cuda::{alloc, cuda_device};
use candle_core::cuda::cudarc::driver::sys;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Result, Tensor};
use std::sync::OnceLock;

/// Query rows below this go to our kernel, whose split-KV schedule suits decode.
pub const MIN_ROWS: usize = 128;

/// The attention kernel `APB_ATTENTION` asks for: `auto` (default: on sm_90 the first of
/// [`auto_order`] that is available, else ours), or one kernel for comparisons: `mma` (ours
/// everywhere), `flashinfer` or `cudnn` (which fail rather than fall back).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kernel {
    /// The fastest available (see [`auto_order`]), falling back when one fails.
    Auto,
    /// Our FlashAttention-2 kernel (sm_80+).
    Mma,
    /// FlashInfer's FA3-style sm_90 prefill.
    FlashInfer,
    /// cuDNN's SDPA.
    Cudnn,
}

/// Hopper kernels in the order `auto` tries them for `head_dim`, fastest first as measured on
/// H100 (bench/results/gpu-h100-attention-2026-11-25.md): FlashInfer's at d128 (1.06× cuDNN at
/// 32K), cuDNN's at d64 (FlashInfer's d64 tiles lose up to 30 % at 8K).
pub fn auto_order(head_dim: usize) -> [Kernel; 2] {
    if head_dim == 64 {
        [Kernel::Cudnn, Kernel::FlashInfer]
    } else {
        [Kernel::FlashInfer, Kernel::Cudnn]
    }
}

impl Kernel {
    /// The name `APB_ATTENTION` takes.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Auto => "auto",
            Kernel::Mma => "mma",
            Kernel::FlashInfer => "flashinfer",
            Kernel::Cudnn => "cudnn",
        }
    }

    /// Whether this Hopper kernel can run in this process (its library loads); the reason if not.
    pub fn available(self) -> std::result::Result<(), String> {
        match self {
            Kernel::Cudnn => super::cudnn::loaded(),
            Kernel::FlashInfer => Ok(()),
            k => Err(format!("{} is not a Hopper kernel", k.name())),
        }
    }

    fn run_piece(self, p: &Piece, dev: &CudaDevice) -> Result<()> {
        let stream = dev.cuda_stream();
        match self {
            Kernel::Cudnn => super::cudnn::run_piece(p, dev, &stream),
            Kernel::FlashInfer => super::flashinfer::run_piece(p, &stream),
            k => candle_core::bail!("{} is not a Hopper kernel", k.name()),
        }
    }
}

/// `APB_ATTENTION`, read once.
pub fn choice() -> Kernel {
    static C: OnceLock<Kernel> = OnceLock::new();
    *C.get_or_init(|| match std::env::var("APB_ATTENTION").as_deref() {
        Ok("mma") => Kernel::Mma,
        Ok("cudnn") => Kernel::Cudnn,
        Ok("flashinfer") => Kernel::FlashInfer,
        Ok("auto") | Err(_) => Kernel::Auto,
        Ok(other) => {
            eprintln!(
                "warning: APB_ATTENTION={other:?} is not one of auto, mma, flashinfer, cudnn; using auto"
            );
            Kernel::Auto
        }
    })
}

/// The Hopper kernel that runs prefill blocks of `head_dim` on `device`, if any (sm_90 and one
/// available).
pub fn kernel_for(device: &candle_core::Device, head_dim: usize) -> Result<Option<Kernel>> {
    let candle_core::Device::Cuda(dev) = device else {
        return Ok(None);
    };
    if !is_hopper(dev)? {
        return Ok(None);
    }
    Ok(match choice() {
        Kernel::Mma => None,
        Kernel::Auto => auto_order(head_dim)
            .into_iter()
            .find(|k| k.available().is_ok()),
        k => k.available().is_ok().then_some(k),
    })
}

/// Compute capability 9.x.
pub fn is_hopper(dev: &CudaDevice) -> Result<bool> {
    let major = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(crate::cuda::err)?;
    Ok(major == 9)
}

/// Tells once per kernel that it failed and was skipped.
fn warn_once(kernel: Kernel, e: &candle_core::Error) {
    static WARNED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut w = WARNED.lock().expect("warned");
    if !w.contains(&kernel.name()) {
        w.push(kernel.name());
        eprintln!(
            "warning: {} attention failed ({e}); using the next kernel",
            kernel.name()
        );
    }
}

/// A range of rows or keys: (start, len).
pub type Span = (usize, usize);

/// `(rows, keys)` ranges of the pieces that compute `mask` over `sq` queries and
/// `sk` keys; `None` if some row would see no key (those rows are 0 / LSE −inf by definition, which
/// neither fused kernel promises).
pub fn pieces(mask: Mask, sq: usize, sk: usize) -> Option<Vec<(Span, Span)>> {
    let a = mask.anchor_rows.min(sq);
    let p = if a > 0 { mask.passing_keys } else { 0 };
    let ok = sk > 0 && if mask.causal { sk >= sq + p } else { a == 0 };
    if !ok {
        return None;
    }
    // Rows [0, a) attend keys [p, sk − (sq − a)), rows [a, sq) keys [0, sk): with bottom-right
    // alignment each piece keeps its rows' diagonal.
    let mut out = Vec::new();
    if a > 0 {
        out.push(((0, a), (p, sk - (sq - a) - p)));
    }
    if a < sq {
        out.push(((a, sq - a), (0, sk)));
    }
    Some(out)
}

/// Attention by `kernel` (a Hopper kernel), or `None` where it does not apply (not sm_90, its
/// library missing, short queries, masks without [`pieces`]); if `forced`, those are errors
/// instead (and short queries run). Operands as in [`super::attention`], already checked.
pub fn run(
    kernel: Kernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Mask,
    want_lse: bool,
    forced: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let decline = |why: String| -> Result<Option<(Tensor, Option<Tensor>)>> {
        if forced {
            candle_core::bail!("APB_ATTENTION={}: {why}", kernel.name())
        }
        Ok(None)
    };
    let (b, n_h, sq, d) = q.dims4()?;
    let sk = k.dim(2)?;
    if [q, k, v].iter().any(|t| t.stride()[3] != 1) {
        return decline("a strided head dimension".into());
    }
    let Some(pieces) = pieces(mask, sq, sk) else {
        return decline(format!(
            "mask {mask:?} with sq {sq}, sk {sk} leaves rows without keys"
        ));
    };
    let dev = cuda_device(q)?;
    if !is_hopper(&dev)? {
        return decline("the GPU is not sm_90".into());
    }
    if let Err(e) = kernel.available() {
        return decline(e);
    }
    if sq < MIN_ROWS && !forced {
        return Ok(None);
    }
    let stream = dev.cuda_stream();
    // Both kernels go through the CUDA runtime, which uses the thread's current context.
    stream
        .context()
        .bind_to_thread()
        .map_err(crate::cuda::err)?;
    // Token-major output, returned as a head-major view: the transpose before o_proj is free.
    // (Measured on H100: cuDNN runs equally fast with a head-major output.)
    let o = alloc(&dev, (b, sq, n_h, d), q.dtype(), &stream)?
        .0
        .transpose(1, 2)?;
    let mut lses = Vec::new();
    for ((r0, nr), (k0, nk)) in pieces {
        let lse = if want_lse {
            Some(alloc(&dev, (b, n_h, nr), DType::F32, &stream)?)
        } else {
            None
        };
        let (qs, os) = (q.narrow(2, r0, nr)?, o.narrow(2, r0, nr)?);
        let (ks, vs) = (k.narrow(2, k0, nk)?, v.narrow(2, k0, nk)?);
        let piece = Piece {
            q: &qs,
            k: &ks,
            v: &vs,
            o: &os,
            lse: lse.as_ref(),
            causal: mask.causal,
        };
        if let Err(e) = kernel.run_piece(&piece, &dev) {
            if forced {
                return Err(e);
            }
            // Auto: a kernel that refuses this shape at run time gives way to the next one.
            warn_once(kernel, &e);
            return Ok(None);
        }
        if let Some((l, _)) = lse {
            lses.push(l);
        }
    }
    let lse = match lses.len() {
        0 => None,
        1 => lses.pop(),
        _ => Some(Tensor::cat(&lses, 2)?),
    };
    Ok(Some((o, lse)))
}
