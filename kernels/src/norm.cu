// A layer's residual add and the RMSNorm after it in one pass: x' = x + a (rounded to T, as an
// add of two T tensors) and h = x' / sqrt(mean(x'²) + eps) · w, one block per token. Unfused, a
// decode step spent four small kernels a layer on these (two adds, two norms).
#include "common.cuh"

namespace {

// The row's sum of squares over the block (every thread gets it).
__device__ __forceinline__ float block_sum(float ss) {
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
    return part[0];
}

// Any width and alignment: element-strided, the sum read back from `x_out`.
template <typename T>
__device__ void add_rms_norm_any(const T* __restrict__ x, const T* __restrict__ a,
                                 const T* __restrict__ w, T* __restrict__ x_out, T* __restrict__ h,
                                 int d, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const T s = Ty<T>::from(Ty<T>::to(x[i]) + Ty<T>::to(a[i]));
        x_out[i] = s;
        const float f = Ty<T>::to(s);
        ss += f * f;
    }
    const float inv = rsqrtf(block_sum(ss) / d + eps);
    // Each thread reads back only what it wrote itself.
    for (int i = threadIdx.x; i < d; i += blockDim.x) h[i] = Ty<T>::from(Ty<T>::to(x_out[i]) * inv * Ty<T>::to(w[i]));
}

// 16-byte chunks a thread holds in registers between the sum and the scaling.
constexpr int NORM_CHUNKS = 4;

// Widths of 8k up to 8 · NORM_CHUNKS · blockDim, 16-byte aligned rows (every model's hidden
// size): one 16-byte load of x, a and w per 8 values, the row kept in registers (a decode step's
// norm is latency-bound: the strided pass took 9.5 µs for a 4096-wide row on an H100).
template <typename T>
__device__ void add_rms_norm_vec(const T* __restrict__ x, const T* __restrict__ a,
                                 const T* __restrict__ w, T* __restrict__ x_out, T* __restrict__ h,
                                 int d, float eps) {
    const int n8 = d / 8;
    float v[NORM_CHUNKS][8];
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < NORM_CHUNKS; ++c) {
        const int j = threadIdx.x + c * blockDim.x;
        if (j < n8) {
            const uint4 xv = reinterpret_cast<const uint4*>(x)[j];
            const uint4 av = reinterpret_cast<const uint4*>(a)[j];
            const T* xs = reinterpret_cast<const T*>(&xv);
            const T* as = reinterpret_cast<const T*>(&av);
            uint4 sv;
            T* s = reinterpret_cast<T*>(&sv);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                s[e] = Ty<T>::from(Ty<T>::to(xs[e]) + Ty<T>::to(as[e]));
                v[c][e] = Ty<T>::to(s[e]);
                ss += v[c][e] * v[c][e];
            }
            reinterpret_cast<uint4*>(x_out)[j] = sv;
        }
    }
    const float inv = rsqrtf(block_sum(ss) / d + eps);
#pragma unroll
    for (int c = 0; c < NORM_CHUNKS; ++c) {
        const int j = threadIdx.x + c * blockDim.x;
        if (j < n8) {
            const uint4 wv = reinterpret_cast<const uint4*>(w)[j];
            const T* ws = reinterpret_cast<const T*>(&wv);
            uint4 hv;
            T* o = reinterpret_cast<T*>(&hv);
#pragma unroll
            for (int e = 0; e < 8; ++e) o[e] = Ty<T>::from(v[c][e] * inv * Ty<T>::to(ws[e]));
            reinterpret_cast<uint4*>(h)[j] = hv;
        }
    }
}

template <typename T>
__device__ void add_rms_norm(const T* x, const T* a, const T* w, T* x_out, T* h, int d, float eps) {
    const int64_t off = (int64_t)blockIdx.x * d;
    x += off;
    a += off;
    x_out += off;
    h += off;
    const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(a) |
                           reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(x_out) |
                           reinterpret_cast<uintptr_t>(h)) & 15) == 0;
    // The same for every row of a launch, and for a row alone: the width and the base addresses
    // decide, and the model's tensors are whole allocations (256-byte aligned), so a row's
    // values do not depend on the rows beside it (tested).
    if (aligned && d % 8 == 0 && d / 8 <= NORM_CHUNKS * (int)blockDim.x) {
        add_rms_norm_vec(x, a, w, x_out, h, d, eps);
    } else {
        add_rms_norm_any(x, a, w, x_out, h, d, eps);
    }
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
