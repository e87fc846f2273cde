//! How a request is laid out over ranks: the method, the plan (block, anchor and passing
//! lengths), and each rank's prefill tokens, positions and [`RankLayout`].

use crate::prompt::PromptParts;
use anyhow::{bail, Result};
use apb_plugin::{plan, Kind, Plan, PlanRequest, RankLayout, Scorer};
use serde::{Deserialize, Serialize};

/// The attention method of a request: `dense` on one rank, or a sequence-parallel [`Kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Dense,
    Ring,
    Star,
    Apb,
}

impl Method {
    pub const NAMES: [&'static str; 4] = ["dense", "ring", "star", "apb"];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "dense" => Method::Dense,
            "ring" => Method::Ring,
            "star" => Method::Star,
            "apb" => Method::Apb,
            other => bail!(
                "unknown attention backend '{other}' (available: {})",
                Self::NAMES.join(", ")
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Dense => "dense",
            Method::Ring => "ring",
            Method::Star => "star",
            Method::Apb => "apb",
        }
    }

    /// The sequence-parallel backend kind (None: dense).
    pub fn kind(self) -> Option<Kind> {
        match self {
            Method::Dense => None,
            Method::Ring => Some(Kind::Ring),
            Method::Star => Some(Kind::Star),
            Method::Apb => Some(Kind::Apb),
        }
    }

    /// APB and Star embed or need the question in their anchors.
    pub fn needs_question(self) -> bool {
        matches!(self, Method::Star | Method::Apb)
    }
}

/// The layout part of a sequence-parallel request.
#[derive(Debug, Clone)]
pub struct DistConfig {
    pub kind: Kind,
    pub world: usize,
    pub anchor_len: Option<usize>,
    pub passing_len: Option<usize>,
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
