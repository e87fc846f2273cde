//! CUDA kernels of APB-rs. The kernels arrive with the GPU path (issue 4); without the `cuda`
//! feature this crate is empty so CPU builds need no CUDA toolkit.
