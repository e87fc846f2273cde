//! The exact methods on one GPU (run on the device; `--features cuda`): ranks as threads sharing
//! the GPU through the in-process communicator, on the tiny Llama-3.1 and Qwen2 fixtures.
//! `ring`, `zigzag` (2–4 ranks) and `ulysses` (2 ranks) against `dense` on the same GPU; the YaRN
//! fixtures against transformers.
//!
//! Tolerance: f32, first-token logits within 1e-4 relative (‖Δ‖∞ / ‖ref‖∞; GPU reductions run in
//! a different order per split), greedy tokens identical. bf16: within 3e-2 relative (one bf16
//! rounding of the merged output per layer).
#![cfg(feature = "cuda")]

use apb_host::{GenParams, Method, Runner};
use apb_integration_tests::*;
use apb_loaders::{load, ModelSource};
use apb_plugin::Scorer;
use candle_core::{DType, Device};

#[test]
fn exact_methods_equal_dense_on_one_gpu() {
    let dev = Device::new_cuda(0).unwrap();
    let params = GenParams {
        max_new_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    for name in ["tiny-llama31", "tiny-qwen2"] {
        for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 3e-2)] {
            let m = Runner::new(
                load(&ModelSource::Dir(fixture(name)), dtype, &dev).unwrap(),
                Scorer::QueryAware,
            );
            let p = fixture_parts(name);
            let want = run_job(&m, &job(&p, Method::DENSE, 1, &params));
            let cases = [
                (Method::RING, 3),
                (Method::ZIGZAG, 2),
                (Method::ZIGZAG, 3),
                (Method::ZIGZAG, 4),
                (Method::ULYSSES, 2),
            ];
            for (method, world) in cases {
                let got = run_job(&m, &job(&p, method, world, &params));
                let r = first_logits_rel_diff(&got, &want);
                println!(
                    "{name} {dtype:?} {method} H={world}: first-token logits {r:.2e} relative"
                );
                assert_eq!(got.plan.world, world);
                assert!(r <= tol, "{name} {dtype:?} {method} H={world}: {r}");
                if dtype == DType::F32 {
                    assert_eq!(got.tokens, want.tokens, "{name} {method} H={world}");
                }
            }
        }
    }
}

/// YaRN on the GPU: the tiny Qwen2 and Llama YaRN checkpoints (64 original positions × 4, 200
/// tokens) against transformers' f32 logits, within the CPU parity tolerance loosened tenfold
/// (1e-3 + 1e-3·|ref|: GPU reductions run in another order).
#[test]
fn yarn_matches_transformers_on_the_gpu() {
    let dev = Device::new_cuda(0).unwrap();
    for name in ["tiny-qwen2-yarn", "tiny-llama-yarn"] {
        let dir = fixture(name);
        let exp = read_json(dir.join("expected.json"));
        let m = load(&ModelSource::Dir(dir), DType::F32, &dev).unwrap();
        let logits = all_logits(
            &m.model,
            &apb_plugin::DenseBackend,
            &u32s(&exp["input_ids"]),
        );
        for (p, want) in u32s(&exp["positions"])
            .iter()
            .zip(exp["logits"].as_array().unwrap())
        {
            let r = worst_ratio(&logits[*p as usize], &f32s(want), 1e-3, 1e-3);
            println!("{name}: position {p}: {r:.3} of the tolerance");
            assert!(r <= 1.0, "{name}: position {p} off by {r}x the tolerance");
        }
    }
}
