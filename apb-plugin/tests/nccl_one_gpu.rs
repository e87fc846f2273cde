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
