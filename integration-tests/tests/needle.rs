//! The real default model end to end on CPU ranks: a ≥4K-token needle-in-a-haystack prompt,
//! answered by `dense`, by APB (training-free scorer) on 2 and 4 ranks, by Spava on 4 ranks, and
//! by APB with the retaining heads shipped for the model (`--heads smollm2-135m-instruct`) on 4
//! ranks; Spava on 2 ranks equals APB on 4.

use apb_host::Method;
use apb_host::{prompt, GenParams};
use apb_integration_tests::*;
use apb_plugin::Scorer;
use candle_core::{DType, Device};

#[test]
fn apb_finds_the_needle_like_dense() {
    let m = smollm2_runner();
    let doc = haystack(370, 0.45, "The special magic number is 73914.", 7);
    let parts = prompt::build(
        m.tok(),
        &doc,
        Some("What is the special magic number?"),
        true,
        false,
    )
    .unwrap();
    assert!(
        parts.context.len() >= 4000,
        "{} context tokens",
        parts.context.len()
    );
    let params = GenParams {
        max_new_tokens: 12,
        ..Default::default()
    };

    let dense = run_job(&m, &job(&parts, Method::DENSE, 1, &params));
    assert!(dense.text.contains("73914"), "dense: {:?}", dense.text);

    for world in [2, 4] {
        let d = run_job(&m, &job(&parts, Method::APB, world, &params));
        assert_eq!(d.plan.world, world);
        assert!(d.plan.l_a >= parts.prefix_len + parts.question.len() && d.plan.l_p > 0);
        assert!(d.text.contains("73914"), "apb H={world}: {:?}", d.text);
    }

    // Spava on 4 ranks (8 zigzag chunks) finds it too.
    let d = run_job(&m, &job(&parts, Method::SPAVA, 4, &params));
    assert_eq!(d.plan.world, 4);
    assert!(d.text.contains("73914"), "spava H=4: {:?}", d.text);

    // Spava on 2 ranks is APB on 4 (a short prompt; 30 layers carry any difference in the
    // anchor rows, which the 2-layer fixtures cannot show).
    let short = prompt::build(
        m.tok(),
        &haystack(40, 0.5, "The special magic number is 73914.", 3),
        Some("What is the special magic number?"),
        true,
        false,
    )
    .unwrap();
    let small = |method, world| {
        let j = apb_host::Job {
            anchor_len: Some(64),
            passing_len: Some(32),
            ..job(
                &short,
                method,
                world,
                &GenParams {
                    max_new_tokens: 4,
                    ignore_eos: true,
                    ..Default::default()
                },
            )
        };
        run_job(&m, &j)
    };
    let (apb, spava) = (small(Method::APB, 4), small(Method::SPAVA, 2));
    assert_eq!((apb.plan.world, spava.plan.world), (4, 2));
    let rel = first_logits_rel_diff(&spava, &apb);
    assert!(
        rel <= 1e-5,
        "spava H=2 vs apb H=4: first-token logits differ by {rel}"
    );
    assert_eq!(spava.tokens, apb.tokens);

    let heads = apb_loaders::heads::load_heads(
        "smollm2-135m-instruct",
        &m.model().cfg,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut trained = m.clone();
    trained.scorer = Scorer::Heads(std::sync::Arc::new(heads));
    let d = run_job(&trained, &job(&parts, Method::APB, 4, &params));
    assert!(d.text.contains("73914"), "apb + heads H=4: {:?}", d.text);
}
