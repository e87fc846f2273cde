//! GGUF (`llama` architecture) → the same config, HF-named weights and tokenizer as a
//! safetensors checkpoint, so the model file has one code path.
//!
//! Two conversions matter: quantized tensors are dequantized to the run dtype, and the q/k
//! projection rows, which llama.cpp permutes for its interleaved RoPE, are permuted back to the
//! HF half-rotation layout our RoPE uses.

use crate::config::{Arch, Config, RopeScaling};
use crate::error::{load_err, LoadError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// An open GGUF file: its metadata and tensor index.
pub struct GgufModel {
    /// Metadata and tensor infos.
    pub content: Content,
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl GgufModel {
    /// Reads the header of `path` (tensors are read when the model loads).
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| LoadError::file(path, e))?;
        let content = Content::read(&mut file)
            .map_err(|e| LoadError::file(path, format!("not a readable GGUF file ({e})")))?;
        Ok(Self {
            content,
            file,
            path: path.to_path_buf(),
        })
    }

    fn md(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn md_u32(&self, key: &str) -> Result<u32> {
        let v = self
            .md(key)
            .ok_or_else(|| LoadError::file(&self.path, format!("GGUF metadata '{key}' missing")))?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .map_err(|e| LoadError::file(&self.path, format!("GGUF '{key}': {e}")))
    }

    fn md_f32(&self, key: &str) -> Option<f32> {
        self.md(key).and_then(|v| v.to_f32().ok())
    }

    /// A string metadata value.
    pub fn md_str(&self, key: &str) -> Option<&str> {
        self.md(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    /// String array metadata (tokens, merges).
    pub fn md_strings(&self, key: &str) -> Result<Vec<String>> {
        let v = self
            .md(key)
            .ok_or_else(|| LoadError::file(&self.path, format!("GGUF metadata '{key}' missing")))?;
        let arr = v
            .to_vec()
            .map_err(|e| LoadError::file(&self.path, format!("GGUF '{key}': {e}")))?;
        arr.iter()
            .map(|x| {
                x.to_string()
                    .cloned()
                    .map_err(|e| LoadError::file(&self.path, format!("GGUF '{key}': {e}")))
            })
            .collect()
    }

    /// An integer-array metadata value (empty if absent).
    pub fn md_i32s(&self, key: &str) -> Vec<i32> {
        self.md(key)
            .and_then(|v| v.to_vec().ok())
            .map(|a| a.iter().filter_map(|x| x.to_i32().ok()).collect())
            .unwrap_or_default()
    }

    /// A token id metadata value.
    pub fn md_token_id(&self, key: &str) -> Option<u32> {
        self.md_u32(key).ok()
    }

    /// The model config from the `llama.*` metadata (and the `rope_freqs` tensor, if any).
    pub fn config(&mut self) -> Result<Config> {
        let arch = self.md_str("general.architecture").unwrap_or("");
        if arch != "llama" {
            return Err(LoadError::UnsupportedArch {
                found: format!("GGUF '{arch}'"),
            });
        }
        let n_h = self.md_u32("llama.attention.head_count")? as usize;
        let hidden = self.md_u32("llama.embedding_length")? as usize;
        let vocab = match self.md_u32("llama.vocab_size") {
            Ok(v) => v as usize,
            Err(_) => self.md_strings("tokenizer.ggml.tokens")?.len(),
        };
        let has_output = self.content.tensor_infos.contains_key("output.weight");
        let cfg = Config {
            arch: Arch::Llama,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.md_u32("llama.feed_forward_length")? as usize,
            num_hidden_layers: self.md_u32("llama.block_count")? as usize,
            num_attention_heads: n_h,
            num_key_value_heads: self
                .md_u32("llama.attention.head_count_kv")
                .map(|x| x as usize)
                .unwrap_or(n_h),
            head_dim: self
                .md_u32("llama.rope.dimension_count")
                .map(|x| x as usize)
                .unwrap_or(hidden / n_h.max(1)),
            rms_norm_eps: self
                .md_f32("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5) as f64,
            rope_theta: self.md_f32("llama.rope.freq_base").unwrap_or(10_000.0) as f64,
            rope_scaling: self.rope_scaling(hidden / n_h.max(1))?,
            max_position_embeddings: self
                .md_u32("llama.context_length")
                .map(|x| x as usize)
                .unwrap_or(4096),
            tie_word_embeddings: !has_output,
            qkv_bias: false,
            bos_token_id: self.md_token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: self
                .md_token_id("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// RoPE scaling as llama.cpp stores it: Llama-3.1's as a `rope_freqs` tensor of per-dimension
    /// divisors, YaRN as `llama.rope.scaling.*` metadata. Other types are refused by name
    /// (`--rope-scaling` can replace them).
    fn rope_scaling(&mut self, head_dim: usize) -> Result<Option<RopeScaling>> {
        let head_dim = self
            .md_u32("llama.rope.dimension_count")
            .map(|x| x as usize)
            .unwrap_or(head_dim);
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let t = self
                .content
                .tensor(&mut self.file, "rope_freqs.weight", &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>())
                .map_err(|e| LoadError::file(&self.path, format!("tensor 'rope_freqs': {e}")))?;
            if t.len() != head_dim / 2 {
                return Err(LoadError::file(
                    &self.path,
                    format!(
                        "rope_freqs has {} values, the head dimension {head_dim} needs {}",
                        t.len(),
                        head_dim / 2
                    ),
                ));
            }
            let s = RopeScaling::FreqFactors(t);
            s.check().map_err(|e| LoadError::file(&self.path, e))?;
            return Ok(Some(s));
        }
        gguf_rope_scaling(
            self.md_str("llama.rope.scaling.type"),
            self.md_f32("llama.rope.scaling.factor"),
            self.md_u32("llama.rope.scaling.original_context_length")
                .ok(),
        )
        .map_err(|e| LoadError::file(&self.path, e))
    }

    /// All tensors, dequantized to `dtype`, under HF names.
    pub fn tensors(
        &mut self,
        cfg: &Config,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        let mut out = HashMap::new();
        for name in names {
            let Some(hf) = hf_name(&name) else { continue };
            let q = self
                .content
                .tensor(&mut self.file, &name, &Device::Cpu)
                .map_err(|e| LoadError::file(&self.path, format!("tensor '{name}': {e}")))?;
            let mut t = q.dequantize(&Device::Cpu)?;
            if hf.ends_with("q_proj.weight") {
                t = unpermute_rope_rows(&t, cfg.num_attention_heads)?;
            } else if hf.ends_with("k_proj.weight") {
                t = unpermute_rope_rows(&t, cfg.num_key_value_heads)?;
            }
            out.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
        }
        if !out.contains_key("model.embed_tokens.weight") {
            return Err(load_err!(
                "{}: GGUF has no token_embd.weight",
                self.path.display()
            ));
        }
        Ok(out)
    }
}

/// llama.cpp's `llama.rope.scaling.*` metadata as our RoPE scaling: `yarn` (factor, original
/// context), `none` or absent; other types (linear, longrope) refused by name.
fn gguf_rope_scaling(
    kind: Option<&str>,
    factor: Option<f32>,
    original: Option<u32>,
) -> Result<Option<RopeScaling>> {
    match kind {
        None | Some("none") => Ok(None),
        Some("yarn") => RopeScaling::from_json(&serde_json::json!({
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
        })),
        Some(other) => Err(load_err!(
            "GGUF rope scaling type '{other}' is not supported (supported: yarn; --rope-scaling replaces it)"
        )),
    }
}

/// GGUF tensor name → HF name (`None` for tensors the model does not use, e.g. `rope_freqs`).
fn hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (i, tail) = rest.split_once('.')?;
    let hf = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{i}.{hf}"))
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows `(head, d/2, 2)` → `(head, 2, d/2)`.
fn unpermute_rope_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((n_head, rows / n_head / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, d, cols) = (3, 8, 5);
        let w = Tensor::arange(0f32, (n_head * d * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n_head * d, cols))
            .unwrap();
        let permuted = w
            .reshape((n_head, 2, d / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((n_head * d, cols))
            .unwrap();
        let back = unpermute_rope_rows(&permuted, n_head).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert_ne!(
            permuted.to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
    }

    /// A GGUF of llama metadata and the given extra entries, no weights but `extra_tensors`.
    fn tiny_gguf(
        extra: &[(&str, Value)],
        extra_tensors: &[(&str, Tensor)],
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let mut md: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.attention.head_count", Value::U32(2)),
            ("llama.embedding_length", Value::U32(16)),
            ("llama.vocab_size", Value::U32(32)),
            ("llama.feed_forward_length", Value::U32(32)),
            ("llama.block_count", Value::U32(1)),
            ("llama.context_length", Value::U32(64)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
        ];
        md.extend(extra.iter().cloned());
        let qs: Vec<(&str, QTensor)> = extra_tensors
            .iter()
            .map(|(n, t)| (*n, QTensor::quantize(t, GgmlDType::F32).unwrap()))
            .collect();
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(
            &mut f,
            &md.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
            &qs.iter().map(|(k, q)| (*k, q)).collect::<Vec<_>>(),
        )
        .unwrap();
        (dir, path)
    }

    /// llama.cpp stores Llama-3.1's scaling as per-dimension divisors (`rope_freqs`): they divide
    /// the inverse frequencies; a wrong length is refused.
    #[test]
    fn rope_freqs_tensor_divides_the_frequencies() {
        let factors = [1f32, 1.0, 2.5, 8.0]; // head_dim 8 → 4 frequencies
        let t = Tensor::new(&factors, &Device::Cpu).unwrap();
        let (_d, path) = tiny_gguf(&[], &[("rope_freqs.weight", t)]);
        let cfg = GgufModel::open(&path).unwrap().config().unwrap();
        assert_eq!(
            cfg.rope_scaling,
            Some(RopeScaling::FreqFactors(
                factors.iter().map(|&x| x as f64).collect()
            ))
        );
        let plain = Config {
            rope_scaling: None,
            ..cfg.clone()
        };
        for ((s, p), f) in cfg
            .rope_inv_freq()
            .iter()
            .zip(plain.rope_inv_freq())
            .zip(factors)
        {
            assert!((s * f / p - 1.0).abs() < 1e-6, "{s} {p} {f}");
        }
        let short = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let (_d, path) = tiny_gguf(&[], &[("rope_freqs.weight", short)]);
        let e = GgufModel::open(&path)
            .unwrap()
            .config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_freqs has 2 values"), "{e}");
    }

    #[test]
    fn yarn_metadata_and_unknown_scaling() {
        let (_d, path) = tiny_gguf(
            &[
                ("llama.rope.scaling.type", Value::String("yarn".into())),
                ("llama.rope.scaling.factor", Value::F32(4.0)),
                ("llama.rope.scaling.original_context_length", Value::U32(64)),
            ],
            &[],
        );
        let cfg = GgufModel::open(&path).unwrap().config().unwrap();
        let Some(RopeScaling::Yarn(y)) = &cfg.rope_scaling else {
            panic!("{:?}", cfg.rope_scaling)
        };
        assert_eq!(
            (y.factor, y.original_max_position_embeddings),
            (4.0, Some(64))
        );
        assert_eq!(cfg.context_len(), 256);
        let (_d, path) = tiny_gguf(
            &[("llama.rope.scaling.type", Value::String("linear".into()))],
            &[],
        );
        let e = GgufModel::open(&path)
            .unwrap()
            .config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("'linear' is not supported"), "{e}");
        let (_d, path) = tiny_gguf(
            &[("llama.rope.scaling.type", Value::String("none".into()))],
            &[],
        );
        assert_eq!(
            GgufModel::open(&path)
                .unwrap()
                .config()
                .unwrap()
                .rope_scaling,
            None
        );
    }

    #[test]
    fn maps_gguf_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
