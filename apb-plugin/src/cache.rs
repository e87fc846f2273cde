//! Per-layer KV cache: sized once where the host knows how many positions a sequence keeps
//! ([`LayerKv::with_room`]), else with amortised growth, so decode never copies the whole cache
//! per token.

use crate::Result;
use candle_core::{Tensor, D};

/// Post-RoPE keys and values of one layer, `(batch, n_kv_heads, len, head_dim)`.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// Positions the first allocation holds at least.
    room: usize,
}

impl LayerKv {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`(b, n_kv, s, d)`) along the sequence axis.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let at = self.reserve(k, v)?;
        let (ck, cv) = (self.k.as_ref().unwrap(), self.v.as_ref().unwrap());
        ck.slice_set(&k.contiguous()?, 2, at)?;
        cv.slice_set(&v.contiguous()?, 2, at)?;
        Ok(())
    }

    /// One more position for a host that writes many sequences' new rows in one kernel
    /// ([`apb_kernels::write_rows`]): grows as [`append`](Self::append) does (`k`, `v`: the row,
    /// `(b, n_kv, 1, d)`, for shape and dtype) and returns the K and V buffers
    /// `(b, n_kv, capacity, d)` and the position to write. The position counts as cached from
    /// now on: write it before the cache is read.
    pub fn push_slot(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, usize)> {
        let at = self.reserve(k, v)?;
        Ok((
            self.k.clone().expect("reserved"),
            self.v.clone().expect("reserved"),
            at,
        ))
    }

    /// Makes room for `k`'s positions after the cached ones and counts them; returns where
    /// they go.
    fn reserve(&mut self, k: &Tensor, v: &Tensor) -> Result<usize> {
        let add = k.dim(2)?;
        let cap = self.k.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if self.len + add > cap {
            // Grow geometrically; the first allocation is exact (prompts are usually the bulk).
            let new_cap = if cap == 0 {
                add.max(self.room)
            } else {
                (self.len + add).max(cap * 2)
            };
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = like.dims4()?;
                let t = Tensor::zeros((b, h, new_cap, d), like.dtype(), like.device())?;
                if let Some(old) = old {
                    t.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(t)
            };
            self.k = Some(grow(&self.k, k)?);
            self.v = Some(grow(&self.v, v)?);
        }
        let at = self.len;
        self.len += add;
        Ok(at)
    }

    /// An empty cache whose first allocation holds `room` positions (or what the first append
    /// brings, if more): a host that knows how many positions a sequence keeps on this rank
    /// (its share of the prompt and of the new tokens, [`crate::new_kv_rows`]) allocates once,
    /// exactly, instead of doubling.
    pub fn with_room(room: usize) -> Self {
        Self {
            room,
            ..Self::default()
        }
    }

    /// Positions the cache holds room for.
    pub fn capacity(&self) -> usize {
        self.k.as_ref().map(|k| k.dim(2).unwrap_or(0)).unwrap_or(0)
    }

    /// The cached keys and values (views of length [`len`](Self::len)), or `None` when empty.
    pub fn kv(&self) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) if self.len > 0 => Ok(Some((
                k.narrow(D::Minus2, 0, self.len)?,
                v.narrow(D::Minus2, 0, self.len)?,
            ))),
            _ => Ok(None),
        }
    }
}
