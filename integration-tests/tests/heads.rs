//! Retaining heads: the thunlp pickle layout and safetensors load to the same heads, which give
//! PyTorch's scores (within 1e-5 + 1e-5·|ref|); a pickle with a code-execution payload is refused
//! before anything is unpickled; layer-count and shape mismatches are clear errors.

use apb_integration_tests::*;
use apb_loaders::heads::load_heads;
use apb_loaders::Config;
use candle_core::{DType, Device, Tensor};

fn cfg() -> Config {
    let text = std::fs::read_to_string(fixture("tiny-llama31").join("config.json")).unwrap();
    Config::from_json(&text).unwrap()
}

fn scores(path: &str) -> Vec<f32> {
    let heads = load_heads(path, &cfg(), DType::F32, &Device::Cpu).unwrap();
    let exp = read_json(fixture("heads").join("expected.json"));
    let x: Vec<Vec<f32>> = exp["x"].as_array().unwrap().iter().map(f32s).collect();
    let (s, w) = (x.len(), x[0].len());
    let x = Tensor::from_vec(x.concat(), (1, s, w), &Device::Cpu).unwrap();
    let (nq, nkv) = (
        exp["n_q"].as_u64().unwrap() as usize,
        exp["n_kv"].as_u64().unwrap() as usize,
    );
    let (q, k, v) = (
        x.narrow(2, 0, nq).unwrap(),
        x.narrow(2, nq, nkv).unwrap(),
        x.narrow(2, nq + nkv, nkv).unwrap(),
    );
    heads
        .score(exp["layer"].as_u64().unwrap() as usize, &q, &k, &v)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// PyTorch's f32 scores of the fixture heads (expected.json).
fn pytorch_scores() -> Vec<f32> {
    let exp = read_json(fixture("heads").join("expected.json"));
    exp["scores"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(f32s)
        .collect()
}

#[test]
fn pickle_and_safetensors_give_pytorch_scores() {
    let dir = fixture("heads");
    let from_pt = scores(dir.join("heads.pt").to_str().unwrap());
    let from_st = scores(dir.join("heads.safetensors").to_str().unwrap());
    assert_eq!(from_pt, from_st, "same tensors, same scores");
    let want = pytorch_scores();
    assert!(worst_ratio(&from_pt, &want, 1e-5, 1e-5) <= 1.0);
}

#[test]
fn half_precision_pickles_decode_like_safetensors() {
    // bf16 / f16 storages (scripts/reference/heads_dtypes.py: the f32 fixture rounded, plus an
    // extra non-fc tensor the loader must skip) give exactly the scores of the same rounded
    // tensors read from safetensors, and PyTorch's f32 scores within the rounding (weights to
    // 8 / 11 significant bits: 3e-2 / 4e-3 of the largest score).
    let dir = fixture("heads");
    let want = pytorch_scores();
    let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
    for (name, tol) in [("bf16", 3e-2f32), ("f16", 4e-3)] {
        let from_pt = scores(dir.join(format!("heads-{name}.pt")).to_str().unwrap());
        let from_st = scores(
            dir.join(format!("heads-{name}.safetensors"))
                .to_str()
                .unwrap(),
        );
        assert_eq!(from_pt, from_st, "{name}: same tensors, same scores");
        let err = from_pt
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(err <= tol * scale, "{name}: {err} vs scale {scale}");
        assert!(err > 0.0, "{name}: the weights were not rounded");
    }
}

#[test]
fn code_execution_payload_is_refused() {
    let marker = std::path::Path::new("/tmp/apb-rs-pwned");
    let _ = std::fs::remove_file(marker);
    let err = load_heads(
        fixture("heads").join("evil.pt").to_str().unwrap(),
        &cfg(),
        DType::F32,
        &Device::Cpu,
    )
    .expect_err("refused")
    .to_string();
    assert!(
        err.contains("refusing the pickle") && err.contains("system"),
        "{err}"
    );
    assert!(!marker.exists(), "the payload ran");
}

#[test]
fn mismatches_are_clear_errors() {
    let path = fixture("heads").join("heads.safetensors");
    let mut three = cfg();
    three.num_hidden_layers = 3;
    let err = load_heads(path.to_str().unwrap(), &three, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.layers.2.self_attn.fc1.weight"), "{err}");
    let mut one = cfg();
    one.num_hidden_layers = 1;
    let err = load_heads(path.to_str().unwrap(), &one, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("heads for 2 layers, the model has 1"), "{err}");
    let mut wide = cfg();
    wide.num_attention_heads = 8;
    let err = load_heads(path.to_str().unwrap(), &wide, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("fc1") && err.contains("192"), "{err}");
}
