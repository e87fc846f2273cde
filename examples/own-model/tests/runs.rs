//! The example as the test command runs it: to completion, exact methods equal to dense (it exits
//! non-zero otherwise). A test, so it is built by the workspace's test build with the features
//! that build settled; `cargo run -p apb-own-model` alone re-resolves them and recompiled candle
//! (~5 minutes of CI).

#[test]
fn the_example_host_runs_and_exact_methods_equal_dense() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apb-own-model"))
        .output()
        .expect("run apb-own-model");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.trim().is_empty(), "no report: {stderr}");
}
