//! NCCL point-to-point on one GPU (run on the device): a one-rank communicator's `ring_pass`
//! (a send to itself and a receive from itself, grouped) returns the tensor, for each dtype the
//! methods pass; `all_to_all` of one part returns it. Several ranks need several GPUs.
#![cfg(feature = "cuda")]

use apb_plugin::nccl::{unique_id, NcclComm};
use apb_plugin::Communicator;
use candle_core::{DType, Device, Tensor};

/// The largest absolute difference between `a` and `b` (in f32).
fn diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

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
        assert_eq!(diff(&got, &t), 0.0, "{dtype:?}");
        assert_eq!(got.dims(), t.dims());
        let back = comm.all_to_all(std::slice::from_ref(&t)).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].dims(), t.dims());
    }
    // A wrong number of parts is an error, not a hang.
    let e = comm.all_to_all(&[]).unwrap_err().to_string();
    assert!(e.contains("1 parts"), "{e}");
}

/// A transfer in flight runs on its own stream and is ordered both ways. (1) Behind ~0.5 s of
/// copies queued on the transfer stream, a one-rank gather is still pending after the call (an
/// event recorded behind it is not complete) and the compute stream's read after
/// [`Pending::wait`] sees the gathered data, not the uninitialised buffer. (2) With the transfer
/// stream idle and ~0.1 s of matmuls producing the input on the compute stream, the gather still
/// reads the finished input. (3) A pending transfer dropped unwaited leaves nothing broken.
#[test]
fn a_transfer_in_flight_is_ordered_after_its_input_and_before_its_reader() {
    use candle_core::cuda::cudarc::driver::sys::CUevent_flags;
    let dev = Device::new_cuda(0).unwrap();
    let comm = NcclComm::new_with(&dev, 0, 1, unique_id().unwrap(), true).unwrap();
    assert!(comm.overlaps());
    let side = comm.transfer_stream();
    // Warm up first (module loads, NCCL's first call): they take longer than the copies below.
    let t = Tensor::randn(0f32, 1.0, (1, 3, 129, 64), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    comm.all_gather_pending(&t).unwrap().wait().unwrap();
    dev.synchronize().unwrap();
    // (1) 1 GiB copied back and forth on the transfer stream (~0.5 s), then the gather behind it.
    let n = 1usize << 28;
    let mut a = side.alloc_zeros::<f32>(n).unwrap();
    let mut b = side.alloc_zeros::<f32>(n).unwrap();
    side.synchronize().unwrap();
    for _ in 0..500 {
        side.memcpy_dtod(&a, &mut b).unwrap();
        side.memcpy_dtod(&b, &mut a).unwrap();
    }
    let t = Tensor::randn(0f32, 1.0, (1, 3, 129, 64), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let pending = comm.all_gather_pending(&t).unwrap();
    let behind = side
        .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .unwrap();
    assert!(
        !behind.is_complete(),
        "the gather did not queue on the transfer stream behind the copies"
    );
    let got = pending.wait().unwrap();
    assert_eq!(
        diff(&got[0], &t),
        0.0,
        "the reader did not wait for the gather"
    );
    drop((a, b));
    // (2) The input produced by a long run of compute-stream kernels.
    let m = Tensor::randn(0f32, 1.0, (8192, 8192), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let mut x = m.clone();
    for _ in 0..40 {
        // Scaled by 1/√8192 ≈ 1/90.5 so the values stay of order one.
        x = (x.matmul(&m).unwrap() * (1.0 / 90.5)).unwrap();
    }
    let t = x.narrow(0, 0, 64).unwrap().contiguous().unwrap();
    let got = comm.all_gather_pending(&t).unwrap().wait().unwrap();
    assert_eq!(
        diff(&got[0], &t),
        0.0,
        "the gather read its input before it was written"
    );
    // (3) Dropped unwaited, then the device is still usable.
    drop(comm.all_gather_pending(&t).unwrap());
    dev.synchronize().unwrap();
    // Passes go the same way.
    let t = Tensor::randn(0f32, 1.0, (2, 5, 64), &dev).unwrap();
    let got = comm.ring_pass(&t).unwrap().wait().unwrap();
    assert_eq!(got.to_vec3::<f32>().unwrap(), t.to_vec3::<f32>().unwrap());
}
