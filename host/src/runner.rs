//! The one per-rank program, for every method (dense is its one-rank case): a sequence's
//! prefill (the rank's share, then the question segment) and batched decode steps (one forward
//! over many sequences' next tokens, each attending its own KV on this rank, merged by LSE in
//! one all-gather per layer). Rank 0's engine ([`crate::engine`]) decides the steps and samples;
//! every rank runs them through [`Runner::prefill_seq`] and [`Runner::decode_rows`] (see
//! `ranks.rs` for how ranks are started and fed steps). Also here: job checks and planning
//! ([`prepare`]) and the text stream with stop strings ([`TextStream`]).

use crate::error::{err, Context, Result};
use crate::prompt::PromptParts;
use apb_loaders::{Cache, Loaded, Model, Tokenizer};
use apb_plugin::profile::{span, Bucket};
use apb_plugin::{
    AttentionBackend, AttnInput, Communicator, Method, Phase, Plan, PlanArgs, RankInputs, Scorer,
};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Sampling and stop rules of one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenParams {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f64,
    /// Sampling seed (the same seed reproduces a run).
    pub seed: u64,
    /// Keep generating through EOS (benchmarks that need a fixed token count).
    pub ignore_eos: bool,
    /// Stop before the first occurrence of any of these strings (not included in the text).
    #[serde(default)]
    pub stop: Vec<String>,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 299792458,
            ignore_eos: false,
            stop: Vec::new(),
        }
    }
}

/// Largest accepted sampling temperature (OpenAI's range).
pub const MAX_TEMPERATURE: f64 = 2.0;

impl GenParams {
    /// Checks the values a user can set; the message names the bad one.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.max_new_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if !(self.temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&self.temperature)) {
            return Err(format!(
                "temperature must be in [0, {MAX_TEMPERATURE}], got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// How a job runs over the ranks: the method and its layout settings, as `apb generate`, a
/// server (every request it runs) and an eval arm set them (`--attention`, `--world-size`,
/// `--anchor-len`, `--passing-len`, `--apb-question-mask`, `--min-rank-tokens`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSettings {
    /// The attention method.
    pub method: Method,
    /// Requested ranks (the planner may use fewer for a short prompt).
    pub world: usize,
    /// Anchor length override.
    pub anchor_len: Option<usize>,
    /// Passing length override.
    pub passing_len: Option<usize>,
    /// APB's question segment on non-last ranks (`full`, or the reference's `causal`).
    #[serde(default)]
    pub question_mask: apb_plugin::QuestionMask,
    /// Fewest context tokens per rank (`--min-rank-tokens`; 0: none): see `PlanArgs`.
    #[serde(default)]
    pub min_rank_tokens: usize,
}

impl JobSettings {
    /// `method` on `world` ranks, the planner choosing the rest (no per-rank minimum).
    pub fn new(method: Method, world: usize) -> Self {
        Self {
            method,
            world,
            anchor_len: None,
            passing_len: None,
            question_mask: Default::default(),
            min_rank_tokens: 0,
        }
    }
}

/// One request, as every rank receives it (serialized to the worker ranks).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// The split prompt.
    pub prompt: PromptParts,
    /// How it runs over the ranks.
    #[serde(flatten)]
    pub settings: JobSettings,
    /// Sampling and stop rules.
    pub params: GenParams,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// EOS / end of turn, or a stop string.
    Stop,
    /// `max_new_tokens`, or the model's context, was reached.
    Length,
    /// A rank was told to cancel (the client went away).
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
/// Counts and times of one generation.
pub struct GenStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time to the first token: the whole prompt (question segment included).
    pub prefill_ms: f64,
    /// Decode speed after the first token.
    pub decode_tokens_per_s: f64,
}

/// What one rank's run produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The method that ran: the job's, or its fallback (dense with no context; zigzag for APB or
    /// Star without a question).
    pub method: Method,
    /// The generated text (cut before a stop string).
    pub text: String,
    /// The generated tokens.
    pub tokens: Vec<u32>,
    /// Logits (f32) that chose the first generated token (rank 0 chooses every token; it holds
    /// the merged rows, as every rank does): what backends are compared on.
    pub first_logits: Vec<f32>,
    /// Why generation ended.
    pub finish: Finish,
    /// Counts and times.
    pub stats: GenStats,
    /// The plan the ranks ran (world 1 for dense).
    pub plan: Plan,
    /// Rows each rank ran in prefill (anchor + local + probe).
    pub rank_prefill_tokens: Vec<usize>,
    /// The group rank of the plan's first rank: 0, unless a one-rank request ran on another
    /// rank ([`crate::ranks::Group::set_spread`]).
    pub first_rank: usize,
    /// What selected APB's passing KV (`retaining-heads`, or our training-free selector, which is
    /// not the paper's APB); `None` for the other methods and for APB that fell back to one rank.
    pub scorer: Option<String>,
    /// APB's question mask on non-last ranks, when APB ran on several ranks.
    pub question_mask: Option<apb_plugin::QuestionMask>,
}

/// What ran for one generation, in the names every report uses: the fields of `apb generate
/// --json` and of the server's `apb` object (each adds what only it knows: the text and the model;
/// the requested method and the ranks' mode).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The method that ran ([`Generation::method`]).
    pub method: &'static str,
    /// Ranks its plan used.
    pub ranks: usize,
    /// The group rank it started on ([`Generation::first_rank`]).
    pub first_rank: usize,
    /// Context tokens per rank of the plan.
    pub block_len: usize,
    /// The plan's anchor length (0: none).
    pub anchor_len: usize,
    /// The plan's passing length (0: none).
    pub passing_len: usize,
    /// What picked the passing K/V ([`Generation::scorer`]).
    pub scorer: Option<String>,
    /// APB's question mask on non-last ranks ([`Generation::question_mask`]).
    pub question_mask: Option<apb_plugin::QuestionMask>,
    /// Rows each rank ran in prefill.
    pub rank_prefill_tokens: Vec<usize>,
    /// Why the plan differs from what was asked, if it does.
    pub plan_notes: Vec<String>,
    /// Time to the first token (milliseconds).
    pub prefill_ms: f64,
    /// Decode speed after the first token.
    pub decode_tokens_per_s: f64,
}

impl Generation {
    /// What ran, as reported ([`RunReport`]).
    pub fn report(&self) -> RunReport {
        RunReport {
            method: self.method.name(),
            ranks: self.plan.world,
            first_rank: self.first_rank,
            block_len: self.plan.l_b,
            anchor_len: self.plan.l_a,
            passing_len: self.plan.l_p,
            scorer: self.scorer.clone(),
            question_mask: self.question_mask,
            rank_prefill_tokens: self.rank_prefill_tokens.clone(),
            plan_notes: self.plan.notes.clone(),
            prefill_ms: self.stats.prefill_ms,
            decode_tokens_per_s: self.stats.decode_tokens_per_s,
        }
    }
}

/// A request that cannot run as given (bad input: the caller's fault, not a rank failure).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// What every rank derives from a job before running it, identically.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The method that runs: the job's, or dense when nothing is left to spread.
    pub method: Method,
    /// The layout over ranks.
    pub plan: Plan,
    /// Tokens to generate at most (within the model's context).
    pub max_new: usize,
}

impl Prepared {
    /// The method that ran, as reported: a plan of one rank is dense attention whatever the
    /// method (no anchor, no passing, no ring).
    pub fn ran(&self) -> Method {
        if self.plan.world == 1 {
            Method::DENSE
        } else {
            self.method
        }
    }
}

/// Checks `job` against the model and plans it: the one place for the context-length and
/// question checks. Prompts too short for the requested ranks fall back to fewer (down to one
/// rank, which still runs the job's method: it must reduce to dense, and is tested to), and the
/// plan's notes say so.
pub fn prepare(model: &Model, job: &Job) -> std::result::Result<Prepared, InputError> {
    let c = &model.cfg;
    let total = job.prompt.len();
    let mut prep = prepare_within(
        c.context_len(),
        (c.num_attention_heads, c.num_key_value_heads),
        job,
    )
    .map_err(|e| match &c.rope_scaling {
        // Only a prompt over the context gets a hint on extending it.
        _ if total < c.context_len() => e,
        None => InputError(format!(
            "{}, or, if the model card gives RoPE scaling for longer contexts (Qwen-2.5: YaRN), pass it with --rope-scaling JSON",
            e.0
        )),
        Some(apb_loaders::RopeScaling::Yarn(_)) => InputError(format!(
            "{}, or raise the YaRN factor with --rope-scaling JSON (past the factor the model was tuned for, quality is not assured)",
            e.0
        )),
        Some(_) => e,
    })?;
    // A plan note, not a log line: prepare runs on every rank and at the server's admission too.
    if let Some(note) = rope_note(c, total) {
        prep.plan.notes.push(note);
    }
    Ok(prep)
}

/// A selecting method (APB, Spava) on several ranks (a one-rank plan is dense: no selection, no
/// question mask).
pub fn selects_on_ranks(prep: &Prepared) -> bool {
    prep.method.selects() && prep.plan.world > 1
}

/// The reference's causal question mask is an APB setting: other methods refuse it.
pub fn check_question_mask(
    method: Method,
    mask: apb_plugin::QuestionMask,
) -> std::result::Result<(), InputError> {
    if mask != apb_plugin::QuestionMask::Full && !method.has_reference_question_mask() {
        return Err(InputError(format!(
            "--apb-question-mask causal mirrors thunlp/APB and applies to --attention apb only, not {}",
            method.name()
        )));
    }
    Ok(())
}

/// Qwen-2.5 checkpoints are pre-trained at 32K positions, though some configs say up to 128K;
/// past that an unscaled RoPE extrapolates and answers degrade (their model cards add YaRN).
const QWEN2_TRAINED_POSITIONS: usize = 32_768;

/// A note for a Qwen2 prompt past 32K positions with no RoPE scaling, on configs of Qwen-2.5's
/// size (≤ 128K; long-trained variants such as Qwen2.5-1M say more and need no YaRN).
fn rope_note(c: &apb_loaders::Config, prompt: usize) -> Option<String> {
    (c.rope_scaling.is_none()
        && c.arch == apb_loaders::Arch::Qwen2
        && c.max_position_embeddings <= 131_072
        && prompt > QWEN2_TRAINED_POSITIONS)
        .then(|| format!(
            "the prompt has {prompt} tokens and the config no RoPE scaling; Qwen-2.5 models are pre-trained at {QWEN2_TRAINED_POSITIONS} positions and their model cards add YaRN beyond that: --rope-scaling '{{\"rope_type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":32768}}'"
        ))
}

/// [`prepare`] against a context of `ctx` positions and a model of `heads` (query, KV) heads
/// (`apb bench prefill` times random weights past the config's context: positions are only
/// numbers to it).
pub fn prepare_within(
    ctx: usize,
    heads: (usize, usize),
    job: &Job,
) -> std::result::Result<Prepared, InputError> {
    let parts = &job.prompt;
    let total = parts.len();
    if total >= ctx {
        return Err(InputError(format!(
            "the prompt has {total} tokens but the model's context is {ctx} (at most {} prompt tokens leave room for a generated one); shorten the prompt",
            ctx.saturating_sub(1)
        )));
    }
    if job.settings.world == 0 {
        return Err(InputError("the world size must be at least 1".into()));
    }
    job.params.validate().map_err(InputError)?;
    check_question_mask(job.settings.method, job.settings.question_mask)?;
    let max_new = job.params.max_new_tokens.min(ctx - total);
    // APB and Star embed the question in their anchors; without one they cannot run as asked,
    // but the request still gets an answer: the exact zigzag layout over the same ranks.
    let (method, fallback) = if job.settings.method.imp().needs_question()
        && parts.question.is_empty()
        && job.settings.anchor_len != Some(0)
    {
        let note = format!(
            "no question found (end the prompt with a blank line and the question, or give it separately: --question, a request's \"question\" field); {} needs one, ran the exact zigzag layout instead",
            job.settings.method.name()
        );
        (Method::ZIGZAG, Some(note))
    } else {
        (job.settings.method, None)
    };
    if !method.is_dense() && parts.context.is_empty() {
        let note = "the prompt has no context before the question; ran dense on one rank";
        return Ok(Prepared {
            method: Method::DENSE,
            plan: Plan::one_rank(0, vec![note.into()]),
            max_new,
        });
    }
    let args = PlanArgs {
        world: job.settings.world,
        anchor_len: job.settings.anchor_len.filter(|_| fallback.is_none()),
        passing_len: job.settings.passing_len.filter(|_| fallback.is_none()),
        n_heads: heads.0,
        n_kv_heads: heads.1,
        min_rank_tokens: job.settings.min_rank_tokens,
    };
    let mut plan = method
        .plan(parts, &args)
        .map_err(|e| InputError(format!("{e:#}")))?;
    plan.notes.extend(fallback);
    Ok(Prepared {
        method,
        plan,
        max_new,
    })
}

/// A rank's resident state: the model (weights shared by thread ranks) and the scorer APB uses.
#[derive(Clone)]
pub struct Runner {
    /// The model and tokenizer.
    pub loaded: Arc<Loaded>,
    /// The scorer APB selects passing K/V with.
    pub scorer: Scorer,
}

impl Runner {
    /// A rank program over `loaded` with `scorer`.
    pub fn new(loaded: Loaded, scorer: Scorer) -> Self {
        Self {
            loaded: Arc::new(loaded),
            scorer,
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.loaded.model
    }

    /// [`Generation::scorer`] for a prepared job.
    pub fn scorer_of(&self, prep: &Prepared) -> Option<String> {
        selects_on_ranks(prep).then(|| self.scorer.name().to_string())
    }

    /// The tokenizer.
    pub fn tok(&self) -> &Tokenizer {
        &self.loaded.tok
    }

    /// Prefills sequence `id` as rank `comm.rank()` of its `prep.plan.world` ranks (`comm` spans
    /// exactly those): this rank's share, then the question segment, keeping the cache and
    /// backend in `seqs` for its decode steps. Returns the last prompt token's hidden state
    /// `(1, 1, hidden)`, the same on every rank of the plan, or None when `cancel` stopped it (the
    /// ranks agree every few layers). At the same points `between` may interleave other steps:
    /// when rank 0's says running sequences are due a decode step, every rank of the prefill
    /// runs what rank 0 interleaves ([`Between`]) and then goes on with its layers.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_seq(
        &self,
        seqs: &mut RankSeqs,
        id: SeqId,
        job: &Job,
        prep: &Prepared,
        comm: Arc<dyn Communicator>,
        cancel: &AtomicBool,
        between: &mut dyn Between,
    ) -> Result<Option<Tensor>> {
        let model = self.model();
        let (p, parts) = (&prep.plan, &job.prompt);
        let (rank, world) = (comm.rank(), p.world);
        if comm.world_size() != world {
            return Err(err!(
                "rank {rank}: the plan has {world} ranks but the group {}",
                comm.world_size()
            ));
        }
        let bar = (rank == 0)
            .then(|| prefill_bar(parts.len(), model.cfg.num_hidden_layers))
            .flatten();
        // Between layers the ranks may stop a prefill nobody waits for any more, or let running
        // sequences take a decode step: one rank decides every layer; several agree every
        // CANCEL_EVERY layers (one tiny all-gather).
        let layers = model.cfg.num_hidden_layers;
        let mut stopped_at = None;
        let mut tick = |i: usize| -> apb_plugin::Result<()> {
            if let Some(b) = &bar {
                b.inc(1)
            }
            let check = world == 1 || (i % CANCEL_EVERY == CANCEL_EVERY - 1 && i + 1 < layers);
            if !check || i + 1 == layers {
                return Ok(());
            }
            let (stop, due) = (cancel.load(Ordering::Relaxed), between.due());
            let (stop, due) = agree(&*comm, model, stop, due)
                .map_err(|e| apb_plugin::Error::Comm(format!("{e:#}")))?;
            if stop {
                stopped_at = Some(i + 1);
                return Err(apb_plugin::Error::Cancelled);
            }
            if due {
                between
                    .run(seqs)
                    .map_err(|e| apb_plugin::Error::Comm(format!("{e:#}")))?;
            }
            Ok(())
        };
        let pre = prefill(model, &self.scorer, job, prep, comm.clone(), &mut tick);
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let Prefilled {
            mut cache,
            backend,
            hidden,
            query_left,
            ..
        } = match (pre, stopped_at) {
            (Ok(pre), _) => pre,
            (Err(_), Some(layer)) => {
                if rank == 0 {
                    tracing::info!("cancelled during prefill, after layer {layer} of {layers}");
                }
                return Ok(None);
            }
            (Err(e), None) => return Err(e),
        };
        let after = &parts.query_segment[parts.query_segment.len() - query_left..];
        let mut hidden = hidden;
        if !after.is_empty() {
            // The question segment at its true positions, against every rank's cache.
            let q_pos: Vec<u32> = (p.n as u32..parts.len() as u32).collect();
            hidden = model
                .forward(
                    after,
                    &q_pos,
                    Phase::Decode,
                    backend.as_ref(),
                    &mut cache,
                    &mut |_| Ok(()),
                )
                .context("question segment")?;
        }
        seqs.0.insert(id, SeqKv { cache, backend });
        let s = hidden.dim(1)?;
        Ok(Some(hidden.narrow(1, s - 1, 1)?))
    }

    /// One-rank sequences prefilled side by side, at most one on each rank of `comm` (the
    /// step's ranks): the item whose home is this rank runs alone here (a one-rank plan; its KV
    /// stays here), then one all-gather brings every item's last hidden state `(1, 1, hidden)`
    /// to every rank. Returns them in `items`' order; None for this rank's own item when
    /// `cancel` stopped it (other ranks' items run to their end: they are short).
    pub fn prefill_side_by_side(
        &self,
        seqs: &mut RankSeqs,
        items: &[SideBySide],
        comm: &dyn Communicator,
        cancel: &AtomicBool,
    ) -> Result<Vec<Option<Tensor>>> {
        let rank = comm.rank();
        let model = self.model();
        let mut own = None;
        if let Some(it) = items.iter().find(|it| it.home == rank) {
            let alone: Arc<dyn Communicator> = apb_plugin::LocalGroup::ranks(1).remove(0);
            own =
                Some(self.prefill_seq(seqs, it.id, &it.job, &it.prep, alone, cancel, &mut Alone)?);
        }
        let cancelled = matches!(own, Some(None));
        let mine = match own.flatten() {
            Some(h) => h,
            None => Tensor::zeros((1, 1, model.cfg.hidden_size), model.dtype(), model.device())?,
        };
        let all = comm
            .all_gather(&mine)
            .context("the side-by-side prefills' last states")?;
        Ok(items
            .iter()
            .map(|it| (!(it.home == rank && cancelled)).then(|| all[it.home].clone()))
            .collect())
    }

    /// One decode step of many sequences on this rank: `rows[i]` is a sequence's next token at
    /// its position (or padding). The rows run through the model as one batch; each attends its
    /// own sequence's cache on this rank (nothing where this rank holds none of it), and every
    /// row's partial output and LSE travel in one all-gather per layer over `comm` (the step's
    /// ranks). Returns the hidden states `(1, rows, hidden)`, the same on every rank.
    ///
    /// `lead`: the ranks share compute (threads of one process, processes on one GPU), so rank 0
    /// alone runs the projections and MLP and broadcasts each layer's q/k/v to the others, which
    /// only attend (a second collective per layer instead of every rank computing every row).
    /// The other ranks then return None. Rank 0's rows are bit for bit what they are without it.
    pub fn decode_rows(
        &self,
        seqs: &mut RankSeqs,
        rows: &[Row],
        comm: &dyn Communicator,
        lead: bool,
    ) -> Result<Option<Tensor>> {
        let lead = lead && comm.world_size() > 1;
        if lead && comm.rank() != 0 {
            let c = &self.model().cfg;
            for layer in 0..c.num_hidden_layers {
                let all = comm
                    .broadcast(None, 0)
                    .context("decode: q/k/v from rank 0")?;
                let x = Qkv::unpack(&all, rows.len(), c)?;
                attend_part(seqs, rows, &x.input(layer), comm).context("decode")?;
            }
            return Ok(None);
        }
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let positions: Vec<u32> = rows.iter().map(|r| r.pos).collect();
        let mut attend = |_: usize, x: &AttnInput<'_>| -> apb_plugin::Result<Tensor> {
            if lead {
                comm.broadcast(Some(&Qkv::pack(x)?), 0)?;
            }
            attend_part(seqs, rows, x, comm)
        };
        self.model()
            .forward_with(&tokens, &positions, &mut attend, &mut |_| Ok(()), true)
            .context("decode")
            .map(Some)
    }
}

/// One layer of [`Runner::decode_rows`] on this rank: every row attends its own sequence's
/// keys here, and all rows' parts are merged in one all-gather. Where every backend says what
/// its decode part is and the device fuses rows (the GPU; the CPU in f32), all rows attend in one
/// call ([`attend_rows`]); elsewhere each row runs its decode part.
fn attend_part(
    seqs: &mut RankSeqs,
    rows: &[Row],
    x: &AttnInput<'_>,
    comm: &dyn Communicator,
) -> apb_plugin::Result<Tensor> {
    let layer = x.layer;
    let one_kernel = apb_kernels::rows_fused(x.q)
        && rows.iter().all(|r| {
            r.seq
                .and_then(|id| seqs.0.get(&id))
                .is_none_or(|s| s.backend.fuses_decode_rows())
        });
    if one_kernel {
        return attend_rows(seqs, rows, layer, x, comm);
    }
    let mut outs = Vec::with_capacity(rows.len());
    let mut lses = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let one = Qkv::row(x, i)?;
        let xi = one.input(layer);
        let keep = row.keeps_here(comm.rank());
        let (o, l) = match row.seq.and_then(|id| seqs.0.get_mut(&id)) {
            Some(s) => s
                .backend
                .decode_part(&xi, &mut s.cache.layers[layer], keep)?,
            None => apb_plugin::nothing_attended(xi.q)?,
        };
        outs.push(o.to_dtype(candle_core::DType::F32)?);
        lses.push(l);
    }
    let out = Tensor::cat(&outs, 2)?;
    let lse = Tensor::cat(&lses, 2)?;
    Ok(apb_plugin::gather_merge(comm, &out, &lse)?.to_dtype(x.q.dtype())?)
}

/// One layer's q, k, v and their pre-RoPE projections, owned (what [`AttnInput`] borrows), in
/// the one order rank 0 packs them for the ranks that only attend.
struct Qkv([Tensor; 6]);

impl Qkv {
    /// Rank 0's layer input as one flat tensor, for the others ([`Qkv::unpack`]).
    fn pack(x: &AttnInput<'_>) -> candle_core::Result<Tensor> {
        let flat = [x.q, x.k, x.v, x.q_raw, x.k_raw, x.v_raw]
            .iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)
    }

    /// [`Qkv::pack`]'s tensor back as `rows` rows of a model of `c`'s shapes: q `(1, n_h, rows,
    /// d)`, k and v `(1, n_kv, rows, d)`, the projections `(1, rows, heads·d)`.
    fn unpack(all: &Tensor, rows: usize, c: &apb_loaders::Config) -> candle_core::Result<Self> {
        let (b, d, nq, nkv) = (
            rows,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        let shapes = [
            vec![1, nq, b, d],
            vec![1, nkv, b, d],
            vec![1, nkv, b, d],
            vec![1, b, nq * d],
            vec![1, b, nkv * d],
            vec![1, b, nkv * d],
        ];
        let mut off = 0;
        let parts = shapes.map(|shape| {
            let n: usize = shape.iter().product();
            let t = all.narrow(0, off, n).and_then(|t| t.reshape(shape));
            off += n;
            t
        });
        let [q, k, v, q_raw, k_raw, v_raw] = parts;
        Ok(Self([q?, k?, v?, q_raw?, k_raw?, v_raw?]))
    }

    /// Row `i` of `x` (views).
    fn row(x: &AttnInput<'_>, i: usize) -> candle_core::Result<Self> {
        let (h, t) = (
            |t: &Tensor| t.narrow(2, i, 1),
            |t: &Tensor| t.narrow(1, i, 1),
        );
        Ok(Self([
            h(x.q)?,
            h(x.k)?,
            h(x.v)?,
            t(x.q_raw)?,
            t(x.k_raw)?,
            t(x.v_raw)?,
        ]))
    }

    fn input(&self, layer: usize) -> AttnInput<'_> {
        let [q, k, v, q_raw, k_raw, v_raw] = &self.0;
        AttnInput {
            layer,
            q,
            k,
            v,
            q_raw,
            k_raw,
            v_raw,
        }
    }
}

/// [`Runner::decode_rows`]' attention where rows fuse (the GPU; the CPU in f32): the new K/V of
/// the rows this rank keeps ([`Row::kv_rank`]) written in one call, every row
/// attending its sequence's keys here in another, and all rows' parts merged in one all-gather.
fn attend_rows(
    seqs: &mut RankSeqs,
    rows: &[Row],
    layer: usize,
    x: &AttnInput<'_>,
    comm: &dyn Communicator,
) -> apb_plugin::Result<Tensor> {
    let mut k_to = Vec::with_capacity(rows.len());
    let mut v_to = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        match row.seq.and_then(|id| seqs.0.get_mut(&id)) {
            Some(s) if row.keeps_here(comm.rank()) => {
                let (k, v) = (x.k.narrow(2, i, 1)?, x.v.narrow(2, i, 1)?);
                let (kb, vb, at) = s.cache.layers[layer].push_slot(&k, &v)?;
                k_to.push(Some((kb, at)));
                v_to.push(Some((vb, at)));
            }
            _ => {
                k_to.push(None);
                v_to.push(None);
            }
        }
    }
    let dev = x.q.device();
    span(Bucket::RowsWrite, dev, || -> candle_core::Result<()> {
        apb_kernels::write_rows(x.k, &k_to)?;
        apb_kernels::write_rows(x.v, &v_to)
    })?;
    let kv = rows
        .iter()
        .map(|r| match r.seq.and_then(|id| seqs.0.get(&id)) {
            Some(s) => s.cache.layers[layer].kv(),
            None => Ok(None),
        })
        .collect::<apb_plugin::Result<Vec<_>>>()?;
    let (out, lse) = span(Bucket::RowsAttend, dev, || {
        apb_kernels::attention_rows(x.q, &kv)
    })?;
    if comm.world_size() == 1 {
        // Merging one part is the identity (weight exactly 1; a row with nothing is 0 either
        // way): skip its copies and kernels.
        return Ok(out);
    }
    span(Bucket::RowsMerge, dev, || {
        Ok(apb_plugin::gather_merge(comm, &out, &lse)?.to_dtype(x.q.dtype())?)
    })
}

/// A sequence's number, the same on every rank (rank 0 assigns it).
pub type SeqId = u64;

/// A one-rank sequence to prefill on rank `home` beside others on other ranks
/// ([`Runner::prefill_side_by_side`]): short requests on ranks that own their device.
#[derive(Clone)]
pub struct SideBySide {
    /// The sequence.
    pub id: SeqId,
    /// Its job.
    pub job: Arc<Job>,
    /// Its one-rank plan.
    pub prep: Arc<Prepared>,
    /// The rank that runs it and keeps its KV.
    pub home: usize,
}

/// One row of a batched decode step: a sequence's next token at its position, or a padding row
/// (`seq` None: it attends nothing and its output is dropped).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Row {
    /// The sequence, or None for padding.
    pub seq: Option<SeqId>,
    /// The token fed.
    pub token: u32,
    /// Its position.
    pub pos: u32,
    /// The rank (of the sequence's) that keeps this token's K/V: rank 0's engine spreads a
    /// sequence's generated tokens over its ranks ([`apb_plugin::generated_kv_rank`]).
    pub kv_rank: u32,
}

impl Row {
    /// Whether rank `rank` of the step appends this row's K/V to its sequence's cache. Steps
    /// span a prefix of the group, and a sequence's ranks (`0..ranks`, or its home alone) are
    /// numbered as the group's, so the step's rank and the sequence's are one number.
    fn keeps_here(&self, rank: usize) -> bool {
        self.seq.is_some() && self.kv_rank as usize == rank
    }
}

/// One sequence's state on one rank between steps: its caches and the backend that holds its
/// layout.
struct SeqKv {
    cache: Cache,
    backend: Box<dyn AttentionBackend>,
}

/// The sequences a rank holds, by id.
#[derive(Default)]
pub struct RankSeqs(std::collections::HashMap<SeqId, SeqKv>);

impl RankSeqs {
    /// Drops a sequence's caches.
    pub fn free(&mut self, id: SeqId) {
        self.0.remove(&id);
    }

    /// Positions of sequence `id` this rank keeps in each layer's cache (None: not held here).
    pub fn kv_len(&self, id: SeqId) -> Option<usize> {
        let s = self.0.get(&id)?;
        Some(s.cache.layers.first().map_or(0, |l| l.len()))
    }

    /// Sequences held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes in `other`'s sequences.
    pub fn absorb(&mut self, other: RankSeqs) {
        self.0.extend(other.0);
    }
}

/// A rank after its prefill: the cache it keeps, its backend (it holds the rank's layout), the
/// last hidden state, and how many query tokens still follow (0 for dense: it prefilled them).
pub struct Prefilled {
    /// The layers' caches.
    pub cache: Cache,
    /// The backend that filled them.
    pub backend: Box<dyn AttentionBackend>,
    /// The last layer's output for the prefilled rows.
    pub hidden: Tensor,
    /// Query tokens still to run on every rank.
    pub query_left: usize,
}

/// This rank's prefill share under the prepared plan.
pub fn rank_share(job: &Job, prep: &Prepared, rank: usize, scorer: &Scorer) -> RankInputs {
    let mut share = prep
        .method
        .imp()
        .rank_inputs(&job.prompt, &prep.plan, rank, scorer);
    // APB's switch only: a fallback (dense) runs the exact full question segment.
    if prep.method.has_reference_question_mask() {
        share.layout.question_mask = job.settings.question_mask;
    }
    share
}

/// The prefill stage of the rank program (what `apb bench prefill` times): this rank's share
/// through the model with the method's backend.
pub fn prefill(
    model: &Model,
    scorer: &Scorer,
    job: &Job,
    prep: &Prepared,
    comm: Arc<dyn Communicator>,
    tick: &mut dyn FnMut(usize) -> apb_plugin::Result<()>,
) -> Result<Prefilled> {
    let rank = comm.rank();
    let RankInputs {
        tokens,
        positions,
        layout,
        query_left,
    } = rank_share(job, prep, rank, scorer);
    // Each layer's cache is allocated once: the rank's kept rows, the question segment on the
    // last rank, and the rank's round-robin share of the tokens the sequence may generate.
    let room = layout.local - layout.pad
        + apb_plugin::new_kv_rows(rank, prep.plan.world, query_left, prep.max_new);
    let backend = prep.method.backend(comm, layout, scorer.clone())?;
    let mut cache = Cache {
        layers: vec![apb_plugin::LayerKv::with_room(room); model.cfg.num_hidden_layers],
    };
    let hidden = model
        .forward(
            &tokens,
            &positions,
            Phase::Prefill,
            backend.as_ref(),
            &mut cache,
            tick,
        )
        .context("prefill")?;
    Ok(Prefilled {
        cache,
        backend,
        hidden,
        query_left,
    })
}

/// The prefill ranks' agreement between layers: whether any rank cancels, and whether rank 0
/// interleaves a step.
fn agree(comm: &dyn Communicator, model: &Model, cancel: bool, due: bool) -> Result<(bool, bool)> {
    if comm.world_size() == 1 {
        return Ok((cancel, due));
    }
    // On the rank's device: NCCL gathers device memory.
    let mine = Tensor::new(&[cancel as u32, due as u32], model.device())?;
    let all = comm.all_gather(&mine)?;
    let mut any_cancel = false;
    for t in &all {
        any_cancel |= t.to_vec1::<u32>()?[0] != 0;
    }
    Ok((any_cancel, all[0].to_vec1::<u32>()?[1] != 0))
}

/// What the ranks of a prefill do between its layers for the other sequences (rank 0 decides):
/// rank 0's runs a decode step of the running sequences and tells the prefill's other ranks to
/// resume; theirs runs the steps rank 0 sends until then.
pub trait Between {
    /// Rank 0: whether the running sequences are due a decode step (other ranks: never asked).
    fn due(&mut self) -> bool {
        false
    }
    /// Runs the interleaved steps on this rank (`seqs`: its sequences, the prefilling one not
    /// among them yet).
    fn run(&mut self, seqs: &mut RankSeqs) -> Result<()>;
}

/// A prefill with nothing interleaved (`apb generate`, benchmarks, tests).
pub struct Alone;

impl Between for Alone {
    fn run(&mut self, _: &mut RankSeqs) -> Result<()> {
        Err(err!("a step interleaved with a prefill that runs alone"))
    }
}

/// Ranks of a group agree whether to stop a prefill every this many layers.
const CANCEL_EVERY: usize = 4;

/// Prompts at least this long get a prefill progress bar (on a terminal).
const PROGRESS_MIN_TOKENS: usize = 2048;

/// A layer-by-layer prefill progress bar for prompts of at least [`PROGRESS_MIN_TOKENS`] tokens
/// (indicatif draws it only when stderr is a terminal).
fn prefill_bar(prompt_tokens: usize, layers: usize) -> Option<indicatif::ProgressBar> {
    (prompt_tokens >= PROGRESS_MIN_TOKENS).then(|| {
        let b = indicatif::ProgressBar::new(layers as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "prefill {pos}/{len} layers {bar:30} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    })
}

/// Streams generated text in whole characters and applies stop strings: a piece is held back
/// while the decoded tail is an incomplete UTF-8 sequence or could begin a stop string.
///
/// The text grows incrementally: each token decodes a few ids of context again (the window from
/// the last piece's start), not the whole sequence, which cost O(length) a token (~200 µs a row
/// at 2K tokens on a CPU core, every step). Decoding the window with and without the new ids and
/// keeping the difference is what TGI and vLLM do: a tokenizer that drops a window's leading
/// space drops it in both.
#[derive(Debug, Default)]
pub struct TextStream {
    printed: usize,
    stop: Vec<String>,
    /// Where the first stop string begins, once seen.
    cut: Option<usize>,
    /// The text of `ids[..read]`.
    text: String,
    /// The text of the ids after `read`, when it ends inside a character (U+FFFD): searched for
    /// stop strings, never emitted.
    pending: String,
    /// `ids[prefix..read]`: the context decoded again with new ids.
    prefix: usize,
    read: usize,
}

impl TextStream {
    /// A stream that stops at any of `stop`.
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop,
            ..Default::default()
        }
    }

    /// Adds what `ids` beyond those already read decode to, in whole characters (a new id that
    /// ends inside a character waits for the next).
    fn read(&mut self, tok: &Tokenizer, ids: &[u32]) -> Result<()> {
        if ids.len() < self.read {
            // Not a continuation of what was read: start again.
            *self = Self::new(std::mem::take(&mut self.stop));
        }
        let before = tok.decode(&ids[self.prefix..self.read])?;
        let after = tok.decode(&ids[self.prefix..])?;
        self.pending.clear();
        if after.ends_with('\u{FFFD}') {
            if let Some(new) = after.strip_prefix(before.as_str()) {
                self.pending.push_str(new);
            }
            return Ok(());
        }
        match after.strip_prefix(before.as_str()) {
            Some(new) if !new.is_empty() => {
                self.text.push_str(new);
                self.prefix = self.read;
                self.read = ids.len();
            }
            Some(_) => {}
            // The window's text changed before the new ids (a tokenizer whose decoding is not
            // prefix-stable): take the whole text once.
            None => {
                self.text = tok.decode(ids)?;
                self.prefix = ids.len();
                self.read = ids.len();
            }
        }
        Ok(())
    }

    /// The text read so far with its pending tail.
    fn full(&self) -> std::borrow::Cow<'_, str> {
        if self.pending.is_empty() {
            std::borrow::Cow::Borrowed(&self.text)
        } else {
            std::borrow::Cow::Owned(format!("{}{}", self.text, self.pending))
        }
    }

    /// Emits what `ids` decode to beyond what was already emitted; true when a stop string
    /// appeared (the text ends before it).
    pub fn push(
        &mut self,
        tok: &Tokenizer,
        ids: &[u32],
        emit: &mut dyn FnMut(&str),
    ) -> Result<bool> {
        self.read(tok, ids)?;
        let full = self.full();
        if let Some(i) = self.stop.iter().filter_map(|s| full.find(s.as_str())).min() {
            // Never cut before what was already streamed (decoding is prefix-stable in practice).
            let i = i.max(self.printed);
            if i > self.printed {
                emit(&full[self.printed..i]);
            }
            self.cut = Some(i);
            self.printed = i;
            return Ok(true);
        }
        if !self.pending.is_empty() {
            return Ok(false);
        }
        let text = &self.text;
        // Hold back a tail that could still become a stop string.
        let mut safe = text.len();
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                    safe = safe.min(text.len() - k);
                    break;
                }
            }
        }
        if safe > self.printed {
            emit(&text[self.printed..safe]);
            self.printed = safe;
        }
        Ok(false)
    }

    /// Emits the rest and returns the whole text (cut before a stop string).
    pub fn finish(
        self,
        tok: &Tokenizer,
        ids: &[u32],
        emit: &mut dyn FnMut(&str),
    ) -> Result<String> {
        let mut text = tok.decode(ids)?;
        let full = self.full();
        let streamed = full.get(..self.printed).unwrap_or(&full);
        if !text.starts_with(streamed) {
            // A tokenizer whose whole text does not begin with what streamed: keep what
            // streamed, so the stream and the final text agree.
            text = full.into_owned();
        }
        if let Some(i) = self.cut {
            if text.is_char_boundary(i) {
                text.truncate(i);
            }
        } else {
            // A generation cut inside a multi-byte character (max_tokens) decodes to U+FFFD at
            // the end: the bytes that would complete it never came. Streaming holds such a tail
            // back between tokens; the final text drops it (a U+FFFD the model meant at the very
            // end goes with it).
            let whole = text.trim_end_matches('\u{FFFD}').len().max(self.printed);
            text.truncate(whole);
        }
        if text.len() > self.printed {
            emit(&text[self.printed..]);
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the stream did before it read incrementally: decode every id each token. The
    /// reference for the stream's pieces, stop decisions and final text.
    fn whole_each_time(tok: &Tokenizer, ids: &[u32], stop: &[String]) -> (Vec<String>, String) {
        let (mut pieces, mut printed) = (Vec::new(), 0);
        for n in 1..=ids.len() {
            let text = tok.decode(&ids[..n]).unwrap();
            if let Some(i) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                let i = i.max(printed);
                if i > printed {
                    pieces.push(text[printed..i].to_string());
                }
                return (pieces, text[..i].to_string());
            }
            if text.ends_with('\u{FFFD}') {
                continue;
            }
            let mut safe = text.len();
            for s in stop {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                        safe = safe.min(text.len() - k);
                        break;
                    }
                }
            }
            if safe > printed {
                pieces.push(text[printed..safe].to_string());
                printed = safe;
            }
        }
        let text = tok.decode(ids).unwrap();
        let whole = text.trim_end_matches('\u{FFFD}').len().max(printed);
        if whole > printed {
            pieces.push(text[printed..whole].to_string());
        }
        (pieces, text[..whole].to_string())
    }

    /// Reading incrementally streams the same pieces, stops at the same place and ends with the
    /// same text as decoding everything each token: multi-byte characters split over byte
    /// tokens, stop strings inside and across tokens, a cut inside a character.
    #[test]
    fn incremental_text_equals_decoding_everything() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-llama31");
        let tok = Tokenizer::from_dir(&dir, &[]).unwrap();
        let text = "The café in Zürich — naïve 日本語 text, 🎉 numbers 12345 and \"quotes\"! ";
        let ids = tok.encode_plain(&text.repeat(3)).unwrap();
        let stops: [&[&str]; 5] = [
            &[],
            &["日本"],
            &["zz", "12"],
            &["🎉 n"],
            &["Zürich — naïve 日本語 text, 🎉 numbers 12345 and \"quotes\"! The"],
        ];
        for stop in stops {
            let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
            for end in [ids.len(), ids.len() - 1, ids.len() / 2, 7] {
                let ids = &ids[..end];
                let (want_pieces, want_text) = whole_each_time(&tok, ids, &stop);
                let mut pieces = Vec::new();
                let mut ts = TextStream::new(stop.clone());
                let mut used = ids.len();
                for n in 1..=ids.len() {
                    if ts
                        .push(&tok, &ids[..n], &mut |s| pieces.push(s.to_string()))
                        .unwrap()
                    {
                        used = n;
                        break;
                    }
                }
                let text = ts
                    .finish(&tok, &ids[..used], &mut |s| pieces.push(s.to_string()))
                    .unwrap();
                assert_eq!(text, want_text, "stop {stop:?}, {end} ids");
                assert_eq!(pieces.concat(), want_text, "stop {stop:?}, {end} ids");
                assert_eq!(pieces, want_pieces, "stop {stop:?}, {end} ids");
            }
        }
    }

    /// A `max_tokens` cut inside "é" (two byte tokens of the tiny fixture's byte-level BPE) ends
    /// the text before it, streamed and whole alike, instead of with U+FFFD.
    #[test]
    fn a_cut_inside_a_character_ends_the_text_before_it() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-llama31");
        let tok = Tokenizer::from_dir(&dir, &[]).unwrap();
        let ids = tok.encode_plain("café").unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), "café");
        let cut = &ids[..ids.len() - 1];
        assert!(tok.decode(cut).unwrap().ends_with('\u{FFFD}'));
        let mut streamed = String::new();
        let mut ts = TextStream::new(vec![]);
        for i in 1..=cut.len() {
            ts.push(&tok, &cut[..i], &mut |s| streamed.push_str(s))
                .unwrap();
        }
        let text = ts.finish(&tok, cut, &mut |s| streamed.push_str(s)).unwrap();
        assert_eq!((text.as_str(), streamed.as_str()), ("caf", "caf"));
    }
}
