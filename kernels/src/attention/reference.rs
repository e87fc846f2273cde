//! The judge: plain attention in f64 with an explicit boolean mask, for tests.

use candle_core::{DType, Device, Result, Tensor};

/// Plain reference with an explicit boolean mask, in f64, for tests: `mask(i, j)` says whether
/// query row `i` sees key `j`. Inputs as in [`super::attention`]. Returns `(out, lse)` flattened in the
/// layouts `(b, n_h, sq, d)` and `(b, n_h, sq)`.
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: impl Fn(usize, usize) -> bool,
) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
    let flat = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f64>()
    };
    let (qv, kv, vv) = (flat(q)?, flat(k)?, flat(v)?);
    let (b, n_h, sq, d) = q.dims4()?;
    let (n_kv, sk) = (k.dim(1)?, k.dim(2)?);
    let g = n_h / n_kv;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; b * n_h * sq * d];
    let mut lse = vec![f64::NEG_INFINITY; b * n_h * sq];
    for bi in 0..b {
        for h in 0..n_h {
            let kh = bi * n_kv + h / g;
            for i in 0..sq {
                let row = (bi * n_h + h) * sq + i;
                let qi = &qv[row * d..(row + 1) * d];
                let s: Vec<Option<f64>> = (0..sk)
                    .map(|j| {
                        mask(i, j).then(|| {
                            qi.iter()
                                .zip(&kv[(kh * sk + j) * d..])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                * scale
                        })
                    })
                    .collect();
                let m = s
                    .iter()
                    .flatten()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = s.iter().flatten().map(|x| (x - m).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    if let Some(sj) = sj {
                        let p = (sj - m).exp() / z;
                        for x in 0..d {
                            out[row * d + x] += p * vv[(kh * sk + j) * d + x];
                        }
                    }
                }
                lse[row] = m + z.ln();
            }
        }
    }
    Ok((out, lse))
}
