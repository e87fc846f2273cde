//! `attention` and the `dense` backend against a plain f64 reference with an explicit boolean
//! mask, on fresh random inputs (GQA, odd lengths, chunk boundaries, APB masks).
//!
//! Tolerance: f32 results within 2e-5 absolute of the f64 reference (outputs are convex
//! combinations of values in [-1, 1]; LSE within 2e-5 + 1e-5·|lse|).

use apb_plugin::{attention, attention_with_lse, reference_attention, Mask};
use apb_plugin::{AttentionBackend, AttnInput, DenseBackend, LayerKv, Phase};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

fn rand_t(rng: &mut rand::rngs::StdRng, shape: (usize, usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * 2.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[allow(clippy::too_many_arguments)]
fn check(seed: u64, b: usize, n_h: usize, n_kv: usize, sq: usize, sk: usize, d: usize, spec: Mask) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let q = rand_t(&mut rng, (b, n_h, sq, d));
    let k = rand_t(&mut rng, (b, n_kv, sk, d));
    let v = rand_t(&mut rng, (b, n_kv, sk, d));
    let (out, lse) = attention_with_lse(&q, &k, &v, spec).unwrap();
    // The boolean mask, written out independently of Mask::key_range.
    let off = sk as i64 - sq as i64;
    let mask = |i: usize, j: usize| {
        let causal_ok = !spec.causal || (j as i64) <= i as i64 + off;
        let anchor_ok = i >= spec.anchor_rows || j >= spec.passing_keys;
        causal_ok && anchor_ok
    };
    let (want_out, want_lse) = reference_attention(&q, &k, &v, mask).unwrap();
    let got_out = flat(&out);
    let got_lse = flat(&lse);
    assert!(got_out.iter().all(|x| x.is_finite()), "non-finite output");
    for (i, (g, w)) in got_out.iter().zip(&want_out).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 2e-5,
            "out[{i}] = {g}, want {w} ({spec:?}, sq {sq}, sk {sk})"
        );
    }
    for (i, (g, w)) in got_lse.iter().zip(&want_lse).enumerate() {
        if w.is_infinite() {
            assert!(g.is_infinite() && *g < 0.0, "lse[{i}] = {g}, want -inf");
        } else {
            assert!(
                (*g as f64 - w).abs() <= 2e-5 + 1e-5 * w.abs(),
                "lse[{i}] = {g}, want {w}"
            );
        }
    }
}

#[test]
fn causal_gqa_odd_lengths() {
    check(1, 1, 6, 2, 37, 37, 16, Mask::causal());
    check(2, 2, 4, 4, 1, 53, 8, Mask::causal()); // decode row
    check(3, 1, 8, 2, 300, 301, 16, Mask::causal()); // crosses the 256-row chunk
    check(4, 1, 3, 1, 5, 19, 32, Mask::causal()); // bottom-right: 5 new rows over 19 keys
}

#[test]
fn full_and_fully_masked_rows() {
    check(5, 1, 4, 2, 17, 29, 16, Mask::full());
    // sq > sk with causal: the first rows see nothing (output 0, lse -inf).
    check(6, 1, 2, 1, 9, 4, 8, Mask::causal());
}

#[test]
fn apb_mask_anchor_rows_skip_passing_keys() {
    // keys = [passing 24 | anchor 16 | local 40], queries = [anchor 16 | local 40]
    check(7, 1, 6, 3, 56, 80, 16, Mask::apb(16, 24));
    check(8, 1, 4, 2, 300, 428, 8, Mask::apb(130, 128));
}

#[test]
fn dense_backend_decode_equals_one_pass() {
    // Prefill 23 tokens, then 5 single-token steps == attention over all 28 at once.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (n_h, n_kv, n, d) = (4, 2, 28, 16);
    let q = rand_t(&mut rng, (1, n_h, n, d));
    let k = rand_t(&mut rng, (1, n_kv, n, d));
    let v = rand_t(&mut rng, (1, n_kv, n, d));
    let want = attention(&q, &k, &v, Mask::causal()).unwrap();
    let raw = Tensor::zeros((1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let mut cache = LayerKv::new();
    let mut outs = Vec::new();
    let mut start = 0;
    for (len, phase) in [
        (23, Phase::Prefill),
        (1, Phase::Decode),
        (1, Phase::Decode),
        (1, Phase::Decode),
        (1, Phase::Decode),
        (1, Phase::Decode),
    ] {
        let s = |t: &Tensor| t.narrow(2, start, len).unwrap();
        let (qs, ks, vs) = (s(&q), s(&k), s(&v));
        let x = AttnInput {
            layer: 0,
            q: &qs,
            k: &ks,
            v: &vs,
            q_raw: &raw,
            k_raw: &raw,
            v_raw: &raw,
        };
        outs.push(DenseBackend.forward(phase, &x, &mut cache).unwrap());
        start += len;
    }
    assert_eq!(cache.len(), n);
    let got = Tensor::cat(&outs, 2).unwrap();
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 1e-6, "decode vs one pass: {diff}");
}

#[test]
fn cache_grows_and_keeps_contents() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let k = rand_t(&mut rng, (1, 2, 40, 4));
    let mut cache = LayerKv::new();
    for (a, n) in [(0, 7), (7, 1), (8, 1), (9, 20), (29, 11)] {
        cache
            .append(&k.narrow(2, a, n).unwrap(), &k.narrow(2, a, n).unwrap())
            .unwrap();
    }
    let (ck, cv) = cache.kv().unwrap().unwrap();
    assert_eq!(flat(&ck.contiguous().unwrap()), flat(&k));
    assert_eq!(flat(&cv.contiguous().unwrap()), flat(&k));
}
