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

use crate::ranks::{Group, RunError};
use crate::runner::{
    rank_share, Finish, GenStats, Generation, Job, Prepared, Row, SeqId, TextStream,
};
use crate::sampling::Sampler;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
    /// Ranks its KV lives on (`0..ranks`).
    ranks: usize,
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
}

/// A finished request: its tag and what it produced.
pub type Done<T> = (T, Generation);

/// The running sequences of a group.
pub struct Engine<'a, T> {
    seqs: Vec<Seq<'a, T>>,
}

impl<T> Default for Engine<'_, T> {
    fn default() -> Self {
        Self { seqs: Vec::new() }
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

    /// Prefills `req` on its ranks and chooses its first token. Returns it at once when it is
    /// already done (a stop token first, `max_tokens` 1, cancelled during prefill); an input
    /// error comes back with the request's tag.
    pub fn add(
        &mut self,
        group: &Group,
        req: Request<'a, T>,
    ) -> Result<Option<Done<T>>, (T, RunError)> {
        let (job, prep) = match group.place(&req.job) {
            Ok(p) => p,
            Err(e) => return Err((req.tag, e)),
        };
        let t0 = Instant::now();
        let id = group.new_id();
        let placed = match group.prefill(id, &job, &prep, &req.cancel) {
            Ok(p) => p,
            Err(e) => return Err((req.tag, e)),
        };
        let runner = group.runner();
        let rank_prefill_tokens = (0..prep.plan.world)
            .map(|h| rank_share(&job, &prep, h, &runner.scorer).tokens.len())
            .collect();
        let params = &job.params;
        let mut seq = Seq {
            id,
            sampler: Sampler::new(params.temperature, params.top_p, params.seed),
            stream: TextStream::new(params.stop.clone()),
            out: Vec::new(),
            next: 0,
            pos: job.prompt.len() as u32,
            first_logits: Vec::new(),
            t0,
            prefill_ms: None,
            t1: t0,
            steps: 0,
            rank_prefill_tokens,
            ranks: 0,
            prep,
            req: Request { job, ..req },
        };
        let Some((ranks, hidden)) = placed else {
            return Ok(Some(seq.finish(group, Finish::Cancelled)));
        };
        seq.ranks = ranks;
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
        match seq.accept(group, logits) {
            Ok(None) => {
                self.seqs.push(seq);
                Ok(None)
            }
            Ok(Some(f)) => {
                group.free(&[(seq.id, seq.ranks)]);
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
                freed.push((s.id, s.ranks));
                done.push(s.finish(group, Finish::Cancelled));
            } else {
                i += 1;
            }
        }
        if !self.seqs.is_empty() {
            let mut rows: Vec<(Row, usize)> = self
                .seqs
                .iter()
                .map(|s| {
                    (
                        Row {
                            seq: Some(s.id),
                            token: s.next,
                            pos: s.pos,
                        },
                        s.ranks,
                    )
                })
                .collect();
            // One row runs as two (a padding row that attends nothing): the CPU GEMM rounds a
            // single row differently from several, and a request must get, token for token, what
            // it gets in any batch.
            if rows.len() == 1 {
                rows.push((
                    Row {
                        seq: None,
                        token: rows[0].0.token,
                        pos: rows[0].0.pos,
                    },
                    1,
                ));
            }
            let logits = group.decode(&rows)?;
            let mut keep = Vec::with_capacity(self.seqs.len());
            for (mut s, logits) in std::mem::take(&mut self.seqs).into_iter().zip(logits) {
                s.pos += 1;
                s.steps += 1;
                match s.accept(group, logits)? {
                    None => keep.push(s),
                    Some(f) => {
                        freed.push((s.id, s.ranks));
                        done.push(s.finish(group, f));
                    }
                }
            }
            self.seqs = keep;
        }
        if !freed.is_empty() {
            group.free(&freed);
        }
        Ok(done)
    }

    /// The running requests' tags, taking them out (after a group failure).
    pub fn drain(&mut self) -> Vec<T> {
        self.seqs.drain(..).map(|s| s.req.tag).collect()
    }

    /// Cancels every running request (they end at the next step).
    pub fn cancel_all(&self) {
        for s in &self.seqs {
            s.req.cancel.store(true, Ordering::SeqCst);
        }
    }
}

impl<T> Seq<'_, T> {
    /// Chooses the next token from `logits` and applies the stop rules; None: keep going (the
    /// token is fed at the next step).
    fn accept(&mut self, group: &Group, logits: Vec<f32>) -> Result<Option<Finish>, RunError> {
        let tok = group.runner().tok();
        let next = self.sampler.sample(&logits);
        if self.prefill_ms.is_none() {
            self.prefill_ms = Some(self.t0.elapsed().as_secs_f64() * 1e3);
            self.t1 = Instant::now();
            // What backends are compared on (rank 0 holds the merged rows, as every rank does).
            self.first_logits = logits;
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
        let apb_on_ranks = prep.method == apb_plugin::Method::APB && prep.plan.world > 1;
        let mut g = Generation {
            method: prep.ran(),
            scorer: runner.scorer_of(prep),
            question_mask: apb_on_ranks.then_some(self.req.job.question_mask),
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
        };
        g.stats.generated_tokens = g.tokens.len();
        (self.req.tag, g)
    }
}
