//! Writes the default model's tokenizer (built from its GGUF metadata) as a `tokenizer.json`, so
//! a model directory of other weights can use a real 49K-token BPE (scripts/device-serve.sh
//! measures the server with it on random Llama-3.1-8B weights).
//!
//! `cargo run --release -p apb-examples --example export_tokenizer -- out/tokenizer.json`

use anyhow::{Context, Result};
use apb_loaders::{load, registry::DEFAULT_MODEL, ModelSource};
use candle_core::{DType, Device};

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .context("usage: export_tokenizer OUT/tokenizer.json")?;
    let loaded = load(
        &ModelSource::parse(DEFAULT_MODEL, None)?,
        DType::F32,
        &Device::Cpu,
    )?;
    loaded
        .tok
        .tokenizer
        .save(&out, false)
        .map_err(|e| anyhow::anyhow!("cannot write {out}: {e}"))?;
    println!("wrote {out}");
    Ok(())
}
