//! With the `cuda` feature, compiles each `src/*.cu` to PTX (compute_80: runs on A100 and H100/H200,
//! JIT-compiled by the driver at first load) with nvcc (scripts/cuda-env.sh provides it).
//! Without it, nothing: CPU builds need no CUDA toolkit.

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
}
