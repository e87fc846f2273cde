//! With the `cuda` feature, compiles each `src/*.cu` to a fatbin (SASS for sm_80 and sm_90, PTX for
//! other GPUs; see `FATBIN_TARGETS`) with nvcc (scripts/cuda-env.sh provides it),
//! and builds the cuDNN attention shim (see `cudnn_shim`). Without it, nothing: CPU builds need no
//! CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 5] = ["attention", "layout", "linear", "norm", "select"];

/// Machine code for A100 (sm_80) and H100/H200 (sm_90), so those load our modules without the
/// driver compiling PTX at first use (seconds a module: it stalled a fresh server's first decode
/// step 2.5–5 s), and compute_80 PTX for any other GPU, which the driver compiles once.
/// scripts/check-cuda-kernels.sh compiles the same in CI.
const FATBIN_TARGETS: [&str; 2] = [
    "-gencode=arch=compute_80,code=[sm_80,compute_80]",
    "-gencode=arch=compute_90,code=sm_90",
];

fn main() {
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-changed=src/common.cuh");
    for s in SOURCES {
        println!("cargo:rerun-if-changed=src/{s}.cu");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    // One nvcc a source, side by side (ptxas on attention.cu and linear.cu takes seconds a target).
    let jobs: Vec<_> = SOURCES
        .iter()
        .map(|s| {
            let child = Command::new(&nvcc)
                .args(["--fatbin", "-O3", "-std=c++17", "-lineinfo"])
                .args(FATBIN_TARGETS)
                .arg(format!("src/{s}.cu"))
                .arg("-o")
                .arg(out_dir.join(format!("{s}.fatbin")))
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run {nvcc} ({e}); `source scripts/cuda-env.sh` first")
                });
            (s, child)
        })
        .collect();
    for (s, mut child) in jobs {
        let status = child.wait().expect("wait for nvcc");
        assert!(status.success(), "nvcc failed on kernels/src/{s}.cu");
    }
    cudnn_shim();
    flashinfer_sm90();
}

/// FlashInfer's Hopper prefill (src/flashinfer_sm90.cu): SASS for sm_90a only, from the header-only
/// sources scripts/cuda-env.sh fetched; about 90 s on 2 cores. Linked with the CUDA runtime.
fn flashinfer_sm90() {
    println!("cargo:rerun-if-changed=src/flashinfer_sm90.cu");
    println!("cargo:rerun-if-env-changed=APB_FLASHINFER");
    let fi = PathBuf::from(
        std::env::var("APB_FLASHINFER")
            .expect("APB_FLASHINFER is not set: `source scripts/cuda-env.sh` first"),
    );
    let mut b = cc::Build::new();
    b.cuda(true)
        .cudart("shared")
        .warnings(false)
        .flag("-std=c++17")
        .flag("-O3")
        .flag("-DNDEBUG")
        .flag("-gencode=arch=compute_90a,code=sm_90a")
        .flag("--expt-relaxed-constexpr")
        .flag("--expt-extended-lambda")
        .flag("-use_fast_math")
        .flag("-static-global-template-stub=false")
        .flag("-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED")
        .flag("-DFLASHINFER_ENABLE_F16")
        .flag("-DFLASHINFER_ENABLE_BF16");
    // FlashInfer's own CCCL before the toolkit's, as its JIT does.
    for inc in ["cccl/cub", "cccl/libcudacxx/include", "cccl/thrust"] {
        b.flag(format!("-I{}", fi.join(inc).display()));
    }
    for inc in ["include", "cutlass/include", "cutlass/tools/util/include"] {
        b.flag("-isystem").flag(fi.join(inc).display().to_string());
    }
    b.file("src/flashinfer_sm90.cu")
        .compile("apb_flashinfer_sm90");
}

/// cuDNN's fused attention behind a C ABI (src/cudnn_sdpa.cpp): host C++ against the header-only
/// cuDNN frontend; libcudnn is opened at run time, so nothing cuDNN is linked.
fn cudnn_shim() {
    println!("cargo:rerun-if-changed=src/cudnn_sdpa.cpp");
    println!("cargo:rerun-if-env-changed=APB_CUDNN_INCLUDE");
    let inc = std::env::var("APB_CUDNN_INCLUDE")
        .expect("APB_CUDNN_INCLUDE is not set: `source scripts/cuda-env.sh` first");
    let cuda = std::env::var("CUDA_HOME")
        .expect("CUDA_HOME is not set: `source scripts/cuda-env.sh` first");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .define("NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING", None)
        .define("CUDNN_FRONTEND_SKIP_JSON_LIB", None)
        .include(inc)
        .include(PathBuf::from(cuda).join("include"))
        .file("src/cudnn_sdpa.cpp")
        .compile("apb_cudnn_sdpa");
    println!("cargo:rustc-link-lib=dl");
}
