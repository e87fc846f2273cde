//! The `apb` binary end to end: the default model answers, and bad input gets a one-line error
//! naming the problem, a non-zero exit and no panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn apb(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_apb"));
    // Library errors capture backtraces under RUST_BACKTRACE; the CLI must still print one line.
    c.env("RUST_BACKTRACE", "1");
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run apb")
}

/// Runs `apb` expecting success (else fails with its stderr) and exactly one JSON object on stdout.
fn apb_json(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let out = apb(args, env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("exactly one JSON object on stdout")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tiny() -> PathBuf {
    root().join("tests/fixtures/tiny-llama31")
}

/// Fails with a clear error: non-zero exit, stderr is one `error:` line mentioning `needle`.
fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        err.contains(needle),
        "error should mention {needle:?}: {err}"
    );
}

fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn default_model_answers_paris_as_json() {
    let v = apb_json(
        &[
            "generate",
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "8",
            "--json",
        ],
        &[],
    );
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["prompt_tokens"], 5);
    assert_eq!(v["generated_tokens"], 8);
    assert_eq!(v["attention"], "dense");
    assert_eq!(v["world_size"], 1);
    assert_eq!(v["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert!(v["prefill_ms"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn streams_chat_answer() {
    let out = apb(
        &[
            "generate",
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "12",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = [
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--json",
    ];
    let a = apb(&args, &[]);
    let b = apb(&args, &[]);
    assert!(a.status.success());
    let text = |o: &Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["text"].clone()
    };
    assert_eq!(text(&a), text(&b));
}

/// `-m random:PRESET`: a preset's (here a config's) shapes with random weights and the default
/// model's tokenizer; the name says so. An unknown preset is a clear error.
#[test]
fn random_weights_run_with_the_default_tokenizer() {
    let config = tiny().join("config.json");
    let model = format!("random:{}", config.display());
    let v = apb_json(
        &[
            "generate",
            "-m",
            &model,
            "--chat",
            "--prompt",
            "Hello there",
            "--max-new-tokens",
            "3",
            "--ignore-eos",
            "--json",
        ],
        &[],
    );
    assert_eq!(v["generated_tokens"], 3, "{v}");
    let name = v["model"].as_str().unwrap();
    assert!(
        name.starts_with("random:") && name.contains("random weights"),
        "{v}"
    );
    assert_clean_error(
        &apb(&["generate", "-m", "random:llama-9b", "--prompt", "x"], &[]),
        "neither a preset",
    );
}

#[test]
fn missing_model_path() {
    assert_clean_error(
        &apb(
            &["generate", "-m", "/nonexistent/model.gguf", "--prompt", "x"],
            &[],
        ),
        "not found",
    );
}

#[test]
fn missing_prompt_file() {
    assert_clean_error(
        &apb(
            &["generate", "--prompt-file", "/nonexistent/prompt.txt"],
            &[],
        ),
        "/nonexistent/prompt.txt",
    );
}

#[test]
fn invalid_utf8_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.txt");
    std::fs::write(&p, b"hello \xff\xfe world").unwrap();
    assert_clean_error(
        &apb(&["generate", "--prompt-file", p.to_str().unwrap()], &[]),
        "not valid UTF-8",
    );
}

#[test]
fn unknown_device_and_dtype_and_backend() {
    assert_clean_error(
        &apb(&["generate", "--prompt", "x", "--device", "tpu"], &[]),
        "unknown device 'tpu'",
    );
    assert_clean_error(
        &apb(&["generate", "--prompt", "x", "--dtype", "f8"], &[]),
        "unknown dtype 'f8'",
    );
    assert_clean_error(
        &apb(&["generate", "--prompt", "x", "--attention", "magic"], &[]),
        "unknown attention method 'magic'",
    );
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.gguf");
    let src = apb_loaders::registry::named("smollm2-135m-instruct")
        .unwrap()
        .0;
    let bytes = std::fs::read(&src).expect("default model fetched (scripts/fetch-model.sh)");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &apb(
            &["generate", "-m", p.to_str().unwrap(), "--prompt", "x"],
            &[],
        ),
        "cut.gguf",
    );
    std::fs::write(&p, b"GGUF garbage").unwrap();
    assert_clean_error(
        &apb(
            &["generate", "-m", p.to_str().unwrap(), "--prompt", "x"],
            &[],
        ),
        "not a readable GGUF",
    );
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny(), dir.path(), &["model.safetensors"]);
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() - 1000],
    )
    .unwrap();
    assert_clean_error(
        &apb(
            &[
                "generate",
                "-m",
                dir.path().to_str().unwrap(),
                "--prompt",
                "x",
            ],
            &[],
        ),
        "safetensors",
    );
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny(), dir.path(), &[]);
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    assert_clean_error(
        &apb(
            &[
                "generate",
                "-m",
                dir.path().to_str().unwrap(),
                "--prompt",
                "x",
            ],
            &[],
        ),
        "unsupported architecture 'GPT2LMHeadModel'",
    );
}

#[test]
fn missing_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&tiny(), dir.path(), &["tokenizer.json"]);
    assert_clean_error(
        &apb(
            &[
                "generate",
                "-m",
                dir.path().to_str().unwrap(),
                "--prompt",
                "x",
            ],
            &[],
        ),
        "missing tokenizer.json",
    );
}

#[test]
fn prompt_over_context() {
    // The tiny model's context is 512 positions; its tokenizer is one token per byte.
    let long = "a".repeat(600);
    assert_clean_error(
        &apb(
            &[
                "generate",
                "-m",
                tiny().to_str().unwrap(),
                "--prompt",
                &long,
            ],
            &[],
        ),
        "context is 512",
    );
}

/// `--rope-scaling` replaces the config's scaling: a longer YaRN factor lets a prompt past the
/// config's context run; a malformed value is refused; a model without scaling names the flag
/// when a prompt does not fit.
#[test]
fn rope_scaling_flag_extends_the_context_and_refuses_bad_json() {
    let yarn = root().join("tests/fixtures/tiny-qwen2-yarn"); // YaRN 64 × 4: 256 positions
    let m = yarn.to_str().unwrap();
    let long = "a".repeat(300);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "-m",
            m,
            "--prompt",
            &long,
            "--max-new-tokens",
            "2",
        ];
        args.extend_from_slice(extra);
        apb(&args, &[])
    };
    assert_clean_error(&run(&[]), "context is 256");
    let wider = r#"{"rope_type":"yarn","factor":8.0,"original_max_position_embeddings":64}"#;
    let out = run(&["--rope-scaling", wider, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], 300, "{v}");
    assert_clean_error(
        &run(&["--rope-scaling", "{yarn"]),
        "--rope-scaling: not JSON",
    );
    assert_clean_error(&run(&["--rope-scaling", ""]), "--rope-scaling is empty");
    assert_clean_error(&run(&[]), "raise the YaRN factor");
    // The server checks the value before it binds its port (and never starts listening).
    assert_clean_error(
        &apb(
            &["serve", "-m", m, "--port", "0", "--rope-scaling", "{yarn"],
            &[],
        ),
        "--rope-scaling: not JSON",
    );
    assert_clean_error(
        &run(&["--rope-scaling", r#"{"type":"dynamic","factor":2}"#]),
        "'dynamic' is not supported",
    );
    let plain = root().join("tests/fixtures/tiny-yi"); // no scaling, 512 positions
    let longer = "a".repeat(600);
    assert_clean_error(
        &apb(
            &[
                "generate",
                "-m",
                plain.to_str().unwrap(),
                "--prompt",
                &longer,
            ],
            &[],
        ),
        "pass it with --rope-scaling",
    );
}

#[test]
fn hub_offline_not_cached() {
    let home = tempfile::tempdir().unwrap();
    let out = apb(
        &["generate", "-m", "someorg/somemodel", "--prompt", "x"],
        &[
            ("HF_HOME", home.path().to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert_clean_error(&out, "HF_HUB_OFFLINE");
}

/// The 6K-token needle document (520 sentences, the needle at sentence 312).
/// ~2.2K tokens: over 4 ranks (the 4K and longer needles run in integration-tests/tests/needle.rs
/// and the server tests; CI time).
fn needle_doc() -> String {
    common::needle_doc(200)
}

#[test]
fn apb_on_4_ranks_answers_a_needle_and_reports_its_plan() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("doc.txt");
    std::fs::write(&f, needle_doc()).unwrap();
    let v = apb_json(
        &[
            "generate",
            "--attention",
            "apb",
            "--world-size",
            "4",
            "--chat",
            "--question",
            "What is the special magic number?",
            "--prompt-file",
            f.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--json",
        ],
        &[],
    );
    assert!(v["text"].as_str().unwrap().contains("73914"), "{v}");
    assert_eq!(v["attention"], "apb");
    assert_eq!(v["world_size"], 4);
    assert!(v["prompt_tokens"].as_u64().unwrap() >= 2000, "{v}");
    // The planner's rule, recomputed here: l_a = l_b/4, l_p = l_b/8, nearest multiple of 128.
    let l_b = v["block_len"].as_u64().unwrap();
    let tile = |x: u64| ((x + 64) / 128 * 128).max(128);
    assert_eq!(v["anchor_len"].as_u64().unwrap(), tile(l_b / 4), "{v}");
    assert_eq!(v["passing_len"].as_u64().unwrap(), tile(l_b / 8), "{v}");
    assert_eq!(
        v["scorer"],
        "training-free selector (query-aware; not the paper's retaining heads)"
    );
    let per_rank: Vec<u64> = v["rank_prefill_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(per_rank.len(), 4);
    assert!(
        per_rank[1..].iter().all(|&r| r == l_b + tile(l_b / 4)),
        "{per_rank:?}"
    );
}

/// APB without a question still answers: the exact zigzag layout runs, and the output says so.
/// A raw prompt (no --chat) ending with a blank line and a question is split as the server
/// splits it, and APB runs.
#[test]
fn apb_without_question_falls_back_and_a_raw_prompt_is_split() {
    let m = tiny();
    let doc = "abcdefgh ".repeat(40);
    let run = |prompt: &str| {
        apb_json(
            &[
                "generate",
                "-m",
                m.to_str().unwrap(),
                "--attention",
                "apb",
                "--world-size",
                "2",
                "--min-rank-tokens",
                "0",
                "--anchor-len",
                "32",
                "--passing-len",
                "16",
                "--max-new-tokens",
                "2",
                "--json",
                "--prompt",
                prompt,
            ],
            &[],
        )
    };
    let v = run(&doc);
    assert_eq!(
        (v["attention"].as_str(), v["method"].as_str()),
        (Some("apb"), Some("zigzag")),
        "{v}"
    );
    assert_eq!(v["world_size"], 2, "{v}");
    assert!(
        v["plan_notes"].to_string().contains("no question found"),
        "{v}"
    );
    let v = run(&format!("{doc}\n\nWhat comes next?"));
    assert_eq!(v["method"], "apb", "{v}");
    assert_eq!(v["world_size"], 2, "{v}");
    assert!(!v["plan_notes"].to_string().contains("no question"), "{v}");
    assert_clean_error(
        &apb(
            &[
                "generate",
                "--attention",
                "dense",
                "--world-size",
                "2",
                "--prompt",
                "x",
            ],
            &[],
        ),
        "runs on one rank",
    );
}

#[test]
fn short_prompt_falls_back_to_fewer_ranks_and_says_so() {
    let out = apb(
        &[
            "generate",
            "--attention",
            "apb",
            "--world-size",
            "4",
            "--chat",
            "--prompt",
            "Paris is the capital of France. Berlin is the capital of Germany.",
            "--question",
            "What is the capital of France?",
            "--max-new-tokens",
            "8",
            "--json",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requested_world_size"], 4);
    assert_eq!(v["world_size"], 1, "{v}");
    assert!(!v["plan_notes"].as_array().unwrap().is_empty(), "{v}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("note: "),
        "fallback is announced on stderr"
    );
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
}

/// `apb bench prefill` of the tiny config on CPU in f32 with `extra` flags: the JSON it wrote.
fn bench_prefill_tiny(extra: &[&str]) -> serde_json::Value {
    let cfg = tiny().join("config.json");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let mut args = vec!["bench", "prefill", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(&["--device", "cpu", "--dtype", "f32"]);
    args.extend_from_slice(&["--json", json.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let out = apb(&args, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

/// `apb bench prefill` on CPU with the tiny config: one result per length, the breakdown buckets
/// add up to no more than the wall time, FLOPs are counted.
#[test]
fn bench_prefill_reports_results_and_breakdown() {
    let v = bench_prefill_tiny(&[
        "--lengths",
        "300,600",
        "--attention",
        "dense",
        "--world-size",
        "1",
        "--breakdown",
    ]);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, len) in results.iter().zip([300, 600]) {
        assert_eq!(r["length"], len);
        assert!(r["wall_s"].as_f64().unwrap() > 0.0);
        assert!(r["slowest_rank_tflop"].as_f64().unwrap() > 0.0);
        let parts: f64 = r["breakdown_s"]
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!(
            parts > 0.0 && r["breakdown_s"]["attention"].as_f64().unwrap() > 0.0,
            "{r}"
        );
    }
}

/// Dense beside a method over 2 rank processes (the command's default shape: dense runs on rank
/// 0 while the other ranks wait; it panicked on rank 1 until the eleventh session).
#[test]
fn bench_prefill_runs_dense_beside_a_method_over_rank_processes() {
    let v = bench_prefill_tiny(&[
        "--lengths",
        "256",
        "--attention",
        "dense,zigzag",
        "--world-size",
        "2",
        "--ranks",
        "processes",
    ]);
    let ran: Vec<(String, u64)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["attention"].as_str().unwrap().to_string(),
                r["gpus"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ran,
        [("dense".to_string(), 1), ("zigzag".to_string(), 2)],
        "{v}"
    );
}

#[test]
fn bench_prefill_one_rank_share_reports_attended_pairs_per_rank() {
    // Rank 1's share of every exact method on 2 ranks (--only-rank runs on the CPU too): zigzag
    // and ulysses give both ranks the same pairs, ring's second rank three times the first's.
    let v = bench_prefill_tiny(&[
        "--lengths",
        "600",
        "--attention",
        "zigzag,ulysses,ring",
        "--world-size",
        "2",
        "--only-rank",
        "1",
    ]);
    let ratio: Vec<(String, f64)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["per_rank_pairs"].as_array().unwrap().len(), 2, "{r}");
            (
                r["attention"].as_str().unwrap().to_string(),
                r["pairs_max_over_min"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ratio[0], ("zigzag".into(), 1.0));
    assert_eq!(ratio[1], ("ulysses".into(), 1.0));
    assert!(
        ratio[2].0 == "ring" && (2.9..3.1).contains(&ratio[2].1),
        "{ratio:?}"
    );
}

#[test]
fn heads_overlap_compares_the_scorers() {
    let out = apb(
        &[
            "heads-overlap",
            "--heads",
            "smollm2-135m-instruct",
            "--cases",
            "2",
            "--tokens",
            "300",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cases"], 2, "{v}");
    for s in ["heads", "query_aware"] {
        let o = v["top10_overlap"][s].as_f64().unwrap();
        assert!(o > 0.0 && o <= 1.0, "{s}: {v}");
    }
    let bad = apb(&["heads-overlap", "--heads", "x", "--cases", "0"], &[]);
    assert_clean_error(&bad, "--cases must be positive");
}

#[test]
fn bench_prefill_bad_config_and_world_are_clear_errors() {
    let out = apb(
        &[
            "bench",
            "prefill",
            "--config",
            "no-such-model",
            "--device",
            "cpu",
        ],
        &[],
    );
    assert_clean_error(&out, "no-such-model");
    let cfg = tiny().join("config.json");
    let out = apb(
        &[
            "bench",
            "prefill",
            "--config",
            cfg.to_str().unwrap(),
            "--device",
            "cpu",
            "--world-size",
            "2",
        ],
        &[],
    );
    assert_clean_error(&out, "--device cuda");
}

/// Launch flags are checked up front, also where ranks are threads (CPU).
#[test]
fn bad_launch_flags_are_clear_errors() {
    let m = tiny();
    let base = [
        "generate",
        "-m",
        m.to_str().unwrap(),
        "--prompt",
        "hello there",
        "--device",
        "cpu",
    ];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        apb(&args, &[])
    };
    assert_clean_error(
        &with(&["--collective-timeout", "0"]),
        "--collective-timeout",
    );
    assert_clean_error(
        &with(&["--attention", "ring", "--world-size", "2", "--nnodes", "2"]),
        "--nnodes",
    );
    assert_clean_error(
        &with(&["--attention", "ring", "--world-size", "3", "--nnodes", "2"]),
        "multiple of --nnodes",
    );
    // A method on one rank runs, and says it is dense attention there.
    let out = with(&["--attention", "apb", "--max-new-tokens", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: --attention apb on one rank is dense attention"),
        "{err}"
    );
}

/// `--apb-question-mask causal` (thunlp/APB's mask, for comparisons) runs APB end to end; other
/// methods and unknown values are refused. What the mask does is tested against a boolean mask in
/// apb-plugin/tests/ranks.rs.
#[test]
fn apb_question_mask_switch() {
    let m = tiny();
    let prompt = "abcdefgh ".repeat(40);
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "-m", m.to_str().unwrap(), "--prompt", &prompt];
        args.extend_from_slice(&["--question", "What comes next?"]);
        args.extend_from_slice(&["--max-new-tokens", "3"]);
        args.extend_from_slice(extra);
        apb(&args, &[])
    };
    let out = run(&[
        "--attention",
        "apb",
        "--world-size",
        "2",
        "--min-rank-tokens",
        "0",
        "--anchor-len",
        "32",
        "--apb-question-mask",
        "causal",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["world_size"].as_u64(), v["generated_tokens"].as_u64()),
        (Some(2), Some(3)),
        "{v}"
    );
    assert_eq!(v["question_mask"], "causal", "{v}");
    assert_clean_error(
        &run(&["--apb-question-mask", "causal"]),
        "applies to --attention apb only",
    );
    // Spava's rank caches hold two chunks each: the reference's mask has no meaning there.
    assert_clean_error(
        &run(&[
            "--attention",
            "spava",
            "--world-size",
            "2",
            "--apb-question-mask",
            "causal",
        ]),
        "applies to --attention apb only, not spava",
    );
    assert_clean_error(
        &run(&[
            "--attention",
            "apb",
            "--world-size",
            "2",
            "--apb-question-mask",
            "diagonal",
        ]),
        "unknown question mask 'diagonal'",
    );
}

/// Defects found by trying the CLI as a new user: each must be a clean answer or a clear error.
#[test]
fn one_token_prompt_and_bad_numbers() {
    // A one-token prompt generates (it used to fail with "no context before the question").
    let v = apb_json(
        &[
            "generate",
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
            "--json",
        ],
        &[],
    );
    assert_eq!(v["prompt_tokens"], 1, "{v}");
    assert_eq!(v["generated_tokens"], 3, "{v}");
    assert_eq!(v["finish_reason"], "length", "{v}");

    assert_clean_error(
        &apb(
            &["generate", "--prompt", "Hi", "--max-new-tokens", "0"],
            &[],
        ),
        "--max-new-tokens must be at least 1",
    );
    assert_clean_error(
        &apb(&["generate", "--prompt", "Hi", "--temperature", "5"], &[]),
        "--temperature must be in [0, 2]",
    );
    // A negative number is a bad value of its flag, not an "unexpected argument".
    let out = apb(
        &["generate", "--prompt", "Hi", "--max-new-tokens", "-5"],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("invalid value '-5'") && !err.contains("unexpected argument"),
        "{err}"
    );
}

#[test]
fn many_ranks_on_short_and_long_prompts_never_panic() {
    // ring / star at 8 ranks on a short prompt used to panic (a rank with only padding); APB at
    // 1000 ranks printed 999 notes.
    // Without --min-rank-tokens (0), the methods' own thin splits; with its default (256), one rank.
    for (attention, min) in ["ring", "star", "apb"]
        .into_iter()
        .flat_map(|a| [(a, "0"), (a, "256")])
    {
        let out = apb(
            &[
                "generate",
                "--attention",
                attention,
                "--world-size",
                "8",
                "--min-rank-tokens",
                min,
                "--chat",
                "--prompt",
                "Paris is the capital of France.\n\nWhat is the capital of France?",
                "--max-new-tokens",
                "4",
                "--json",
            ],
            &[],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{attention}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.matches("note:").count() <= 1, "{attention}: {err}");
        if min == "0" {
            continue;
        }
        // --min-rank-tokens (256 by default) keeps a 30-token prompt on one rank: star on 7 of 8
        // ranks used to answer "L'Alma, the capital of".
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["world_size"], 1, "{attention}: {v}");
        assert!(err.contains("note: "), "{attention}: {err}");
        assert!(
            v["text"].as_str().unwrap().contains("Paris"),
            "{attention}: {v}"
        );
    }
    // 1000 thread ranks: a clear error up front, not a panic (nor 16 GB of threads).
    assert_clean_error(
        &apb(
            &[
                "generate",
                "--attention",
                "ring",
                "--world-size",
                "1000",
                "--prompt",
                &needle_doc(),
            ],
            &[],
        ),
        "at most 64",
    );
}

#[test]
fn train_heads_then_eval_with_them_on_the_default_model() {
    let dir = tempfile::tempdir().unwrap();
    let heads = dir.path().join("heads.safetensors");
    let data = dir.path().join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"The code is 4417. Repeat the code.\", \"answer\": \"4417\"}\n",
    )
    .unwrap();
    let h = heads.to_str().unwrap();
    let out = apb(
        &[
            "train-heads",
            "--data",
            data.to_str().unwrap(),
            "--synthetic",
            "1",
            "--synthetic-tokens",
            "200",
            "--steps",
            "3",
            "--hidden",
            "8",
            "--out",
            h,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(heads.is_file() && heads.with_extension("ckpt").is_file());
    let rows = dir.path().join("eval.jsonl");
    let out = apb(
        &[
            "eval",
            "--tasks",
            "niah_noise,multikey",
            "--lengths",
            "600",
            "--cases",
            "1",
            "--attention",
            "dense,apb-heads",
            "--world-size",
            "2",
            "--heads",
            h,
            "--max-new-tokens",
            "8",
            "--json",
            rows.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("| task | length | dense | apb-heads |"),
        "{table}"
    );
    assert!(table.contains("| **average** | 600 |"), "{table}");
    // Which scorer APB ran is said beside the numbers, in the table and in every row.
    assert!(
        table.contains("- `apb-heads`: apb on 2 ranks with retaining-heads"),
        "{table}"
    );
    let text = std::fs::read_to_string(&rows).unwrap();
    assert_eq!(text.lines().count(), 4, "2 tasks × 2 methods: {text}");
    for line in text.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let want = if r["method"] == "dense" {
            serde_json::Value::Null
        } else {
            "retaining-heads".into()
        };
        assert_eq!(r["scorer"], want, "{line}");
        // 600 tokens fit 2 APB ranks (at 300 the planner falls back to one, which is dense).
        let ranks = if r["method"] == "dense" { 1 } else { 2 };
        assert_eq!(r["ranks"], ranks, "{line}");
    }
    // A rerun finds every case done and only prints the table.
    let again = apb(
        &[
            "eval",
            "--tasks",
            "niah_noise,multikey",
            "--lengths",
            "600",
            "--cases",
            "1",
            "--attention",
            "dense,apb-heads",
            "--world-size",
            "2",
            "--heads",
            h,
            "--max-new-tokens",
            "8",
            "--json",
            rows.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(std::fs::read_to_string(&rows).unwrap().lines().count(), 4);
    // Other settings on the same file are refused, not mixed in.
    let other = apb(
        &[
            "eval",
            "--tasks",
            "niah_noise",
            "--lengths",
            "600",
            "--cases",
            "1",
            "--attention",
            "dense",
            "--world-size",
            "2",
            "--heads",
            h,
            "--max-new-tokens",
            "9",
            "--json",
            rows.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&other, "made with other settings");
}

#[test]
fn train_heads_and_eval_refuse_bad_arguments() {
    let out = apb(&["train-heads", "--out", "/tmp/x.safetensors"], &[]);
    assert_clean_error(&out, "--synthetic");
    let out = apb(
        &["eval", "--tasks", "nope", "--json", "/tmp/apb-eval-x.jsonl"],
        &[],
    );
    assert_clean_error(&out, "unknown task 'nope'");
    let out = apb(
        &[
            "eval",
            "--attention",
            "apb-heads",
            "--json",
            "/tmp/apb-eval-y.jsonl",
        ],
        &[],
    );
    assert_clean_error(&out, "apb-heads needs --heads");
    for (column, why) in [
        ("star-heads", "retaining heads are for apb, spava only"),
        ("apb@0", "ranks after @ must be a number above 0"),
        ("apb@x", "ranks after @ must be a number above 0"),
    ] {
        let out = apb(
            &[
                "eval",
                "--attention",
                column,
                "--json",
                "/tmp/apb-eval-z.jsonl",
            ],
            &[],
        );
        assert_clean_error(&out, why);
    }
    // A model without a chat template cannot be evaluated: a clear error, no empty rows file.
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows.jsonl");
    let out = apb(
        &[
            "eval",
            "-m",
            tiny().to_str().unwrap(),
            "--tasks",
            "niah_noise",
            "--lengths",
            "200",
            "--cases",
            "1",
            "--attention",
            "dense",
            "--json",
            rows.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "no chat template");
    assert!(!rows.exists(), "a failed run left {}", rows.display());
    let out = apb(&["eval", "--json", "/nonexistent-apb-dir/rows.jsonl"], &[]);
    assert_clean_error(&out, "no such folder");
    // Caught up front, in the flags' own words (before the model loads).
    let out = apb(
        &["eval", "--lengths", "0", "--json", rows.to_str().unwrap()],
        &[],
    );
    assert_clean_error(&out, "--lengths 0");
    let out = apb(
        &[
            "eval",
            "--max-new-tokens",
            "0",
            "--json",
            rows.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "--max-new-tokens must be at least 1");
    let out = apb(&["eval", "--json", dir.path().to_str().unwrap()], &[]);
    assert_clean_error(&out, "is a directory");
    assert!(!rows.exists());
    let help = apb(&["eval", "--help"], &[]);
    let help = String::from_utf8_lossy(&help.stdout);
    let line = help
        .lines()
        .skip_while(|l| !l.contains("--max-new-tokens"))
        .nth(1)
        .unwrap_or("");
    assert!(!line.trim().is_empty() && !line.contains("--"), "{help}");
}

/// `apb serve` with an empty key, model name or a malformed CORS origin stops at start with one
/// error naming the flag (an empty key used to turn authentication off silently).
#[test]
fn serve_refuses_empty_and_malformed_flags() {
    let serve = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_apb"));
        c.args(["serve", "--port", "0"])
            .args(args)
            .env_remove("APB_API_KEY")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        // A server that started instead of refusing: stop it and fail below.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    assert_clean_error(&serve(&["--api-key", ""], &[]), "--api-key");
    assert_clean_error(&serve(&["--api-key", "  "], &[]), "--api-key");
    assert_clean_error(&serve(&[], &[("APB_API_KEY", "")]), "APB_API_KEY");
    assert_clean_error(
        &serve(&["--served-model-name", ""], &[]),
        "--served-model-name",
    );
    for bad in ["0", "1.5", "-0.2", "nan"] {
        assert_clean_error(
            &serve(&["--gpu-memory-utilization", bad], &[]),
            "--gpu-memory-utilization",
        );
    }
    for bad in [
        "localhost:3000",
        "http://x.org/",
        "ftp://x.org",
        "http://",
        "http://a b",
    ] {
        assert_clean_error(&serve(&["--cors-origin", bad], &[]), "--cors-origin");
    }
}
