//! Model shapes without the weights, for benchmarks: named presets of real configs and random
//! weights of exactly those shapes (N(0, 0.02) matrices, unit norms), made on the target device.

use crate::config::Config;
use crate::llama::Model;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// `config.json` of the benchmark presets (values from the models' Hub configs).
pub const PRESETS: [(&str, &str); 3] = [
    (
        "llama-3.1-8b",
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
        "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,
        "rms_norm_eps":1e-5,"rope_theta":500000.0,"max_position_embeddings":131072,
        "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"},"tie_word_embeddings":false}"#,
    ),
    (
        "qwen-2.5-14b",
        r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":5120,"intermediate_size":13824,
        "num_hidden_layers":48,"num_attention_heads":40,"num_key_value_heads":8,"vocab_size":152064,
        "rms_norm_eps":1e-6,"rope_theta":1000000.0,"max_position_embeddings":131072,
        "tie_word_embeddings":false}"#,
    ),
    (
        "yi-34b",
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":7168,"intermediate_size":20480,
        "num_hidden_layers":60,"num_attention_heads":56,"num_key_value_heads":8,"vocab_size":64000,
        "rms_norm_eps":1e-5,"rope_theta":5000000.0,"max_position_embeddings":200000,
        "tie_word_embeddings":false}"#,
    ),
];

/// A preset name or a path to a `config.json`.
pub fn config_by_name(spec: &str) -> crate::Result<Config> {
    if let Some((_, json)) = PRESETS.iter().find(|(n, _)| *n == spec) {
        return Config::from_json(json);
    }
    let text = std::fs::read_to_string(spec).map_err(|e| {
        crate::LoadError::Msg(format!(
            "'{spec}' is neither a preset ({}) nor a readable config.json: {e}",
            PRESETS.map(|p| p.0).join(", ")
        ))
    })?;
    Config::from_json(&text)
}

struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if name.ends_with("norm.weight") {
            return Tensor::ones(s, dtype, dev);
        }
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights have no shape for {name}")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The model of `cfg` with random weights of its exact shapes.
pub fn random_model(cfg: &Config, dtype: DType, device: &Device) -> crate::Result<Model> {
    cfg.validate()?;
    let vb = candle_nn::VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    Ok(Model::load(vb, cfg)?)
}
