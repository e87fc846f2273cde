//! APB over CPU ranks through the library: split a long prompt across 4 ranks (threads sharing
//! the weights), embed the question in every anchor, pass compressed KV between ranks.
//!
//! `cargo run --release -p apb-examples --example apb_ranks`

use anyhow::Result;
use apb_host::ranks::Group;
use apb_host::Method;
use apb_host::{prompt, GenParams, Job, JobSettings, Runner};
use apb_loaders::{load, registry::DEFAULT_MODEL, ModelSource};
use apb_plugin::Scorer;
use candle_core::{DType, Device};

fn main() -> Result<()> {
    let m = load(
        &ModelSource::parse(DEFAULT_MODEL, None)?,
        DType::F32,
        &Device::Cpu,
    )?;
    let filler = "The river runs past the old mill and into the valley. ".repeat(300);
    let doc = format!("{filler}The special magic number is 73914. {filler}");
    // Four rank threads sharing one copy of the weights.
    let group = Group::threads(Runner::new(m, Scorer::QueryAware), 4)?;
    let parts = prompt::build(
        group.runner().tok(),
        &doc,
        Some("What is the special magic number?"),
        true,
        false,
    )?;
    let context = parts.context.len();
    let job = Job {
        settings: JobSettings::new(Method::APB, 4),
        prompt: parts,
        params: GenParams {
            max_new_tokens: 12,
            ..Default::default()
        },
    };
    let never = Default::default();
    let g = group.run(&job, &never, &mut |piece| print!("{piece}"))?;
    println!(
        "\n[{context} context tokens on {} ranks: block {}, anchor {}, passing {}; per-rank prefill rows {:?}; first token after {:.0} ms]",
        g.plan.world, g.plan.l_b, g.plan.l_a, g.plan.l_p, g.rank_prefill_tokens, g.stats.prefill_ms
    );
    group.shutdown()?;
    Ok(())
}
