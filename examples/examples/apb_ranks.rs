//! APB over CPU ranks through the library: split a long prompt across 4 ranks (threads sharing
//! the weights), embed the question in every anchor, pass compressed KV between ranks.
//!
//! `cargo run --release -p apb-examples --example apb_ranks`

use anyhow::Result;
use apb_host::dist::{self, DistConfig};
use apb_host::{prompt, GenParams};
use apb_loaders::{load, registry::DEFAULT_MODEL, ModelSource};
use apb_plugin::{Kind, Scorer};
use candle_core::{DType, Device};

fn main() -> Result<()> {
    let m = load(
        &ModelSource::parse(DEFAULT_MODEL, None)?,
        DType::F32,
        &Device::Cpu,
    )?;
    let filler = "The river runs past the old mill and into the valley. ".repeat(300);
    let doc = format!("{filler}The special magic number is 73914. {filler}");
    let parts = prompt::build(
        &m.tok,
        &doc,
        Some("What is the special magic number?"),
        true,
    )?;
    let cfg = DistConfig {
        kind: Kind::Apb,
        world: 4,
        anchor_len: None,
        passing_len: None,
        scorer: Scorer::QueryAware,
    };
    let params = GenParams {
        max_new_tokens: 12,
        ..Default::default()
    };
    let d = dist::generate(&m.model, &m.tok, &parts, &cfg, &params, &mut |piece| {
        print!("{piece}")
    })?;
    println!(
        "\n[{} context tokens on {} ranks: block {}, anchor {}, passing {}; per-rank prefill rows {:?}; first token after {:.0} ms]",
        parts.context.len(),
        d.plan.world,
        d.plan.l_b,
        d.plan.l_a,
        d.plan.l_p,
        d.rank_prefill_tokens,
        d.generation.stats.prefill_ms
    );
    Ok(())
}
