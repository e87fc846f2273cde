//! From a model name to a ready model and tokenizer.

use crate::config::Config;
use crate::error::{load_err, LoadError, Result};
use crate::gguf::GgufModel;
use crate::hub::HubRepo;
use crate::llama::Model;
use crate::registry;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// An HF-style directory: config.json, *.safetensors, tokenizer.json, ...
    Dir(PathBuf),
    /// A single `.gguf` file (architecture `llama`).
    Gguf(PathBuf),
    /// `random:PRESET`: a benchmark preset's shapes (or a config.json) with random weights and
    /// the default model's tokenizer, the vocabulary cut to it (serving measurable without a
    /// download; the name says so beside every number).
    Random(String),
    /// An HF Hub repo id (`org/name`) at a revision.
    Hub {
        /// `org/name`.
        repo_id: String,
        /// Branch, tag or commit (`main` if none).
        revision: Option<String>,
    },
}

impl ModelSource {
    /// Resolves `-m`: a registered name, an existing path, or an `org/name` hub id.
    pub fn parse(spec: &str, revision: Option<&str>) -> Result<Self> {
        if let Some(preset) = spec.strip_prefix("random:") {
            // Checked now: a typo fails before anything loads.
            crate::random::config_by_name(preset)?;
            return Ok(Self::Random(preset.to_string()));
        }
        if let Some((path, how)) = registry::named(spec) {
            if !path.exists() {
                return Err(load_err!(
                    "model '{spec}' is not downloaded yet (expected {}); fetch it with {how}",
                    path.display()
                ));
            }
            return Ok(Self::Gguf(path));
        }
        let p = Path::new(spec);
        if p.is_dir() {
            return Ok(Self::Dir(p.to_path_buf()));
        }
        if p.is_file() {
            if p.extension().and_then(|e| e.to_str()) == Some("gguf") {
                return Ok(Self::Gguf(p.to_path_buf()));
            }
            return Err(LoadError::file(
                p,
                "not a model: expected a .gguf file or a model directory",
            ));
        }
        let looks_like_hub = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && !spec.starts_with('/')
            && !spec.ends_with(".gguf");
        if looks_like_hub {
            return Ok(Self::Hub {
                repo_id: spec.to_string(),
                revision: revision.map(String::from),
            });
        }
        Err(load_err!(
            "model '{spec}' not found: not a registered name ({}), an existing file or directory, or an HF Hub id (org/name)",
            registry::names().join(", ")
        ))
    }
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(load_err!("unknown dtype '{s}' (use f32, bf16 or f16)")),
    }
}

/// A model ready to run and its tokenizer.
pub struct Loaded {
    /// The weights and the forward pass.
    pub model: Model,
    /// The tokenizer and chat template.
    pub tok: Tokenizer,
    /// Human-readable origin, reported in outputs.
    pub name: String,
}

/// Changes to a model's config made before its weights load (`apb`'s model flags).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--rope-scaling JSON`: replaces the config's RoPE scaling, as vLLM's flag does (e.g.
    /// YaRN for Qwen-2.5 past 32K without editing a downloaded config).
    pub rope_scaling: Option<String>,
}

impl Overrides {
    fn apply(&self, cfg: &mut Config) -> Result<()> {
        if let Some(json) = &self.rope_scaling {
            cfg.override_rope_scaling(json)?;
        }
        Ok(())
    }
}

/// Loads `source` (config, weights, tokenizer) in `dtype` on `device`.
pub fn load(source: &ModelSource, dtype: DType, device: &Device) -> Result<Loaded> {
    load_with(source, dtype, device, &Overrides::default())
}

/// [`load`] with the config changed by `ov` first.
pub fn load_with(
    source: &ModelSource,
    dtype: DType,
    device: &Device,
    ov: &Overrides,
) -> Result<Loaded> {
    match source {
        ModelSource::Gguf(path) => load_gguf(path, dtype, device, ov),
        ModelSource::Dir(dir) => load_dir(dir, dtype, device, &dir.display().to_string(), ov),
        ModelSource::Random(preset) => load_random(preset, dtype, device, ov),
        ModelSource::Hub { repo_id, revision } => {
            let hub = HubRepo::from_env(repo_id, revision.as_deref());
            load_dir(&fetch_hub(&hub)?, dtype, device, &hub.repo_id, ov)
        }
    }
}

/// Fetches (or finds in the HF cache) a hub repo's config, tokenizer and safetensors, then loads
/// them from the snapshot directory.
pub fn load_hub(hub: &HubRepo, dtype: DType, device: &Device) -> Result<Loaded> {
    load_dir(
        &fetch_hub(hub)?,
        dtype,
        device,
        &hub.repo_id,
        &Overrides::default(),
    )
}

/// The snapshot directory of `hub`'s config, tokenizer and safetensors (downloaded if needed).
fn fetch_hub(hub: &HubRepo) -> Result<PathBuf> {
    let config = hub.get("config.json")?;
    hub.get("tokenizer.json")?;
    for f in ["tokenizer_config.json", "generation_config.json"] {
        hub.get_optional(f)?;
    }
    match hub.get_optional("model.safetensors.index.json")? {
        Some(index) => {
            for shard in shard_files(&index)? {
                hub.get(&shard)?;
            }
        }
        None => {
            hub.get("model.safetensors")?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| load_err!("bad cache path {}", config.display()))
}

fn load_gguf(path: &Path, dtype: DType, device: &Device, ov: &Overrides) -> Result<Loaded> {
    let mut g = GgufModel::open(path)?;
    let mut cfg = g.config()?;
    ov.apply(&mut cfg)?;
    let tok = Tokenizer::from_gguf(&g, &cfg.eos_token_ids)?;
    let tensors = g.tensors(&cfg, dtype, device)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let model = Model::load(vb, &cfg)
        .map_err(|e| LoadError::file(path, format!("weights do not match the config ({e})")))?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("gguf")
        .to_string();
    Ok(Loaded { model, tok, name })
}

/// `random:PRESET` ([`ModelSource::Random`]): the default model's tokenizer (and its chat
/// template and stop tokens), the preset's shapes with the vocabulary cut to that tokenizer's, and
/// N(0, 0.02) weights made on `device`.
fn load_random(preset: &str, dtype: DType, device: &Device, ov: &Overrides) -> Result<Loaded> {
    let (path, how) = registry::named(registry::DEFAULT_MODEL).expect("the default is registered");
    if !path.exists() {
        return Err(load_err!(
            "random:{preset} takes the default model's tokenizer, which is not downloaded yet (expected {}); fetch it with {how}",
            path.display()
        ));
    }
    let mut g = GgufModel::open(&path)?;
    let tok_cfg = g.config()?;
    let tok = Tokenizer::from_gguf(&g, &tok_cfg.eos_token_ids)?;
    let mut cfg = crate::random::config_by_name(preset)?;
    cfg.vocab_size = tok_cfg.vocab_size;
    cfg.bos_token_id = tok_cfg.bos_token_id;
    cfg.eos_token_ids = tok_cfg.eos_token_ids.clone();
    ov.apply(&mut cfg)?;
    let model = crate::random::random_model(&cfg, dtype, device)?;
    let name = format!(
        "random:{preset} (random weights, {} tokenizer)",
        registry::DEFAULT_MODEL
    );
    Ok(Loaded { model, tok, name })
}

/// Shard file names listed in a `model.safetensors.index.json`.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| LoadError::file(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| LoadError::file(index, format!("invalid JSON ({e})")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LoadError::file(index, "no weight_map"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn load_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
    name: &str,
    ov: &Overrides,
) -> Result<Loaded> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(load_err!("{}: not a model directory (no config.json; expected config.json, model.safetensors and tokenizer.json)", dir.display()));
    }
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| LoadError::file(&cfg_path, format!("cannot read ({e})")))?;
    let mut cfg = Config::from_json(&text).map_err(|e| LoadError::file(&cfg_path, e))?;
    ov.apply(&mut cfg)?;
    let gen = dir.join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&gen) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            for id in crate::config::token_ids(&v.get("eos_token_id").cloned()) {
                if !cfg.eos_token_ids.contains(&id) {
                    cfg.eos_token_ids.push(id);
                }
            }
        }
    }
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        shard_files(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in &files {
        if !f.exists() {
            return Err(LoadError::file(f, "missing weights file"));
        }
    }
    // Safety: the files are memory-mapped read-only; we do not modify them while loaded.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| {
            load_err!(
                "{}: not a valid safetensors checkpoint ({e})",
                dir.display()
            )
        })?;
    let model = Model::load(vb, &cfg)
        .map_err(|e| load_err!("{}: weights do not match config.json ({e})", dir.display()))?;
    let tok = Tokenizer::from_dir(dir, &cfg.eos_token_ids)?;
    Ok(Loaded {
        model,
        tok,
        name: name.to_string(),
    })
}
