//! `--device cpu|cuda[:i]`.

use crate::error::{bail, err, Result};
use candle_core::Device;

/// `cpu`, `cuda` or `cuda:N`; the error lists the choices.
pub fn parse_device(s: &str) -> Result<Device> {
    let ordinal = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match s.strip_prefix("cuda:").map(|i| i.parse::<usize>()) {
            Some(Ok(i)) => i,
            _ => bail!("unknown device '{s}' (use cpu, cuda or cuda:N)"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "device '{s}' needs a CUDA build: rebuild with `cargo build --release --features cuda`"
        );
    }
    Device::new_cuda(ordinal).map_err(|e| err!("cannot open {s}: {e}"))
}
