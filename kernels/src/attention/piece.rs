//! The unit of work the fused Hopper kernels take ([`super::hopper`] cuts a mask into pieces;
//! [`super::cudnn`] and [`super::flashinfer`] each run one): here, below all three, so neither
//! kernel's file reaches back up into the dispatcher for it.

use candle_core::Tensor;

/// One call of a fused kernel: a block of query rows over a block of keys, no mask or
/// bottom-right causal. Views (`(b, h, s, d)`, head dimension contiguous); `o` is written in place
/// and so is `lse` (`(b, n_h, rows)` f32, with its device address) when given.
pub struct Piece<'a> {
    /// Query rows.
    pub q: &'a Tensor,
    /// Keys.
    pub k: &'a Tensor,
    /// Values.
    pub v: &'a Tensor,
    /// Output rows, written in place.
    pub o: &'a Tensor,
    /// Log-sum-exp rows and their device address, written in place when given.
    pub lse: Option<&'a (Tensor, u64)>,
    /// Bottom-right causal, else no mask.
    pub causal: bool,
}
