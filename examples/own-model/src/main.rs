//! A host that is not ours: a small llama-style model written here (not `apb-loaders`' model
//! file), wired into `apb-plugin` through the seam of apb-plugin/README.md, run on CPU ranks as
//! threads. It checks that the exact methods equal dense and shows how far APB and Star move the
//! logits.
//!
//! Its own crate, depending on `apb-plugin` and candle only, as another host would.
//! `cargo run --release -p apb-own-model` (CI runs it; it exits non-zero if an
//! exact method differs from dense by more than 1e-5 relative).

use anyhow::{bail, Result};
use apb_plugin::{
    AttentionBackend, AttnInput, Communicator, DenseBackend, LayerKv, LocalGroup, Method, Phase,
    PlanArgs, PromptParts, Scorer,
};
use candle_core::{Device, Tensor, D};
use std::sync::Arc;

const VOCAB: usize = 96;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const MLP: usize = 128;
const LAYERS: usize = 2;

/// Deterministic weights (xorshift), scaled like a fresh init.
fn weights(seed: u64, shape: (usize, usize)) -> Result<Tensor> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let scale = 1.0 / (shape.1 as f32).sqrt();
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

struct Layer {
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    up: Tensor,
    gate: Tensor,
    down: Tensor,
}

/// The model: embeddings (tied LM head), pre-norm layers of attention and a SiLU-gated MLP.
struct TinyLlama {
    emb: Tensor,
    layers: Vec<Layer>,
}

fn rms_norm(x: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + 1e-5)?.sqrt()?)?)
}

/// Rotary embedding (rotate-half) of `x` `(1, heads, s, d)` at `positions`: the host must use the
/// positions the method gives each rank, not `0..s`.
fn rope(x: &Tensor, positions: &[u32]) -> Result<Tensor> {
    let half = HEAD_DIM / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / HEAD_DIM as f32))
        .collect();
    let ang: Vec<f32> = positions
        .iter()
        .flat_map(|&p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let ang = Tensor::from_vec(ang, (positions.len(), half), &Device::Cpu)?;
    let (cos, sin) = (ang.cos()?, ang.sin()?);
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[r1, r2], 3)?)
}

impl TinyLlama {
    fn new() -> Result<Self> {
        let layers = (0..LAYERS as u64)
            .map(|l| {
                let w = |i: u64, shape| weights(100 * l + i, shape);
                Ok(Layer {
                    wq: w(1, (HEADS * HEAD_DIM, HIDDEN))?,
                    wk: w(2, (KV_HEADS * HEAD_DIM, HIDDEN))?,
                    wv: w(3, (KV_HEADS * HEAD_DIM, HIDDEN))?,
                    wo: w(4, (HIDDEN, HEADS * HEAD_DIM))?,
                    up: w(5, (MLP, HIDDEN))?,
                    gate: w(6, (MLP, HIDDEN))?,
                    down: w(7, (HIDDEN, MLP))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            emb: (weights(7777, (VOCAB, HIDDEN))? * 8.0)?,
            layers,
        })
    }

    /// Runs `tokens` at `positions`; every layer's attention goes through `backend`, which owns
    /// `caches[layer]`. Returns the last position's logits.
    fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        phase: Phase,
        backend: &dyn AttentionBackend,
        caches: &mut [LayerKv],
    ) -> Result<Vec<f32>> {
        let s = tokens.len();
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut h = self.emb.index_select(&ids, 0)?.unsqueeze(0)?; // (1, s, hidden)
        for (layer, (w, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            let x = rms_norm(&h)?;
            // Pre-RoPE projections (1, s, heads·d): what retaining heads score.
            let q_raw = x.broadcast_matmul(&w.wq.t()?)?;
            let k_raw = x.broadcast_matmul(&w.wk.t()?)?;
            let v_raw = x.broadcast_matmul(&w.wv.t()?)?;
            let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
                Ok(t.reshape((1, s, n, HEAD_DIM))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let q = rope(&heads(&q_raw, HEADS)?, positions)?;
            let k = rope(&heads(&k_raw, KV_HEADS)?, positions)?;
            let v = heads(&v_raw, KV_HEADS)?;
            let input = AttnInput {
                layer,
                q: &q,
                k: &k,
                v: &v,
                q_raw: &q_raw,
                k_raw: &k_raw,
                v_raw: &v_raw,
            };
            let o = backend.forward(phase, &input, cache)?; // (1, heads, s, d)
            let o = o.transpose(1, 2)?.reshape((1, s, HEADS * HEAD_DIM))?;
            h = (h + o.broadcast_matmul(&w.wo.t()?)?)?;
            let x = rms_norm(&h)?;
            let gate = candle_core::Tensor::silu(&x.broadcast_matmul(&w.gate.t()?)?)?;
            let mlp = (gate * x.broadcast_matmul(&w.up.t()?)?)?;
            h = (h + mlp.broadcast_matmul(&w.down.t()?)?)?;
        }
        let last = rms_norm(&h.narrow(1, s - 1, 1)?)?.squeeze(0)?;
        Ok(last.matmul(&self.emb.t()?)?.squeeze(0)?.to_vec1()?)
    }
}

/// The first generated token's logits under `method` on `world` ranks, and the ranks the plan
/// used: the per-rank prefill driver and the LSE-merged question segment, on threads.
fn first_logits(
    model: &TinyLlama,
    parts: &PromptParts,
    method: Method,
    world: usize,
) -> Result<(Vec<f32>, usize)> {
    let caches = || vec![LayerKv::new(); LAYERS];
    if method.is_dense() {
        let all = parts.all();
        let pos: Vec<u32> = (0..all.len() as u32).collect();
        return Ok((
            model.forward(&all, &pos, Phase::Prefill, &DenseBackend, &mut caches())?,
            1,
        ));
    }
    let args = PlanArgs {
        world,
        n_heads: HEADS,
        n_kv_heads: KV_HEADS,
        ..Default::default()
    };
    let plan = method.imp().plan(parts, &args)?;
    let comms = LocalGroup::ranks(plan.world);
    let outs: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(h, comm)| {
                let (plan, comm) = (&plan, comm.clone() as Arc<dyn Communicator>);
                s.spawn(move || -> Result<Vec<f32>> {
                    let r = method
                        .imp()
                        .rank_inputs(parts, plan, h, &Scorer::QueryAware);
                    let backend = method.backend(comm, r.layout.clone(), Scorer::QueryAware)?;
                    let mut kv = caches();
                    model.forward(
                        &r.tokens,
                        &r.positions,
                        Phase::Prefill,
                        backend.as_ref(),
                        &mut kv,
                    )?;
                    // The query segment at its true positions, against every rank's cache.
                    let q = &parts.query_segment[parts.query_segment.len() - r.query_left..];
                    let pos: Vec<u32> = (plan.n as u32..(plan.n + q.len()) as u32).collect();
                    model.forward(q, &pos, Phase::Decode, backend.as_ref(), &mut kv)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    // Every rank merged the same output; take the last one's.
    Ok((
        outs.into_iter().last().expect("one rank at least")?,
        plan.world,
    ))
}

fn main() -> Result<()> {
    let model = TinyLlama::new()?;
    // 2001 context tokens (odd: padding), a 6-token query segment with a 4-token question.
    let n = 2001;
    let ids: Vec<u32> = (0..n as u32 + 6)
        .map(|i| (i * 37 + i / 7 + 11) % VOCAB as u32)
        .collect();
    let parts = PromptParts {
        context: ids[..n].to_vec(),
        query_segment: ids[n..].to_vec(),
        question: ids[n..n + 4].to_vec(),
        prefix_len: 0,
    };
    let (dense, _) = first_logits(&model, &parts, Method::DENSE, 1)?;
    let scale = dense.iter().fold(0f32, |a, x| a.max(x.abs()));
    let mut failed = false;
    for (method, world) in [
        (Method::RING, 3),
        (Method::ZIGZAG, 4),
        (Method::ULYSSES, 2),
        (Method::STAR, 3),
        (Method::APB, 3),
    ] {
        let (got, ranks) = first_logits(&model, &parts, method, world)?;
        if ranks != world {
            bail!("{method} planned {ranks} ranks, not {world}");
        }
        let diff = got
            .iter()
            .zip(&dense)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()))
            / scale;
        let exact = method.imp().exact();
        println!(
            "{method:>8} on {world} ranks: first-token logits {diff:.1e} relative to dense ({})",
            if exact { "exact" } else { "approximate" }
        );
        failed |= exact && diff > 1e-5;
    }
    if failed {
        bail!("an exact method differs from dense");
    }
    Ok(())
}
