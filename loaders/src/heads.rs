//! Retaining heads (Locret MLPs) from safetensors or from PyTorch checkpoints such as the released
//! `thunlp/APB-Locret-*` (zip pickles, keys `model.layers.{i}.self_attn.fc1.weight` / `fc2.weight`).
//!
//! Pickles are read by candle's pickle *parser*, which never runs Python; before that, every
//! class a pickle references is checked against the few torch rebuild functions a plain state
//! dict needs, so a checkpoint carrying a code-execution payload is refused outright.

use crate::config::Config;
use crate::error::{load_err, LoadError, Result};
use crate::hub::HubRepo;
use apb_plugin::RetainingHeads;
use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn key(i: usize, fc: &str) -> String {
    format!("model.layers.{i}.self_attn.{fc}.weight")
}

/// Loads heads for `cfg` from a registered model name (the heads shipped for it), a file, a
/// directory holding one, or an HF Hub id.
pub fn load_heads(
    spec: &str,
    cfg: &Config,
    dtype: DType,
    device: &Device,
) -> Result<RetainingHeads> {
    let path = resolve(spec)?;
    let tensors = read_tensors(&path)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let get = |fc: &str| {
            tensors
                .get(&key(i, fc))
                .ok_or_else(|| {
                    LoadError::file(
                        &path,
                        format!(
                            "no '{}' (expected one fc1/fc2 pair per model layer, {} layers)",
                            key(i, fc),
                            cfg.num_hidden_layers
                        ),
                    )
                })
                .and_then(|t| Ok(t.to_dtype(dtype)?.to_device(device)?))
        };
        layers.push((get("fc1")?, get("fc2")?));
    }
    let extra = (cfg.num_hidden_layers..)
        .take_while(|&i| tensors.contains_key(&key(i, "fc1")))
        .count();
    if extra > 0 {
        return Err(LoadError::file(
            &path,
            format!(
                "has retaining heads for {} layers, the model has {}",
                cfg.num_hidden_layers + extra,
                cfg.num_hidden_layers
            ),
        ));
    }
    RetainingHeads::new(
        layers,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    .map_err(|e| LoadError::file(&path, e))
}

const CANDIDATES: &[&str] = &[
    "model.safetensors",
    "retaining_heads.safetensors",
    "pytorch_model.bin",
    "model.pt",
    "retaining_heads.pt",
];

fn resolve(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    // A registered model name: the heads shipped for it (a local file or folder of that name
    // comes first).
    if let Some(shipped) = crate::registry::shipped_heads(spec).filter(|_| !p.exists()) {
        return if shipped.is_file() {
            Ok(shipped)
        } else {
            Err(LoadError::file(
                &shipped,
                format!(
                    "the heads shipped for {spec} are not there (they live in the repository's heads/ folder; pass their path instead)"
                ),
            ))
        };
    }
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    if p.is_dir() {
        return CANDIDATES
            .iter()
            .map(|f| p.join(f))
            .find(|f| f.exists())
            .ok_or_else(|| {
                LoadError::file(
                    p,
                    format!(
                        "no retaining-head checkpoint (looked for {})",
                        CANDIDATES.join(", ")
                    ),
                )
            });
    }
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') {
        let hub = HubRepo::from_env(spec, None);
        for f in CANDIDATES {
            if let Some(path) = hub.get_optional(f)? {
                return Ok(path);
            }
        }
        return Err(load_err!(
            "{spec}: no retaining-head checkpoint in the repo (looked for {})",
            CANDIDATES.join(", ")
        ));
    }
    Err(load_err!(
        "retaining heads '{spec}' not found (a file, a directory, or an HF Hub id org/name)"
    ))
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(
        &mut std::fs::File::open(path).map_err(|e| LoadError::file(path, e))?,
        &mut magic,
    )
    .map_err(|e| LoadError::file(path, e))?;
    if &magic == b"PK\x03\x04" {
        check_pickle_safe(path)?;
        let pth = PthTensors::new(path, None).map_err(|e| {
            LoadError::file(path, format!("not a readable PyTorch checkpoint ({e})"))
        })?;
        let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
        let mut out = HashMap::new();
        for n in names {
            if let Some(t) = pth.get(&n).map_err(|e| LoadError::file(path, e))? {
                out.insert(n, t);
            }
        }
        Ok(out)
    } else {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| LoadError::file(path, format!("not a valid safetensors file ({e})")))
    }
}

/// Classes a plain tensor state dict may reference.
fn allowed(module: &str, class: &str) -> bool {
    matches!(
        (module, class),
        ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_parameter")
            | ("collections", "OrderedDict")
            | ("torch", "Size")
    ) || (module == "torch" && class.ends_with("Storage"))
}

/// Parses every `data.pkl` in the zip and refuses any reference outside `allowed`.
pub fn check_pickle_safe(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| LoadError::file(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| LoadError::file(path, format!("not a PyTorch zip checkpoint ({e})")))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with("data.pkl"))
        .collect();
    if names.is_empty() {
        return Err(LoadError::file(path, "no data.pkl in the checkpoint"));
    }
    for name in names {
        let entry = zip.by_name(&name).map_err(|e| LoadError::file(path, e))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut std::io::BufReader::new(entry))
            .map_err(|e| {
                LoadError::file(
                    path,
                    format!("refusing the pickle: cannot parse it safely ({e})"),
                )
            })?;
        let obj = stack
            .finalize()
            .map_err(|e| LoadError::file(path, format!("refusing the pickle: {e}")))?;
        if let Some((m, c)) = first_disallowed(&obj) {
            return Err(LoadError::file(path, format!("refusing the pickle: it references {m}.{c}, which a tensor checkpoint never needs (possible code-execution payload)")));
        }
    }
    Ok(())
}

fn first_disallowed(o: &Object) -> Option<(String, String)> {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => (!allowed(module_name, class_name)).then(|| (module_name.clone(), class_name.clone())),
        Object::Tuple(v) | Object::List(v) => v.iter().find_map(first_disallowed),
        Object::Dict(kv) => kv
            .iter()
            .find_map(|(k, v)| first_disallowed(k).or_else(|| first_disallowed(v))),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            first_disallowed(callable).or_else(|| first_disallowed(args))
        }
        Object::PersistentLoad(x) => first_disallowed(x),
        _ => None,
    }
}
