//! `apb train-heads` on the tiny Llama-3.1 fixture: the Locret labels equal a plain f64
//! computation from the model's own post-RoPE q/k; a few optimiser steps lower the loss; saved
//! heads reload through the loader (`--heads`) and change APB's output; a checkpoint resumes to
//! the same heads as an uninterrupted run.

use apb_host::prompt::PromptParts;
use apb_host::train::{self, Heads, Record};
use apb_host::Method;
use apb_host::{GenParams, Runner};
use apb_integration_tests::*;
use apb_loaders::{load, Cache, ModelSource};
use apb_plugin::{AttentionBackend, AttnInput, DenseBackend, LayerKv, Phase, Scorer};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

fn tiny() -> Runner {
    let m = load(
        &ModelSource::Dir(fixture("tiny-llama31")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    Runner::new(m, Scorer::QueryAware)
}

/// Fresh random ids each run (the vocabulary's lower half avoids special tokens).
fn record(prompt: usize, answer: usize) -> Record {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("record seed {t}");
    let mut x = t | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 200) as u32 + 10
    };
    Record {
        prompt: (0..prompt).map(|_| next()).collect(),
        answer: (0..answer).map(|_| next()).collect(),
    }
}

/// Records each layer's post-RoPE q and k.
struct Spy(Mutex<Vec<(Tensor, Tensor)>>);

impl AttentionBackend for Spy {
    fn name(&self) -> &str {
        "spy"
    }
    fn forward(
        &self,
        phase: Phase,
        x: &AttnInput<'_>,
        cache: &mut LayerKv,
    ) -> apb_plugin::Result<Tensor> {
        self.0.lock().unwrap().push((x.q.clone(), x.k.clone()));
        DenseBackend.forward(phase, x, cache)
    }

    fn decode_part(
        &self,
        x: &AttnInput<'_>,
        cache: &mut LayerKv,
        keep: bool,
    ) -> apb_plugin::Result<(Tensor, Tensor)> {
        DenseBackend.decode_part(x, cache, keep)
    }
}

#[test]
fn labels_equal_a_plain_f64_computation() {
    let r = tiny();
    let model = r.model();
    let rec = record(37, 5);
    let ex = train::example(model, &rec).unwrap();
    let tokens: Vec<u32> = [rec.prompt.clone(), rec.answer.clone()].concat();
    let pos: Vec<u32> = (0..tokens.len() as u32).collect();
    let spy = Spy(Mutex::new(Vec::new()));
    let mut cache = Cache::new(&model.cfg);
    model
        .forward(&tokens, &pos, Phase::Prefill, &spy, &mut cache, &mut |_| {
            Ok(())
        })
        .unwrap();
    let (n_h, n_kv, d) = (
        model.cfg.num_attention_heads,
        model.cfg.num_key_value_heads,
        model.cfg.head_dim,
    );
    let g = n_h / n_kv;
    let p = rec.prompt.len();
    let spied = spy.0.into_inner().unwrap();
    assert_eq!(ex.layers.len(), model.cfg.num_hidden_layers);
    for (l, ((q, k), (feats, labels))) in spied.iter().zip(&ex.layers).enumerate() {
        let q: Vec<Vec<Vec<f32>>> = q.squeeze(0).unwrap().to_vec3().unwrap();
        let k: Vec<Vec<Vec<f32>>> = k.squeeze(0).unwrap().to_vec3().unwrap();
        let got: Vec<Vec<f32>> = labels.to_vec2().unwrap();
        assert_eq!(got.len(), p);
        assert_eq!(feats.dims(), &[p, (n_h + 2 * n_kv) * d]);
        for (key, row) in got.iter().enumerate() {
            for (j, &label) in row.iter().enumerate() {
                let mut want = f64::NEG_INFINITY;
                for head in &q[j * g..(j + 1) * g] {
                    for qrow in &head[p..] {
                        let dot: f64 = qrow
                            .iter()
                            .zip(&k[j][key])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        want = want.max(dot / (d as f64).sqrt());
                    }
                }
                assert!(
                    (label as f64 - want).abs() <= 1e-4 + 1e-5 * want.abs(),
                    "layer {l} key {key} head {j}: {label} vs {want}"
                );
            }
        }
    }
}

#[test]
fn steps_lower_the_loss_and_checkpoints_resume() {
    let r = tiny();
    let model = r.model();
    let c = &model.cfg;
    let in_dim = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
    let rec = record(48, 6);
    let ex = train::example(model, &rec).unwrap();
    let new = || {
        Heads::new(
            c.num_hidden_layers,
            in_dim,
            32,
            c.num_key_value_heads,
            3,
            &Device::Cpu,
        )
        .unwrap()
    };
    let heads = new();
    let loss_of = |h: &Heads| {
        train::loss(h, &ex, 0.0025)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap()
    };
    let before = loss_of(&heads);
    let mut opt = train::AdamW::new(&heads, 5e-3, 2, 30).unwrap();
    for _ in 0..30 {
        let (l, _) = train::loss(&heads, &ex, 0.0025).unwrap();
        opt.step(&heads, &l).unwrap();
    }
    let after = loss_of(&heads);
    assert!(after < 0.7 * before, "loss {before} -> {after}");

    // 10 steps, checkpoint, 10 more from the checkpoint == 20 straight.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("h.ckpt");
    let straight = new();
    let mut o1 = train::AdamW::new(&straight, 5e-3, 2, 20).unwrap();
    let split = new();
    let mut o2 = train::AdamW::new(&split, 5e-3, 2, 20).unwrap();
    for i in 0..20 {
        let (l, _) = train::loss(&straight, &ex, 0.0025).unwrap();
        o1.step(&straight, &l).unwrap();
        if i < 10 {
            let (l, _) = train::loss(&split, &ex, 0.0025).unwrap();
            o2.step(&split, &l).unwrap();
        }
    }
    train::save_checkpoint(&ck, &split, &o2).unwrap();
    let resumed = new();
    let mut o3 = train::AdamW::new(&resumed, 5e-3, 2, 20).unwrap();
    train::load_checkpoint(&ck, &resumed, &mut o3, &Device::Cpu).unwrap();
    assert_eq!(o3.step, 10);
    for _ in 0..10 {
        let (l, _) = train::loss(&resumed, &ex, 0.0025).unwrap();
        o3.step(&resumed, &l).unwrap();
    }
    let all = |h: &Heads| {
        h.fc1
            .iter()
            .chain(&h.fc2)
            .map(|v| v.as_tensor().clone())
            .collect::<Vec<_>>()
    };
    for (a, b) in all(&straight).iter().zip(all(&resumed)) {
        let diff = (a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "resumed heads differ by {diff}");
    }
}

#[test]
fn saved_heads_reload_and_change_apb_selection() {
    let r = tiny();
    let c = r.model().cfg.clone();
    let in_dim = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
    let heads = Heads::new(
        c.num_hidden_layers,
        in_dim,
        16,
        c.num_key_value_heads,
        9,
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("heads.safetensors");
    heads.save(&path, DType::F32).unwrap();
    let loaded =
        apb_loaders::heads::load_heads(path.to_str().unwrap(), &c, DType::F32, &Device::Cpu)
            .unwrap();
    // The reloaded heads score like the trained ones.
    let x = Tensor::randn(0f32, 1.0, (1, 11, in_dim), &Device::Cpu).unwrap();
    let (nq, nkv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let s1 = loaded
        .score(
            0,
            &x.narrow(2, 0, nq).unwrap(),
            &x.narrow(2, nq, nkv).unwrap(),
            &x.narrow(2, nq + nkv, nkv).unwrap(),
        )
        .unwrap();
    let s2 = heads.predict(0, &x.squeeze(0).unwrap()).unwrap();
    let diff = (s1 - s2)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "reloaded heads score differently: {diff}");
    // APB with a small passing block picks differently with the heads than training-free.
    let ids = u32s(&read_json(fixture("tiny-llama31").join("expected.json"))["input_ids"]);
    let p = PromptParts {
        context: ids[..61].to_vec(),
        query_segment: ids[61..70].to_vec(),
        question: ids[63..67].to_vec(),
        prefix_len: 0,
    };
    let params = GenParams {
        max_new_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    let mut j = job(&p, Method::APB, 3, &params);
    (j.settings.anchor_len, j.settings.passing_len) = (Some(4), Some(3));
    let free = run_job(&r, &j);
    let mut with_heads = r.clone();
    with_heads.scorer = Scorer::Heads(Arc::new(loaded));
    let trained = run_job(&with_heads, &j);
    let (a, b) = (free.first_logits, trained.first_logits);
    assert!(!a.is_empty());
    assert_ne!(a, b, "the heads did not change APB's selection");
}
