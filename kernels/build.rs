//! With the `cuda` feature, compiles src/apb.cu to PTX with nvcc (scripts/cuda-env.sh provides it).
//! Without it, nothing: CPU builds need no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/apb.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("apb.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-arch=compute_90",
            "-std=c++17",
            "src/apb.cu",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} ({e}); `source scripts/cuda-env.sh` first"));
    assert!(status.success(), "nvcc failed on kernels/src/apb.cu");
}
