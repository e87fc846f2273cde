//! HF Hub loading against a real HF cache layout that the test builds itself
//! (`hub/models--org--name/{blobs,snapshots/<commit>,refs/main}`, snapshot files symlinked to
//! content-addressed blobs, as huggingface_hub and hf-hub write them). Offline mode only: the
//! tests have no network, and offline is exactly what must read this layout.
//!
//! One test function: it sets process environment variables, which must not race.

use apb_integration_tests::*;
use apb_loaders::{load, load_hub, HubRepo, ModelSource};
use apb_plugin::DenseBackend;
use candle_core::{DType, Device};
use std::path::Path;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Writes `src`'s files into an HF cache under `hub/` as `repo_id` at [`COMMIT`], `refs/main`.
fn build_cache(hub: &Path, repo_id: &str, src: &Path) {
    build_cache_files(
        hub,
        repo_id,
        &[
            (src.join("config.json"), "config.json"),
            (src.join("model.safetensors"), "model.safetensors"),
            (src.join("tokenizer.json"), "tokenizer.json"),
        ],
    );
}

/// Writes `files` (source path, name in the repo) as `repo_id` at [`COMMIT`], `refs/main`.
fn build_cache_files(hub: &Path, repo_id: &str, files: &[(std::path::PathBuf, &str)]) {
    let repo = hub.join(format!("models--{}", repo_id.replace('/', "--")));
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for (src, f) in files {
        let bytes = std::fs::read(src).unwrap();
        // Blob names are content hashes in real caches; any unique name works for readers.
        let blob = format!("blob-{}-{}", f.replace('.', "-"), bytes.len());
        std::fs::write(repo.join("blobs").join(&blob), &bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(f)).unwrap();
    }
}

#[test]
fn loads_from_hf_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let hub = home.path().join("hub");
    build_cache(&hub, "apb-test/tiny-llama31", &fixture("tiny-llama31"));
    let exp = read_json(fixture("tiny-llama31").join("expected.json"));
    let ids = u32s(&exp["input_ids"]);
    let want_last = f32s(exp["logits"].as_array().unwrap().last().unwrap());

    // By branch (refs/main) and by commit hash, offline.
    for rev in ["main", COMMIT] {
        let repo = HubRepo {
            repo_id: "apb-test/tiny-llama31".into(),
            revision: rev.into(),
            cache_dir: hub.clone(),
            offline: true,
        };
        let loaded = load_hub(&repo, DType::F32, &Device::Cpu).unwrap();
        let logits = all_logits(&loaded.model, &DenseBackend, &ids);
        assert!(
            worst_ratio(logits.last().unwrap(), &want_last, 1e-4, 1e-4) <= 1.0,
            "revision {rev}"
        );
        assert_eq!(loaded.name, "apb-test/tiny-llama31");
    }

    // A file the cache lacks, offline: a clear error, no network attempt.
    let repo = HubRepo {
        repo_id: "apb-test/absent".into(),
        revision: "main".into(),
        cache_dir: hub.clone(),
        offline: true,
    };
    let err = load_hub(&repo, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("apb-test/absent"),
        "{err}"
    );

    // The CLI's path: `-m org/name` with HF_HOME and HF_HUB_OFFLINE=1 from the environment.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let src = ModelSource::parse("apb-test/tiny-llama31", None).unwrap();
    assert_eq!(
        src,
        ModelSource::Hub {
            repo_id: "apb-test/tiny-llama31".into(),
            revision: None
        }
    );
    let loaded = load(&src, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        greedy(&loaded.model, &DenseBackend, &ids, 12),
        u32s(&exp["greedy"])
    );

    // Retaining heads by hub id (`--heads org/name`), offline: the thunlp layout (a PyTorch
    // `pytorch_model.bin`) and a safetensors repo give the same heads.
    let heads_dir = fixture("heads");
    build_cache_files(
        &hub,
        "apb-test/heads-bin",
        &[(heads_dir.join("heads.pt"), "pytorch_model.bin")],
    );
    build_cache_files(
        &hub,
        "apb-test/heads-st",
        &[(heads_dir.join("heads.safetensors"), "model.safetensors")],
    );
    let cfg = &loaded.model.cfg;
    let x = candle_core::Tensor::randn(0f32, 1.0, (1, 9, 128), &Device::Cpu).unwrap();
    let score = |spec: &str| {
        let h = apb_loaders::heads::load_heads(spec, cfg, DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        let (nq, nkv) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        h.score(
            1,
            &x.narrow(2, 0, nq).unwrap(),
            &x.narrow(2, nq, nkv).unwrap(),
            &x.narrow(2, nq + nkv, nkv).unwrap(),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
    };
    assert_eq!(score("apb-test/heads-bin"), score("apb-test/heads-st"));
    let err =
        apb_loaders::heads::load_heads("apb-test/absent-heads", cfg, DType::F32, &Device::Cpu)
            .expect_err("absent heads repo must fail")
            .to_string();
    assert!(err.contains("apb-test/absent-heads"), "{err}");
}
