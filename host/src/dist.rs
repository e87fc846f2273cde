//! Generation over `H` ranks: each rank is a thread sharing the model weights, with its own
//! cache and its own backend instance, connected by a [`LocalGroup`]. Same program on every
//! rank (SPMD): prefill its share, run the query segment, then decode; the last rank picks each
//! token and broadcasts it.

use crate::engine::{GenParams, GenStats, Generation, TextStream};
use crate::prompt::PromptParts;
use crate::sampling::Sampler;
use anyhow::{anyhow, bail, Result};
use apb_loaders::{Cache, Model, Tok};
use apb_plugin::{
    plan, Communicator, Kind, LocalGroup, Phase, Plan, PlanRequest, RankBackend, RankLayout, Scorer,
};
use candle_core::Tensor;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct DistConfig {
    pub kind: Kind,
    pub world: usize,
    pub anchor_len: Option<usize>,
    pub passing_len: Option<usize>,
    pub scorer: Scorer,
}

#[derive(Debug, Clone)]
pub struct DistGeneration {
    pub generation: Generation,
    pub plan: Plan,
    /// Rows each rank ran in prefill (anchor + local + probe).
    pub rank_prefill_tokens: Vec<usize>,
    pub scorer: Option<String>,
}

/// Plans the layout of `parts` for `cfg`.
pub fn make_plan(parts: &PromptParts, cfg: &DistConfig) -> Result<Plan> {
    let req = PlanRequest {
        n: parts.context.len(),
        world: cfg.world,
        anchor_len: cfg.anchor_len,
        passing_len: cfg.passing_len,
        anchor_min: if cfg.kind == Kind::Apb {
            parts.prefix_len + parts.question.len()
        } else {
            0
        },
        uses_anchor: cfg.kind != Kind::Ring,
        uses_passing: cfg.kind == Kind::Apb,
        anchor_is_first_block: cfg.kind == Kind::Star,
    };
    Ok(plan(&req)?)
}

/// Rank `h`'s prefill tokens, positions and layout.
pub fn rank_inputs(
    parts: &PromptParts,
    p: &Plan,
    kind: Kind,
    h: usize,
    scorer: &Scorer,
) -> (Vec<u32>, Vec<u32>, RankLayout) {
    let ctx = &parts.context;
    let (start, end) = p.block(h);
    let real_end = end.min(p.n);
    let pad = end - real_end;
    let mut tokens = Vec::new();
    let mut positions = Vec::new();
    let mut layout = RankLayout {
        local: end - start,
        pad,
        l_p: p.l_p,
        ..Default::default()
    };
    if h > 0 && p.l_a > 0 && kind != Kind::Ring {
        if kind == Kind::Apb && !parts.question.is_empty() {
            // anchor = prefix ++ question ++ context[p .. l_a − |q|]
            let (pre, q) = (parts.prefix_len, parts.question.len());
            tokens.extend(&ctx[..pre]);
            tokens.extend(&parts.question);
            tokens.extend(&ctx[pre..p.l_a - q]);
            layout.question_rows = pre..pre + q;
        } else {
            tokens.extend(&ctx[..p.l_a]);
        }
        positions.extend(0..p.l_a as u32);
        layout.anchor = p.l_a;
    }
    tokens.extend(&ctx[start..real_end]);
    tokens.extend(std::iter::repeat_n(0u32, pad));
    positions.extend(start as u32..real_end as u32);
    positions.extend(std::iter::repeat_n(0u32, pad));
    layout.exclude_front = if h == 0 {
        p.l_a.min(end - start)
    } else {
        layout.anchor
    };
    if h == 0
        && kind == Kind::Apb
        && p.world > 1
        && matches!(scorer, Scorer::QueryAware)
        && !parts.question.is_empty()
    {
        // Rank 0 has no anchor: a question probe after its block gives the training-free scorer
        // the question's queries; its rows are never selected and its KV is dropped.
        layout.question_rows = tokens.len()..tokens.len() + parts.question.len();
        tokens.extend(&parts.question);
        positions.extend(end as u32..(end + parts.question.len()) as u32);
        layout.probe = parts.question.len();
    }
    (tokens, positions, layout)
}

pub fn generate(
    model: &Model,
    tok: &Tok,
    parts: &PromptParts,
    cfg: &DistConfig,
    params: &GenParams,
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<DistGeneration> {
    let (p, max_new, inputs) = prepare(model, parts, cfg, params)?;
    let comms = LocalGroup::new(p.world);
    let t0 = Instant::now();
    let on_text = std::sync::Mutex::new(on_text);
    let results: Vec<Result<Generation>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .zip(&inputs)
            .map(|(comm, (tokens, positions, layout))| {
                let comm = comm.clone();
                let on_text = &on_text;
                let p = &p;
                s.spawn(move || {
                    let comm_dyn: Arc<dyn Communicator> = comm.clone();
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_rank(
                            model,
                            tok,
                            parts,
                            p,
                            cfg,
                            params,
                            max_new,
                            comm_dyn.clone(),
                            tokens,
                            positions,
                            layout,
                            t0,
                            p.world - 1,
                            on_text,
                        )
                    }));
                    let res = match run {
                        Ok(r) => r,
                        Err(_) => Err(anyhow!("rank {} panicked", comm.rank())),
                    };
                    if let Err(e) = &res {
                        comm.abort(&format!("rank {} failed: {e:#}", comm.rank()));
                    }
                    res
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("rank thread died")))
            })
            .collect()
    });
    let mut gen = None;
    let mut errors = Vec::new();
    for r in results {
        match r {
            // The last rank's result: it sampled, so it has the first logits.
            Ok(g) => gen = Some(g),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        // The root cause, not the "group aborted" echoes of the other ranks.
        let pos = errors
            .iter()
            .position(|e| !format!("{e:#}").contains("group aborted"))
            .unwrap_or(0);
        return Err(errors.swap_remove(pos));
    }
    let generation = gen.ok_or_else(|| anyhow!("the last rank returned no result"))?;
    Ok(finish(generation, p, &inputs, cfg))
}

type RankInputs = (Vec<u32>, Vec<u32>, RankLayout);

/// What every rank agrees on before running: the plan, the new-token budget, each rank's inputs.
fn prepare(
    model: &Model,
    parts: &PromptParts,
    cfg: &DistConfig,
    params: &GenParams,
) -> Result<(Plan, usize, Vec<RankInputs>)> {
    let ctx_limit = model.cfg.max_position_embeddings;
    let total = parts.context.len() + parts.query.len();
    if total >= ctx_limit {
        bail!("the prompt has {total} tokens but the model's context is {ctx_limit}; shorten the prompt");
    }
    let p = make_plan(parts, cfg)?;
    let max_new = params.max_new_tokens.min(ctx_limit - total);
    let inputs = (0..p.world)
        .map(|h| rank_inputs(parts, &p, cfg.kind, h, &cfg.scorer))
        .collect();
    Ok((p, max_new, inputs))
}

fn finish(
    generation: Generation,
    p: Plan,
    inputs: &[RankInputs],
    cfg: &DistConfig,
) -> DistGeneration {
    DistGeneration {
        generation,
        rank_prefill_tokens: inputs.iter().map(|(t, _, _)| t.len()).collect(),
        scorer: (cfg.kind == Kind::Apb).then(|| cfg.scorer.name().to_string()),
        plan: p,
    }
}

/// This process's rank of a multi-process group (one GPU each, `comm` over NCCL): the same
/// program as [`generate`]'s threads. Every rank returns the generation; `emit_rank` streams text.
#[allow(clippy::too_many_arguments)]
pub fn generate_on_rank(
    model: &Model,
    tok: &Tok,
    parts: &PromptParts,
    cfg: &DistConfig,
    params: &GenParams,
    comm: Arc<dyn Communicator>,
    emit_rank: usize,
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<DistGeneration> {
    let (p, max_new, inputs) = prepare(model, parts, cfg, params)?;
    if p.world != comm.world_size() {
        bail!(
            "the planner chose {} ranks for this prompt but {} processes run: {}",
            p.world,
            comm.world_size(),
            p.notes.join("; ")
        );
    }
    let (tokens, positions, layout) = &inputs[comm.rank()];
    let on_text = std::sync::Mutex::new(on_text);
    let generation = run_rank(
        model,
        tok,
        parts,
        &p,
        cfg,
        params,
        max_new,
        comm.clone(),
        tokens,
        positions,
        layout,
        Instant::now(),
        emit_rank,
        &on_text,
    )
    .inspect_err(|e| comm.abort(&format!("rank {} failed: {e:#}", comm.rank())))?;
    Ok(finish(generation, p, &inputs, cfg))
}

#[allow(clippy::too_many_arguments)]
fn run_rank(
    model: &Model,
    tok: &Tok,
    parts: &PromptParts,
    p: &Plan,
    cfg: &DistConfig,
    params: &GenParams,
    max_new: usize,
    comm: Arc<dyn Communicator>,
    tokens: &[u32],
    positions: &[u32],
    layout: &RankLayout,
    t0: Instant,
    emit_rank: usize,
    on_text: &std::sync::Mutex<&mut (dyn FnMut(&str) + Send)>,
) -> Result<Generation> {
    let rank = comm.rank();
    let last = rank + 1 == p.world;
    let emits = rank == emit_rank;
    let backend = RankBackend::new(cfg.kind, comm.clone(), layout.clone(), cfg.scorer.clone())?;
    let mut cache = Cache::new(&model.cfg);
    // The emitting rank shows prefill progress (all ranks move layer by layer together).
    let bar = emits
        .then(|| crate::engine::prefill_bar(p.n, model.cfg.num_hidden_layers))
        .flatten();
    model.forward(
        tokens,
        positions,
        Phase::Prefill,
        &backend,
        &mut cache,
        &mut |_| {
            if let Some(b) = &bar {
                b.inc(1)
            }
        },
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    // Query segment at its true positions, then one token at a time.
    let mut sampler = Sampler::new(params.temperature, params.top_p, params.seed);
    let n = p.n;
    let q_pos: Vec<u32> = (n as u32..(n + parts.query.len()) as u32).collect();
    let mut hidden = model.forward(
        &parts.query,
        &q_pos,
        Phase::Decode,
        &backend,
        &mut cache,
        &mut |_| {},
    )?;
    let mut pos = (n + parts.query.len()) as u32;
    let mut out = Vec::new();
    let mut stream = TextStream::default();
    let mut emit = |piece: &str| {
        if let Ok(mut f) = on_text.lock() {
            f(piece);
        }
    };
    let mut prefill_ms = 0.0;
    let mut t1 = Instant::now();
    let mut steps = 0usize;
    let mut first_logits = Vec::new();
    loop {
        // The last rank chooses; everyone gets the same token.
        let mine = if last {
            let logits = model.last_logits(&hidden)?.to_vec1::<f32>()?;
            let t = sampler.sample(&logits);
            if first_logits.is_empty() {
                first_logits = logits;
            }
            Some(Tensor::new(&[t], model.device())?)
        } else {
            None
        };
        let next = comm
            .broadcast(mine.as_ref(), p.world - 1)?
            .to_vec1::<u32>()?[0];
        if out.is_empty() {
            prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
            t1 = Instant::now();
        }
        if out.len() >= max_new || (!params.ignore_eos && tok.stop_ids.contains(&next)) {
            break;
        }
        out.push(next);
        if emits {
            stream.push(tok, &out, &mut emit)?;
        }
        if out.len() >= max_new {
            break;
        }
        hidden = model.forward(
            &[next],
            &[pos],
            Phase::Decode,
            &backend,
            &mut cache,
            &mut |_| {},
        )?;
        pos += 1;
        steps += 1;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let text = if emits {
        stream.finish(tok, &out, &mut emit)?
    } else {
        tok.decode(&out)?
    };
    let total = parts.context.len() + parts.query.len();
    let stats = GenStats::new(total, out.len(), prefill_ms, steps, decode_s);
    Ok(Generation {
        text,
        tokens: out,
        first_logits,
        stats,
    })
}
