//! NCCL point-to-point between two GPUs (run on a device with at least two; `--features cuda`):
//! one thread per GPU, rank-tagged tensors. `ring_pass` brings the previous rank's tensor and
//! `all_to_all` returns the parts every rank addressed to this one, in rank order, bit for bit.
#![cfg(feature = "cuda")]

use apb_plugin::nccl::{unique_id, NcclComm};
use apb_plugin::Communicator;
use candle_core::{DType, Device, Tensor};

/// A (1, 2, 5, 8) tensor whose every element is `tag`.
fn tagged(tag: f32, dev: &Device) -> Tensor {
    Tensor::full(tag, (1, 2, 5, 8), dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

fn value(t: &Tensor) -> f32 {
    let v: Vec<f32> = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(v.iter().all(|x| *x == v[0]), "one value per tensor");
    v[0]
}

#[test]
fn two_ranks_pass_and_exchange_in_rank_order() {
    let world = 2;
    let id = unique_id().unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let dev = Device::new_cuda(rank).unwrap();
                    let comm = NcclComm::new(&dev, rank, world, id).unwrap();
                    let got = comm
                        .ring_pass(&tagged(rank as f32, &dev))
                        .unwrap()
                        .wait()
                        .unwrap();
                    assert_eq!(value(&got), ((rank + world - 1) % world) as f32);
                    // Rank r sends 10·r + d to rank d.
                    let parts: Vec<Tensor> = (0..world)
                        .map(|d| tagged((10 * rank + d) as f32, &dev))
                        .collect();
                    let back = comm.all_to_all(&parts).unwrap();
                    let vals: Vec<f32> = back.iter().map(value).collect();
                    let want: Vec<f32> = (0..world).map(|r| (10 * r + rank) as f32).collect();
                    assert_eq!(vals, want, "rank {rank}");
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}
