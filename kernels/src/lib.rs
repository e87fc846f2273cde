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
//! - [`select`]: retaining-score pooling, top-k positions, packing the passing block.

pub mod attention;
#[cfg(feature = "cuda")]
mod cuda;
pub mod layout;
pub mod select;

pub use attention::{
    attention, attention_rows, flash_supported, lse_merge, reference_attention, rows_fused, Mask,
};
pub use layout::{contiguous, rope_split, write_rows};
pub use select::{argmax, argmax_rows, gather_kv, pool5_mask, topk_positions};

#[cfg(test)]
mod tests;
