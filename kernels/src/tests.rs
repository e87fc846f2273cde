//! Kernel tests: CPU cases by hand; on the GPU machine (`--features cuda`) each kernel against
//! its CPU reference on fresh random inputs.

use crate::*;
use candle_core::{Device, Tensor};

#[test]
fn pool_and_mask_by_hand() {
    // seq 6, n_kv 1: scores 0 5 1 0 0 9, candidates [1, 5): row 0 (before them) enters the
    // pools, row 5 (past them: a question probe) does not → pooled -inf 5 5 5 1 -inf.
    let t = Tensor::new(&[[0f32], [5.], [1.], [0.], [0.], [9.]], &Device::Cpu).unwrap();
    let p = pool5_mask(&t, 1, 5).unwrap().to_vec2::<f32>().unwrap();
    let inf = f32::NEG_INFINITY;
    assert_eq!(p, vec![vec![inf, 5., 5., 5., 1., inf]]);
}

/// Rank 0's question probe sits after its block: whatever the probe rows score, the pooled scores
/// of the real tokens are those of the block alone (random scores, probe rows at ±1e9).
#[test]
fn probe_rows_never_enter_the_pool_of_real_tokens() {
    let (block, probe, n_kv) = (37, 6, 3);
    let real = Tensor::randn(0f32, 1.0, (block, n_kv), &Device::Cpu).unwrap();
    let alone = pool5_mask(&real, 4, block).unwrap();
    for fill in [1e9f32, -1e9] {
        let rows = Tensor::full(fill, (probe, n_kv), &Device::Cpu).unwrap();
        let with = Tensor::cat(&[&real, &rows], 0).unwrap();
        let pooled = pool5_mask(&with, 4, block).unwrap();
        assert_eq!(
            pooled
                .narrow(1, 0, block)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            alone.to_vec2::<f32>().unwrap(),
            "probe rows at {fill} leaked into the pool"
        );
    }
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
        (37, 3, 5, 40), // candidates past the end: clamped
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

#[test]
fn topk_by_hand() {
    let t = Tensor::new(&[[5f32, 1., 5., 7., 0., 5.]], &Device::Cpu).unwrap();
    let top = |lo, hi, k| {
        topk_positions(&t, lo, hi, k)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
    };
    // 7 at 3, then the tie at 5: lower positions first.
    assert_eq!(top(0, 6, 3), vec![vec![0, 2, 3]]);
    assert_eq!(top(1, 6, 2), vec![vec![2, 3]]);
    // Fewer candidates than k: all of them, padded with the last.
    assert_eq!(top(4, 6, 4), vec![vec![4, 5, 5, 5]]);
    assert_eq!(top(3, 3, 2), vec![vec![3, 3]]);
    let nan = Tensor::new(&[[f32::NAN, -1., -2.]], &Device::Cpu).unwrap();
    assert_eq!(
        topk_positions(&nan, 0, 3, 2)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap(),
        vec![vec![1, 2]]
    );
}

#[test]
fn gather_kv_by_hand() {
    // n_kv 2, s 3, d 2: k[h, i] = (10h + i, 10h + i), v = -k.
    let k = Tensor::new(
        &[[
            [[0f32, 0.], [1., 1.], [2., 2.]],
            [[10., 10.], [11., 11.], [12., 12.]],
        ]],
        &Device::Cpu,
    )
    .unwrap();
    let v = k.neg().unwrap();
    let picks = Tensor::new(&[[2u32, 0], [1, 1]], &Device::Cpu).unwrap();
    let g = gather_kv(&k, &v, &picks).unwrap();
    assert_eq!(g.dims(), &[1, 2, 2, 4]);
    let g = g.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
    assert_eq!(g[0], vec![vec![2., 2., -2., -2.], vec![0., 0., 0., 0.]]);
    assert_eq!(
        g[1],
        vec![vec![11., 11., -11., -11.], vec![11., 11., -11., -11.]]
    );
}

#[test]
fn lse_merge_by_hand() {
    // Row 0: parts with LSE ln 1 and ln 3 → weights 1/4, 3/4. Row 1: only part 1 saw keys.
    // Row 2: nobody.
    let inf = f32::NEG_INFINITY;
    let o = Tensor::new(&[[[4f32], [7.], [1.]], [[8.], [9.], [2.]]], &Device::Cpu).unwrap();
    let l = Tensor::new(&[[0f32, inf, inf], [3f32.ln(), 0.5, inf]], &Device::Cpu).unwrap();
    let (out, lse) = lse_merge(&o, &l).unwrap();
    let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let lse = lse.to_vec1::<f32>().unwrap();
    assert!(
        (out[0] - 7.0).abs() < 1e-6 && (out[1] - 9.0).abs() < 1e-6 && out[2] == 0.0,
        "{out:?}"
    );
    assert!(
        (lse[0] - 4f32.ln()).abs() < 1e-6 && (lse[1] - 0.5).abs() < 1e-6 && lse[2] == inf,
        "{lse:?}"
    );
}

#[test]
fn contiguous_matches_candle_on_cpu() {
    let t = Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &Device::Cpu).unwrap();
    let view = t.transpose(1, 2).unwrap();
    let got = contiguous(&view).unwrap();
    assert!(got.is_contiguous());
    let want = view.contiguous().unwrap();
    assert_eq!(
        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

/// The CPU path of `attention_rows` (f32: one call for all rows; what the GPU kernel is checked
/// against row by row): each row against the f64 reference over its own keys (1e-5), bit for bit
/// the same as that row alone; a row without keys is 0 with LSE -inf. Small calls run inline,
/// large ones on several threads; caches are strided views (a buffer's first `len` of `cap`
/// slots, and K|V packed along the head dim).
#[test]
fn attention_rows_on_the_cpu_match_the_reference() {
    let cases: [(usize, usize, usize, &[Option<usize>]); 2] = [
        (6, 2, 16, &[Some(5), None, Some(1), Some(40)]),
        (9, 3, 64, &[Some(700), Some(3), None, Some(1500), Some(64)]),
    ];
    for (n_h, n_kv, d, lens) in cases {
        let q = Tensor::randn(0f32, 1.0, (1, n_h, lens.len(), d), &Device::Cpu).unwrap();
        let kv: Vec<_> = lens
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.map(|n| {
                    if i % 2 == 0 {
                        let mk =
                            || Tensor::randn(0f32, 1.0, (1, n_kv, n + 3, d), &Device::Cpu).unwrap();
                        (mk().narrow(2, 0, n).unwrap(), mk().narrow(2, 0, n).unwrap())
                    } else {
                        let kv =
                            Tensor::randn(0f32, 1.0, (1, n_kv, n, 2 * d), &Device::Cpu).unwrap();
                        (kv.narrow(3, 0, d).unwrap(), kv.narrow(3, d, d).unwrap())
                    }
                })
            })
            .collect();
        let (o, lse) = attention_rows(&q, &kv).unwrap();
        let row = |t: &Tensor, i: usize| -> Vec<f32> {
            t.narrow(2, i, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        for (i, x) in kv.iter().enumerate() {
            let (oi, li) = (row(&o, i), row(&lse, i));
            let qi = q.narrow(2, i, 1).unwrap();
            let (o1, l1) = attention_rows(&qi, std::slice::from_ref(x)).unwrap();
            assert_eq!(
                (row(&o1, 0), row(&l1, 0)),
                (oi.clone(), li.clone()),
                "row {i} alone"
            );
            match x {
                Some((k, v)) => {
                    let (want, want_lse) = reference_attention(&qi, k, v, |_, _| true).unwrap();
                    for (a, w) in oi.iter().zip(&want).chain(li.iter().zip(&want_lse)) {
                        assert!(
                            (*a as f64 - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                            "row {i}: {a} vs {w}"
                        );
                    }
                }
                None => assert!(
                    oi.iter().all(|x| *x == 0.0) && li.iter().all(|x| *x == f32::NEG_INFINITY)
                ),
            }
        }
    }
}

/// `write_rows` on the CPU: each row at its slot of its own buffer, nothing else touched.
#[test]
fn write_rows_by_hand() {
    let src = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap(); // (1, 1, 2 rows, 2)
    let a = Tensor::zeros((1, 1, 3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    write_rows(&src, &[Some((a.clone(), 2)), None]).unwrap();
    assert_eq!(
        a.squeeze(0).unwrap().to_vec3::<f32>().unwrap()[0],
        vec![vec![0., 0.], vec![0., 0.], vec![1., 2.]]
    );
    write_rows(&src, &[None, Some((b.clone(), 0))]).unwrap();
    assert_eq!(
        b.squeeze(0).unwrap().to_vec3::<f32>().unwrap()[0],
        vec![vec![3., 4.], vec![0., 0.]]
    );
    assert!(
        write_rows(&src, &[Some((b.clone(), 2)), None]).is_err(),
        "a slot past the buffer"
    );
}

#[test]
fn argmax_by_hand() {
    let nan = f32::NAN;
    let rows: [[f32; 4]; 5] = [
        [0.5, 2.0, 2.0, 1.0],             // tie: the lower index
        [nan, 3.0, 1.0, 0.0],             // NaN first: 0
        [1.0, nan, 3.0, nan],             // NaN elsewhere: never
        [f32::NEG_INFINITY; 4],           // all -inf: 0
        [-1.0, -1.0, f32::INFINITY, 7.0], // +inf
    ];
    let want = [1, 0, 2, 0, 2];
    for (r, w) in rows.iter().zip(want) {
        assert_eq!(argmax(r), w, "{r:?}");
    }
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (5, 4), &Device::Cpu).unwrap();
    assert_eq!(argmax_rows(&t).unwrap().to_vec1::<u32>().unwrap(), want);
}

/// `x · Wᵀ` in f64 for `x (m, k)`, `w (n, k)` given as f32 rows.
fn linear_f64(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for r in 0..m {
        for c in 0..n {
            y[r * n + c] = (0..k)
                .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                .sum();
        }
    }
    y
}

/// `silu(gate) · up` in f64 of `y (m, 2h)` = `[gate | up]`.
fn silu_mul_f64(y: &[f64], m: usize, h: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(m * h);
    for r in 0..m {
        for c in 0..h {
            let (g, u) = (y[r * 2 * h + c], y[r * 2 * h + h + c]);
            out.push(g / (1.0 + (-g).exp()) * u);
        }
    }
    out
}

/// The few-rows projections on the CPU (f32) against f64: `x · Wᵀ` for 1 to 9 rows of a
/// 3-d input, and the gate|up projection with its SiLU product; each row equals its run alone.
#[test]
fn linear_rows_on_the_cpu_match_the_reference() {
    let (n, k) = (24, 40);
    let w = Tensor::randn(0f32, 0.2, (n, k), &Device::Cpu).unwrap();
    let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    for m in [1, 2, 9] {
        let x = Tensor::randn(0f32, 1.0, (1, m, k), &Device::Cpu).unwrap();
        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let want = linear_f64(&xv, &wv, m, n, k);
        let y = linear_rows(&x, &w).unwrap();
        assert_eq!(y.dims(), &[1, m, n]);
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-4, "rows {m}: {a} vs {b}");
        }
        let a = linear_rows_silu_mul(&x, &w).unwrap();
        assert_eq!(a.dims(), &[1, m, n / 2]);
        let got: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip(silu_mul_f64(&want, m, n / 2)) {
            assert!(
                (*a as f64 - b).abs() < 1e-4,
                "silu·up, rows {m}: {a} vs {b}"
            );
        }
        let last = linear_rows(&x.narrow(1, m - 1, 1).unwrap(), &w).unwrap();
        assert_eq!(
            last.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got_row(&y, m - 1),
            "the last row alone"
        );
    }
    assert!(linear_rows(
        &Tensor::zeros((2, 7), candle_core::DType::F32, &Device::Cpu).unwrap(),
        &w
    )
    .is_err());
    assert!(linear_rows_silu_mul(
        &Tensor::zeros((2, k), candle_core::DType::F32, &Device::Cpu).unwrap(),
        &w.narrow(0, 0, 3).unwrap()
    )
    .is_err());
}

fn got_row(y: &Tensor, r: usize) -> Vec<f32> {
    y.narrow(1, r, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `(x + a, (x + a) / sqrt(mean((x + a)²) + eps) · w)` in f64, rows of width `d`.
fn add_rms_norm_f64(x: &[f32], a: &[f32], w: &[f32], d: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let s: Vec<f64> = x
        .iter()
        .zip(a)
        .map(|(x, a)| *x as f64 + *a as f64)
        .collect();
    let mut h = Vec::with_capacity(s.len());
    for row in s.chunks(d) {
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
        h.extend(row.iter().zip(w).map(|(v, w)| v * inv * *w as f64));
    }
    (s, h)
}

/// The residual add and RMSNorm (CPU, f32) against f64 for 3 tokens of width 70.
#[test]
fn add_rms_norm_on_the_cpu_matches_the_reference() {
    let (t, d) = (3, 70);
    let r = |shape: (usize, usize, usize)| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let (x, a) = (r((1, t, d)), r((1, t, d)));
    let w = Tensor::randn(1f32, 0.1, d, &Device::Cpu).unwrap();
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (s_want, h_want) = add_rms_norm_f64(&v(&x), &v(&a), &v(&w), d, 1e-5);
    let (s, h) = add_rms_norm(&x, &a, &w, 1e-5).unwrap();
    assert_eq!(h.dims(), &[1, t, d]);
    for (got, want) in v(&s).iter().zip(&s_want).chain(v(&h).iter().zip(&h_want)) {
        assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }
    assert!(add_rms_norm(&x, &a, &w.narrow(0, 0, 5).unwrap(), 1e-5).is_err());
}

#[cfg(feature = "cuda")]
mod gpu {
    use crate::*;
    use candle_core::{DType, Device, Tensor};

    fn gpu() -> Device {
        Device::new_cuda(0).expect("a CUDA device")
    }

    /// All values of `t` as f32, in order (on the host).
    fn flat_f32(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Attention outputs against the f64 reference: rel-L2 within 1e-2 (bf16) / 2e-3 (f16), every
    /// element within 0.05. Returns (rel-L2, max abs).
    fn assert_close(o: &[f32], want: &[f64], dt: DType, label: &str) -> (f64, f64) {
        let (mut num, mut den, mut worst) = (0f64, 0f64, 0f64);
        for (a, w) in o.iter().zip(want) {
            num += (*a as f64 - w).powi(2);
            den += w * w;
            worst = worst.max((*a as f64 - w).abs());
        }
        let rel = (num / den.max(1e-30)).sqrt();
        let bound = if dt == DType::BF16 { 1e-2 } else { 2e-3 };
        assert!(
            rel <= bound && worst <= 0.05,
            "{label}: rel-L2 {rel:.2e}, max abs {worst:.3}"
        );
        (rel, worst)
    }

    /// Random scores with many exact ties (rounded to 1/8) and some -inf, like pooled scores.
    fn tied_scores(rows: usize, seq: usize) -> Tensor {
        let t = Tensor::randn(0f32, 4.0, (rows, seq), &Device::Cpu).unwrap();
        (t * 8.0)
            .unwrap()
            .round()
            .unwrap()
            .affine(0.125, 0.0)
            .unwrap()
    }

    #[test]
    fn topk_cuda_matches_cpu() {
        let g = gpu();
        for (rows, seq, lo, hi, k) in [
            (1, 10, 0, 10, 3),
            (3, 1000, 10, 990, 128),
            (8, 70_001, 4096, 70_001, 2048),
            (8, 65_536, 0, 65_536, 8192),
            (2, 300, 100, 200, 128), // fewer candidates than k
            (2, 300, 150, 150, 4),   // none
        ] {
            let s = tied_scores(rows, seq);
            let want = topk_positions(&s, lo, hi, k)
                .unwrap()
                .to_vec2::<u32>()
                .unwrap();
            let got = topk_positions(&s.to_device(&g).unwrap(), lo, hi, k)
                .unwrap()
                .to_vec2::<u32>()
                .unwrap();
            assert_eq!(got, want, "rows {rows} seq {seq} [{lo},{hi}) k {k}");
        }
    }

    #[test]
    fn contiguous_cuda_matches_candle() {
        let g = gpu();
        let f = flat_f32;
        for dt in [DType::BF16, DType::F16, DType::F32] {
            let t = Tensor::randn(0f32, 1.0, (2, 37, 6, 64), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
                .to_device(&g)
                .unwrap();
            let views = [
                t.transpose(1, 2).unwrap(), // (b, s, h, d) -> (b, h, s, d)
                t.narrow(1, 5, 20).unwrap().transpose(1, 2).unwrap(), // offset start
                t.narrow(3, 0, 32).unwrap(), // rows of 64 bytes with a gap
                t.reshape((74, 6, 64)).unwrap().transpose(0, 1).unwrap(), // 3 dims
                t.narrow(3, 1, 5).unwrap(), // unaligned: candle's copy
            ];
            for (i, v) in views.iter().enumerate() {
                let got = contiguous(v).unwrap();
                assert!(
                    got.is_contiguous() && got.dims() == v.dims(),
                    "{dt:?} view {i}"
                );
                assert_eq!(f(&got), f(&v.contiguous().unwrap()), "{dt:?} view {i}");
            }
        }
    }

    #[test]
    fn gather_kv_cuda_matches_cpu() {
        let g = gpu();
        for dt in [DType::BF16, DType::F32] {
            let (n_kv, s, d, kk) = (4, 1037, 128, 129);
            let k = Tensor::randn(0f32, 1.0, (1, n_kv, s, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let v = Tensor::randn(0f32, 1.0, (1, n_kv, s, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let picks = topk_positions(&tied_scores(n_kv, s), 3, s, kk).unwrap();
            let want = gather_kv(&k, &v, &picks).unwrap();
            // A strided view of a longer buffer, as a cache gives.
            let long = |t: &Tensor| {
                Tensor::cat(&[t, t], 2)
                    .unwrap()
                    .to_device(&g)
                    .unwrap()
                    .narrow(2, 0, s)
                    .unwrap()
            };
            let got = gather_kv(&long(&k), &long(&v), &picks.to_device(&g).unwrap()).unwrap();
            assert_eq!(flat_f32(&got), flat_f32(&want), "{dt:?}");
        }
    }

    #[test]
    fn lse_merge_cuda_matches_cpu() {
        let g = gpu();
        let (parts, rows, d) = (5, 333, 128);
        let o = Tensor::randn(0f32, 1.0, (parts, rows, d), &Device::Cpu).unwrap();
        let mut l = Tensor::randn(0f32, 3.0, (parts, rows), &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for r in 0..rows {
            if r % 7 == 0 {
                l[0][r] = f32::NEG_INFINITY;
            }
            if r % 11 == 0 {
                for p in l.iter_mut() {
                    p[r] = f32::NEG_INFINITY;
                }
            }
        }
        let l = Tensor::new(l, &Device::Cpu).unwrap();
        let (wo, wl) = lse_merge(&o, &l).unwrap();
        let (go, gl) = lse_merge(&o.to_device(&g).unwrap(), &l.to_device(&g).unwrap()).unwrap();
        let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in f(&go).iter().zip(f(&wo)) {
            assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "{a} vs {b}");
        }
        for (a, b) in f(&gl).iter().zip(f(&wl)) {
            assert!(
                *a == b || (a - b).abs() <= 1e-5 + 1e-5 * b.abs(),
                "{a} vs {b}"
            );
        }
    }

    /// The fused q|k|v split + RoPE kernel against the CPU path in f32 on the same (rounded)
    /// inputs, on fresh random projections and real rotation angles: within 1e-6 + 2e-6·|ref| for
    /// f32, one unit in the last place for bf16 (8e-3·|ref|) and f16 (1e-3·|ref|) plus 1e-6: the
    /// kernel rounds once from f32.
    #[test]
    fn rope_split_cuda_matches_cpu() {
        let g = gpu();
        for (b, s, n_h, n_kv, d) in [(1, 1, 1, 1, 64), (2, 37, 4, 2, 64), (1, 300, 32, 8, 128)] {
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let qkv = Tensor::randn(0f32, 1.0, (b, s, (n_h + 2 * n_kv) * d), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let ang: Vec<f32> = (0..s * d / 2)
                    .map(|i| {
                        (i / (d / 2)) as f32
                            * 10000f32.powf(-((i % (d / 2)) as f32) / (d / 2) as f32)
                    })
                    .collect();
                let ang = Tensor::from_vec(ang, (s, d / 2), &Device::Cpu).unwrap();
                let (cos, sin) = (
                    ang.cos().unwrap().to_dtype(dt).unwrap(),
                    ang.sin().unwrap().to_dtype(dt).unwrap(),
                );
                let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let want = rope_split(&f32(&qkv), &f32(&cos), &f32(&sin), n_h, n_kv).unwrap();
                let to = |t: &Tensor| t.to_device(&g).unwrap();
                let got = rope_split(&to(&qkv), &to(&cos), &to(&sin), n_h, n_kv).unwrap();
                let tol = match dt {
                    DType::F32 => 2e-6,
                    DType::BF16 => 8e-3,
                    _ => 1e-3,
                };
                for (name, w, o) in [
                    ("q", &want.0, &got.0),
                    ("k", &want.1, &got.1),
                    ("v", &want.2, &got.2),
                ] {
                    assert_eq!(w.dims(), o.dims(), "{name}");
                    assert!(o.is_contiguous());
                    for (x, y) in flat_f32(w).iter().zip(flat_f32(o)) {
                        assert!(
                            (x - y).abs() <= tol * x.abs() + 1e-6,
                            "{name} b{b} s{s} h{n_h}/{n_kv} d{d} {dt:?}: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    /// Every GPU kernel (ours, `mma.sync`, everywhere; FlashInfer's and cuDNN's on sm_90 where the
    /// mask cuts into pieces they run) against the f64 reference (same bf16/f16-rounded inputs), for causal, full
    /// and APB masks, GQA, odd lengths, straddling row blocks, batch 2, decode (split-KV), strided
    /// cache views and token-major query views. Bounds: relative L2 error of the output ≤ 1e-2
    /// (bf16) / 2e-3 (f16), every element within 0.05 (values are O(1)), LSE within
    /// 1e-3 + 1e-3·|ref|; rows that see nothing are exactly 0 with LSE -inf; NaN never passes.
    /// Outputs are compared in full, so a row a kernel leaves unwritten (0) fails.
    #[test]
    fn flash_matches_reference() {
        let g = gpu();
        use crate::attention::hopper::{self, Kernel};
        let Device::Cuda(cuda) = &g else {
            panic!("a CUDA device")
        };
        // By compute capability, not by APB_ATTENTION: on sm_90 both fused kernels must run.
        let sm90 = hopper::is_hopper(cuda).unwrap();
        let fused: Vec<Kernel> = if sm90 {
            hopper::auto_order(128)
                .into_iter()
                .filter(|k| k.available().is_ok())
                .collect()
        } else {
            vec![]
        };
        for k in hopper::auto_order(128) {
            println!("{}: {:?}", k.name(), k.available());
        }
        println!("sm_90 path: {sm90}, Hopper kernels tested: {fused:?}");
        // (b, n_h, n_kv, sq, sk, d, causal, anchor_rows, passing, dtype)
        let cases = [
            (1, 2, 2, 37, 37, 64, true, 0, 0, DType::BF16),
            (1, 8, 2, 200, 200, 128, true, 0, 0, DType::BF16),
            (2, 4, 1, 129, 300, 128, true, 0, 0, DType::F16),
            (1, 4, 2, 77, 77, 64, false, 0, 0, DType::F16),
            (1, 8, 2, 300, 1000, 128, true, 120, 700, DType::BF16), // APB: passing 700, anchor 120
            (1, 4, 4, 65, 65, 128, true, 65, 30, DType::BF16),      // all rows anchor rows
            (1, 32, 8, 1, 5000, 128, false, 0, 0, DType::BF16),     // decode, split-KV
            (1, 32, 8, 3, 4099, 64, true, 0, 0, DType::F16),        // short query, split-KV
            (1, 8, 8, 40, 20, 128, true, 0, 0, DType::BF16), // sq > sk: first rows see nothing
            (1, 16, 4, 1100, 1100, 128, true, 0, 0, DType::BF16), // long: 2 row tiles per warp
            (1, 8, 2, 700, 2000, 64, true, 300, 900, DType::F16), // long APB, straddling blocks
            (2, 4, 2, 701, 701, 128, true, 0, 0, DType::F16), // batch 2, odd, causal
            (1, 8, 1, 513, 2049, 128, false, 0, 0, DType::BF16), // MQA, non-causal, odd
            (1, 8, 2, 640, 1400, 128, true, 128, 760, DType::BF16), // APB, GQA 4
        ];
        let mut ran_fused = 0;
        for (b, n_h, n_kv, sq, sk, d, causal, anchor_rows, passing, dt) in cases {
            let mk = |h, s| {
                Tensor::randn(0f32, 1.0, (b, h, s, d), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap()
            };
            let (q, k, v) = (mk(n_h, sq), mk(n_kv, sk), mk(n_kv, sk));
            let mask = Mask {
                causal,
                anchor_rows,
                passing_keys: passing,
            };
            let off = sk as i64 - sq as i64;
            let (want, want_lse) = reference_attention(&q, &k, &v, |i, j| {
                (!causal || j as i64 <= i as i64 + off) && !(i < anchor_rows && j < passing)
            })
            .unwrap();
            // K/V as views into a longer cache buffer (strided heads); Q token-major as the
            // projections lay it out (strided rows).
            let long = |t: &Tensor| {
                Tensor::cat(&[t, t], 2)
                    .unwrap()
                    .to_device(&g)
                    .unwrap()
                    .narrow(2, 0, sk)
                    .unwrap()
            };
            let qg = q
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .to_device(&g)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let (kg, vg) = (long(&k), long(&v));
            let mut kernels = vec![Kernel::Mma];
            if hopper::pieces(mask, sq, sk).is_some() {
                kernels.extend(&fused);
            }
            for kernel in kernels {
                let (o, lse) = if kernel == Kernel::Mma {
                    crate::attention::mma::flash(&qg, &kg, &vg, mask, true).unwrap()
                } else {
                    ran_fused += 1;
                    hopper::run(kernel, &qg, &kg, &vg, mask, true, true)
                        .unwrap()
                        .expect("forced")
                };
                let kernel = kernel.name();
                assert_eq!(o.dims(), &[b, n_h, sq, d]);
                let (o, lse) = (flat_f32(&o), flat_f32(&lse.unwrap()));
                let label = format!("{kernel}: b{b} h{n_h}/{n_kv} sq{sq} sk{sk} d{d} causal {causal} anchor {anchor_rows} passing {passing} {dt:?}");
                assert!(o.iter().chain(&lse).all(|x| !x.is_nan()), "NaN: {label}");
                let (rel, worst) = assert_close(&o, &want, dt, &label);
                for (r, (a, w)) in lse.iter().zip(&want_lse).enumerate() {
                    if w.is_infinite() {
                        assert!(
                            *a == f32::NEG_INFINITY,
                            "{label}: row {r} sees nothing, LSE {a}"
                        );
                        assert!(
                            o[r * d..(r + 1) * d].iter().all(|x| *x == 0.0),
                            "{label}: row {r} not 0"
                        );
                    } else {
                        assert!(
                            (*a as f64 - w).abs() <= 1e-3 + 1e-3 * w.abs(),
                            "{label}: row {r} LSE {a} vs {w}"
                        );
                    }
                }
                println!("ok {label}: rel-L2 {rel:.2e}, max abs {worst:.2e}");
            }
        }
        // On Hopper both fused kernels must have run (the device scripts run on H100/H200).
        if sm90 {
            assert_eq!(fused.len(), 2, "a Hopper kernel is unavailable");
            assert!(
                ran_fused >= 20,
                "fused kernels ran on only {ran_fused} cases"
            );
        }
    }

    /// The decode rows of many sequences in one kernel (`attention_rows`), each over its own
    /// cache (views of longer buffers, as caches are): every row against the f64 reference with
    /// the bounds of `flash_matches_reference` (rel-L2 1e-2 bf16 / 2e-3 f16, max abs 0.05, LSE
    /// 1e-3 + 1e-3·|ref|); a row with no cache comes out 0 with LSE -inf; and each row alone
    /// equals, bit for bit, that row in the batch (its key splits depend on its length alone).
    #[test]
    fn attention_rows_match_reference_and_each_row_alone() {
        let g = gpu();
        for (n_h, n_kv, d, dt) in [
            (32, 8, 128, DType::BF16),
            (8, 2, 64, DType::F16),
            (9, 3, 64, DType::BF16),
            // 20 query heads a KV head: two blocks of 16 rows.
            (40, 2, 64, DType::BF16),
        ] {
            let lens = [
                Some(4100),
                Some(1),
                None,
                Some(63),
                Some(64),
                Some(300),
                Some(20000),
                Some(700),
            ];
            let rows = lens.len();
            let q = Tensor::randn(0f32, 1.0, (1, n_h, rows, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let kv: Vec<Option<(Tensor, Tensor)>> = lens
                .iter()
                .map(|l| {
                    l.map(|sk| {
                        let mk = || {
                            Tensor::randn(0f32, 1.0, (1, n_kv, sk + 7, d), &Device::Cpu)
                                .unwrap()
                                .to_dtype(dt)
                                .unwrap()
                        };
                        (mk(), mk())
                    })
                })
                .collect();
            let on_gpu = |x: &Option<(Tensor, Tensor)>, sk: Option<usize>| {
                x.as_ref().map(|(k, v)| {
                    let n = sk.unwrap();
                    (
                        k.to_device(&g).unwrap().narrow(2, 0, n).unwrap(),
                        v.to_device(&g).unwrap().narrow(2, 0, n).unwrap(),
                    )
                })
            };
            let kvg: Vec<_> = kv.iter().zip(&lens).map(|(x, l)| on_gpu(x, *l)).collect();
            let qg = q.to_device(&g).unwrap();
            let (o, lse) = attention_rows(&qg, &kvg).unwrap();
            assert_eq!(o.dims(), &[1, n_h, rows, d]);
            assert_eq!(lse.dims(), &[1, n_h, rows]);
            for (i, (x, l)) in kv.iter().zip(&lens).enumerate() {
                let label = format!("row {i} of {rows} ({l:?} keys) h{n_h}/{n_kv} d{d} {dt:?}");
                let oi = flat_f32(&o.narrow(2, i, 1).unwrap());
                let li = flat_f32(&lse.narrow(2, i, 1).unwrap());
                assert!(oi.iter().chain(&li).all(|x| !x.is_nan()), "NaN: {label}");
                match (x, l) {
                    (Some((k, v)), Some(sk)) => {
                        let qi = q.narrow(2, i, 1).unwrap();
                        let (k, v) = (k.narrow(2, 0, *sk).unwrap(), v.narrow(2, 0, *sk).unwrap());
                        let (want, want_lse) =
                            reference_attention(&qi, &k, &v, |_, _| true).unwrap();
                        let (rel, worst) = assert_close(&oi, &want, dt, &label);
                        for (a, w) in li.iter().zip(&want_lse) {
                            assert!(
                                (*a as f64 - w).abs() <= 1e-3 + 1e-3 * w.abs(),
                                "{label}: LSE {a} vs {w}"
                            );
                        }
                        println!("ok {label}: rel-L2 {rel:.2e}, max abs {worst:.2e}");
                    }
                    _ => {
                        assert!(oi.iter().all(|x| *x == 0.0), "{label}: not 0");
                        assert!(
                            li.iter().all(|x| *x == f32::NEG_INFINITY),
                            "{label}: LSE not -inf"
                        );
                    }
                }
                // Alone (a batch of one) and beside a different neighbour: the same bits.
                for others in [vec![], vec![kvg[0].clone()]] {
                    let mut kv1 = vec![kvg[i].clone()];
                    kv1.extend(others);
                    let q1 = Tensor::cat(
                        &[
                            qg.narrow(2, i, 1).unwrap(),
                            qg.narrow(2, 0, kv1.len() - 1).unwrap(),
                        ],
                        2,
                    )
                    .unwrap();
                    let (o1, l1) = attention_rows(&q1, &kv1).unwrap();
                    assert!(
                        flat_f32(&o1.narrow(2, 0, 1).unwrap()) == oi
                            && flat_f32(&l1.narrow(2, 0, 1).unwrap()) == li,
                        "{label}: differs in a batch of {}",
                        kv1.len()
                    );
                }
            }
        }
    }

    /// `write_rows` puts each row's new K (or V) at its own slot of its own buffer, skips rows
    /// with none, and leaves everything else as it was: equal to the CPU's `slice_set` per row.
    #[test]
    fn write_rows_cuda_matches_cpu() {
        let g = gpu();
        for dt in [DType::BF16, DType::F32] {
            let (n_kv, d, rows) = (3, 64, 5);
            let src = Tensor::randn(0f32, 1.0, (1, n_kv, rows, d), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let slots = [
                Some((10, 0)),
                None,
                Some((7, 6)),
                Some((1, 0)),
                Some((40, 33)),
            ];
            let bufs = |dev: &Device| -> Vec<Option<(Tensor, usize)>> {
                slots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        s.map(|(cap, at)| {
                            let t = Tensor::full(i as f32 + 0.5, (1, n_kv, cap, d), &Device::Cpu)
                                .unwrap()
                                .to_dtype(dt)
                                .unwrap()
                                .to_device(dev)
                                .unwrap();
                            (t, at)
                        })
                    })
                    .collect()
            };
            let (cpu, gpu_bufs) = (bufs(&Device::Cpu), bufs(&g));
            write_rows(&src, &cpu).unwrap();
            write_rows(&src.to_device(&g).unwrap(), &gpu_bufs).unwrap();
            for (i, (a, b)) in cpu.iter().zip(&gpu_bufs).enumerate() {
                if let (Some((a, _)), Some((b, _))) = (a, b) {
                    assert_eq!(flat_f32(a), flat_f32(b), "row {i} {dt:?}");
                    assert_ne!(
                        flat_f32(a),
                        flat_f32(&bufs(&Device::Cpu)[i].as_ref().unwrap().0),
                        "row {i}: nothing written"
                    );
                }
            }
        }
    }

    /// More rows than one launch's by-value table (`ROWS_BY_VALUE`): every row against the f64
    /// reference and bit for bit what it gives alone; K/V writes of as many rows equal the CPU's.
    #[test]
    fn rows_beyond_one_launch() {
        let g = gpu();
        let (n_h, n_kv, d, dt, rows) = (
            8,
            2,
            64,
            DType::BF16,
            2 * crate::attention::ROWS_BY_VALUE + 22,
        );
        let lens: Vec<Option<usize>> = (0..rows)
            .map(|i| (i % 7 != 3).then_some((i * 37) % 500 + 1))
            .collect();
        let q = Tensor::randn(0f32, 1.0, (1, n_h, rows, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let kv: Vec<Option<(Tensor, Tensor)>> = lens
            .iter()
            .map(|l| {
                l.map(|sk| {
                    let mk = || {
                        Tensor::randn(0f32, 1.0, (1, n_kv, sk, d), &Device::Cpu)
                            .unwrap()
                            .to_dtype(dt)
                            .unwrap()
                    };
                    (mk(), mk())
                })
            })
            .collect();
        let kvg: Vec<_> = kv
            .iter()
            .map(|x| {
                x.as_ref()
                    .map(|(k, v)| (k.to_device(&g).unwrap(), v.to_device(&g).unwrap()))
            })
            .collect();
        let qg = q.to_device(&g).unwrap();
        let (o, lse) = attention_rows(&qg, &kvg).unwrap();
        assert_eq!(o.dims(), &[1, n_h, rows, d]);
        for i in 0..rows {
            let label = format!("row {i} of {rows} ({:?} keys)", lens[i]);
            let oi = flat_f32(&o.narrow(2, i, 1).unwrap());
            let li = flat_f32(&lse.narrow(2, i, 1).unwrap());
            match &kv[i] {
                Some((k, v)) => {
                    let (want, _) =
                        reference_attention(&q.narrow(2, i, 1).unwrap(), k, v, |_, _| true)
                            .unwrap();
                    assert_close(&oi, &want, dt, &label);
                }
                None => assert!(oi.iter().all(|x| *x == 0.0), "{label}: not 0"),
            }
            let (o1, l1) = attention_rows(&qg.narrow(2, i, 1).unwrap(), &kvg[i..=i]).unwrap();
            assert!(
                flat_f32(&o1) == oi && flat_f32(&l1) == li,
                "{label}: differs alone"
            );
        }
        // write_rows over as many rows: every third row skipped.
        let src = Tensor::randn(0f32, 1.0, (1, n_kv, rows, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let bufs = |dev: &Device| -> Vec<Option<(Tensor, usize)>> {
            (0..rows)
                .map(|i| {
                    (i % 3 != 1).then(|| {
                        let t = Tensor::full(i as f32, (1, n_kv, 5, d), &Device::Cpu)
                            .unwrap()
                            .to_dtype(dt)
                            .unwrap()
                            .to_device(dev)
                            .unwrap();
                        (t, i % 5)
                    })
                })
                .collect()
        };
        let (cpu, gpu_bufs) = (bufs(&Device::Cpu), bufs(&g));
        write_rows(&src, &cpu).unwrap();
        write_rows(&src.to_device(&g).unwrap(), &gpu_bufs).unwrap();
        for (i, (a, b)) in cpu.iter().zip(&gpu_bufs).enumerate() {
            if let (Some((a, _)), Some((b, _))) = (a, b) {
                assert_eq!(flat_f32(a), flat_f32(b), "write_rows row {i}");
            }
        }
    }

    /// Greedy picks on the GPU equal the CPU scan: random rows, ties (the lowest index wins),
    /// NaN (never chosen, unless first), all -inf, +inf, widths around the block size and
    /// Llama-3's vocabulary.
    #[test]
    fn argmax_rows_cuda_matches_cpu() {
        let g = gpu();
        for n in [1, 5, 1000, 1024, 1025, 49152, 128256] {
            let rows = 9;
            let mut x = Tensor::randn(0f32, 3.0, (rows, n), &Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            // Rounded to 1/4: many exact ties, the maximum among them.
            for v in x[1].iter_mut() {
                *v = (*v * 4.0).round() / 4.0;
            }
            let m = x[2].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let last = n - 1;
            x[2][last] = m;
            x[3][0] = f32::NAN;
            if n > 3 {
                x[4][n / 2] = f32::NAN;
                x[4][n / 3] = 1e30;
            }
            x[5].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
            x[6][last] = f32::INFINITY;
            x[7].iter_mut().for_each(|v| *v = f32::NAN);
            x[8].iter_mut().for_each(|v| *v = 1.0);
            let flat: Vec<f32> = x.iter().flatten().copied().collect();
            let t = Tensor::from_vec(flat, (rows, n), &Device::Cpu).unwrap();
            let want: Vec<u32> = x.iter().map(|r| argmax(r)).collect();
            let cpu = argmax_rows(&t).unwrap().to_vec1::<u32>().unwrap();
            let got = argmax_rows(&t.to_device(&g).unwrap())
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(cpu, want, "CPU op, width {n}");
            assert_eq!(got, want, "GPU, width {n}");
        }
    }

    /// The few-rows kernels (`linear.cu`) against f64 on fresh random bf16 and f16 inputs:
    /// rows 1 to 64 (every tile count, partial tiles) and 150 (three launches), widths not a multiple of the block's 32
    /// weight rows, k of one chunk up to Llama-3's 14336; rel-L2 within 1e-2 (bf16) / 2e-3 (f16)
    /// and every element within 0.05. Each row equals the same row alone bit for bit, whatever
    /// the rows beside it (the batch invariance decode relies on).
    #[test]
    fn linear_rows_cuda_match_reference_and_each_row_alone() {
        let g = gpu();
        let cases = [
            (1, 32, 32),
            (3, 100, 64),
            (8, 48, 576),
            (9, 6144, 4096),
            (24, 200, 1536),
            // 17-32 rows of a weight over 4096 rows: 32-row blocks, alone 16-row ones (k of 32
            // chunks: each warp loops over 4).
            (20, 4200, 1024),
            (33, 96, 14336),
            (64, 130, 256),
            (150, 96, 64),
        ];
        for dt in [DType::BF16, DType::F16] {
            for (m, n, k) in cases {
                let label = format!("{dt:?} m {m} n {n} k {k}");
                let w = (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap()
                    * (1.0 / (k as f64).sqrt()))
                .unwrap()
                .to_dtype(dt)
                .unwrap();
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let (wv, xv) = (flat_f32(&w), flat_f32(&x));
                let want = crate::tests::linear_f64(&xv, &wv, m, n, k);
                let (wg, xg) = (w.to_device(&g).unwrap(), x.to_device(&g).unwrap());
                let y = linear_rows(&xg, &wg).unwrap();
                assert_eq!(y.dims(), &[m, n], "{label}");
                assert_close(&flat_f32(&y), &want, dt, &label);
                let a = linear_rows_silu_mul(&xg, &wg).unwrap();
                let h = n / 2;
                let want_a = crate::tests::silu_mul_f64(&want, m, h);
                assert_close(&flat_f32(&a), &want_a, dt, &format!("silu·up {label}"));
                // Rows alone (and beside fewer rows) give the same bits.
                for r in [0, m / 2, m - 1] {
                    let xr = xg.narrow(0, r, 1).unwrap();
                    let alone = flat_f32(&linear_rows(&xr, &wg).unwrap());
                    assert_eq!(
                        alone,
                        flat_f32(&y.narrow(0, r, 1).unwrap()),
                        "{label}: row {r}"
                    );
                    let alone = flat_f32(&linear_rows_silu_mul(&xr, &wg).unwrap());
                    assert_eq!(
                        alone,
                        flat_f32(&a.narrow(0, r, 1).unwrap()),
                        "silu·up {label}: row {r}"
                    );
                }
            }
        }
    }

    /// The fused residual add + RMSNorm (`norm.cu`) against f64 (bf16, f16; widths 64 to 16384
    /// through the 16-byte path, 70 and 32776 through the element-strided one; 1 to 37 tokens):
    /// the sum equals candle's add bit for bit, the norm within bf16/f16 rounding (rel-L2 and
    /// max abs as the attention tests), and a row alone equals itself among the others bit for
    /// bit.
    #[test]
    fn add_rms_norm_cuda_matches_reference() {
        let g = gpu();
        for dt in [DType::BF16, DType::F16] {
            for (t, d) in [
                (1, 64),
                (37, 576),
                (5, 4096),
                (2, 8192),
                (3, 16384),
                (3, 70),
                (2, 32776),
            ] {
                let label = format!("{dt:?} {t}×{d}");
                let r = |std: f32| {
                    Tensor::randn(0f32, std, (1, t, d), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap()
                };
                let (x, a) = (r(1.0), r(0.5));
                let w = Tensor::randn(1f32, 0.1, d, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let (want_s, want_h) = crate::tests::add_rms_norm_f64(
                    &flat_f32(&x),
                    &flat_f32(&a),
                    &flat_f32(&w),
                    d,
                    1e-5,
                );
                let (xg, ag, wg) = (
                    x.to_device(&g).unwrap(),
                    a.to_device(&g).unwrap(),
                    w.to_device(&g).unwrap(),
                );
                let (s, h) = add_rms_norm(&xg, &ag, &wg, 1e-5).unwrap();
                assert_eq!(
                    flat_f32(&s),
                    flat_f32(&(&xg + &ag).unwrap()),
                    "{label}: x + a"
                );
                assert_close(&flat_f32(&s), &want_s, dt, &format!("{label}: sum"));
                assert_close(&flat_f32(&h), &want_h, dt, &format!("{label}: norm"));
                let last = |t: &Tensor| t.narrow(1, t.dim(1).unwrap() - 1, 1).unwrap();
                let (s1, h1) = add_rms_norm(
                    &last(&xg).contiguous().unwrap(),
                    &last(&ag).contiguous().unwrap(),
                    &wg,
                    1e-5,
                )
                .unwrap();
                assert_eq!(flat_f32(&s1), flat_f32(&last(&s)), "{label}: sum alone");
                assert_eq!(flat_f32(&h1), flat_f32(&last(&h)), "{label}: norm alone");
            }
        }
    }

    /// The dispatcher picks a fused Hopper kernel on sm_90 for long prefill blocks, and it agrees
    /// with ours through the public entry point.
    #[test]
    fn dispatch_prefers_hopper_kernel_on_sm90() {
        let g = gpu();
        let mk = |h, s| {
            Tensor::randn(0f32, 1.0, (1, h, s, 128), &g)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let (q, k, v) = (mk(32, 512), mk(8, 512), mk(8, 512));
        let o = attention(&q, &k, &v, Mask::causal()).unwrap();
        let (o_mma, _) = crate::attention::mma::flash(&q, &k, &v, Mask::causal(), false).unwrap();
        let diff = (o.to_dtype(DType::F32).unwrap() - o_mma.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 0.02, "dispatcher vs mma: max diff {diff}");
        // The Hopper path returns a token-major buffer as a head-major view; ours is contiguous.
        let hopper = crate::attention::hopper::kernel_for(&g, 128)
            .unwrap()
            .is_some();
        assert_eq!(
            !o.is_contiguous(),
            hopper,
            "cuDNN path on sm_90 with cuDNN: {hopper}"
        );
        if hopper {
            assert!(o.transpose(1, 2).unwrap().is_contiguous());
        }
    }
}
