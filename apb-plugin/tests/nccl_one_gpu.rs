//! NCCL point-to-point on one GPU (run on the device): a one-rank communicator's `ring_pass`
//! (a send to itself and a receive from itself, grouped) returns the tensor, for each dtype the
//! methods pass; `all_to_all` of one part returns it. Several ranks need several GPUs.
#![cfg(feature = "cuda")]

use apb_plugin::nccl::{unique_id, NcclComm};
use apb_plugin::Communicator;
use candle_core::{DType, Device, Tensor};

#[test]
fn one_rank_ring_pass_and_all_to_all_return_the_input() {
    let dev = Device::new_cuda(0).unwrap();
    let comm = NcclComm::new(&dev, 0, 1, unique_id().unwrap()).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let t = Tensor::randn(0f32, 1.0, (1, 2, 37, 16), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let got = comm.ring_pass(&t).unwrap().wait().unwrap();
        let diff = (got.to_dtype(DType::F32).unwrap() - t.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{dtype:?}");
        assert_eq!(got.dims(), t.dims());
        let back = comm.all_to_all(std::slice::from_ref(&t)).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].dims(), t.dims());
    }
    // A wrong number of parts is an error, not a hang.
    let e = comm.all_to_all(&[]).unwrap_err().to_string();
    assert!(e.contains("1 parts"), "{e}");
}

/// A transfer in flight runs on its own stream, and whoever reads its result waits for it: with
/// ~0.1–0.2 s of copies queued on the transfer stream ahead of a one-rank gather, the gather call
/// returns at once (it is queued behind them, not waited for), and the compute stream's read of
/// the result still sees the gathered data, not the uninitialised buffer (a missing event wait
/// would read it before the gather ran).
#[test]
fn a_gather_in_flight_is_waited_for_where_its_result_is_read() {
    use std::time::Instant;
    let dev = Device::new_cuda(0).unwrap();
    let comm = NcclComm::new(&dev, 0, 1, unique_id().unwrap()).unwrap();
    let side = comm.transfer_stream();
    // 1 GiB copied back and forth on the transfer stream, long enough to see.
    let n = 1usize << 28;
    let mut a = side.alloc_zeros::<f32>(n).unwrap();
    let mut b = side.alloc_zeros::<f32>(n).unwrap();
    side.synchronize().unwrap();
    let t0 = Instant::now();
    for _ in 0..150 {
        side.memcpy_dtod(&a, &mut b).unwrap();
        side.memcpy_dtod(&b, &mut a).unwrap();
    }
    let queued = t0.elapsed();
    for (i, dtype) in [DType::F32, DType::BF16].into_iter().enumerate() {
        let t = Tensor::randn(0f32, 1.0, (1, 3, 129, 64), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let t1 = Instant::now();
        let pending = comm.all_gather_pending(&t).unwrap();
        let issued = t1.elapsed();
        let got = pending.wait().unwrap();
        // Read on the compute stream (a kernel, then a copy to the host).
        let diff = (got[0].to_dtype(DType::F32).unwrap() - t.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{dtype:?}: the read did not wait for the gather");
        if i == 0 {
            // The copies were still running when the gather was issued behind them.
            let total = t0.elapsed();
            assert!(
                issued.as_secs_f64() < 0.5 * (total - queued).as_secs_f64(),
                "the gather call waited: issued in {issued:?}, copies took {total:?}"
            );
        }
    }
    drop((a, b));
    // Passes go the same way.
    let t = Tensor::randn(0f32, 1.0, (2, 5, 64), &dev).unwrap();
    let got = comm.ring_pass(&t).unwrap().wait().unwrap();
    assert_eq!(got.to_vec3::<f32>().unwrap(), t.to_vec3::<f32>().unwrap());
}
