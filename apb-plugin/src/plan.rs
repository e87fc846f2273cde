//! How a context of `n` tokens is laid out over `H` ranks: block, anchor and passing lengths.
//!
//! Paper rule (apb.md §0.11, §13.10): `l_b = ceil(n/H)`, `l_a = l_b/4` (`l_b/8` beyond 256K),
//! `l_p = l_b/8`, rounded to the nearest multiple of 128 (kernel tiles), at least 128. Explicit
//! `--anchor-len` / `--passing-len` are taken as given (0 allowed). Inputs too short for `H`
//! ranks fall back to fewer ranks, down to 1 (plain dense), and the plan says why.

use crate::{Error, Result};

/// Token layout for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Ranks actually used.
    pub world: usize,
    /// Context tokens (excluding the trailing question segment).
    pub n: usize,
    /// Block per rank, after right-padding the context to `world · l_b`.
    pub l_b: usize,
    /// Anchor length (ranks > 0), question included.
    pub l_a: usize,
    /// Passing length per rank and KV head.
    pub l_p: usize,
    /// Human-readable notes on fallbacks and adjustments.
    pub notes: Vec<String>,
}

impl Plan {
    /// One rank holding the whole context (dense, or a fallback).
    pub fn one_rank(n: usize, notes: Vec<String>) -> Self {
        Plan {
            world: 1,
            n,
            l_b: n,
            l_a: 0,
            l_p: 0,
            notes,
        }
    }

    /// The one note of a fallback to `world` ranks (none when nothing misfit).
    pub fn fallback_note(misfit: Option<String>, world: usize) -> Vec<String> {
        misfit
            .map(|m| {
                format!(
                    "{m}; using {world} rank{}",
                    if world == 1 { "" } else { "s" }
                )
            })
            .into_iter()
            .collect()
    }

    /// Padding at the end of the last rank's block.
    pub fn pad(&self) -> usize {
        self.world * self.l_b - self.n
    }
    /// Context positions `[start, end)` of rank `h`'s block (end may exceed `n`: padding).
    pub fn block(&self, h: usize) -> (usize, usize) {
        (h * self.l_b, (h + 1) * self.l_b)
    }
}

const TILE: usize = 128;

/// Nearest multiple of 128, at least 128.
fn round_tile(x: usize) -> usize {
    ((x + TILE / 2) / TILE * TILE).max(TILE)
}

/// What the planner needs to know.
#[derive(Debug, Clone, Default)]
pub struct PlanRequest {
    /// Context tokens.
    pub n: usize,
    /// Requested ranks.
    pub world: usize,
    /// Anchor length override.
    pub anchor_len: Option<usize>,
    /// Passing length override.
    pub passing_len: Option<usize>,
    /// Tokens a non-empty anchor must hold: chat prefix + question (0 for Star/ring).
    pub anchor_min: usize,
    /// Whether the method uses an anchor at all (Star, APB).
    pub uses_anchor: bool,
    /// Whether the method passes blocks between ranks (APB).
    pub uses_passing: bool,
    /// Star Attention: the anchor is the whole first block unless overridden.
    pub anchor_is_first_block: bool,
}

/// Plans blocks, anchor and passing lengths (the paper's rule, or the overrides).
pub fn plan(req: &PlanRequest) -> Result<Plan> {
    if req.world == 0 {
        return Err(Error::Config("world size must be at least 1".into()));
    }
    if req.n == 0 {
        return Err(Error::Config("empty context".into()));
    }
    if let Some(a) = req.anchor_len {
        if req.uses_anchor && a > 0 && a < req.anchor_min {
            return Err(Error::Config(format!(
                "--anchor-len {a} cannot hold the chat prefix and question ({} tokens)",
                req.anchor_min
            )));
        }
    }
    // One note for the whole fallback, however many rank counts were tried.
    let mut first_misfit: Option<String> = None;
    let mut world = req.world;
    loop {
        let l_b = req.n.div_ceil(world);
        let auto_a = if req.n > 256 * 1024 { l_b / 8 } else { l_b / 4 };
        let default_a = if req.anchor_is_first_block {
            l_b
        } else {
            round_tile(auto_a)
        };
        let mut l_a = if !req.uses_anchor {
            0
        } else {
            req.anchor_len.unwrap_or(default_a)
        };
        if req.uses_anchor && req.anchor_len.is_none() && l_a < req.anchor_min {
            l_a = req.anchor_min.div_ceil(TILE) * TILE;
        }
        let l_p = if !req.uses_passing {
            0
        } else {
            req.passing_len.unwrap_or_else(|| round_tile(l_b / 8))
        };
        if world == 1 {
            return Ok(Plan::one_rank(req.n, Plan::fallback_note(first_misfit, 1)));
        }
        // Rank 0 selects among its tokens after the first l_a; the anchor is cut from the context.
        // Every rank must hold at least one real context token (no block of padding only).
        let fits = l_a <= req.n
            && (world - 1) * l_b < req.n
            && (!req.uses_passing || l_p <= l_b.saturating_sub(l_a))
            && (!req.uses_anchor || l_a == 0 || l_a >= req.anchor_min);
        if fits {
            return Ok(Plan {
                world,
                n: req.n,
                l_b,
                l_a,
                l_p,
                notes: Plan::fallback_note(first_misfit, world),
            });
        }
        first_misfit.get_or_insert_with(|| {
            format!(
                "{} context tokens are too few for {world} ranks (blocks of {l_b} must hold an anchor of {l_a} and leave room for {l_p} passing; a longer prompt, fewer ranks or shorter anchor/passing lengths fit)",
                req.n
            )
        });
        world -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(n: usize, world: usize) -> PlanRequest {
        PlanRequest {
            n,
            world,
            anchor_min: 40,
            uses_anchor: true,
            uses_passing: true,
            ..Default::default()
        }
    }

    #[test]
    fn paper_numbers() {
        // 8 ranks at 128K: 4096 / 2048 as in the paper; 512K: l_a = l_b/8.
        let p = plan(&req(128 * 1024, 8)).unwrap();
        assert_eq!((p.l_b, p.l_a, p.l_p), (16384, 4096, 2048));
        let p = plan(&req(512 * 1024, 8)).unwrap();
        assert_eq!((p.l_b, p.l_a, p.l_p), (65536, 8192, 8192));
        let p = plan(&req(6000, 4)).unwrap();
        assert_eq!(
            (p.world, p.l_b, p.l_a, p.l_p, p.pad()),
            (4, 1500, 384, 128, 0)
        );
    }

    #[test]
    fn short_inputs_fall_back() {
        let p = plan(&req(300, 4)).unwrap();
        assert!(p.world < 4 && !p.notes.is_empty(), "{p:?}");
        let p = plan(&req(100, 4)).unwrap();
        assert_eq!(p.world, 1);
    }

    #[test]
    fn no_rank_gets_only_padding_and_one_note() {
        // Ring (no anchor, no passing) at many ranks on a short context: every block must start
        // inside the context, and the fallback is one note, not one per rank count tried.
        for (n, world) in [(10, 8), (61, 1000), (5000, 1000)] {
            let r = PlanRequest {
                n,
                world,
                ..Default::default()
            };
            let p = plan(&r).unwrap();
            assert!((p.world - 1) * p.l_b < n, "{p:?}");
            assert!(p.notes.len() <= 1, "{:?}", p.notes);
            if p.world < world {
                assert!(
                    p.notes[0].contains(&format!("using {}", p.world)),
                    "{:?}",
                    p.notes
                );
            }
        }
    }

    #[test]
    fn overrides_are_exact() {
        let r = PlanRequest {
            n: 1000,
            world: 3,
            anchor_len: Some(0),
            passing_len: Some(334),
            uses_anchor: true,
            uses_passing: true,
            ..Default::default()
        };
        let p = plan(&r).unwrap();
        assert_eq!((p.world, p.l_b, p.l_a, p.l_p, p.pad()), (3, 334, 0, 334, 2));
    }
}
