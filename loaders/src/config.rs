//! The llama-family config: Llama-3.1 (llama3 RoPE scaling), Yi (plain RoPE), Qwen2 (QKV bias,
//! YaRN for 128K), read from HF `config.json` or GGUF metadata into one struct.

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

/// YaRN RoPE scaling (`rope_type = "yarn"`), as transformers computes it: Qwen-2.5 reaches 128K
/// with `{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct YarnRopeScaling {
    /// How much the context is extended.
    pub factor: f64,
    /// The context the model was pre-trained at (default: the config's
    /// `max_position_embeddings`).
    pub original_max_position_embeddings: Option<usize>,
    /// Rotations above which a dimension is extrapolated (kept); default 32.
    pub beta_fast: Option<f64>,
    /// Rotations below which a dimension is interpolated (divided by `factor`); default 1.
    pub beta_slow: Option<f64>,
    /// Scale on cos/sin; default from `mscale`/`mscale_all_dim`, else `0.1 ln(factor) + 1`.
    pub attention_factor: Option<f64>,
    /// DeepSeek-style numerator of the attention factor.
    pub mscale: Option<f64>,
    /// DeepSeek-style denominator of the attention factor.
    pub mscale_all_dim: Option<f64>,
    /// Round the ramp's ends to whole dimensions (default true).
    pub truncate: Option<bool>,
}

/// RoPE scaling from `rope_scaling` (or transformers 5's `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama-3.1's frequency-band scaling.
    Llama3(Llama3RopeScaling),
    /// YaRN (Qwen-2.5 past 32K).
    Yarn(YarnRopeScaling),
    /// Per-dimension divisors of the inverse frequencies: llama.cpp's form of Llama-3.1's
    /// scaling (a GGUF's `rope_freqs` tensor).
    FreqFactors(Vec<f64>),
}

impl RopeScaling {
    /// Parses a `rope_scaling` object: `None` for absent, `null` or `"default"`; unknown types
    /// are refused by name.
    pub fn from_json(v: &serde_json::Value) -> Result<Option<Self>> {
        if v.is_null() {
            return Ok(None);
        }
        if !v.is_object() {
            return Err(load_err!(
                "RoPE scaling must be a JSON object such as {{\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}}, got {v}"
            ));
        }
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("");
        let bad = |e: serde_json::Error| load_err!("RoPE scaling ({kind}): {e}");
        let scaling = match kind {
            "llama3" => Self::Llama3(serde_json::from_value(v.clone()).map_err(bad)?),
            "yarn" => Self::Yarn(serde_json::from_value(v.clone()).map_err(bad)?),
            "default" => return Ok(None),
            "" => {
                return Err(load_err!(
                "RoPE scaling has no \"rope_type\" (or \"type\"); supported: yarn, llama3, default"
            ))
            }
            other => {
                return Err(load_err!(
                "RoPE scaling type '{other}' is not supported (supported: yarn, llama3, default)"
            ))
            }
        };
        scaling
            .check()
            .map_err(|why| load_err!("RoPE scaling ({kind}): {why}"))?;
        Ok(Some(scaling))
    }

    /// A `--rope-scaling` value: JSON as in a config's `rope_scaling`, or `null` for none. Callers
    /// can check it before loading anything (the server does, before it binds its port).
    pub fn parse_override(json: &str) -> Result<Option<Self>> {
        if json.trim().is_empty() {
            return Err(load_err!(
                "--rope-scaling is empty: give a JSON object such as {{\"rope_type\":\"yarn\",\"factor\":4.0,\"original_max_position_embeddings\":32768}}, or null for no scaling"
            ));
        }
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| load_err!("--rope-scaling: not JSON ({e}): {json}"))?;
        Self::from_json(&v).map_err(|e| load_err!("--rope-scaling: {e}"))
    }

    /// Values that would give NaN or meaningless frequencies are refused, naming the field.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let positive = |name: &str, x: f64| {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a positive number, got {x:?}"))
            }
        };
        let (factor, original) = match self {
            Self::Llama3(l) => {
                positive("low_freq_factor", l.low_freq_factor)?;
                positive("high_freq_factor", l.high_freq_factor)?;
                if l.high_freq_factor <= l.low_freq_factor {
                    return Err("high_freq_factor must exceed low_freq_factor".into());
                }
                (l.factor, Some(l.original_max_position_embeddings))
            }
            Self::Yarn(y) => {
                let (fast, slow) = (y.beta_fast.unwrap_or(32.0), y.beta_slow.unwrap_or(1.0));
                positive("beta_fast", fast)?;
                positive("beta_slow", slow)?;
                if fast <= slow {
                    return Err(format!(
                        "beta_fast ({fast:?}) must exceed beta_slow ({slow:?})"
                    ));
                }
                if let Some(a) = y.attention_factor {
                    positive("attention_factor", a)?;
                }
                // 0 is allowed: transformers then falls back to the default attention factor.
                for (name, x) in [("mscale", y.mscale), ("mscale_all_dim", y.mscale_all_dim)] {
                    if x.is_some_and(|x| !(x.is_finite() && x >= 0.0)) {
                        return Err(format!("{name} must be a number ≥ 0"));
                    }
                }
                (y.factor, y.original_max_position_embeddings)
            }
            Self::FreqFactors(f) => {
                if let Some(x) = f.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                    return Err(format!("rope_freqs must be positive numbers, found {x}"));
                }
                (1.0, None)
            }
        };
        // 1024× is far past any published extension (Qwen-2.5: 4, Llama-3.1: 8); larger factors are
        // typos that would overflow the context.
        if !(factor.is_finite() && (1.0..=1024.0).contains(&factor)) {
            return Err(format!("factor must be in [1, 1024], got {factor:?}"));
        }
        if original == Some(0) {
            return Err("original_max_position_embeddings must be at least 1".into());
        }
        Ok(())
    }
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
    /// RoPE scaling (Llama-3.1's or YaRN), if any.
    pub rope_scaling: Option<RopeScaling>,
    /// `max_position_embeddings` as the config says it; [`Config::context_len`] is the limit.
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
            None => None,
            Some(v) => RopeScaling::from_json(v).map_err(|e| load_err!("config.json: {e}"))?,
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

    /// Longest context (prompt and generated tokens) the model runs: `max_position_embeddings`,
    /// or with YaRN `original_max_position_embeddings × factor`, as vLLM derives it.
    pub fn context_len(&self) -> usize {
        match &self.rope_scaling {
            Some(RopeScaling::Yarn(y)) => (self.yarn_original(y) as f64 * y.factor) as usize,
            _ => self.max_position_embeddings,
        }
    }

    /// Replaces the RoPE scaling (`--rope-scaling JSON`, as vLLM's flag): `null` or
    /// `{"rope_type": "default"}` turns it off.
    pub fn override_rope_scaling(&mut self, json: &str) -> Result<()> {
        self.rope_scaling = RopeScaling::parse_override(json)?;
        Ok(())
    }

    fn yarn_original(&self, y: &YarnRopeScaling) -> usize {
        y.original_max_position_embeddings
            .unwrap_or(self.max_position_embeddings)
    }

    /// The scale on cos/sin (YaRN's attention factor; 1 otherwise).
    pub fn rope_attention_factor(&self) -> f64 {
        let Some(RopeScaling::Yarn(y)) = &self.rope_scaling else {
            return 1.0;
        };
        let mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        match (y.attention_factor, y.mscale, y.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                mscale(y.factor, m) / mscale(y.factor, all)
            }
            _ => mscale(y.factor, 1.0),
        }
    }

    /// RoPE inverse frequencies, with Llama-3.1 or YaRN scaling applied when configured.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        let s = match &self.rope_scaling {
            None => return base.iter().map(|&x| x as f32).collect(),
            Some(RopeScaling::Yarn(y)) => return self.yarn_inv_freq(y, &base),
            Some(RopeScaling::FreqFactors(f)) => {
                return base.iter().zip(f).map(|(b, f)| (b / f) as f32).collect()
            }
            Some(RopeScaling::Llama3(l)) => l,
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

    /// YaRN (transformers' `_compute_yarn_parameters`): dimensions that turn more than
    /// `beta_fast` times over the original context keep their frequency, those under
    /// `beta_slow` are divided by `factor`, a linear ramp in between.
    fn yarn_inv_freq(&self, y: &YarnRopeScaling, base: &[f64]) -> Vec<f32> {
        let dim = self.head_dim as f64;
        let original = self.yarn_original(y) as f64;
        let ln_base = self.rope_theta.ln();
        let correction_dim = |rotations: f64| {
            dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * ln_base)
        };
        let (mut low, mut high) = (
            correction_dim(y.beta_fast.unwrap_or(32.0)),
            correction_dim(y.beta_slow.unwrap_or(1.0)),
        );
        if y.truncate.unwrap_or(true) {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001; // as transformers: no division by zero
        }
        base.iter()
            .enumerate()
            .map(|(i, &extrapolation)| {
                let interpolation = extrapolation / y.factor;
                let keep = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                (interpolation * (1.0 - keep) + extrapolation * keep) as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-7B-Instruct's config.json, shortened to what the loader reads.
    const QWEN25: &str = r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":152064,
        "hidden_size":3584,"intermediate_size":18944,"num_hidden_layers":28,
        "num_attention_heads":28,"num_key_value_heads":4,"rms_norm_eps":1e-6,
        "rope_theta":1000000.0,"max_position_embeddings":32768,"tie_word_embeddings":false}"#;
    const CARD_YARN: &str =
        r#"{"type":"yarn","factor":4.0,"original_max_position_embeddings":32768}"#;

    #[test]
    fn the_model_card_yarn_override_reaches_128k() {
        let mut c = Config::from_json(QWEN25).unwrap();
        assert_eq!((c.context_len(), c.rope_scaling.clone()), (32768, None));
        let plain = c.rope_inv_freq();
        c.override_rope_scaling(CARD_YARN).unwrap();
        let Some(RopeScaling::Yarn(y)) = &c.rope_scaling else {
            panic!("{:?}", c.rope_scaling)
        };
        assert_eq!(
            (y.factor, y.original_max_position_embeddings),
            (4.0, Some(32768))
        );
        assert_eq!(c.context_len(), 131072);
        // 0.1 ln 4 + 1, transformers' default attention factor.
        assert!((c.rope_attention_factor() - 1.138_629_436).abs() < 1e-9);
        // High frequencies kept, low ones divided by the factor.
        let yarn = c.rope_inv_freq();
        assert_eq!(yarn[0], plain[0]);
        let last = plain.len() - 1;
        assert!((yarn[last] * 4.0 / plain[last] - 1.0).abs() < 1e-6);
        // And off again.
        c.override_rope_scaling("null").unwrap();
        assert_eq!((c.context_len(), c.rope_scaling.clone()), (32768, None));
        c.override_rope_scaling(r#"{"rope_type":"default"}"#)
            .unwrap();
        assert_eq!(c.rope_scaling, None);
    }

    #[test]
    fn yarn_in_the_config_file_and_bad_scaling_refused_by_name() {
        let with = |scaling: &str| {
            QWEN25.replace(
                "\"tie_word",
                &format!("\"rope_scaling\":{scaling},\"tie_word"),
            )
        };
        let c = Config::from_json(&with(CARD_YARN)).unwrap();
        assert_eq!(c.context_len(), 131072);
        let err = |r: Result<Config>| r.unwrap_err().to_string();
        let e = err(Config::from_json(&with(
            r#"{"type":"dynamic","factor":2.0}"#,
        )));
        assert!(
            e.contains("'dynamic' is not supported") && e.contains("yarn"),
            "{e}"
        );
        let mut c = Config::from_json(QWEN25).unwrap();
        for (bad, says) in [
            ("{yarn", "not JSON"),
            ("4", "must be a JSON object"),
            (r#"{"factor":4.0}"#, "no \"rope_type\""),
            (r#"{"type":"yarn"}"#, "missing field `factor`"),
            (r#"{"type":"yarn","factor":"4"}"#, "invalid type"),
            (
                r#"{"type":"yarn","factor":0.5}"#,
                "factor must be in [1, 1024]",
            ),
            (r#"{"type":"yarn","factor":1e300}"#, "[1, 1024], got 1e300"),
            ("", "--rope-scaling is empty"),
            (
                r#"{"type":"yarn","factor":4,"beta_fast":0}"#,
                "beta_fast must be a positive",
            ),
            (
                r#"{"type":"yarn","factor":4,"beta_fast":1,"beta_slow":2}"#,
                "must exceed beta_slow",
            ),
            (
                r#"{"type":"yarn","factor":4,"attention_factor":-1}"#,
                "attention_factor must be",
            ),
            (
                r#"{"type":"yarn","factor":4,"original_max_position_embeddings":0}"#,
                "at least 1",
            ),
            (
                r#"{"rope_type":"llama3","factor":8,"low_freq_factor":4,"high_freq_factor":1,"original_max_position_embeddings":8192}"#,
                "must exceed low_freq_factor",
            ),
            (
                r#"{"type":"longrope","factor":4.0}"#,
                "'longrope' is not supported",
            ),
        ] {
            let e = c.override_rope_scaling(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("--rope-scaling") && e.contains(says),
                "{bad}: {e}"
            );
            assert_eq!(c.rope_scaling, None, "a refused override changes nothing");
        }
    }
}
