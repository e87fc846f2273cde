//! With the `cuda` feature, compiles each `src/*.cu` to PTX (compute_80: runs on A100 and H100/H200,
//! JIT-compiled by the driver at first load) with nvcc (scripts/cuda-env.sh provides it),
//! and builds the cuDNN attention shim (see `cudnn_shim`). Without it, nothing: CPU builds need no
//! CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 3] = ["attention", "layout", "select"];

fn main() {
    println!("cargo:rerun-if-env-changed=NVCC");
    for s in SOURCES {
        println!("cargo:rerun-if-changed=src/{s}.cu");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    for s in SOURCES {
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-arch=compute_80",
                "-std=c++17",
                "-lineinfo",
            ])
            .arg(format!("src/{s}.cu"))
            .arg("-o")
            .arg(out_dir.join(format!("{s}.ptx")))
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc} ({e}); `source scripts/cuda-env.sh` first")
            });
        assert!(status.success(), "nvcc failed on kernels/src/{s}.cu");
    }
    cudnn_shim();
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
