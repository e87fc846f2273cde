//! The smallest use of the library: load the default model and generate greedily with `dense`.
//!
//! `cargo run --release -p apb-examples --example generate -- "Your prompt"`

use anyhow::Result;
use apb_host::{Engine, GenParams};
use apb_loaders::{load, registry::DEFAULT_MODEL, ModelSource};
use candle_core::{DType, Device};

fn main() -> Result<()> {
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "The capital of France is".to_string());
    let loaded = load(
        &ModelSource::parse(DEFAULT_MODEL, None)?,
        DType::F32,
        &Device::Cpu,
    )?;
    let engine = Engine::new(loaded, apb_plugin::backend_by_name("dense")?);
    let ids = engine.prompt_ids(&prompt, false)?;
    let params = GenParams {
        max_new_tokens: 16,
        ..Default::default()
    };
    let g = engine.generate(&ids, &params, &mut |piece| print!("{piece}"))?;
    println!(
        "\n[{} prompt tokens, prefill {:.1} ms, {:.1} tok/s]",
        g.stats.prompt_tokens, g.stats.prefill_ms, g.stats.decode_tokens_per_s
    );
    Ok(())
}
