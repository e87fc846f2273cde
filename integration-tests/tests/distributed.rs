//! Distributed backends on CPU ranks (threads over `LocalGroup`) against the exact `dense`
//! backend, on random-weight checkpoints in f32.
//!
//! Tolerance: first-token logits within 1e-5 relative (‖Δ‖∞ / ‖ref‖∞), greedy continuations
//! identical. The degenerate APB setting (no anchor, everything passed) must reduce to dense for
//! prefill *and* for the LSE-merged decode over caches split across ranks.

use apb_host::prompt::PromptParts;
use apb_host::Method;
use apb_host::{GenParams, Generation, Runner};
use apb_integration_tests::*;
use apb_loaders::{load, ModelSource};
use apb_plugin::Scorer;
use candle_core::{DType, Device};

fn tiny(name: &str) -> Runner {
    let m = load(&ModelSource::Dir(fixture(name)), DType::F32, &Device::Cpu).unwrap();
    Runner::new(m, Scorer::QueryAware)
}

fn parts(name: &str) -> PromptParts {
    fixture_parts(name)
}

fn params() -> GenParams {
    GenParams {
        max_new_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    }
}

fn dense(m: &Runner, p: &PromptParts) -> Generation {
    run_job(m, &job(p, Method::DENSE, 1, &params()))
}

fn run(
    m: &Runner,
    p: &PromptParts,
    method: Method,
    world: usize,
    anchor: Option<usize>,
    passing: Option<usize>,
) -> Generation {
    let mut j = job(p, method, world, &params());
    (j.settings.anchor_len, j.settings.passing_len) = (anchor, passing);
    run_job(m, &j)
}

fn assert_same(label: &str, got: &Generation, want: &Generation) {
    let rel = first_logits_rel_diff(got, want);
    assert!(
        rel <= 1e-5,
        "{label}: first-token logits differ by {rel} relative"
    );
    assert_eq!(got.tokens, want.tokens, "{label}: greedy continuation");
}

#[test]
fn one_rank_of_every_method_equals_dense() {
    for name in ["tiny-llama31", "tiny-qwen2"] {
        let m = tiny(name);
        let p = parts(name);
        let want = dense(&m, &p);
        for kind in Method::ALL.into_iter().filter(|m| !m.is_dense()) {
            let d = run(&m, &p, kind, 1, None, None);
            assert_eq!(d.plan.world, 1);
            assert_same(&format!("{name} {kind:?} H=1"), &d, &want);
        }
    }
}

#[test]
fn ring_equals_dense_on_2_3_4_ranks() {
    for name in ["tiny-llama31", "tiny-yi", "tiny-qwen2"] {
        let m = tiny(name);
        let p = parts(name);
        let want = dense(&m, &p);
        for world in [2, 3, 4] {
            let d = run(&m, &p, Method::RING, world, None, None);
            assert_eq!(d.plan.world, world);
            assert_same(&format!("{name} ring H={world}"), &d, &want);
        }
    }
}

#[test]
fn zigzag_equals_dense_on_2_3_4_ranks() {
    // 61 context tokens: chunks of 16 / 11 / 8, so rank 0's last chunk is padded (3 / 5 / 3).
    for name in ["tiny-llama31", "tiny-yi", "tiny-qwen2"] {
        let m = tiny(name);
        let p = parts(name);
        let want = dense(&m, &p);
        for world in [2, 3, 4] {
            let d = run(&m, &p, Method::ZIGZAG, world, None, None);
            assert_eq!(d.plan.world, world);
            assert!(d.plan.pad() > 0, "{:?}", d.plan);
            assert_same(&format!("{name} zigzag H={world}"), &d, &want);
            // Balanced: every rank runs the same number of rows.
            assert!(d.rank_prefill_tokens.iter().all(|&r| r == d.plan.l_b));
        }
    }
}

#[test]
fn ulysses_equals_dense_where_heads_divide() {
    // The fixtures have 2 KV heads: 2 ranks split them (61 tokens: block 31, one padding row);
    // 3 and 4 ranks are refused with the alternatives named.
    for name in ["tiny-llama31", "tiny-yi", "tiny-qwen2"] {
        let m = tiny(name);
        let p = parts(name);
        let want = dense(&m, &p);
        let d = run(&m, &p, Method::ULYSSES, 2, None, None);
        assert_eq!((d.plan.world, d.plan.pad()), (2, 1));
        assert_same(&format!("{name} ulysses H=2"), &d, &want);
        for world in [3, 4] {
            let j = job(&p, Method::ULYSSES, world, &params());
            let e = apb_host::runner::prepare(m.model(), &j).unwrap_err().0;
            assert!(e.contains("2 KV heads") && e.contains("zigzag"), "{e}");
        }
    }
}

#[test]
fn apb_passing_everything_without_anchor_equals_dense() {
    for name in ["tiny-llama31", "tiny-qwen2"] {
        let m = tiny(name);
        let p = parts(name);
        let want = dense(&m, &p);
        for world in [2, 3, 4] {
            let l_b = p.context.len().div_ceil(world);
            let d = run(&m, &p, Method::APB, world, Some(0), Some(l_b));
            assert_eq!((d.plan.world, d.plan.l_a, d.plan.l_p), (world, 0, l_b));
            assert_same(&format!("{name} apb(l_a=0, l_p=l_b) H={world}"), &d, &want);
        }
    }
}

#[test]
fn apb_with_anchor_and_partial_passing_differs_but_runs() {
    // Not exact by design: with an anchor and l_p < l_b, APB approximates. It must run, report
    // its plan, and give finite logits close in distribution to dense on this tiny input.
    let m = tiny("tiny-llama31");
    let p = parts("tiny-llama31");
    let d = run(&m, &p, Method::APB, 2, Some(8), Some(10));
    assert_eq!(
        (d.plan.world, d.plan.l_b, d.plan.l_a, d.plan.l_p),
        (2, 31, 8, 10)
    );
    assert_eq!(
        d.rank_prefill_tokens,
        vec![31 + 4, 8 + 31],
        "rank 0 runs its block + question probe, rank 1 anchor + block"
    );
    assert!(d.first_logits.iter().all(|x| x.is_finite()));
    assert_eq!(d.tokens.len(), 8);
}

#[test]
fn spava_passing_everything_without_anchor_equals_dense() {
    // No anchor and every chunk's keys passed on: each chunk sees all earlier tokens, exactly.
    // Without passing, each chunk sees only itself: it runs, and is not dense.
    for name in ["tiny-llama31", "tiny-qwen2"] {
        let m = tiny(name);
        let p = parts(name);
        let want = dense(&m, &p);
        for world in [2, 3] {
            let c = p.context.len().div_ceil(2 * world);
            let d = run(&m, &p, Method::SPAVA, world, Some(0), Some(c));
            assert_eq!((d.plan.world, d.plan.l_a, d.plan.l_p), (world, 0, c));
            assert_same(&format!("{name} spava(l_a=0, l_p=c) H={world}"), &d, &want);
            let d = run(&m, &p, Method::SPAVA, world, Some(0), Some(0));
            assert_eq!((d.plan.world, d.plan.l_p), (world, 0));
            assert!(d.first_logits.iter().all(|x| x.is_finite()));
            assert!(first_logits_rel_diff(&d, &want) > 1e-4, "{name} H={world}");
        }
    }
}

#[test]
fn spava_on_2_ranks_equals_apb_on_4() {
    // Spava is APB over 2H virtual hosts placed zigzag: the same tokens and, up to the order of
    // the LSE merge, the same logits. With the fixture retaining heads and the training-free
    // scorer (rank 0's chunk 0 scored from its probe, as APB's rank 0). 61 tokens: chunks of 16,
    // the last padded by 3; anchor 6 (4 question tokens), 5 passed per chunk.
    let m = tiny("tiny-llama31");
    let heads = apb_loaders::heads::load_heads(
        fixture("heads").join("heads.safetensors").to_str().unwrap(),
        &m.model().cfg,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut trained = m.clone();
    trained.scorer = Scorer::Heads(std::sync::Arc::new(heads));
    let p = parts("tiny-llama31");
    for (label, runner) in [("heads", &trained), ("query-aware", &m)] {
        let apb = run(runner, &p, Method::APB, 4, Some(6), Some(5));
        let spava = run(runner, &p, Method::SPAVA, 2, Some(6), Some(5));
        assert_eq!((apb.plan.world, apb.plan.l_b), (4, 16));
        assert_eq!(
            (
                spava.plan.world,
                spava.plan.l_b,
                spava.plan.l_a,
                spava.plan.l_p
            ),
            (2, 32, 6, 5)
        );
        assert_same(&format!("spava H=2 vs apb H=4, {label}"), &spava, &apb);
        // Not dense: the passing blocks are partial.
        assert!(
            first_logits_rel_diff(&spava, &dense(runner, &p)) > 1e-4,
            "{label}"
        );
    }
}

#[test]
fn context_limit_ends_with_length_and_stop_strings_cut() {
    // tiny-llama31's context is 512 positions: asking for 1000 new tokens stops at the context,
    // and that is "length", not "stop".
    let m = tiny("tiny-llama31");
    let p = parts("tiny-llama31");
    let long = GenParams {
        max_new_tokens: 1000,
        ignore_eos: true,
        ..Default::default()
    };
    let g = run_job(&m, &job(&p, Method::DENSE, 1, &long));
    assert_eq!(g.finish, apb_host::Finish::Length);
    assert_eq!(g.tokens.len(), 512 - p.len());
    let g2 = run_job(&m, &job(&p, Method::RING, 2, &long));
    assert_eq!(g2.finish, apb_host::Finish::Length);
    assert_eq!(
        g2.tokens, g.tokens,
        "ring over 2 ranks to the context limit"
    );

    // A stop string taken from the greedy text ends it there, on every rank alike.
    let text = g.text.clone();
    let cut = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= 8)
        .expect("some text");
    let stop = text[cut..].chars().take(3).collect::<String>();
    let first = text.find(&stop).unwrap();
    let with_stop = GenParams {
        stop: vec![stop.clone()],
        ..long
    };
    for (method, world) in [(Method::DENSE, 1), (Method::RING, 3)] {
        let s = run_job(&m, &job(&p, method, world, &with_stop));
        assert_eq!(s.finish, apb_host::Finish::Stop, "{method:?}");
        assert_eq!(s.text, text[..first], "{method:?} stop {stop:?}");
    }
}
