//! CUDA kernels of APB-rs, each wrapped as a candle op with a plain CPU implementation that is
//! both the CPU path and the reference the GPU tests compare against. Without the `cuda` feature
//! only the CPU implementations exist, so CPU builds need no CUDA toolkit.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/apb.ptx"));

/// Max-pool (5, stride 1, padding 2) over the sequence and candidate masking of scores
/// `(seq, n_kv)` → `(n_kv, seq)` f32; positions outside `[lo, hi)` become `-inf`.
pub fn pool5_mask(scores: &Tensor, lo: usize, hi: usize) -> Result<Tensor> {
    scores
        .to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&Pool5Mask { lo, hi })
}

struct Pool5Mask {
    lo: usize,
    hi: usize,
}

impl CustomOp1 for Pool5Mask {
    fn name(&self) -> &'static str {
        "pool5-mask"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (seq, n_kv) = layout.shape().dims2()?;
        let x = match storage {
            CpuStorage::F32(v) => &v[layout.start_offset()..],
            _ => candle_core::bail!("pool5-mask expects f32"),
        };
        let mut out = vec![f32::NEG_INFINITY; seq * n_kv];
        for h in 0..n_kv {
            for i in self.lo.min(seq)..self.hi.min(seq) {
                let (a, z) = (i.saturating_sub(2), (i + 3).min(seq));
                out[h * seq + i] = (a..z)
                    .map(|j| x[j * n_kv + h])
                    .fold(f32::NEG_INFINITY, f32::max);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n_kv, seq))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
        let (seq, n_kv) = layout.shape().dims2()?;
        let dev = storage.device.clone();
        let x = storage
            .as_cuda_slice::<f32>()?
            .slice(layout.start_offset()..);
        let out = dev.alloc_zeros::<f32>(seq * n_kv)?;
        let func = dev.get_or_load_custom_func("pool5_mask_f32", "apb_kernels", PTX)?;
        let (s, k, lo, hi) = (seq as u32, n_kv as u32, self.lo as u32, self.hi as u32);
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&out);
        b.arg(&s);
        b.arg(&k);
        b.arg(&lo);
        b.arg(&hi);
        unsafe { b.launch(LaunchConfig::for_num_elems(s * k)) }
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((n_kv, seq)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pool_and_mask_by_hand() {
        // seq 6, n_kv 1: scores 0 5 1 0 0 9 → pooled 5 5 5 9 9 9; candidates [1, 5).
        let t = Tensor::new(&[[0f32], [5.], [1.], [0.], [0.], [9.]], &Device::Cpu).unwrap();
        let p = pool5_mask(&t, 1, 5).unwrap().to_vec2::<f32>().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(p, vec![vec![inf, 5., 5., 9., 9., inf]]);
    }

    /// On the GPU machine (`--features cuda`): the kernel equals the CPU op exactly (a max is
    /// exact) on fresh random scores, odd lengths and several heads; the output buffer starts
    /// poisoned with NaN so an unwritten element fails.
    #[cfg(feature = "cuda")]
    #[test]
    fn pool5_mask_cuda_matches_cpu() {
        let gpu = Device::new_cuda(0).expect("a CUDA device");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        for (seq, n_kv, lo, hi) in [
            (1, 1, 0, 1),
            (37, 3, 5, 30),
            (4099, 8, 1024, 4099),
            (65_537, 8, 4096, 65_000),
        ] {
            let cpu = Tensor::randn(0f32, 1.0, (seq, n_kv), &Device::Cpu).unwrap();
            let want = pool5_mask(&cpu, lo, hi).unwrap().to_vec2::<f32>().unwrap();
            let _poison = Tensor::full(f32::NAN, (n_kv, seq), &gpu).unwrap();
            let got = pool5_mask(&cpu.to_device(&gpu).unwrap(), lo, hi)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(
                got, want,
                "seq {seq}, n_kv {n_kv}, [{lo}, {hi}), seed {seed}"
            );
            assert!(got.iter().flatten().all(|x| !x.is_nan()));
        }
    }
}
