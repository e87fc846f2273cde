//! The llama-family config: Llama-3.1 (llama3 RoPE scaling), Yi (plain RoPE), Qwen2 (QKV bias),
//! read from HF `config.json` or GGUF metadata into one struct.

use crate::error::{load_err, LoadError, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// Which family layout the weights follow.
pub enum Arch {
    /// `LlamaForCausalLM` (Llama-3.x, Yi) and GGUF `llama` (SmolLM2).
    Llama,
    /// `Qwen2ForCausalLM`: bias on the q/k/v projections.
    Qwen2,
}

/// Llama-3.1 `rope_scaling` with `rope_type = "llama3"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    /// How much the context was extended.
    pub factor: f64,
    /// Wavelengths above `original / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context the model was pre-trained at.
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
/// One llama-family model's shapes and settings.
pub struct Config {
    /// Weight layout.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama-3.1 RoPE scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops on any).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 writes `rope_theta` and the scaling together under this key.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

/// `eos_token_id` may be a number or a list.
pub(crate) fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl Config {
    /// Parses an HF `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| load_err!("config.json: {e}"))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "" => return Err(load_err!("config.json: no 'architectures' entry; expected LlamaForCausalLM or Qwen2ForCausalLM")),
            other => return Err(LoadError::UnsupportedArch { found: other.to_string() }),
        };
        let rope_params = raw
            .rope_scaling
            .clone()
            .filter(|v| !v.is_null())
            .or_else(|| raw.rope_parameters.clone());
        let rope_theta = raw.rope_theta.or_else(|| {
            raw.rope_parameters
                .as_ref()
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
        });
        let rope_scaling = match &rope_params {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                match kind {
                    "llama3" => Some(serde_json::from_value(v.clone()).map_err(|e| load_err!("config.json rope_scaling: {e}"))?),
                    "default" => None,
                    other => return Err(load_err!("config.json: rope_scaling type '{other}' is not supported (supported: llama3)")),
                }
            }
        };
        let n_kv = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let cfg = Config {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: n_kv,
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || raw.attention_bias.unwrap_or(false),
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the shapes fit together (query heads a multiple of KV heads, even head_dim, positive
    /// sizes); the error names the values.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.num_attention_heads == 0
            || c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            return Err(load_err!(
                "config: num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                c.num_attention_heads,
                c.num_key_value_heads
            ));
        }
        if !c.head_dim.is_multiple_of(2)
            || c.hidden_size == 0
            || c.num_hidden_layers == 0
            || c.vocab_size == 0
        {
            return Err(load_err!(
                "config: invalid shapes (hidden {}, head_dim {}, layers {})",
                c.hidden_size,
                c.head_dim,
                c.num_hidden_layers
            ));
        }
        Ok(())
    }

    /// RoPE inverse frequencies, with Llama-3.1 scaling applied when configured.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base.iter().map(|&x| x as f32).collect();
        };
        let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
        base.iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let out = if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                };
                out as f32
            })
            .collect()
    }
}
