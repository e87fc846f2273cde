// APB-rs CUDA kernels. Generic over models: they see scores, indices and buffers, not layers.
#include <math_constants.h>

// Retaining-head post-processing: max-pool (kernel 5, stride 1, padding 2) along the sequence of
// `scores` (seq, n_kv) row-major, written transposed to `out` (n_kv, seq); positions outside the
// candidate range [lo, hi) get -inf so top-k never picks them.
extern "C" __global__ void pool5_mask_f32(const float* __restrict__ scores, float* __restrict__ out,
                                          unsigned seq, unsigned n_kv, unsigned lo, unsigned hi) {
    unsigned idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= seq * n_kv) return;
    unsigned h = idx / seq, i = idx % seq;
    float m = -CUDART_INF_F;
    if (i >= lo && i < hi) {
        unsigned a = i >= 2 ? i - 2 : 0, z = i + 3 < seq ? i + 3 : seq;
        for (unsigned j = a; j < z; ++j) m = fmaxf(m, scores[j * n_kv + h]);
    }
    out[idx] = m;
}
