//! Shared helpers for the integration tests: fixture paths, the default model, greedy decoding
//! straight on the model (no stop tokens, as the reference scripts do).

use apb_loaders::{Cache, Model};
use apb_plugin::{AttentionBackend, Phase};
use std::path::PathBuf;

/// The repository: `APB_REPO_ROOT` (a test binary carried to another machine), else where this
/// crate was built.
pub fn repo_root() -> PathBuf {
    std::env::var_os("APB_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(name)
}

/// The default model's GGUF. The test command fetches it first; a missing file is a test
/// failure with the fix, never a skip.
pub fn smollm2_gguf() -> PathBuf {
    let (path, how) = apb_loaders::registry::named(apb_loaders::registry::DEFAULT_MODEL)
        .expect("default model is registered");
    assert!(
        path.exists(),
        "{} is missing: run {how} (the README's test command does)",
        path.display()
    );
    path
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON fixture")
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("int") as u32)
        .collect()
}

pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// Logits `(seq, vocab)` of one prefill pass over `ids`.
pub fn all_logits(model: &Model, backend: &dyn AttentionBackend, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = Cache::new(&model.cfg);
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let h = model
        .forward(ids, &pos, Phase::Prefill, backend, &mut cache, &mut |_| {
            Ok(())
        })
        .unwrap();
    model
        .logits(&h)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// Greedy continuation of `ids` for `n` tokens: one prefill, then decode steps.
pub fn greedy(model: &Model, backend: &dyn AttentionBackend, ids: &[u32], n: usize) -> Vec<u32> {
    let mut cache = Cache::new(&model.cfg);
    let pos: Vec<u32> = (0..ids.len() as u32).collect();
    let mut h = model
        .forward(ids, &pos, Phase::Prefill, backend, &mut cache, &mut |_| {
            Ok(())
        })
        .unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let logits = model.last_logits(&h).unwrap().to_vec1::<f32>().unwrap();
        let next = apb_host::sampling::argmax(&logits);
        out.push(next);
        if i + 1 < n {
            let p = (ids.len() + i) as u32;
            h = model
                .forward(
                    &[next],
                    &[p],
                    Phase::Decode,
                    backend,
                    &mut cache,
                    &mut |_| Ok(()),
                )
                .unwrap();
        }
    }
    out
}

/// Largest `|a - b| / (atol + rtol·|b|)`: ≤ 1 means within tolerance.
pub fn worst_ratio(a: &[f32], b: &[f32], atol: f32, rtol: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).abs() / (atol + rtol * y.abs())
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

/// `‖a − b‖₂ / ‖b‖₂`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den.max(f32::MIN_POSITIVE)).sqrt()
}

/// Filler for needle-in-a-haystack prompts: plain, varied sentences.
const FILL: &[&str] = &[
    "The river runs past the old mill and into the valley.",
    "Farmers bring apples and pears to the market every Saturday.",
    "The library on the hill keeps maps from three centuries.",
    "A cold wind came down from the mountains during the night.",
    "Children play football in the park after school.",
    "The bakery opens at six and sells out of bread by noon.",
    "Birds gather on the bridge when the sun goes down.",
    "The museum shows paintings of ships and harbours.",
    "Rain fell on the roofs of the town for most of the week.",
    "The train to the coast leaves twice a day.",
    "Old letters were found in a box under the stairs.",
    "The teacher read a story about a fox and a crow.",
    "Snow covered the fields and the roads were quiet.",
    "The garden has roses, tulips and a small pond.",
    "Fishermen mend their nets on the pier in the morning.",
    "The clock in the square has not worked for years.",
];

/// `n` filler sentences with `needle` inserted at fraction `at` (deterministic for a `seed`).
pub fn haystack(n: usize, at: f64, needle: &str, seed: u64) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut s: Vec<&str> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            FILL[(x >> 33) as usize % FILL.len()]
        })
        .collect();
    s.insert((n as f64 * at) as usize, needle);
    s.join(" ")
}

/// Runs `job` through the one rank program on `job.settings.world` thread ranks sharing `runner`'s
/// weights (what `apb generate` does on the CPU). The result carries the last rank's logits.
pub fn run_job(runner: &apb_host::Runner, job: &apb_host::Job) -> apb_host::Generation {
    let group =
        apb_host::ranks::Group::threads(runner.clone(), job.settings.world).expect("start ranks");
    let never = std::sync::atomic::AtomicBool::new(false);
    let g = group.run(job, &never, &mut |_| {}).unwrap_or_else(|e| {
        panic!(
            "{} on {} ranks: {e}",
            job.settings.method.name(),
            job.settings.world
        )
    });
    group.shutdown().expect("stop ranks");
    g
}

/// A job of `method` on `world` ranks with default layout lengths.
pub fn job(
    prompt: &apb_host::prompt::PromptParts,
    method: apb_host::Method,
    world: usize,
    params: &apb_host::GenParams,
) -> apb_host::Job {
    apb_host::Job {
        prompt: prompt.clone(),
        settings: apb_host::JobSettings::new(method, world),
        params: params.clone(),
    }
}

/// ‖Δ‖∞ / ‖ref‖∞ of two runs' first-token logits: how the exact methods are compared with dense.
pub fn first_logits_rel_diff(got: &apb_host::Generation, want: &apb_host::Generation) -> f32 {
    let scale = want.first_logits.iter().fold(0f32, |a, x| a.max(x.abs()));
    let err = got
        .first_logits
        .iter()
        .zip(&want.first_logits)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    err / scale
}

/// A request from a tiny fixture's random ids: 61 context tokens (odd: padding on the last rank),
/// a 9-token query segment, and a 4-token "question" inside it.
pub fn fixture_parts(name: &str) -> apb_host::prompt::PromptParts {
    let ids = u32s(&read_json(fixture(name).join("expected.json"))["input_ids"]);
    apb_host::prompt::PromptParts {
        context: ids[..61].to_vec(),
        query_segment: ids[61..70].to_vec(),
        question: ids[63..67].to_vec(),
        prefix_len: 0,
    }
}

/// The default model (SmolLM2 GGUF) in f32 on the CPU, with the training-free scorer.
pub fn smollm2_runner() -> apb_host::Runner {
    let loaded = apb_loaders::load(
        &apb_loaders::ModelSource::Gguf(smollm2_gguf()),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .expect("load SmolLM2");
    apb_host::Runner::new(loaded, apb_plugin::Scorer::QueryAware)
}
