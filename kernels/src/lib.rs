#![warn(missing_docs)]
//! CUDA kernels of APB-rs, each with a plain CPU implementation that is both the CPU path and the
//! reference the GPU tests compare against. Without the `cuda` feature only the CPU
//! implementations exist, so CPU builds need no CUDA toolkit. Kernels know tensors and mask
//! numbers, not models or ranks.
//!
//! - [`attention()`]: attention with the APB mask, one dispatcher over cuDNN (Hopper), our
//!   FlashAttention-2 kernel (CUDA), a tiled CPU kernel and a chunked f32 path; LSE merge.
//! - [`layout`]: strided → contiguous copies at memory speed (the transposes around attention),
//!   and the fused q|k|v split + RoPE + head-major layout.
//! - [`linear`]: a decode step's projections (few rows against a weight), and the MLP's
//!   gate|up projection with its SiLU product, at memory speed and batch-invariant on CUDA.
//! - [`norm`]: a layer's residual add with the RMSNorm after it, one kernel on CUDA.
//! - [`select`]: retaining-score pooling, top-k positions, packing the passing block.

pub mod attention;
#[cfg(feature = "cuda")]
mod cuda;
pub mod layout;
pub mod linear;
pub mod norm;
pub mod select;

pub use attention::{
    attention, attention_rows, attention_with_lse, flash_supported, lse_merge, reference_attention,
    rows_fused, Mask,
};
pub use layout::{contiguous, rope_split, write_rows};
pub use linear::{linear_rows, linear_rows_silu_mul, silu_mul};
pub use norm::add_rms_norm;
pub use select::{argmax, argmax_rows, gather_kv, pool5_mask, topk_positions};

#[cfg(test)]
mod tests;
