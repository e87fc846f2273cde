//! Random-weight Llama-3.1 (llama3 RoPE scaling, untied), Yi-style (plain RoPE, theta 5e6) and
//! Qwen2 (QKV bias, tied) checkpoints against HF transformers (scripts/reference/); YaRN on Qwen2
//! and Llama (64 original positions × 4, 200 tokens: past the original context).
//!
//! Tolerance: f32 logits within 1e-4 + 1e-4·|ref| of PyTorch's; greedy continuations identical.
//! bf16 runs: relative L2 error of the logits ≤ 5 % (bf16 keeps 8 bits of mantissa; weights,
//! activations and the cache are all rounded to it).

use apb_integration_tests::*;
use apb_loaders::{load, load_with, Arch, ModelSource, Overrides, RopeScaling};
use apb_plugin::DenseBackend;
use candle_core::{DType, Device};

fn check(name: &str, arch: Arch, tied: bool, scaled: bool) {
    let dir = fixture(name);
    let exp = read_json(dir.join("expected.json"));
    let loaded = load(&ModelSource::Dir(dir.clone()), DType::F32, &Device::Cpu).unwrap();
    let m = &loaded.model;
    assert_eq!(m.cfg.arch, arch);
    assert_eq!(m.cfg.tie_word_embeddings, tied);
    assert_eq!(m.cfg.rope_scaling.is_some(), scaled);
    let ids = u32s(&exp["input_ids"]);
    let logits = all_logits(m, &DenseBackend, &ids);
    for (p, want) in u32s(&exp["positions"])
        .iter()
        .zip(exp["logits"].as_array().unwrap())
    {
        let r = worst_ratio(&logits[*p as usize], &f32s(want), 1e-4, 1e-4);
        assert!(
            r <= 1.0,
            "{name}: logits at position {p} off by {r}x the tolerance"
        );
    }
    assert_eq!(
        greedy(m, &DenseBackend, &ids, 12),
        u32s(&exp["greedy"]),
        "{name}: greedy continuation"
    );

    let bf = load(&ModelSource::Dir(dir), DType::BF16, &Device::Cpu).unwrap();
    let logits = all_logits(&bf.model, &DenseBackend, &ids);
    let last = *u32s(&exp["positions"]).last().unwrap() as usize;
    let want = f32s(exp["logits"].as_array().unwrap().last().unwrap());
    let rel = rel_l2(&logits[last], &want);
    println!("{name}: bf16 relative L2 error {rel:.4}");
    assert!(
        rel <= 0.05,
        "{name}: bf16 logits relative L2 error {rel} > 0.05"
    );
}

#[test]
fn llama31_matches_transformers() {
    check("tiny-llama31", Arch::Llama, false, true);
}

#[test]
fn yi_style_matches_transformers() {
    check("tiny-yi", Arch::Llama, false, false);
}

#[test]
fn qwen2_matches_transformers() {
    check("tiny-qwen2", Arch::Qwen2, true, false);
}

#[test]
fn qwen2_yarn_matches_transformers_past_the_original_context() {
    check("tiny-qwen2-yarn", Arch::Qwen2, true, true);
}

#[test]
fn llama_yarn_with_every_knob_matches_transformers() {
    check("tiny-llama-yarn", Arch::Llama, false, true);
}

/// YaRN grows the context to original × factor (as vLLM derives it; the config's own
/// `max_position_embeddings` is the pre-trained 64), and the parity check above
/// can fail: the same checkpoint with its scaling turned off (`--rope-scaling null`) is far off
/// past the original 64 positions.
#[test]
fn yarn_sets_the_context_and_turning_it_off_changes_the_logits() {
    let dir = fixture("tiny-qwen2-yarn");
    let exp = read_json(dir.join("expected.json"));
    let src = ModelSource::Dir(dir);
    let yarn = load(&src, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        yarn.model.cfg.rope_scaling,
        Some(RopeScaling::Yarn(_))
    ));
    // The model-card form: max_position_embeddings stays at the pre-trained 64.
    assert_eq!(yarn.model.cfg.max_position_embeddings, 64);
    assert_eq!(yarn.model.cfg.context_len(), 64 * 4);
    let off = Overrides {
        rope_scaling: Some("null".into()),
    };
    let plain = load_with(&src, DType::F32, &Device::Cpu, &off).unwrap();
    assert_eq!(plain.model.cfg.rope_scaling, None);
    assert_eq!(plain.model.cfg.context_len(), 64);
    let ids = u32s(&exp["input_ids"]);
    let logits = all_logits(&plain.model, &DenseBackend, &ids);
    let want = f32s(exp["logits"].as_array().unwrap().last().unwrap());
    let r = worst_ratio(&logits[199], &want, 1e-4, 1e-4);
    assert!(
        r > 10.0,
        "unscaled RoPE should miss YaRN's logits, got {r}x the tolerance"
    );
}
