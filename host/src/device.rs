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

/// `(free, total)` bytes of a GPU's memory (None on the CPU).
pub fn memory(device: &Device) -> std::result::Result<Option<(u64, u64)>, String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let (free, total) = d
            .cuda_stream()
            .context()
            .mem_get_info()
            .map_err(|e| format!("cannot read the GPU's free memory: {e}"))?;
        return Ok(Some((free as u64, total as u64)));
    }
    let _ = device;
    Ok(None)
}
