//! `apb bench`: prefill and attention-kernel timings, side by side in one run.
//!
//! `prefill`: for each length and attention method, one timed prefill (after a warm-up) of a
//! model of real shapes with random weights; dense runs on rank 0's GPU alone, ring/star/apb on all
//! ranks (one process per GPU). Reports the slowest rank's wall time, tokens/s, achieved TFLOP/s
//! and MFU against a bf16 GEMM peak measured in the same run, and (second, synchronised run) a
//! per-part breakdown of the slowest rank.

use crate::error::{bail, err, Result};
use crate::prompt::PromptParts;
use crate::runner::{prefill, prepare_within, rank_share, GenParams, Job};
use crate::JobSettings;
use apb_loaders::{Config, Model};
use apb_plugin::Method;
use apb_plugin::{profile, Communicator, LocalGroup, Scorer};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

/// Breakdown buckets, in report order (see the spans in the model file and the backends).
pub const BUCKETS: [profile::Bucket; 7] = profile::Bucket::PREFILL;

/// Query tokens of the synthetic prompt (APB embeds them in the anchor).
const QUESTION: usize = 64;

/// Measured dense bf16 GEMM throughput (TFLOP/s) at 8192³, the MFU denominator.
pub fn gemm_peak(device: &Device) -> Result<f64> {
    let n = 8192;
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(DType::BF16)?;
    for _ in 0..3 {
        a.matmul(&b)?;
    }
    device.synchronize()?;
    let iters = 20;
    let t = Instant::now();
    for _ in 0..iters {
        a.matmul(&b)?;
    }
    device.synchronize()?;
    Ok(2.0 * (n as f64).powi(3) * iters as f64 / t.elapsed().as_secs_f64() / 1e12)
}

/// FLOPs of one prefill on one rank: matmuls of the layers (no LM head) plus attention over the
/// (query, key) pairs its mask allows (QKᵀ and PV, 2 FLOPs per multiply-add each).
pub fn prefill_flops(cfg: &Config, rows: usize, pairs: f64) -> f64 {
    let (h, i, d) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.head_dim as f64,
    );
    let (n_h, n_kv) = (
        cfg.num_attention_heads as f64,
        cfg.num_key_value_heads as f64,
    );
    let linear = h * (n_h + 2.0 * n_kv) * d + n_h * d * h + 3.0 * h * i;
    cfg.num_hidden_layers as f64 * (2.0 * rows as f64 * linear + 4.0 * d * n_h * pairs)
}

/// Causal pairs of `n` rows over themselves.
fn tri(n: usize) -> f64 {
    n as f64 * (n as f64 + 1.0) / 2.0
}

/// What `apb bench prefill` sweeps.
pub struct Sweep {
    /// A preset name or a config.json path.
    pub config: String,
    /// Weights dtype (`bf16`, `f16`, `f32`).
    pub dtype: String,
    /// Prompt lengths in tokens.
    pub lengths: Vec<usize>,
    /// Methods by name (dense runs on one rank).
    pub methods: Vec<String>,
    /// Also time each part (device synchronised per part).
    pub breakdown: bool,
    /// Where rank 0 writes the results (stdout otherwise).
    pub json: Option<std::path::PathBuf>,
    /// The ranks (one process per GPU).
    pub spec: crate::ranks::GroupSpec,
    /// Run only this rank's share of each distributed method, on one GPU (see `OneRankOfMany`).
    pub only_rank: Option<usize>,
}

/// Every length × method, dense on rank 0's GPU and the others on all ranks, side by side: each
/// rank runs this same program (SPMD) and rank 0 reports.
pub fn prefill_sweep(sw: &Sweep) -> Result<()> {
    let dtype = apb_loaders::parse_dtype(&sw.dtype)?;
    let cfg = apb_loaders::random::config_by_name(&sw.config)?;
    let world = sw.spec.world;
    let member = match sw.only_rank {
        Some(h) if h >= world => bail!("--only-rank {h} needs --world-size above {h}"),
        Some(_) => crate::ranks::join(&crate::ranks::GroupSpec {
            world: 1,
            device: sw.spec.device.clone(),
            launch: sw.spec.launch.clone(),
        })?,
        None => crate::ranks::join(&sw.spec)?,
    };
    let root = member.rank() == 0;
    let model = apb_loaders::random::random_model(&cfg, dtype, &member.device)?;
    let peak = if member.device.is_cuda() {
        Some(gemm_peak(&member.device)?)
    } else {
        None
    };
    let bench = PrefillBench {
        model: &model,
        comm: member.comm.clone(),
        breakdown: sw.breakdown,
        only_rank: sw.only_rank,
    };
    // Warm-up: loads kernels and fills allocator pools, per method.
    let warm = 8192.min(sw.lengths.iter().copied().min().unwrap_or(8192));
    for m in &sw.methods {
        bench.run(warm, m, world)?;
    }
    let mut results = Vec::new();
    for &len in &sw.lengths {
        let mut dense_s = None;
        for m in &sw.methods {
            let mut v = bench.run(len, m, world)?;
            let wall = v["wall_s"].as_f64().unwrap_or(f64::NAN);
            if m == "dense" {
                dense_s = Some(wall);
            }
            if let Some(d) = dense_s {
                v["speedup_vs_dense"] = (d / wall).into();
            }
            if let Some(p) = peak {
                v["mfu"] = (v["slowest_rank_tflops"].as_f64().unwrap_or(0.0) / p).into();
            }
            if root {
                eprintln!(
                    "{len:>7} {m:>5}: {:.3} s  ({:.0} tok/s, {:.0} TFLOP/s slowest rank)",
                    wall,
                    v["tokens_per_s"].as_f64().unwrap_or(0.0),
                    v["slowest_rank_tflops"].as_f64().unwrap_or(0.0)
                );
            }
            results.push(v);
        }
    }
    if root {
        let out = json!({
            "config": sw.config,
            "dtype": sw.dtype,
            "world_size": world,
            "only_rank": sw.only_rank,
            "gemm_peak_tflops": peak,
            "breakdown_buckets": BUCKETS.map(|b| b.name()),
            "results": results,
        });
        let text = serde_json::to_string_pretty(&out)?;
        match &sw.json {
            Some(p) => {
                std::fs::write(p, text).map_err(|e| err!("cannot write {}: {e}", p.display()))?
            }
            None => println!("{text}"),
        }
    }
    drop(bench);
    member.finish()
}

/// One rank of `apb bench prefill`: the model and what it measures with.
pub struct PrefillBench<'a> {
    /// Random weights of the config's shapes.
    pub model: &'a Model,
    /// The benchmark group (every rank runs the same sweep).
    pub comm: Arc<dyn Communicator>,
    /// Also time each part.
    pub breakdown: bool,
    /// Distributed methods run only this rank's share, alone (`comm` has one rank).
    pub only_rank: Option<usize>,
}

/// Stands in for the other ranks when one GPU runs rank `rank`'s share of a `world`-rank prefill
/// (`apb bench prefill --only-rank`): every all-gather returns this rank's tensor once per rank, so
/// the passing blocks have their planned size (their values do not change the work). The time
/// excludes communication by construction, and says so in the results.
struct OneRankOfMany {
    rank: usize,
    world: usize,
}

impl Communicator for OneRankOfMany {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_gather(&self, t: &Tensor) -> apb_plugin::Result<Vec<Tensor>> {
        Ok(vec![t.clone(); self.world])
    }
    fn broadcast(&self, t: Option<&Tensor>, _root: usize) -> apb_plugin::Result<Tensor> {
        t.cloned().ok_or_else(|| {
            apb_plugin::Error::Shape("one-rank bench: broadcast needs a tensor".into())
        })
    }
    fn barrier(&self) -> apb_plugin::Result<()> {
        Ok(())
    }
    fn abort(&self, _why: &str) {}
}

impl PrefillBench<'_> {
    fn parts(&self, len: usize) -> PromptParts {
        // Deterministic pseudo-random ids (same on every rank), avoiding special ids at the top.
        let v = self.model.cfg.vocab_size as u64;
        let vocab = if v > 2048 { v - 1024 } else { v };
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        };
        let context: Vec<u32> = (0..len).map(|_| next()).collect();
        let question: Vec<u32> = (0..QUESTION).map(|_| next()).collect();
        PromptParts {
            context,
            query_segment: question.clone(),
            question,
            prefix_len: 0,
        }
    }

    /// One measurement: (slowest rank's seconds, per-rank seconds, slowest rank's breakdown,
    /// total FLOPs of the slowest rank, plan summary).
    pub fn run(&self, len: usize, method: &str, world: usize) -> Result<Value> {
        let method_ = Method::parse(method)?;
        let alone = self.only_rank.filter(|_| method_.spans_ranks());
        let rank = alone.unwrap_or(self.comm.rank());
        let dev = self.model.device().clone();
        let mut parts = self.parts(len);
        if !method_.spans_ranks() {
            // One rank prefills the whole prompt, question included: exactly `len` tokens.
            let last = parts.context.pop().expect("len > 0");
            parts.query_segment = vec![last];
            parts.question.clear();
        }
        let job = Job {
            settings: JobSettings::new(method_, method_.ranks_for(world)),
            prompt: parts,
            params: GenParams::default(),
        };
        let cfg = &self.model.cfg;
        let heads = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let prep = prepare_within(usize::MAX, heads, &job).map_err(|e| err!("{e}"))?;
        if prep.plan.world != job.settings.world {
            bail!(
                "{method} at {len} tokens: the planner chose {} ranks ({})",
                prep.plan.world,
                prep.plan.notes.join("; ")
            );
        }
        let scorer = Scorer::QueryAware;
        let p = &prep.plan;
        // Attended (query, key) pairs of every rank (the method's own count).
        let mut shares: Vec<_> = (0..p.world)
            .map(|h| rank_share(&job, &prep, h, &scorer))
            .collect();
        let rank_pairs: Vec<f64> = shares
            .iter()
            .enumerate()
            .map(|(h, r)| method_.imp().pairs(p, &r.layout, h))
            .collect();
        // (A rank outside a plan of fewer ranks has no share.)
        let tokens = shares
            .get_mut(rank)
            .map(|s| std::mem::take(&mut s.tokens))
            .unwrap_or_default();
        let pairs = rank_pairs.get(rank).copied().unwrap_or(0.0);
        let plan = json!({"world": p.world, "block_len": p.l_b, "anchor_len": p.l_a, "passing_len": p.l_p});
        // A plan of fewer ranks (dense: rank 0 alone) leaves the others waiting at the barriers.
        let active = rank < p.world;
        let flops = if active {
            prefill_flops(&self.model.cfg, tokens.len(), pairs)
        } else {
            0.0
        };
        let solo: Arc<dyn Communicator> = LocalGroup::ranks(1).remove(0);
        let once = |profiled: bool| -> Result<(f64, Vec<f64>)> {
            profile::enable(profiled);
            self.comm.barrier()?;
            dev.synchronize()?;
            let t = Instant::now();
            if active {
                // The rank program's own prefill stage.
                let comm: Arc<dyn Communicator> = if p.world == 1 {
                    solo.clone()
                } else if let Some(h) = alone {
                    Arc::new(OneRankOfMany { rank: h, world })
                } else {
                    self.comm.clone()
                };
                prefill(self.model, &scorer, &job, &prep, comm, &mut |_| Ok(()))?;
            }
            dev.synchronize()?;
            let secs = t.elapsed().as_secs_f64();
            let b = profile::take();
            profile::enable(false);
            Ok((
                secs,
                BUCKETS
                    .iter()
                    .map(|k| b.get(k).copied().unwrap_or(0.0))
                    .collect(),
            ))
        };
        let (secs, _) = once(false)?;
        let breakdown = if self.breakdown {
            Some(once(true)?.1)
        } else {
            None
        };
        // Every rank's numbers to rank 0: [secs, flops, buckets...].
        let mut mine = vec![secs, flops];
        mine.extend(
            breakdown
                .clone()
                .unwrap_or_else(|| vec![0.0; BUCKETS.len()]),
        );
        let mine = Tensor::new(mine.iter().map(|x| *x as f32).collect::<Vec<_>>(), &dev)?;
        let all: Vec<Vec<f32>> = self
            .comm
            .all_gather(&mine)?
            .iter()
            .map(|t| t.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let ranks: Vec<usize> = (0..all.len().min(p.world)).collect();
        let slowest = *ranks
            .iter()
            .max_by(|a, b| all[**a][0].total_cmp(&all[**b][0]))
            .expect("at least one rank");
        let wall = all[slowest][0] as f64;
        let f = all[slowest][1] as f64;
        let mut v = json!({
            "length": len,
            "attention": method,
            "gpus": ranks.len(),
            "wall_s": wall,
            "tokens_per_s": len as f64 / wall,
            "per_rank_s": ranks.iter().map(|r| all[*r][0]).collect::<Vec<_>>(),
            "per_rank_pairs": rank_pairs,
            "pairs_max_over_min": rank_pairs.iter().cloned().fold(0.0, f64::max)
                / rank_pairs.iter().cloned().fold(f64::MAX, f64::min),
            "slowest_rank": alone.unwrap_or(slowest),
            "one_gpu_share": alone.is_some(),
            "slowest_rank_tflop": f / 1e12,
            "slowest_rank_tflops": f / wall / 1e12,
            "plan": plan,
        });
        if method_.selects() {
            // Timing only: the selector's cost is in the number, its accuracy is not.
            v["scorer"] = scorer.name().into();
        }
        if self.breakdown {
            v["breakdown_s"] = BUCKETS
                .iter()
                .enumerate()
                .map(|(i, k)| (k.name().to_string(), json!(all[slowest][2 + i])))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        Ok(v)
    }
}

/// One `apb bench attention` measurement.
pub struct KernelTiming {
    /// Which kernel ran: `flashinfer` / `cudnn` (Hopper) or `mma` (ours).
    pub kernel: &'static str,
    /// Seconds per call.
    pub seconds: f64,
    /// Counting the causal half of the scores.
    pub tflops: f64,
}

/// Times the fused attention alone: `(b=1, heads, seq, d)` causal bf16, `kv_heads` KV heads.
pub fn attention_kernel(
    device: &Device,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Result<KernelTiming> {
    let q = Tensor::randn(0f32, 1.0, (1, heads, seq, d), device)?.to_dtype(DType::BF16)?;
    let k = Tensor::randn(0f32, 1.0, (1, kv_heads, seq, d), device)?.to_dtype(DType::BF16)?;
    let v = Tensor::randn(0f32, 1.0, (1, kv_heads, seq, d), device)?.to_dtype(DType::BF16)?;
    let run = || apb_plugin::attention(&q, &k, &v, apb_plugin::Mask::causal());
    for _ in 0..3 {
        run()?;
    }
    device.synchronize()?;
    // About a second of work per measurement.
    let flops = 4.0 * d as f64 * heads as f64 * tri(seq);
    let iters = (2e14 / flops).clamp(3.0, 50.0) as usize;
    let t = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    device.synchronize()?;
    let s = t.elapsed().as_secs_f64() / iters as f64;
    Ok(KernelTiming {
        kernel: kernel_name(device, seq, d),
        seconds: s,
        tflops: flops / s / 1e12,
    })
}

/// One `apb bench attention --decode-rows` measurement.
pub struct RowsTiming {
    /// Seconds a call (all rows, one layer).
    pub seconds: f64,
    /// K and V bytes a call reads.
    pub kv_bytes: usize,
}

/// Times a decode step's attention alone: `rows` queries `(heads, d)` bf16, each against its own
/// cache of `keys` positions (`kv_heads` heads), as [`apb_kernels::attention_rows`] takes them in
/// a step. Enough layers of caches rotate that no call finds its K/V in the L2 cache.
pub fn decode_rows_kernel(
    device: &Device,
    rows: usize,
    keys: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Result<RowsTiming> {
    let kv_bytes = 2 * rows * kv_heads * keys * d * 2;
    // At least 1 GB of caches in all (an H100's L2 is 50 MB), at most 64 layers.
    let layers = (1usize << 30).div_ceil(kv_bytes).clamp(2, 64);
    let half = |shape: (usize, usize, usize, usize)| {
        Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(DType::BF16)
    };
    let cache = || -> Result<Option<(Tensor, Tensor)>> {
        let shape = (1, kv_heads, keys, d);
        Ok(Some((half(shape)?, half(shape)?)))
    };
    let kv: Vec<Vec<Option<(Tensor, Tensor)>>> = (0..layers)
        .map(|_| (0..rows).map(|_| cache()).collect())
        .collect::<Result<_>>()?;
    let q = half((1, heads, rows, d))?;
    for layer in &kv {
        apb_kernels::attention_rows(&q, layer)?;
    }
    device.synchronize()?;
    let iters = layers * (200 / layers).max(2);
    let t = Instant::now();
    for i in 0..iters {
        apb_kernels::attention_rows(&q, &kv[i % layers])?;
    }
    device.synchronize()?;
    Ok(RowsTiming {
        seconds: t.elapsed().as_secs_f64() / iters as f64,
        kv_bytes,
    })
}

/// The kernel the dispatcher picks for a prefill block of `rows` × `head_dim` on `device`.
pub fn kernel_name(device: &Device, rows: usize, head_dim: usize) -> &'static str {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use apb_kernels::attention::hopper;
        return match hopper::kernel_for(device, head_dim).ok().flatten() {
            Some(k) if rows >= hopper::MIN_ROWS => k.name(),
            _ => "mma",
        };
    }
    let _ = (device, rows, head_dim);
    "cpu"
}

/// One projection of a decode step timed every way (see [`linear_rows`]).
#[derive(Debug, serde::Serialize)]
pub struct LinearTiming {
    /// Which projection: `qkv`, `o_proj`, `gate_up` (with the SiLU product), `down`, `lm_head`.
    pub name: &'static str,
    /// Rows (sequences of the step).
    pub rows: usize,
    /// Weight `(n, k)`.
    pub n: usize,
    /// Input width.
    pub k: usize,
    /// Weight bytes (bf16 on CUDA, f32 on the CPU).
    pub bytes: usize,
    /// Our few-rows path as the model calls it (`apb_kernels::linear_rows*`), seconds a call.
    pub ours_s: f64,
    /// candle's GEMM (cuBLAS on CUDA; for `gate_up` plus the SiLU product), seconds a call.
    pub gemm_s: f64,
    /// On CUDA, each shape of our kernel (`t{tiles}_u{chunks}`), seconds a call.
    pub shapes_s: std::collections::BTreeMap<String, f64>,
}

/// Seconds a call of `f` (after 3 warm-up calls; 50 timed).
fn time_call(device: &Device, f: &dyn Fn() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    device.synchronize()?;
    let iters = 50;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

/// A decode step's projections of `cfg` for each count of `rows`: our few-rows kernels against
/// candle's GEMM on the same random bf16 inputs, in one run.
pub fn linear_rows(cfg: &Config, device: &Device, rows: &[usize]) -> Result<Vec<LinearTiming>> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim;
    let shapes: [(&'static str, usize, usize); 5] = [
        ("qkv", qkv, h),
        ("o_proj", h, cfg.num_attention_heads * cfg.head_dim),
        ("gate_up", 2 * i, h),
        ("down", h, i),
        ("lm_head", cfg.vocab_size, h),
    ];
    let dtype = if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let mut out = Vec::new();
    for (name, n, k) in shapes {
        // Copies of the weight, used in turn, of at least 256 MB in all: a weight read again
        // would come from L2 (50 MB on an H100), which a model's step never does.
        let copies = (256usize << 20).div_ceil(n * k * 2).max(1);
        let ws = (0..copies)
            .map(|_| (Tensor::randn(0f32, 1.0, (n, k), device)? * 0.02)?.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let turn = std::cell::Cell::new(0usize);
        let next = || {
            turn.set((turn.get() + 1) % copies);
            &ws[turn.get()]
        };
        for &m in rows {
            let x = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(dtype)?;
            let silu = name == "gate_up";
            let ours = || -> Result<Tensor> {
                let w = next();
                Ok(if silu {
                    apb_kernels::linear_rows_silu_mul(&x, w)?
                } else {
                    apb_kernels::linear_rows(&x, w)?
                })
            };
            let gemm = || -> Result<Tensor> {
                let y = x.matmul(&next().t()?)?;
                Ok(if silu { apb_kernels::silu_mul(&y)? } else { y })
            };
            #[allow(unused_mut)]
            let mut shapes_s = std::collections::BTreeMap::new();
            #[cfg(feature = "cuda")]
            if device.is_cuda() {
                for tiles in [1, 2] {
                    for chunks in [1, 2, 4] {
                        if silu && tiles != 2 {
                            continue;
                        }
                        let f = || -> Result<Tensor> {
                            Ok(apb_kernels::linear::linear_rows_shape(
                                &x,
                                next(),
                                silu,
                                tiles,
                                chunks,
                            )?)
                        };
                        shapes_s.insert(format!("t{tiles}_u{chunks}"), time_call(device, &f)?);
                    }
                }
            }
            out.push(LinearTiming {
                name,
                rows: m,
                n,
                k,
                bytes: n * k * dtype.size_in_bytes(),
                ours_s: time_call(device, &ours)?,
                gemm_s: time_call(device, &gemm)?,
                shapes_s,
            });
        }
    }
    Ok(out)
}
