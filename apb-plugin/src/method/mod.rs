//! Attention methods: how a prompt is run over `world` ranks. Each method owns, in its own file
//! and behind one trait ([`SeqMethod`]): its name, whether it needs the question, its plan, each
//! rank's tokens / positions / [`RankLayout`], its prefill attention and its attention work
//! (attended query–key pairs, for FLOP counts). Decode after prefill is common to all
//! sequence-parallel methods (`rank_backend.rs`: every rank attends its cache, outputs merged by
//! log-sum-exp); dense has its own backend in its file.
//!
//! Adding a method: a file here and a line in [`Method::ALL`].
//!
//! | method | exact | per rank |
//! |---|---|---|
//! | `dense` | yes | the whole prompt on one rank |
//! | `ring` | yes | contiguous block; all earlier blocks' K/V by one all-gather (last rank does 2H−1× the first's work) |
//! | `zigzag` | yes | chunks h and 2H−1−h; K/V passed around the ring; balanced causal work |
//! | `ulysses` | yes | all-to-all to H/world heads over the whole sequence and back; KV heads must divide by the ranks |
//! | `star` | no | anchor (first block) + local block |
//! | `apb` | no | anchor with the question + passing blocks chosen by a scorer + local block |
//! | `spava` | no | APB over 2H virtual hosts placed zigzag (chunks h and 2H−1−h): balanced |

mod apb;
mod dense;
mod rank_backend;
mod ring;
mod spava;
mod star;
mod ulysses;
mod zigzag;

use crate::comm::Communicator;
use crate::plan::Plan;
use crate::scorer::Scorer;
use crate::{AttentionBackend, AttnInput, Error, Result};
use candle_core::Tensor;
pub use dense::DenseBackend;
pub use rank_backend::{
    gather_merge, generated_kv_rank, merge_lse, new_kv_rows, nothing_attended, QuestionMask,
    RankBackend, RankLayout,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A request's prompt, split the way the methods need it: the context (prefilled across ranks),
/// the trailing query segment (run by every rank after prefill), and the clean question
/// (embedded in APB's anchors).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PromptParts {
    /// Chat-template prefix + document (may be empty: a one-token prompt is all query).
    pub context: Vec<u32>,
    /// Question + template suffix (assistant header): processed after prefill, at its true
    /// positions. Never empty.
    pub query_segment: Vec<u32>,
    /// The clean question tokens (no template), empty when unknown.
    pub question: Vec<u32>,
    /// Tokens of the chat-template prefix at the start of `context` (where the anchor embeds
    /// the question).
    pub prefix_len: usize,
}

impl PromptParts {
    /// The whole prompt, as the dense method runs it.
    pub fn all(&self) -> Vec<u32> {
        [self.context.as_slice(), self.query_segment.as_slice()].concat()
    }

    /// Prompt tokens in all.
    pub fn len(&self) -> usize {
        self.context.len() + self.query_segment.len()
    }

    /// Whether the prompt has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a plan is made from besides the prompt.
#[derive(Debug, Clone, Default)]
pub struct PlanArgs {
    /// Requested ranks (a short prompt may get fewer).
    pub world: usize,
    /// Anchor length override (APB, Star).
    pub anchor_len: Option<usize>,
    /// Passing length override (APB).
    pub passing_len: Option<usize>,
    /// The model's query heads.
    pub n_heads: usize,
    /// The model's KV heads (Ulysses splits them over ranks).
    pub n_kv_heads: usize,
    /// Fewest context tokens per rank ([`Method::plan`]): a prompt too short for `world` ranks
    /// at this many tokens each runs on fewer. 0 (the default): no such limit, a method splits
    /// as thin as its own layout allows (approximate methods lose accuracy on thin blocks).
    pub min_rank_tokens: usize,
}

/// One rank's prefill share.
#[derive(Debug, Clone, Default)]
pub struct RankInputs {
    /// Token ids the rank prefills.
    pub tokens: Vec<u32>,
    /// Their positions (for RoPE): not `0..n`, the rank holds parts of the prompt.
    pub positions: Vec<u32>,
    /// Where the rows come from.
    pub layout: RankLayout,
    /// Query tokens still to run after prefill, on every rank (0 for dense: it prefills them).
    pub query_left: usize,
}

/// What a rank's prefill attention works with besides the layer's q/k/v.
pub struct PrefillCtx<'a> {
    /// The rank's communicator.
    pub comm: &'a dyn Communicator,
    /// The rank's layout.
    pub layout: &'a RankLayout,
    /// The scorer APB selects passing K/V with.
    pub scorer: &'a Scorer,
}

/// One attention method (see the module docs). Implementations are unit structs in this folder.
pub trait SeqMethod: Send + Sync {
    /// The name `--attention` takes.
    fn name(&self) -> &'static str;
    /// Whether the result equals dense attention (up to rounding).
    fn exact(&self) -> bool;
    /// Whether the method needs the question separated from the document (APB and Star put it
    /// in their anchors).
    fn needs_question(&self) -> bool {
        false
    }
    /// Whether the method passes K/V that a scorer picks (APB, Spava): retaining heads and the
    /// question-mask switch apply to it.
    fn selects(&self) -> bool {
        false
    }
    /// Whether `QuestionMask::Causal` (thunlp/APB's bottom-right causal question segment on
    /// non-last ranks) means something here: APB only (a rank's cache is one contiguous block).
    fn has_reference_question_mask(&self) -> bool {
        false
    }
    /// The most ranks the method spreads a prompt over (None: any number; dense: one).
    fn max_world(&self) -> Option<usize> {
        None
    }
    /// The layout over ranks; prompts too short for `args.world` ranks get fewer, with a note.
    fn plan(&self, parts: &PromptParts, args: &PlanArgs) -> Result<Plan>;
    /// Rank `h`'s prefill tokens, positions and layout under `plan`.
    fn rank_inputs(
        &self,
        parts: &PromptParts,
        plan: &Plan,
        h: usize,
        scorer: &Scorer,
    ) -> RankInputs;
    /// The attention of one layer over this rank's prefill rows. The default: causal attention
    /// over the rows alone (dense's one rank, Star's `[anchor | local]`).
    fn prefill(&self, _r: &PrefillCtx<'_>, x: &AttnInput<'_>) -> Result<Tensor> {
        Ok(crate::profile::span(
            crate::profile::Bucket::Attention,
            x.q.device(),
            || crate::attention(x.q, x.k, x.v, crate::Mask::causal()),
        )?)
    }
    /// (query, key) pairs rank `h`'s prefill attends, summed over query heads and divided by
    /// their number (so FLOPs = 4·d·n_heads·pairs per layer, whatever the heads split).
    fn pairs(&self, plan: &Plan, layout: &RankLayout, h: usize) -> f64;
    /// The backend a rank runs for this method (dense overrides it: it caches everything).
    fn backend(
        &self,
        method: Method,
        comm: Arc<dyn Communicator>,
        layout: RankLayout,
        scorer: Scorer,
    ) -> Result<Box<dyn AttentionBackend>> {
        Ok(Box::new(RankBackend::new(method, comm, layout, scorer)?))
    }
}

/// A method by name: a small copyable handle (what jobs carry and serialize, as the name).
#[derive(Clone, Copy)]
pub struct Method(&'static dyn SeqMethod);

impl Method {
    /// Exact, one rank.
    pub const DENSE: Method = Method(&dense::Dense);
    /// Exact, contiguous blocks, all-gathered K/V.
    pub const RING: Method = Method(&ring::Ring);
    /// Exact, balanced: zigzag chunks, K/V passed around the ring.
    pub const ZIGZAG: Method = Method(&zigzag::Zigzag);
    /// Exact, balanced: all-to-all of heads.
    pub const ULYSSES: Method = Method(&ulysses::Ulysses);
    /// Star Attention (approximate).
    pub const STAR: Method = Method(&star::Star);
    /// APB (approximate).
    pub const APB: Method = Method(&apb::Apb);
    /// Spava: APB over 2H virtual hosts placed zigzag (approximate, balanced).
    pub const SPAVA: Method = Method(&spava::Spava);

    /// Every method, in the order help texts list them.
    pub const ALL: [Method; 7] = [
        Self::DENSE,
        Self::RING,
        Self::ZIGZAG,
        Self::ULYSSES,
        Self::STAR,
        Self::APB,
        Self::SPAVA,
    ];

    /// The names of [`Method::ALL`].
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|m| m.name()).collect()
    }

    /// The method of that name; the error lists the names.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| Error::UnknownMethod {
                name: name.to_string(),
                available: Self::names().join(", "),
            })
    }

    /// The method's name.
    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// Whether a scorer picks the K/V it passes ([`SeqMethod::selects`]).
    pub fn selects(self) -> bool {
        self.0.selects()
    }

    /// Whether `--apb-question-mask causal` applies ([`SeqMethod::has_reference_question_mask`]).
    pub fn has_reference_question_mask(self) -> bool {
        self.0.has_reference_question_mask()
    }

    /// The names of the methods that select (`apb, spava`), for messages.
    pub fn selecting_names() -> String {
        Self::ALL
            .iter()
            .filter(|m| m.selects())
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The ranks a job asking for `world` runs on ([`SeqMethod::max_world`]).
    pub fn ranks_for(self, world: usize) -> usize {
        self.0.max_world().map_or(world, |m| world.min(m))
    }

    /// Whether the method spreads a prompt over several ranks (all but dense).
    pub fn spans_ranks(self) -> bool {
        self.0.max_world() != Some(1)
    }

    /// Whether this is `dense` (one rank, no communication).
    pub fn is_dense(self) -> bool {
        self == Self::DENSE
    }

    /// The method's implementation (plan, rank inputs, attention, work).
    pub fn imp(self) -> &'static dyn SeqMethod {
        self.0
    }

    /// The method's plan after the rule every method shares: at most one rank per
    /// `args.min_rank_tokens` context tokens (a plan note says when it applied).
    pub fn plan(self, parts: &PromptParts, args: &PlanArgs) -> Result<crate::Plan> {
        let n = parts.context.len();
        let cap = match args.min_rank_tokens {
            0 => args.world,
            m => (n / m).max(1),
        };
        // Planned as asked first: a setting the method refuses (Ulysses' ranks must divide the
        // KV heads) is refused whatever the prompt's length.
        let full = self.0.plan(parts, args)?;
        if cap >= full.world {
            return Ok(full);
        }
        // The most ranks up to the cap that the method accepts (Ulysses: a divisor of the KV
        // heads).
        let mut world = cap;
        let mut plan = loop {
            let capped = PlanArgs {
                world,
                ..args.clone()
            };
            match self.0.plan(parts, &capped) {
                Ok(p) => break p,
                Err(_) if world > 1 => world -= 1,
                Err(e) => return Err(e),
            }
        };
        plan.notes.insert(
            0,
            format!(
                "{n} context tokens are fewer than {} per rank (--min-rank-tokens) on {} ranks; planned for {world}",
                args.min_rank_tokens, args.world
            ),
        );
        Ok(plan)
    }

    /// The backend rank `comm.rank()` runs.
    pub fn backend(
        self,
        comm: Arc<dyn Communicator>,
        layout: RankLayout,
        scorer: Scorer,
    ) -> Result<Box<dyn AttentionBackend>> {
        self.0.backend(self, comm, layout, scorer)
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Method {}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Method::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// Causal pairs of `n` rows over themselves.
pub(crate) fn tri(n: usize) -> f64 {
    n as f64 * (n as f64 + 1.0) / 2.0
}

/// Rank `h`'s contiguous block `plan.block(h)` of the context, padded with token 0 at position 0
/// to the block length (the plan pads the last block): ring's and Ulysses' inputs, and the tail of
/// Star's and APB's.
pub(crate) fn block_inputs(parts: &PromptParts, plan: &Plan, h: usize) -> RankInputs {
    let (start, end) = plan.block(h);
    let real_end = end.min(plan.n);
    let pad = end - real_end;
    let mut tokens = parts.context[start..real_end].to_vec();
    tokens.extend(std::iter::repeat_n(0u32, pad));
    let mut positions: Vec<u32> = (start as u32..real_end as u32).collect();
    positions.extend(std::iter::repeat_n(0u32, pad));
    RankInputs {
        tokens,
        positions,
        layout: RankLayout {
            local: end - start,
            pad,
            ..Default::default()
        },
        query_left: parts.query_segment.len(),
    }
}

/// APB's anchor of `l_a` tokens at positions `0..l_a`: `prefix ++ question ++ context[prefix ..
/// l_a − |question|]` (the document's start with the question embedded), or the context's first
/// `l_a` tokens without a question. Appended to `r`, whose `question_rows` it sets (APB, Spava).
pub(crate) fn push_anchor(r: &mut RankInputs, parts: &PromptParts, l_a: usize) {
    if l_a == 0 {
        return;
    }
    let ctx = &parts.context;
    if parts.question.is_empty() {
        r.tokens.extend(&ctx[..l_a]);
    } else {
        let (pre, q) = (parts.prefix_len, parts.question.len());
        r.tokens.extend(&ctx[..pre]);
        r.tokens.extend(&parts.question);
        r.tokens.extend(&ctx[pre..l_a - q]);
        r.layout.question_rows = pre..pre + q;
    }
    r.positions.extend(0..l_a as u32);
}

/// Zigzag chunks `h` and `2H−1−h` of length `c` appended to `r` (the last chunk padded with token 0
/// at position 0): zigzag's and Spava's local rows.
pub(crate) fn push_zigzag_chunks(r: &mut RankInputs, parts: &PromptParts, plan: &Plan, h: usize) {
    let c = plan.l_b / 2;
    for chunk in [h, 2 * plan.world - 1 - h] {
        let (start, end) = (chunk * c, ((chunk + 1) * c).min(plan.n));
        r.tokens.extend(&parts.context[start..end]);
        r.positions.extend(start as u32..end as u32);
        r.tokens
            .extend(std::iter::repeat_n(0u32, c - (end - start)));
        r.positions
            .extend(std::iter::repeat_n(0u32, c - (end - start)));
    }
}

/// The plan of a method with contiguous blocks and no anchor or passing (ring, Ulysses).
pub(crate) fn block_plan(parts: &PromptParts, world: usize) -> Result<Plan> {
    crate::plan::plan(&crate::plan::PlanRequest {
        n: parts.context.len(),
        world,
        ..Default::default()
    })
}

/// Partial attention results for one set of rows, merged by log-sum-exp at the end.
#[derive(Default)]
pub(super) struct Parts {
    outs: Vec<Tensor>,
    lses: Vec<Tensor>,
}

impl Parts {
    /// Adds one part (output in f32, LSE).
    pub(super) fn push(&mut self, out: Tensor, lse: Tensor) -> Result<()> {
        self.outs
            .push(out.to_dtype(candle_core::DType::F32)?.contiguous()?);
        self.lses.push(lse.contiguous()?);
        Ok(())
    }
    /// The parts merged (f32).
    pub(super) fn merge(&self) -> Result<Tensor> {
        merge_lse(&self.outs, &self.lses)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn min_rank_tokens_caps_the_ranks_of_every_method_and_says_so() {
        let p = PromptParts {
            context: (0..1000).collect(),
            query_segment: vec![1, 2],
            question: vec![1],
            prefix_len: 0,
        };
        for m in Method::ALL {
            let args = PlanArgs {
                world: 8,
                n_heads: 8,
                n_kv_heads: 8,
                min_rank_tokens: 300,
                ..Default::default()
            };
            let plan = m.plan(&p, &args).unwrap();
            assert!(plan.world <= 3, "{m}: {}", plan.world);
            // 0 is no limit: the method's own plan.
            let free = m
                .plan(
                    &p,
                    &PlanArgs {
                        min_rank_tokens: 0,
                        ..args.clone()
                    },
                )
                .unwrap();
            let own = m.imp().plan(&p, &args).unwrap();
            assert_eq!(free.world, own.world, "{m}");
            // The note says so where the limit, not the method's own layout, cut the ranks.
            if own.world > plan.world {
                assert!(
                    plan.notes[0].contains("--min-rank-tokens"),
                    "{m}: {:?}",
                    plan.notes
                );
            }
        }
    }
    use super::*;

    pub(super) fn parts(n: usize, question: usize) -> PromptParts {
        PromptParts {
            context: (1..=n as u32).collect(),
            query_segment: vec![7, 8, 9],
            question: (1000..1000 + question as u32).collect(),
            prefix_len: 2,
        }
    }

    /// Causal (query, key) pairs a rank's real rows attend, counted from its positions alone.
    pub(super) fn causal_pairs_from_positions(r: &RankInputs) -> f64 {
        let l = &r.layout;
        let real = l.anchor..l.anchor + l.local - l.pad;
        r.positions[real].iter().map(|&p| p as f64 + 1.0).sum()
    }

    #[test]
    fn names_parse_and_serialize() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.name()).unwrap(), m);
            let j = serde_json::to_string(&m).unwrap();
            assert_eq!(j, format!("\"{}\"", m.name()));
            assert_eq!(serde_json::from_str::<Method>(&j).unwrap(), m);
        }
        let e = Method::parse("zig-zag").unwrap_err().to_string();
        assert!(e.contains("zigzag") && e.contains("ulysses"), "{e}");
        assert!(serde_json::from_str::<Method>("\"nope\"").is_err());
    }

    #[test]
    fn every_method_covers_the_context_once() {
        // Each context position is some rank's real local row exactly once, in every method.
        for m in Method::ALL {
            for (n, world) in [(1000, 4), (997, 3), (64, 2), (5, 4)] {
                let p = parts(n, 3);
                let args = PlanArgs {
                    world,
                    n_heads: 6,
                    n_kv_heads: 3,
                    ..Default::default()
                };
                let world = if m == Method::ULYSSES { 3 } else { world };
                let plan = m.imp().plan(&p, &PlanArgs { world, ..args }).unwrap();
                let mut seen = vec![0usize; if m.is_dense() { p.len() } else { n }];
                for h in 0..plan.world {
                    let r = m.imp().rank_inputs(&p, &plan, h, &Scorer::QueryAware);
                    assert_eq!(r.tokens.len(), r.positions.len());
                    assert_eq!(r.tokens.len(), r.layout.rows(), "{m} h{h}");
                    let l = &r.layout;
                    for i in l.anchor..l.anchor + l.local - l.pad {
                        seen[r.positions[i] as usize] += 1;
                        let want = if m.is_dense() {
                            p.all()[r.positions[i] as usize]
                        } else {
                            p.context[r.positions[i] as usize]
                        };
                        assert_eq!(r.tokens[i], want, "{m} h{h} row {i}");
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{m} n{n} w{world}: {seen:?}");
            }
        }
    }
}
