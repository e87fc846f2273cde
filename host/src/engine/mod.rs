//! The engine on rank 0: running sequences, one step at a time (nano-vllm's `LLMEngine` shape).
//!
//! A sequence enters with a prefill step (its prompt over the ranks its plan names; the first
//! token is chosen from it) and then takes part in every decode step until it stops: one
//! forward over the next token of every running sequence, each attending its own KV on every
//! rank, merged in one all-gather per layer for the whole batch ([`crate::ranks::Group::decode`]).
//! Sampling, stop rules, `finish_reason` and cancellation are judged here, on rank 0; the other
//! ranks only run what rank 0's step messages say. `apb generate` is a batch of one; the server
//! adds a scheduler in front ([`scheduler`]).

pub mod scheduler;

use crate::error::err;
use crate::ranks::{Group, Pick, RunError};
use crate::runner::{
    rank_share, Between, Finish, GenStats, Generation, Job, Prepared, RankSeqs, Row, SeqId,
    SideBySide, TextStream,
};
use crate::sampling::Sampler;
use apb_plugin::profile;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request for the engine: the job, its cancel flag (set by anyone; checked every step), where
/// its text goes, and the caller's tag, handed back with the result.
pub struct Request<'a, T> {
    /// What to run.
    pub job: Job,
    /// Set to stop it at the next step (or between prefill layers).
    pub cancel: Arc<AtomicBool>,
    /// Receives the text as it is decoded.
    pub on_text: Box<dyn FnMut(&str) + 'a>,
    /// The caller's handle on it.
    pub tag: T,
}

/// One running sequence.
struct Seq<'a, T> {
    id: SeqId,
    req: Request<'a, T>,
    prep: Prepared,
    /// Ranks its KV lives on: `home..home + ranks` (a sequence over several ranks starts at 0;
    /// a one-rank one may run on any rank where they spread, [`Group::set_spread`]).
    ranks: usize,
    home: usize,
    sampler: Sampler,
    stream: TextStream,
    out: Vec<u32>,
    /// The token to feed at `pos` in the next decode step.
    next: u32,
    pos: u32,
    first_logits: Vec<f32>,
    t0: Instant,
    /// Time to the first token, once chosen.
    prefill_ms: Option<f64>,
    t1: Instant,
    steps: usize,
    rank_prefill_tokens: Vec<usize>,
    /// KV positions it holds per rank (see [`Placed`]).
    need: Vec<usize>,
}

/// A finished request: its tag and what it produced.
pub type Done<T> = (T, Generation);

/// A started request: running (None), already done with its prefill, or failed (with its tag).
pub type Started<T> = Result<Option<Done<T>>, (T, RunError)>;

/// The KV positions running sequences may hold: admission waits for room and refuses what can
/// never fit.
#[derive(Debug, Clone, Copy)]
pub struct KvBudget {
    /// Positions per pool.
    pub positions: usize,
    /// One pool for every rank (thread ranks share their process's memory), else one per rank.
    pub shared: bool,
    /// Bytes one position takes in every layer (K and V), to say what the budget means.
    pub bytes_per_position: usize,
    /// Transient bytes a prefill row takes while its prefill runs (activations; counted at
    /// admission, which starts the prefill, and freed when it ends).
    pub prefill_bytes_per_row: usize,
}

impl KvBudget {
    /// Positions' worth of a prefill's activations over `rows` rows.
    fn prefill_positions(&self, rows: usize) -> usize {
        (rows * self.prefill_bytes_per_row).div_ceil(self.bytes_per_position.max(1))
    }
}

/// A request planned for the group, with the KV positions it keeps on each rank (its share of
/// the prompt, the question segment on the last rank, its share of the tokens it may generate:
/// [`apb_plugin::new_kv_rows`]) and, in
/// positions' worth of memory, what its prefill's activations take there while it runs.
pub struct Placed<'a, T> {
    req: Request<'a, T>,
    prep: Prepared,
    need: Vec<usize>,
    prefill: Vec<usize>,
    /// The rank its plan's first rank runs on (0 unless it is a one-rank request placed on
    /// another rank: [`Engine::reserve_home`]).
    home: usize,
}

impl<T> Placed<'_, T> {
    /// Whether its client gave up (set while it waits for room).
    pub fn cancelled(&self) -> bool {
        self.req.cancel.load(Ordering::SeqCst)
    }

    /// Takes the caller's tag back (a request dropped before it ran).
    pub fn into_tag(self) -> T {
        self.req.tag
    }

    /// Whether it runs on one rank, which may then be any rank of a group that spreads short
    /// requests ([`Engine::reserve_home`]).
    pub fn one_rank(&self) -> bool {
        self.prep.plan.world == 1
    }

    /// Its prompt's tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.req.job.prompt.len()
    }

    /// The rank its plan starts on.
    pub fn home(&self) -> usize {
        self.home
    }

    /// Moves a one-rank request's needs to rank `home`.
    fn at(&mut self, home: usize) {
        // A one-rank request's vectors hold one non-zero entry, at its current home (or none).
        let shift = |v: &mut Vec<usize>| {
            let n = v.iter().sum();
            *v = vec![0; home + 1];
            v[home] = n;
        };
        shift(&mut self.need);
        shift(&mut self.prefill);
        self.home = home;
    }
}

/// One decode step, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct StepStat {
    /// Sequences in it.
    pub rows: usize,
    /// Of them, those whose KV spans several ranks.
    pub spanning: usize,
    /// How long they waited for it since their last step (None: their first).
    pub gap_s: Option<f64>,
    /// How long it took.
    pub secs: f64,
}

/// The running sequences of a group.
pub struct Engine<'a, T> {
    seqs: Vec<Seq<'a, T>>,
    /// Run a lone decode row as two (see [`Engine::batching`]).
    pad_lone_rows: bool,
    budget: Option<KvBudget>,
    /// KV positions held per rank.
    used: Vec<usize>,
    /// Running sequences get a decode step between a prefill's layers once they have waited
    /// this long (None: they wait for the whole prefill).
    max_gap: Option<Duration>,
    /// Since when the running sequences wait for a step.
    waiting_since: Option<Instant>,
    /// Requests finished by steps run inside a prefill, for the caller to take (unless
    /// `on_done` answers them at once).
    finished: Vec<Done<T>>,
    on_done: Option<Box<dyn FnMut(Done<T>) + 'a>>,
    stats: Vec<StepStat>,
}

impl<T> Default for Engine<'_, T> {
    fn default() -> Self {
        Self {
            seqs: Vec::new(),
            pad_lone_rows: false,
            budget: None,
            used: Vec::new(),
            max_gap: None,
            waiting_since: None,
            finished: Vec::new(),
            on_done: None,
            stats: Vec::new(),
        }
    }
}

impl<'a, T> Engine<'a, T> {
    /// Sequences in decode.
    pub fn running(&self) -> usize {
        self.seqs.len()
    }

    /// Running sequences whose KV spans several ranks.
    pub fn spanning(&self) -> usize {
        self.seqs.iter().filter(|s| s.ranks > 1).count()
    }

    /// An engine whose requests may share decode batches (a server with `--max-num-seqs` > 1):
    /// a lone request then runs as two rows, so its tokens do not depend on whether others
    /// run beside it. Within `budget`, if any.
    pub fn batching(budget: Option<KvBudget>) -> Self {
        Self {
            pad_lone_rows: true,
            budget,
            ..Self::default()
        }
    }

    /// Lets running sequences take a decode step between a prefill's layers once they have
    /// waited `gap` (the ranks of a prefill agree every layer on one rank, every few on several),
    /// so a long prefill does not stall every stream for its whole length. Values are unchanged:
    /// each sequence's computation is the same, only the order of steps differs.
    pub fn with_decode_gap(mut self, gap: Duration) -> Self {
        self.max_gap = Some(gap);
        self
    }

    /// Hands requests that finish in decode steps inside a prefill to `f` at once (a server
    /// answers them then, not when the prefill ends); without it they wait in
    /// [`Engine::take_finished`].
    pub fn on_done_inside_prefill(mut self, f: impl FnMut(Done<T>) + 'a) -> Self {
        self.on_done = Some(Box::new(f));
        self
    }

    /// Requests finished by decode steps that ran inside a prefill ([`Engine::start`]).
    pub fn take_finished(&mut self) -> Vec<Done<T>> {
        std::mem::take(&mut self.finished)
    }

    /// The decode steps run since the last call.
    pub fn take_stats(&mut self) -> Vec<StepStat> {
        std::mem::take(&mut self.stats)
    }

    /// Whether the running sequences are due a step inside a prefill.
    fn due(&self) -> bool {
        match (self.max_gap, self.waiting_since) {
            (Some(gap), Some(t)) => !self.seqs.is_empty() && t.elapsed() >= gap,
            _ => false,
        }
    }

    /// An engine that admits sequences within `budget`, one at a time (`--max-num-seqs 1`: no
    /// padding row, nothing to be consistent with).
    pub fn with_budget(budget: Option<KvBudget>) -> Self {
        Self {
            budget,
            ..Self::default()
        }
    }

    /// Checks and plans `req` for the group and counts the KV it needs; a bad request, or one
    /// that can never fit the KV budget, comes back with its tag (400).
    pub fn place(
        &self,
        group: &Group,
        req: Request<'a, T>,
    ) -> Result<Placed<'a, T>, (T, RunError)> {
        let (job, prep) = match group.place(&req.job) {
            Ok(p) => p,
            Err(e) => return Err((req.tag, e)),
        };
        let scorer = &group.runner().scorer;
        let world = prep.plan.world;
        let (need, rows): (Vec<usize>, Vec<usize>) = (0..world)
            .map(|h| {
                let r = rank_share(&job, &prep, h, scorer);
                let kept = r.layout.local - r.layout.pad;
                let new = apb_plugin::new_kv_rows(h, world, r.query_left, prep.max_new);
                (kept + new, r.tokens.len())
            })
            .unzip();
        let prefill: Vec<usize> = match &self.budget {
            Some(b) => rows.iter().map(|&n| b.prefill_positions(n)).collect(),
            None => vec![0; world],
        };
        if let Some(b) = &self.budget {
            let (most, act, at) = if b.shared {
                (
                    need.iter().sum::<usize>(),
                    prefill.iter().sum::<usize>(),
                    "in all".to_string(),
                )
            } else {
                (0..world)
                    .map(|h| (need[h] + prefill[h], prefill[h], format!("on rank {h}")))
                    .max()
                    .map(|(sum, act, at)| (sum - act, act, at))
                    .unwrap_or_default()
            };
            if most + act > b.positions {
                let e = RunError::Input(format!(
                    "the request needs KV memory for {most} positions {at} (prompt and max_tokens), and {act} positions' worth for its prefill's activations, but the server's budget is {} positions{} (--kv-cache-memory-bytes, {} bytes a position); shorten the prompt or max_tokens",
                    b.positions,
                    if b.shared { "" } else { " per rank" },
                    b.bytes_per_position
                ));
                return Err((req.tag, e));
            }
        }
        Ok(Placed {
            req: Request { job, ..req },
            prep,
            need,
            prefill,
            home: 0,
        })
    }

    /// Places a one-rank request for a side-by-side batch ([`Engine::start_side_by_side`]) on
    /// the rank, not in `taken` (the batch's others), that holds the least KV (the last such)
    /// and has room for it now, and holds that room (its KV, and its prefill's activations until
    /// the batch starts: nothing else is admitted while it runs).
    /// False: no rank has room now.
    pub fn reserve_home(&mut self, group: &Group, p: &mut Placed<'a, T>, taken: &[usize]) -> bool {
        let used = |h: usize| self.used.get(h).copied().unwrap_or(0);
        let mut ranks: Vec<usize> = (0..group.world()).filter(|h| !taken.contains(h)).collect();
        // Ties go to the last ranks: rank 0 also relays every step and samples every row.
        ranks.sort_by_key(|&h| (used(h), std::cmp::Reverse(h)));
        for h in ranks {
            p.at(h);
            if self.fits(p) {
                self.hold(&p.need, true);
                self.hold(&p.prefill, true);
                return true;
            }
        }
        p.at(0);
        false
    }

    /// Whether `p`'s KV, and its prefill's activations while they last, fit beside the running
    /// sequences now.
    pub fn fits(&self, p: &Placed<'a, T>) -> bool {
        let Some(b) = &self.budget else {
            return true;
        };
        let used = |h: usize| self.used.get(h).copied().unwrap_or(0);
        if b.shared {
            self.used.iter().sum::<usize>()
                + p.need.iter().sum::<usize>()
                + p.prefill.iter().sum::<usize>()
                <= b.positions
        } else {
            (0..p.need.len()).all(|h| used(h) + p.need[h] + p.prefill[h] <= b.positions)
        }
    }

    /// KV positions held by the running sequences, per rank.
    pub fn kv_used(&self) -> &[usize] {
        &self.used
    }

    fn hold(&mut self, need: &[usize], add: bool) {
        if self.used.len() < need.len() {
            self.used.resize(need.len(), 0);
        }
        for (u, &n) in self.used.iter_mut().zip(need) {
            *u = if add { *u + n } else { u.saturating_sub(n) };
        }
    }

    /// Plans and starts `req` (no budget check: what `apb generate` runs).
    pub fn add(&mut self, group: &Group, req: Request<'a, T>) -> Started<T> {
        let placed = self.place(group, req)?;
        self.start(group, placed)
    }

    /// Prefills a placed request on its ranks and chooses its first token. Returns it at once
    /// when it is already done (a stop token first, `max_tokens` 1, cancelled during prefill);
    /// a failure comes back with the request's tag. Running sequences may take decode steps
    /// inside the prefill ([`Engine::with_decode_gap`]); what they finish is in
    /// [`Engine::take_finished`].
    pub fn start(&mut self, group: &Group, placed: Placed<'a, T>) -> Started<T> {
        let t0 = Instant::now();
        let id = group.new_id();
        let mut between = Interleave {
            eng: self,
            group,
            k: placed.prep.plan.world,
        };
        let (req, prep) = (&placed.req, &placed.prep);
        let prefilled = match group.prefill(id, &req.job, prep, &req.cancel, &mut between) {
            Ok(p) => p.map(|(_, hidden)| hidden),
            Err(e) => return Err((placed.req.tag, e)),
        };
        self.hold(&placed.need, true);
        let seq = Seq::new(group, id, placed, t0);
        self.admit(group, seq, prefilled)
    }

    /// Prefills one-rank requests side by side, each on the rank [`Engine::reserve_home`] gave
    /// it (distinct ranks; their room is held already), and chooses their first tokens, as
    /// [`Engine::start`] does for one request. Nothing runs between their layers: they are short.
    pub fn start_side_by_side(
        &mut self,
        group: &Group,
        batch: Vec<Placed<'a, T>>,
    ) -> Vec<Started<T>> {
        debug_assert!(
            (1..batch.len()).all(|i| batch[..i].iter().all(|b| b.home != batch[i].home)),
            "side-by-side prefills on distinct ranks"
        );
        let t0 = Instant::now();
        let seqs: Vec<Seq<'a, T>> = batch
            .into_iter()
            .map(|p| {
                self.hold(&p.prefill, false);
                Seq::new(group, group.new_id(), p, t0)
            })
            .collect();
        let items = seqs
            .iter()
            .map(|s| SideBySide {
                id: s.id,
                job: Arc::new(s.req.job.clone()),
                prep: Arc::new(s.prep.clone()),
                home: s.home,
            })
            .collect();
        let never = AtomicBool::new(false);
        let cancel = seqs
            .iter()
            .find(|s| s.home == 0)
            .map_or(&never, |s| &*s.req.cancel);
        match group.prefill_side_by_side(items, cancel) {
            Ok(hidden) => seqs
                .into_iter()
                .zip(hidden)
                .map(|(s, h)| self.admit(group, s, h))
                .collect(),
            Err(e) => seqs
                .into_iter()
                .map(|s| {
                    self.hold(&s.need, false);
                    Err((s.req.tag, RunError::Failed(e.to_string())))
                })
                .collect(),
        }
    }

    /// A prefilled sequence (None: cancelled during its prefill) joins the running ones with
    /// its first token, or ends at once (stopped by it, `max_tokens` 1, cancelled).
    fn admit(
        &mut self,
        group: &Group,
        mut seq: Seq<'a, T>,
        hidden: Option<candle_core::Tensor>,
    ) -> Started<T> {
        let Some(hidden) = hidden else {
            self.hold(&seq.need, false);
            return Ok(Some(seq.finish(group, Finish::Cancelled)));
        };
        let logits = group
            .runner()
            .model()
            .last_logits(&hidden)
            .and_then(|l| l.to_vec1::<f32>())
            .map_err(|e| RunError::Failed(format!("rank 0: first logits: {e}")));
        let logits = match logits {
            Ok(l) => l,
            Err(e) => return Err((seq.req.tag, e)),
        };
        match seq.accept(group, Pick::Logits(logits)) {
            Ok(None) => {
                self.seqs.push(seq);
                self.waiting_since.get_or_insert_with(Instant::now);
                Ok(None)
            }
            Ok(Some(f)) => {
                group.free(&[(seq.id, seq.holders())]);
                self.hold(&seq.need, false);
                Ok(Some(seq.finish(group, f)))
            }
            Err(e) => Err((seq.req.tag, e)),
        }
    }

    /// One decode step of every running sequence (those cancelled since the last step end
    /// first). Returns the requests that finished. A failure fails the group: the running
    /// requests are then [`drain`](Self::drain)ed by the caller.
    pub fn step(&mut self, group: &Group) -> Result<Vec<Done<T>>, RunError> {
        let mut done = Vec::new();
        let mut freed = Vec::new();
        let mut i = 0;
        while i < self.seqs.len() {
            if self.seqs[i].req.cancel.load(Ordering::SeqCst) {
                let s = self.seqs.swap_remove(i);
                freed.push((s.id, s.holders()));
                self.hold(&s.need, false);
                done.push(s.finish(group, Finish::Cancelled));
            } else {
                i += 1;
            }
        }
        if !self.seqs.is_empty() {
            let t0 = Instant::now();
            let stat = StepStat {
                rows: self.seqs.len(),
                spanning: self.spanning(),
                gap_s: self.waiting_since.map(|t| (t0 - t).as_secs_f64()),
                secs: 0.0,
            };
            let mut rows: Vec<(Row, usize)> = self
                .seqs
                .iter()
                .map(|s| {
                    (
                        Row {
                            seq: Some(s.id),
                            token: s.next,
                            pos: s.pos,
                            kv_rank: (s.home + apb_plugin::generated_kv_rank(s.steps, s.ranks))
                                as u32,
                        },
                        s.holders().end,
                    )
                })
                .collect();
            // Where requests can share a batch, one row runs as two (a padding row that attends
            // nothing): GEMM libraries compute a single row differently from several (candle's
            // CPU GEMM: another kernel), and a request must get, token for token, what it gets
            // in any batch. A padding row is not free, so only a batching engine pays it.
            if rows.len() == 1 && self.pad_lone_rows {
                rows.push((
                    Row {
                        seq: None,
                        ..rows[0].0
                    },
                    1,
                ));
            }
            let greedy: Vec<bool> = self.seqs.iter().map(|s| s.sampler.greedy()).collect();
            let picks = group.decode(&rows, &greedy)?;
            let t1 = Instant::now();
            let mut keep = Vec::with_capacity(self.seqs.len());
            for (mut s, pick) in std::mem::take(&mut self.seqs).into_iter().zip(picks) {
                s.pos += 1;
                s.steps += 1;
                match s.accept(group, pick)? {
                    None => keep.push(s),
                    Some(f) => {
                        freed.push((s.id, s.holders()));
                        self.hold(&s.need, false);
                        done.push(s.finish(group, f));
                    }
                }
            }
            self.seqs = keep;
            profile::add(profile::Bucket::DecodeAccept, t1.elapsed());
            self.stats.push(StepStat {
                secs: t0.elapsed().as_secs_f64(),
                ..stat
            });
        }
        self.waiting_since = (!self.seqs.is_empty()).then(Instant::now);
        if !freed.is_empty() {
            group.free(&freed);
        }
        Ok(done)
    }

    /// The running requests' tags, taking them out (after a group failure).
    pub fn drain(&mut self) -> Vec<T> {
        self.used.clear();
        self.waiting_since = None;
        self.seqs.drain(..).map(|s| s.req.tag).collect()
    }

    /// Cancels every running request (they end at the next step).
    pub fn cancel_all(&self) {
        for s in &self.seqs {
            s.req.cancel.store(true, Ordering::SeqCst);
        }
    }
}

/// The engine inside a prefill over ranks `0..k`: when the running sequences are due, one
/// decode step of them, then the prefill's workers resume.
struct Interleave<'e, 'a, T> {
    eng: &'e mut Engine<'a, T>,
    group: &'e Group,
    k: usize,
}

impl<T> Between for Interleave<'_, '_, T> {
    fn due(&mut self) -> bool {
        self.eng.due()
    }

    fn run(&mut self, _: &mut RankSeqs) -> crate::error::Result<()> {
        let done = self.eng.step(self.group).map_err(|e| err!("{e}"))?;
        match &mut self.eng.on_done {
            Some(f) => done.into_iter().for_each(f),
            None => self.eng.finished.extend(done),
        }
        self.group.resume(self.k).map_err(|e| err!("{e}"))
    }
}

impl<'a, T> Seq<'a, T> {
    /// A placed request whose prefill starts now (`t0`) as sequence `id`.
    fn new(group: &Group, id: SeqId, p: Placed<'a, T>, t0: Instant) -> Self {
        let Placed {
            req,
            prep,
            need,
            home,
            ..
        } = p;
        let scorer = &group.runner().scorer;
        let rank_prefill_tokens = (0..prep.plan.world)
            .map(|h| rank_share(&req.job, &prep, h, scorer).tokens.len())
            .collect();
        let params = &req.job.params;
        Seq {
            id,
            sampler: Sampler::new(params.temperature, params.top_p, params.seed),
            stream: TextStream::new(params.stop.clone()),
            out: Vec::new(),
            next: 0,
            pos: req.job.prompt.len() as u32,
            first_logits: Vec::new(),
            t0,
            prefill_ms: None,
            t1: t0,
            steps: 0,
            rank_prefill_tokens,
            ranks: prep.plan.world,
            home,
            prep,
            req,
            need,
        }
    }

    /// The group ranks that hold its KV.
    fn holders(&self) -> std::ops::Range<usize> {
        self.home..self.home + self.ranks
    }

    /// Takes the next token (greedy, picked on the device) or chooses it from the logits, and
    /// applies the stop rules; None: keep going (the token is fed at the next step).
    fn accept(&mut self, group: &Group, pick: Pick) -> Result<Option<Finish>, RunError> {
        let tok = group.runner().tok();
        let next = match &pick {
            Pick::Token(t) => *t,
            Pick::Logits(l) => self.sampler.sample(l),
        };
        if self.prefill_ms.is_none() {
            self.prefill_ms = Some(self.t0.elapsed().as_secs_f64() * 1e3);
            self.t1 = Instant::now();
            // What backends are compared on (rank 0 holds the merged rows, as every rank does).
            if let Pick::Logits(l) = pick {
                self.first_logits = l;
            }
        }
        if self.req.cancel.load(Ordering::SeqCst) {
            return Ok(Some(Finish::Cancelled));
        }
        let params = &self.req.job.params;
        if !params.ignore_eos && tok.stop_ids.contains(&next) {
            return Ok(Some(Finish::Stop));
        }
        self.out.push(next);
        let stopped = self
            .stream
            .push(tok, &self.out, &mut *self.req.on_text)
            .map_err(|e| RunError::Failed(format!("rank 0: decoding text: {e:#}")))?;
        if stopped {
            return Ok(Some(Finish::Stop));
        }
        if self.out.len() >= self.prep.max_new {
            return Ok(Some(Finish::Length));
        }
        self.next = next;
        Ok(None)
    }

    fn finish(mut self, group: &Group, finish: Finish) -> Done<T> {
        let runner = group.runner();
        let stream = std::mem::take(&mut self.stream);
        // Decoding what was already decoded once cannot fail; keep the streamed text if it did.
        let text = stream
            .finish(runner.tok(), &self.out, &mut *self.req.on_text)
            .unwrap_or_default();
        let decode_s = self.t1.elapsed().as_secs_f64();
        let prefill_ms = self
            .prefill_ms
            .unwrap_or_else(|| self.t0.elapsed().as_secs_f64() * 1e3);
        let prep = &self.prep;
        let masked = prep.method.has_reference_question_mask() && prep.plan.world > 1;
        let mut g = Generation {
            method: prep.ran(),
            scorer: runner.scorer_of(prep),
            question_mask: masked.then_some(self.req.job.settings.question_mask),
            text,
            tokens: std::mem::take(&mut self.out),
            first_logits: std::mem::take(&mut self.first_logits),
            finish,
            stats: GenStats {
                prompt_tokens: self.req.job.prompt.len(),
                generated_tokens: 0,
                prefill_ms,
                decode_tokens_per_s: if self.steps > 0 && decode_s > 0.0 {
                    self.steps as f64 / decode_s
                } else {
                    0.0
                },
            },
            plan: prep.plan.clone(),
            rank_prefill_tokens: std::mem::take(&mut self.rank_prefill_tokens),
            first_rank: self.home,
        };
        g.stats.generated_tokens = g.tokens.len();
        (self.req.tag, g)
    }
}

// `Group::run` lives here, beside the engine it drives, so the ranks need not know the engine.
impl Group {
    /// Runs `job` on the group alone (a batch of one: what `apb generate` does). Text streams to
    /// `on_text` as it is decoded; setting `cancel` stops it at the next token. The result
    /// carries the first token's logits.
    pub fn run(
        &self,
        job: &Job,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> std::result::Result<Generation, RunError> {
        let flag = Arc::new(AtomicBool::new(cancel.load(Ordering::SeqCst)));
        let mut engine = Engine::default();
        let req = Request {
            job: job.clone(),
            cancel: flag.clone(),
            on_text: Box::new(|t: &str| on_text(t)),
            tag: (),
        };
        if let Some(((), g)) = engine.add(self, req).map_err(|(_, e)| e)? {
            return Ok(g);
        }
        loop {
            if cancel.load(Ordering::SeqCst) {
                flag.store(true, Ordering::SeqCst);
            }
            if let Some(((), g)) = engine.step(self)?.pop() {
                return Ok(g);
            }
        }
    }
}
