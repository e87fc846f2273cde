//! The llama-family model: Llama-3.x, Yi and Qwen2 (QKV bias), one plain file.
//!
//! Attention goes through [`apb_plugin::AttentionBackend`]; the model never knows about ranks.
//! Callers pass the position id of every token, which is how a distributed backend gives its
//! anchor block positions `0..l_a` while local tokens keep their true positions.

use crate::config::Config;
use apb_plugin::profile::{span, Bucket};
use apb_plugin::{AttentionBackend, AttnInput, LayerKv, Phase};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

fn linear(vb: &VarBuilder, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let w = vb.get((out, inp), &format!("{name}.weight"))?;
    let b = if bias {
        Some(vb.get(out, &format!("{name}.bias"))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// `x · Wᵀ (+ b)` for `x` `(b, s, in)`; with `rows` (a decode step's rows, one per sequence)
/// through [`apb_kernels::linear_rows`], the few-rows path.
fn project(l: &Linear, x: &Tensor, rows: bool) -> Result<Tensor> {
    if !rows {
        return l.forward(x);
    }
    let y = apb_kernels::linear_rows(x, l.weight())?;
    match l.bias() {
        Some(bias) => y.broadcast_add(bias),
        None => Ok(y),
    }
}

/// An RMSNorm's weight and epsilon. Every norm but the first follows a residual add, and runs
/// fused with it ([`apb_kernels::add_rms_norm`]).
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: &VarBuilder, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, &format!("{name}.weight"))?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }

    /// `(x + a, norm(x + a))`.
    fn add_forward(&self, x: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        apb_kernels::add_rms_norm(x, a, &self.weight, self.eps)
    }
}

/// Cos/sin tables for arbitrary position ids.
#[derive(Debug, Clone)]
struct Rope {
    inv_freq: Tensor, // (1, d/2) f32
    /// YaRN's scale on cos/sin (1 otherwise).
    attention_factor: f64,
}

impl Rope {
    fn new(cfg: &Config, dev: &Device) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let n = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, (1, n), dev)?,
            attention_factor: cfg.rope_attention_factor(),
        })
    }

    /// (cos, sin), each `(seq, d/2)`, for `positions`.
    fn cos_sin(&self, positions: &[u32], dtype: DType) -> Result<(Tensor, Tensor)> {
        let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (positions.len(), 1), self.inv_freq.device())?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let (cos, sin) = if self.attention_factor == 1.0 {
            (cos, sin)
        } else {
            (
                (cos * self.attention_factor)?,
                (sin * self.attention_factor)?,
            )
        };
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }
}

struct Attention {
    /// q_proj, k_proj and v_proj stacked: one GEMM for all three projections.
    qkv_proj: Linear,
    o_proj: Linear,
    n_h: usize,
    n_kv: usize,
    d: usize,
}

impl Attention {
    fn load(vb: &VarBuilder, cfg: &Config) -> Result<Self> {
        let (h, d, n_h, n_kv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        );
        let parts = [
            linear(vb, "q_proj", n_h * d, h, cfg.qkv_bias)?,
            linear(vb, "k_proj", n_kv * d, h, cfg.qkv_bias)?,
            linear(vb, "v_proj", n_kv * d, h, cfg.qkv_bias)?,
        ];
        let w = Tensor::cat(&parts.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
        let b = if cfg.qkv_bias {
            let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias()).collect();
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Self {
            qkv_proj: Linear::new(w, b),
            o_proj: linear(vb, "o_proj", h, n_h * d, false)?,
            n_h,
            n_kv,
            d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cos: &Tensor,
        sin: &Tensor,
        attend: &mut Attend<'_>,
        rows: bool,
    ) -> apb_plugin::Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nq, nkv) = (self.n_h * self.d, self.n_kv * self.d);
        let bucket = |prefill: Bucket, decode: Bucket| if rows { decode } else { prefill };
        let (q_raw, k_raw, v_raw, q, k, v) = span(
            bucket(Bucket::Qkv, Bucket::RowsQkv),
            x.device(),
            || -> Result<_> {
                let qkv = project(&self.qkv_proj, x, rows)?;
                // Token-major projections → head-major (b, n, s, d) q/k/v with RoPE, in one pass.
                let (q, k, v) = apb_plugin::rope_split(&qkv, cos, sin, self.n_h, self.n_kv)?;
                // Pre-RoPE projections for retaining heads: views of the fused output.
                let (q_raw, k_raw, v_raw) = (
                    qkv.narrow(2, 0, nq)?,
                    qkv.narrow(2, nq, nkv)?,
                    qkv.narrow(2, nq + nkv, nkv)?,
                );
                Ok((q_raw, k_raw, v_raw, q, k, v))
            },
        )?;
        let input = AttnInput {
            layer,
            q: &q,
            k: &k,
            v: &v,
            q_raw: &q_raw,
            k_raw: &k_raw,
            v_raw: &v_raw,
        };
        let y = attend(layer, &input)?;
        span(
            bucket(Bucket::OProj, Bucket::RowsOProj),
            x.device(),
            || -> apb_plugin::Result<Tensor> {
                let y = apb_plugin::contiguous(&y.transpose(1, 2)?)?.reshape((
                    b,
                    s,
                    self.n_h * self.d,
                ))?;
                Ok(project(&self.o_proj, &y, rows)?)
            },
        )
    }
}

/// Attention of one layer's rows: `(layer, input) → output (b, n_heads, s, head_dim)`.
pub type Attend<'a> = dyn FnMut(usize, &AttnInput<'_>) -> apb_plugin::Result<Tensor> + 'a;

struct Mlp {
    /// gate_proj and up_proj stacked: on a decode step one kernel for both and the SiLU
    /// product ([`apb_kernels::linear_rows_silu_mul`]).
    gate_up: Tensor,
    /// Views of `gate_up` (no copy) for prefill: two GEMMs and a contiguous SiLU product (the
    /// product over strided halves of one fused output measured ~70 % slower on an H100).
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: &VarBuilder, cfg: &Config) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate = vb.get((i, h), "gate_proj.weight")?;
        let up = vb.get((i, h), "up_proj.weight")?;
        let gate_up = Tensor::cat(&[gate, up], 0)?;
        Ok(Self {
            gate_proj: Linear::new(gate_up.narrow(0, 0, i)?, None),
            up_proj: Linear::new(gate_up.narrow(0, i, i)?, None),
            gate_up,
            down_proj: linear(vb, "down_proj", h, i, false)?,
        })
    }

    /// Runs over tokens in chunks: the `(tokens, intermediate)` activations of a long prompt
    /// would otherwise dominate memory.
    fn forward(&self, x: &Tensor, rows: bool) -> Result<Tensor> {
        const CHUNK: usize = 2048;
        if rows {
            let a = apb_kernels::linear_rows_silu_mul(x, &self.gate_up)?;
            return project(&self.down_proj, &a, true);
        }
        let s = x.dim(1)?;
        let run = |x: &Tensor| -> Result<Tensor> {
            let g = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
            self.down_proj.forward(&(g * self.up_proj.forward(x)?)?)
        };
        if s <= CHUNK {
            return run(x);
        }
        let parts = (0..s)
            .step_by(CHUNK)
            .map(|i| run(&x.narrow(1, i, CHUNK.min(s - i))?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// The KV cache of a whole model: one [`LayerKv`] per layer.
#[derive(Debug, Clone)]
pub struct Cache {
    /// One cache per layer.
    pub layers: Vec<LayerKv>,
}

impl Cache {
    /// Empty caches for every layer of `cfg`.
    pub fn new(cfg: &Config) -> Self {
        Self {
            layers: vec![LayerKv::new(); cfg.num_hidden_layers],
        }
    }
    /// Cached positions (of layer 0).
    pub fn len(&self) -> usize {
        self.layers.first().map(|l| l.len()).unwrap_or(0)
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The llama-family decoder (Llama-3.1, Qwen2, Yi, SmolLM2); attention goes through the backend it is given.
pub struct Model {
    /// Its config.
    pub cfg: Config,
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl Model {
    /// Loads from HF-named weights (`model.layers.{i}.self_attn.q_proj.weight`, ...).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let embed = vb.get((cfg.vocab_size, h), "model.embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("model.layers.{i}"));
                Ok(Block {
                    input_layernorm: RmsNorm::load(&vb, "input_layernorm", h, eps)?,
                    self_attn: Attention::load(&vb.pp("self_attn"), cfg)?,
                    post_attention_layernorm: RmsNorm::load(
                        &vb,
                        "post_attention_layernorm",
                        h,
                        eps,
                    )?,
                    mlp: Mlp::load(&vb.pp("mlp"), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            Linear::new(embed.clone(), None)
        } else {
            linear(&vb, "lm_head", cfg.vocab_size, h, false)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens: Embedding::new(embed, h),
            layers,
            norm: RmsNorm::load(&vb, "model.norm", h, eps)?,
            lm_head,
            rope: Rope::new(cfg, vb.device())?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs `tokens` (at `positions`, one per token) through every layer and the final norm.
    /// Returns hidden states `(1, seq, hidden)`. `on_layer` is called after each layer (progress,
    /// and a chance to stop: an error from it ends the pass with that error).
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        phase: Phase,
        backend: &dyn AttentionBackend,
        cache: &mut Cache,
        on_layer: &mut dyn FnMut(usize) -> apb_plugin::Result<()>,
    ) -> apb_plugin::Result<Tensor> {
        let layers = &mut cache.layers;
        self.forward_with(
            tokens,
            positions,
            &mut |i, x| backend.forward(phase, x, &mut layers[i]),
            on_layer,
            false,
        )
    }

    /// [`forward`](Self::forward) with attention left to `attend`: a host batching the decode
    /// step of many sequences runs their rows as one sequence of tokens (every projection one
    /// GEMM over the rows; `rows`: [`apb_kernels::linear_rows`], the few-rows kernels) and attends
    /// each row to its own sequence's cache.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        positions: &[u32],
        attend: &mut Attend<'_>,
        on_layer: &mut dyn FnMut(usize) -> apb_plugin::Result<()>,
        rows: bool,
    ) -> apb_plugin::Result<Tensor> {
        if tokens.len() != positions.len() || tokens.is_empty() {
            return Err(apb_plugin::Error::Shape(format!(
                "{} tokens with {} positions",
                tokens.len(),
                positions.len()
            )));
        }
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let (cos, sin) = self.rope.cos_sin(positions, self.dtype)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        // `h` is always the norm of `x` the next sub-layer reads; each residual add runs fused
        // with the norm after it (the next layer's input norm, or the final one).
        let mut h = match self.layers.first() {
            Some(block) => block.input_layernorm.forward(&x)?,
            None => self.norm.forward(&x)?,
        };
        for (i, block) in self.layers.iter().enumerate() {
            let a = block.self_attn.forward(&h, i, &cos, &sin, attend, rows)?;
            (x, h) = block.post_attention_layernorm.add_forward(&x, &a)?;
            let ffn = if rows { Bucket::RowsFfn } else { Bucket::Ffn };
            let f = span(ffn, x.device(), || block.mlp.forward(&h, rows))?;
            let next = match self.layers.get(i + 1) {
                Some(b) => &b.input_layernorm,
                None => &self.norm,
            };
            (x, h) = next.add_forward(&x, &f)?;
            on_layer(i)?;
        }
        Ok(h)
    }

    /// Logits (f32) of the last position of `hidden` `(1, seq, hidden)`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let s = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, s - 1, 1)?)?
            .squeeze(0)?
            .squeeze(0)
    }

    /// Logits (f32) for every position of `hidden`: `(1, seq, vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }

    /// [`logits`](Self::logits) of a decode step's rows (the few-rows kernel, as
    /// [`forward_with`](Self::forward_with) with `rows`).
    pub fn row_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        project(&self.lm_head, hidden, true)?.to_dtype(DType::F32)
    }
}
