//! The real default model end to end on CPU ranks: a ≥4K-token needle-in-a-haystack prompt,
//! answered by `dense` and by APB (training-free scorer) on 2 and 4 ranks.

use apb_host::dist::{self, DistConfig};
use apb_host::{prompt, GenParams};
use apb_integration_tests::*;
use apb_loaders::{load, ModelSource};
use apb_plugin::{Dense, Kind, Scorer};
use candle_core::{DType, Device};

#[test]
fn apb_finds_the_needle_like_dense() {
    let m = load(&ModelSource::Gguf(smollm2_gguf()), DType::F32, &Device::Cpu).unwrap();
    let doc = haystack(370, 0.45, "The special magic number is 73914.", 7);
    let parts = prompt::build(
        &m.tok,
        &doc,
        Some("What is the special magic number?"),
        true,
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

    let dense =
        apb_host::engine::generate(&m.model, &m.tok, &Dense, &parts.all(), &params, &mut |_| {})
            .unwrap();
    assert!(dense.text.contains("73914"), "dense: {:?}", dense.text);

    for world in [2, 4] {
        let cfg = DistConfig {
            kind: Kind::Apb,
            world,
            anchor_len: None,
            passing_len: None,
            scorer: Scorer::QueryAware,
        };
        let d = dist::generate(&m.model, &m.tok, &parts, &cfg, &params, &mut |_| {}).unwrap();
        assert_eq!(d.plan.world, world);
        assert!(d.plan.l_a >= parts.prefix_len + parts.question.len() && d.plan.l_p > 0);
        assert!(
            d.generation.text.contains("73914"),
            "apb H={world}: {:?}",
            d.generation.text
        );
    }
}
