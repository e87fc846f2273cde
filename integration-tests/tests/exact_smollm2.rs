//! The exact sequence-parallel methods on the real default model: a ≥ 4K-token prompt through
//! `zigzag` on 4 CPU ranks and `ulysses` on 3 (SmolLM2-135M has 3 KV heads) equals `dense`.
//!
//! Tolerance: first-token logits within 1e-5 relative (‖Δ‖∞ / ‖ref‖∞) in f32, 16 greedy tokens
//! identical.

use apb_host::{prompt, GenParams, Method};
use apb_integration_tests::*;

#[test]
fn zigzag_and_ulysses_equal_dense_on_smollm2_at_4k() {
    let m = smollm2_runner();
    assert_eq!(m.model().cfg.num_key_value_heads, 3);
    let doc = haystack(370, 0.6, "The pass code of the vault is 51170.", 3);
    let parts = prompt::build(
        m.tok(),
        &doc,
        Some("What is the pass code of the vault?"),
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
        max_new_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    };
    let want = run_job(&m, &job(&parts, Method::DENSE, 1, &params));
    for (method, world) in [(Method::ZIGZAG, 4), (Method::ULYSSES, 3)] {
        let got = run_job(&m, &job(&parts, method, world, &params));
        assert_eq!(got.plan.world, world, "{method}");
        let rel = first_logits_rel_diff(&got, &want);
        assert!(
            rel <= 1e-5,
            "{method} H={world}: first-token logits off by {rel} relative"
        );
        assert_eq!(
            got.tokens, want.tokens,
            "{method} H={world}: greedy continuation"
        );
    }
}
