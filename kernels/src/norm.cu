// A layer's residual add and the RMSNorm after it in one pass: x' = x + a (rounded to T, as an
// add of two T tensors) and h = x' / sqrt(mean(x'²) + eps) · w, one block per token. Unfused, a
// decode step spent four small kernels a layer on these (two adds, two norms).
#include "common.cuh"

namespace {

template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ a,
                             const T* __restrict__ w, T* __restrict__ x_out, T* __restrict__ h,
                             int d, float eps) {
    const int64_t off = (int64_t)blockIdx.x * d;
    x += off;
    a += off;
    x_out += off;
    h += off;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const T s = Ty<T>::from(Ty<T>::to(x[i]) + Ty<T>::to(a[i]));
        x_out[i] = s;
        const float f = Ty<T>::to(s);
        ss += f * f;
    }
    __shared__ float part[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float v = lane < (int)(blockDim.x / 32) ? part[lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) part[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(part[0] / d + eps);
    // Each thread reads back only what it wrote itself.
    for (int i = threadIdx.x; i < d; i += blockDim.x) h[i] = Ty<T>::from(Ty<T>::to(x_out[i]) * inv * Ty<T>::to(w[i]));
}

}  // namespace

extern "C" __global__ void add_rms_norm_bf16(const __nv_bfloat16* x, const __nv_bfloat16* a,
                                             const __nv_bfloat16* w, __nv_bfloat16* x_out,
                                             __nv_bfloat16* h, int d, float eps) {
    add_rms_norm(x, a, w, x_out, h, d, eps);
}
extern "C" __global__ void add_rms_norm_f16(const __half* x, const __half* a, const __half* w,
                                            __half* x_out, __half* h, int d, float eps) {
    add_rms_norm(x, a, w, x_out, h, d, eps);
}
