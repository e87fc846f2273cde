//! The smallest use of the library: load the default model and generate greedily with `dense`
//! (one rank of the one rank program).
//!
//! `cargo run --release -p apb-examples --example generate -- "Your prompt"`

use anyhow::Result;
use apb_host::ranks::Group;
use apb_host::Method;
use apb_host::{prompt, GenParams, Job, JobSettings, Runner};
use apb_loaders::{load, registry::DEFAULT_MODEL, ModelSource};
use apb_plugin::Scorer;
use candle_core::{DType, Device};

fn main() -> Result<()> {
    let text = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "The capital of France is".to_string());
    let loaded = load(
        &ModelSource::parse(DEFAULT_MODEL, None)?,
        DType::F32,
        &Device::Cpu,
    )?;
    let group = Group::threads(Runner::new(loaded, Scorer::QueryAware), 1)?;
    let job = Job {
        settings: JobSettings::new(Method::DENSE, 1),
        prompt: prompt::build(group.runner().tok(), &text, None, false, false)?,
        params: GenParams {
            max_new_tokens: 16,
            ..Default::default()
        },
    };
    let never = Default::default();
    let g = group.run(&job, &never, &mut |piece| print!("{piece}"))?;
    println!(
        "\n[{} prompt tokens, prefill {:.1} ms, {:.1} tok/s]",
        g.stats.prompt_tokens, g.stats.prefill_ms, g.stats.decode_tokens_per_s
    );
    group.shutdown()?;
    Ok(())
}
