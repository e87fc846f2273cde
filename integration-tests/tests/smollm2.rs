//! The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) against HF transformers reading the
//! same GGUF: tokenization, last-position logits and 16-token greedy continuations.
//!
//! Tolerance: the top-20 reference logits within 2e-3 + 1e-3·|ref| (both sides dequantize the same
//! Q4_1/Q8_0 blocks to f32; differences are summation order over 30 layers); same argmax.

use apb_integration_tests::*;
use apb_loaders::{load, ModelSource};
use apb_plugin::DenseBackend;
use candle_core::{DType, Device};

#[test]
fn smollm2_matches_transformers() {
    let loaded = load(&ModelSource::Gguf(smollm2_gguf()), DType::F32, &Device::Cpu).unwrap();
    let exp = read_json(fixture("smollm2").join("expected.json"));
    for case in exp["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ids = u32s(&case["input_ids"]);
        assert_eq!(
            loaded.tok.encode(case["text"].as_str().unwrap()).unwrap(),
            ids,
            "{name}: tokenization"
        );
        let logits = all_logits(&loaded.model, &DenseBackend, &ids);
        let last = logits.last().unwrap();
        let top = u32s(&case["top_ids"]);
        let ours: Vec<f32> = top.iter().map(|&i| last[i as usize]).collect();
        let r = worst_ratio(&ours, &f32s(&case["top_logits"]), 2e-3, 1e-3);
        assert!(r <= 1.0, "{name}: top-20 logits off by {r}x the tolerance");
        assert_eq!(apb_host::sampling::argmax(last), top[0], "{name}: argmax");
        assert_eq!(
            greedy(&loaded.model, &DenseBackend, &ids, 16),
            u32s(&case["greedy"]),
            "{name}: greedy continuation"
        );
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    let loaded = load(&ModelSource::Gguf(smollm2_gguf()), DType::F32, &Device::Cpu).unwrap();
    let exp = read_json(fixture("smollm2").join("expected.json"));
    let chat = exp["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "chat")
        .unwrap();
    let rendered = loaded
        .tok
        .apply_chat_template(&[apb_loaders::ChatMessage::user(
            "What is the largest planet in the solar system?",
        )])
        .unwrap();
    assert_eq!(rendered, chat["text"].as_str().unwrap());
    assert!(
        loaded.tok.stop_ids.contains(&2),
        "<|im_end|> stops generation"
    );
}

/// Long texts are encoded in parallel pieces (the server's time to first token): the ids must be
/// exactly those of encoding the text whole, for the default model and the fixtures' tokenizers.
#[test]
fn parallel_encoding_equals_whole_text_encoding() {
    let mut text = String::new();
    let words = [
        "the",
        "river's",
        "don't",
        "Ünïcödé",
        "naïve",
        "42",
        "3.14159",
        "x=y+z;",
        "\n\n",
        "  double  space",
        "tab\tbed",
        "<|im_start|>",
        "emoji 🎉",
        "CamelCase",
        "end.",
        "über",
        "日本語のテキスト",
        "a",
        "I",
        "'ll",
    ];
    let mut x = 7u64;
    while text.len() < 300_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(words[(x % words.len() as u64) as usize]);
        text.push(if x.is_multiple_of(11) { '\n' } else { ' ' });
    }
    let smol = load(&ModelSource::Gguf(smollm2_gguf()), DType::F32, &Device::Cpu).unwrap();
    assert!(
        smol.tok.encodes_in_parallel(),
        "SmolLM2's byte-level BPE splits"
    );
    let mut checked = 0;
    let fixtures = ["tiny-llama31", "tiny-qwen2", "tiny-yi"]
        .map(|n| load(&ModelSource::Dir(fixture(n)), DType::F32, &Device::Cpu).unwrap());
    for (name, tok) in std::iter::once(("smollm2", &smol.tok)).chain(
        ["tiny-llama31", "tiny-qwen2", "tiny-yi"]
            .into_iter()
            .zip(fixtures.iter().map(|l| &l.tok)),
    ) {
        let whole = tok.tokenizer.encode(text.as_str(), false).unwrap();
        assert_eq!(
            tok.encode(&text).unwrap(),
            whole.get_ids(),
            "{name}: encode differs from the whole text"
        );
        if tok.encodes_in_parallel() {
            // As on machines of 2, 3 and 8 threads, for trusted and for user text.
            for parts in [2, 3, 8] {
                assert_eq!(
                    tok.encode_in_pieces(&text, parts, false).unwrap(),
                    whole.get_ids(),
                    "{name}: {parts} pieces differ from the whole text"
                );
                assert_eq!(
                    tok.encode_in_pieces(&text, parts, true).unwrap(),
                    tok.encode_in_pieces(&text, 1, true).unwrap(),
                    "{name}: {parts} plain pieces"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 1);
}
