//! Ranks on threads: the APB per-rank attention against an explicit boolean-mask f64 reference,
//! the log-sum-exp merge against one attention over the whole cache, and failure handling of the
//! communicator. Tolerance 2e-5 absolute (outputs are convex combinations of values in [-2, 2]).

use apb_plugin::scorer::select_top;
use apb_plugin::{attention_with_lse, reference_attention, Mask};
use apb_plugin::{
    merge_lse, AttentionBackend, AttnInput, Communicator, LayerKv, LocalGroup, Method, Phase,
    QuestionMask, RankBackend, RankLayout, Scorer,
};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn rand_t(rng: &mut rand::rngs::StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

struct RankData {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_raw: Tensor,
    k_raw: Tensor,
    v_raw: Tensor,
    layout: RankLayout,
}

#[test]
fn apb_rank_attention_matches_boolean_mask_reference() {
    // 3 ranks, GQA 6/2, d 8, block 23 (odd), anchor 7 on ranks 1-2, l_p 5, padding 4 on the last.
    let (world, n_h, n_kv, d, l_b, l_a, l_p, pad) = (3, 6, 2, 8, 23, 7, 5, 4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let data: Vec<RankData> = (0..world)
        .map(|h| {
            let anchor = if h > 0 { l_a } else { 0 };
            let s = anchor + l_b;
            let layout = RankLayout {
                anchor,
                local: l_b,
                pad: if h == world - 1 { pad } else { 0 },
                l_p,
                exclude_front: l_a,
                question_rows: 1..4,
                ..Default::default()
            };
            RankData {
                q: rand_t(&mut rng, &[1, n_h, s, d]),
                k: rand_t(&mut rng, &[1, n_kv, s, d]),
                v: rand_t(&mut rng, &[1, n_kv, s, d]),
                q_raw: rand_t(&mut rng, &[1, s, n_h * d]),
                k_raw: rand_t(&mut rng, &[1, s, n_kv * d]),
                v_raw: rand_t(&mut rng, &[1, s, n_kv * d]),
                layout,
            }
        })
        .collect();
    let comms = LocalGroup::ranks(world);
    let outs: Vec<(Tensor, LayerKv)> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .zip(&data)
            .map(|(c, r)| {
                let c: Arc<dyn Communicator> = c.clone();
                s.spawn(move || {
                    let b = RankBackend::new(Method::APB, c, r.layout.clone(), Scorer::QueryAware)
                        .unwrap();
                    let x = AttnInput {
                        layer: 0,
                        q: &r.q,
                        k: &r.k,
                        v: &r.v,
                        q_raw: &r.q_raw,
                        k_raw: &r.k_raw,
                        v_raw: &r.v_raw,
                    };
                    let mut cache = LayerKv::new();
                    let o = b.forward(Phase::Prefill, &x, &mut cache).unwrap();
                    (o, cache)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Expected passing blocks, built independently: scores → picks → gathered K/V per KV head.
    let picks: Vec<Vec<Vec<u32>>> = data
        .iter()
        .map(|r| {
            let l = &r.layout;
            let sc = Scorer::QueryAware
                .score(
                    0,
                    &r.q_raw,
                    &r.k_raw,
                    &r.v_raw,
                    n_kv,
                    l.question_rows.clone(),
                )
                .unwrap();
            select_top(&sc, l.exclude_front..l.anchor + l.local - l.pad, l_p)
                .unwrap()
                .to_vec2::<u32>()
                .unwrap()
        })
        .collect();
    for (h, r) in data.iter().enumerate() {
        let gather = |t: &Tensor, src: usize| {
            let heads: Vec<Tensor> = (0..n_kv)
                .map(|kh| {
                    t.narrow(1, kh, 1)
                        .unwrap()
                        .index_select(
                            &Tensor::new(picks[src][kh].as_slice(), &Device::Cpu).unwrap(),
                            2,
                        )
                        .unwrap()
                })
                .collect();
            Tensor::cat(&heads, 1).unwrap()
        };
        let mut ks: Vec<Tensor> = (0..h).map(|src| gather(&data[src].k, src)).collect();
        let mut vs: Vec<Tensor> = (0..h).map(|src| gather(&data[src].v, src)).collect();
        ks.push(r.k.clone());
        vs.push(r.v.clone());
        let (k, v) = (Tensor::cat(&ks, 2).unwrap(), Tensor::cat(&vs, 2).unwrap());
        let p = h * l_p;
        let a = r.layout.anchor;
        // Anchor rows: anchor keys up to themselves. Local rows: all passing, all anchor, causal local.
        let mask = |i: usize, j: usize| {
            if i < a {
                j >= p && j <= p + i
            } else {
                j <= p + i
            }
        };
        let (want, _) = reference_attention(&r.q, &k, &v, mask).unwrap();
        let got = flat(&outs[h].0);
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
        assert!(worst <= 2e-5, "rank {h}: worst abs error {worst}");
        // The cache keeps the real local block only.
        assert_eq!(outs[h].1.len(), l_b - r.layout.pad, "rank {h} cache");
        let (ck, _) = outs[h].1.kv().unwrap().unwrap();
        assert_eq!(
            flat(&ck.contiguous().unwrap()),
            flat(
                &r.k.narrow(2, a, l_b - r.layout.pad)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            )
        );
    }
}

#[test]
fn lse_merge_over_split_cache_equals_one_attention() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let (n_h, n_kv, d, sq) = (4, 2, 16, 3);
    let q = rand_t(&mut rng, &[1, n_h, sq, d]);
    let k = rand_t(&mut rng, &[1, n_kv, 50, d]);
    let v = rand_t(&mut rng, &[1, n_kv, 50, d]);
    let (want, want_lse) = attention_with_lse(&q, &k, &v, Mask::full()).unwrap();
    // Parts of 17, 0 (a rank with nothing: LSE -inf) and 33 keys.
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (a, n) in [(0, 17), (17, 0), (17, 33)] {
        let (o, l) = attention_with_lse(
            &q,
            &k.narrow(2, a, n).unwrap(),
            &v.narrow(2, a, n).unwrap(),
            Mask::full(),
        )
        .unwrap();
        outs.push(o);
        lses.push(l);
    }
    assert!(flat(&lses[1]).iter().all(|x| *x == f32::NEG_INFINITY));
    let got = merge_lse(&outs, &lses).unwrap();
    let worst = flat(&got)
        .iter()
        .zip(flat(&want))
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(worst <= 2e-6, "merge error {worst}");
    assert!(flat(&want_lse).iter().all(|x| x.is_finite()));
    // All parts empty → zeros, not NaN.
    let none = merge_lse(&outs[1..2], &lses[1..2]).unwrap();
    assert!(flat(&none).iter().all(|x| *x == 0.0));
}

/// Generated rows kept round robin (`generated_kv_rank`) through the per-row `decode_part`,
/// on a non-last rank too: each rank's cache grows by the rows it keeps, and every row's
/// merged output equals one attention over the whole context and every new key up to it.
#[test]
fn generated_rows_kept_on_any_rank_equal_one_attention() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let (n_h, n_kv, d, ctx, new) = (4, 2, 16, 45, 5);
    let k_all = rand_t(&mut rng, &[1, n_kv, ctx + new, d]);
    let v_all = rand_t(&mut rng, &[1, n_kv, ctx + new, d]);
    let comms = LocalGroup::ranks(2);
    let backends: Vec<RankBackend> = comms
        .iter()
        .map(|c| {
            let comm: Arc<dyn Communicator> = c.clone();
            RankBackend::new(
                Method::ZIGZAG,
                comm,
                RankLayout::default(),
                Scorer::QueryAware,
            )
            .unwrap()
        })
        .collect();
    // The context: 20 keys on rank 0, 25 on rank 1; room for it and the rank's new rows.
    let room = |h: usize, context: usize| context + apb_plugin::new_kv_rows(h, 2, 0, new);
    let mut caches = [
        LayerKv::with_room(room(0, 20)),
        LayerKv::with_room(room(1, 25)),
    ];
    for (cache, (a, n)) in caches.iter_mut().zip([(0, 20), (20, 25)]) {
        cache
            .append(
                &k_all.narrow(2, a, n).unwrap(),
                &v_all.narrow(2, a, n).unwrap(),
            )
            .unwrap();
    }
    for j in 0..new {
        let q = rand_t(&mut rng, &[1, n_h, 1, d]);
        let (k, v) = (
            k_all.narrow(2, ctx + j, 1).unwrap(),
            v_all.narrow(2, ctx + j, 1).unwrap(),
        );
        let raw = Tensor::zeros((1, 1, n_h * d), DType::F32, &Device::Cpu).unwrap();
        let x = AttnInput {
            layer: 0,
            q: &q,
            k: &k,
            v: &v,
            q_raw: &raw,
            k_raw: &raw,
            v_raw: &raw,
        };
        let keeper = apb_plugin::generated_kv_rank(j, 2);
        let (outs, lses): (Vec<Tensor>, Vec<Tensor>) = backends
            .iter()
            .zip(caches.iter_mut())
            .enumerate()
            .map(|(h, (b, c))| b.decode_part(&x, c, h == keeper).unwrap())
            .unzip();
        let got = merge_lse(&outs, &lses).unwrap();
        let seen = ctx + j + 1;
        let (want, _) = attention_with_lse(
            &q,
            &k_all.narrow(2, 0, seen).unwrap(),
            &v_all.narrow(2, 0, seen).unwrap(),
            Mask::full(),
        )
        .unwrap();
        let worst = flat(&got)
            .iter()
            .zip(flat(&want))
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(worst <= 2e-5, "row {j}: error {worst}");
    }
    // Rows 0, 2, 4 on rank 0 and 1, 3 on rank 1, each exactly the room it was given (the
    // first allocation was not outgrown).
    assert_eq!((caches[0].len(), caches[1].len()), (23, 27));
    assert_eq!((caches[0].capacity(), caches[1].capacity()), (23, 27));
}

#[test]
fn a_failing_rank_aborts_the_group_instead_of_hanging() {
    let comms = LocalGroup::ranks(3);
    let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    let start = std::time::Instant::now();
    let res: Vec<Result<usize, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                let t = t.clone();
                s.spawn(move || {
                    // One good collective, then rank 1 fails before the second.
                    c.all_gather(&t).map_err(|e| e.to_string())?;
                    if c.rank() == 1 {
                        c.abort("rank 1 failed: boom");
                        return Err("boom".into());
                    }
                    c.all_gather(&t).map(|v| v.len()).map_err(|e| e.to_string())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed().as_secs() < 10);
    for (r, x) in res.iter().enumerate() {
        let e = x.as_ref().expect_err("every rank fails");
        assert!(e.contains("boom"), "rank {r}: {e}");
    }
}

#[test]
fn broadcast_and_gather_order() {
    let comms = LocalGroup::ranks(4);
    let res: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let mine = Tensor::new(&[c.rank() as f32], &Device::Cpu).unwrap();
                    let all = c
                        .all_gather(&mine)
                        .unwrap()
                        .iter()
                        .map(|t| t.to_vec1::<f32>().unwrap()[0])
                        .collect();
                    let b = c
                        .broadcast((c.rank() == 3).then_some(&mine), 3)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    (all, b)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (all, b) in res {
        assert_eq!(all, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(b, vec![3.0]);
    }
}

/// The question segment (`q_len` rows at once) on 2 ranks holding caches of `c0` and `c1` keys:
/// rank 0 attends its cache under `qm`, the last rank its cache and the new rows causally, merged
/// by log-sum-exp. Returns each rank's merged output (f32) and the f64 reference over
/// [cache 0 | cache 1 | new] with the boolean mask `qm` names: `full` lets every row see all of
/// rank 0's cache; `causal` (thunlp/APB's quirk) is bottom-right aligned there, so row i misses
/// rank 0's last `q_len − 1 − i` keys.
fn question_segment(qm: QuestionMask, dtype: DType, seed: u64) -> (Vec<Vec<f32>>, Vec<f64>) {
    let (n_h, n_kv, d, c0, c1, q_len) = (4, 2, 8, 13, 11, 5);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut r = |shape: &[usize]| rand_t(&mut rng, shape).to_dtype(dtype).unwrap();
    let caches: Vec<(Tensor, Tensor)> = [c0, c1]
        .iter()
        .map(|&c| (r(&[1, n_kv, c, d]), r(&[1, n_kv, c, d])))
        .collect();
    let (q, k, v) = (
        r(&[1, n_h, q_len, d]),
        r(&[1, n_kv, q_len, d]),
        r(&[1, n_kv, q_len, d]),
    );
    let all_k = Tensor::cat(&[&caches[0].0, &caches[1].0, &k], 2).unwrap();
    let all_v = Tensor::cat(&[&caches[0].1, &caches[1].1, &v], 2).unwrap();
    let comms = LocalGroup::ranks(2);
    let got: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .zip(&caches)
            .map(|(c, (ck, cv))| {
                let c: Arc<dyn Communicator> = c.clone();
                let (q, k, v) = (&q, &k, &v);
                s.spawn(move || {
                    let layout = RankLayout {
                        question_mask: qm,
                        ..Default::default()
                    };
                    let b = RankBackend::new(Method::APB, c, layout, Scorer::QueryAware).unwrap();
                    let mut cache = LayerKv::new();
                    cache.append(ck, cv).unwrap();
                    let x = AttnInput {
                        layer: 0,
                        q,
                        k,
                        v,
                        q_raw: q,
                        k_raw: k,
                        v_raw: v,
                    };
                    let o = b.forward(Phase::Decode, &x, &mut cache).unwrap();
                    assert_eq!(o.dtype(), dtype);
                    flat(&o.to_dtype(DType::F32).unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mask = |i: usize, j: usize| {
        if j < c0 {
            qm == QuestionMask::Full || j + q_len <= c0 + i
        } else if j < c0 + c1 {
            true
        } else {
            j - c0 - c1 <= i
        }
    };
    (
        got,
        reference_attention(&q, &all_k, &all_v, mask).unwrap().0,
    )
}

fn worst_abs(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()))
}

/// Each question mask equals its boolean mask (f32, 2e-5); they differ where the masks do.
#[test]
fn question_mask_on_a_non_last_rank_matches_its_boolean_mask() {
    let d = 8;
    let mut outs = Vec::new();
    for qm in [QuestionMask::Full, QuestionMask::Causal] {
        let (got, want) = question_segment(qm, DType::F32, 23);
        for (h, o) in got.iter().enumerate() {
            let worst = worst_abs(o, &want);
            assert!(worst <= 2e-5, "{qm:?}, rank {h}: worst abs error {worst}");
        }
        outs.push(got[0].clone());
    }
    // The last question row sees all of rank 0's cache under both masks; the first does not.
    let row_diff = |i: usize| {
        (i * d..(i + 1) * d)
            .map(|x| (outs[0][x] - outs[1][x]).abs())
            .fold(0f32, f32::max)
    };
    assert!(row_diff(4) <= 1e-6, "last row differs by {}", row_diff(4));
    assert!(
        row_diff(0) > 1e-3,
        "first row should differ, by {}",
        row_diff(0)
    );
}

/// An accuracy bound for gathering partial outputs in the model dtype: a bf16 question segment
/// matches the f64 reference on the same (bf16-rounded) inputs within bf16's rounding of the
/// partials and the output (values in [-2, 2]: 2⁻⁸ relative each, 1.6e-2 absolute allowed).
#[test]
fn decode_gathered_in_bf16_matches_the_reference() {
    let (got, want) = question_segment(QuestionMask::Full, DType::BF16, 24);
    for (h, o) in got.iter().enumerate() {
        let worst = worst_abs(o, &want);
        assert!(worst <= 1.6e-2, "rank {h}: worst abs error {worst}");
    }
}
