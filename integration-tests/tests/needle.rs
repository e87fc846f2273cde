//! The real default model end to end on CPU ranks: a ≥4K-token needle-in-a-haystack prompt,
//! answered by `dense` and by APB (training-free scorer) on 2 and 4 ranks, and by APB with the
//! retaining heads shipped for the model (`--heads smollm2-135m-instruct`) on 4 ranks.

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
