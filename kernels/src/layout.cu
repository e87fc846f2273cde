// Copies a tensor whose innermost dimension is contiguous (rows of `row_bytes`, a multiple of 16)
// from a strided source into a contiguous destination, 16 bytes per thread. Outer dimensions
// (n0, n1, n2) with source strides in bytes (s0, s1, s2). This is the token-major ↔ head-major
// transpose around attention; it runs at memory speed, where a per-element strided copy does not.
#include <stdint.h>

extern "C" __global__ void copy_rows_16b(const char* __restrict__ src, uint4* __restrict__ dst,
                                         int64_t n1, int64_t n2, int64_t s0, int64_t s1,
                                         int64_t s2, int64_t chunks_per_row, int64_t total) {
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; c < total; c += step) {
        const int64_t row = c / chunks_per_row, k = c - row * chunks_per_row;
        const int64_t i2 = row % n2, r = row / n2;
        const int64_t i1 = r % n1, i0 = r / n1;
        dst[c] = *reinterpret_cast<const uint4*>(src + i0 * s0 + i1 * s1 + i2 * s2 + k * 16);
    }
}

// Splits a fused q|k|v projection (token-major rows of (n_h + 2 n_kv) heads × d) into head-major
// q (b, n_h, s, d), k, v (b, n_kv, s, d), applying RoPE (rotate-half form, cos/sin (s, d/2)) to q
// and k on the way: one read and one write of the projections instead of split + transpose + rope.
// Block: d/2 threads × 8 head slots; grid: (b·s, ceil(slots/8)). Math in f32.
template <typename T>
__device__ void rope_split(const T* __restrict__ qkv, const T* __restrict__ cos,
                           const T* __restrict__ sin, T* __restrict__ q, T* __restrict__ k,
                           T* __restrict__ v, int s, int n_h, int n_kv, int d) {
    const int slots = n_h + 2 * n_kv;
    const int slot = blockIdx.y * blockDim.y + threadIdx.y;
    if (slot >= slots) return;
    const int64_t row = blockIdx.x;  // b·s + t
    const int t = (int)(row % s);
    const int64_t bi = row / s;
    const int half = d / 2, i = threadIdx.x;
    const T* src = qkv + row * (int64_t)slots * d + (int64_t)slot * d;
    float x1 = (float)src[i], x2 = (float)src[i + half];
    T* dst;
    bool rotate = true;
    if (slot < n_h) {
        dst = q + ((bi * n_h + slot) * s + t) * (int64_t)d;
    } else if (slot < n_h + n_kv) {
        dst = k + ((bi * n_kv + (slot - n_h)) * s + t) * (int64_t)d;
    } else {
        dst = v + ((bi * n_kv + (slot - n_h - n_kv)) * s + t) * (int64_t)d;
        rotate = false;
    }
    if (rotate) {
        const float c = (float)cos[(int64_t)t * half + i], sn = (float)sin[(int64_t)t * half + i];
        dst[i] = (T)(x1 * c - x2 * sn);
        dst[i + half] = (T)(x2 * c + x1 * sn);
    } else {
        dst[i] = src[i];
        dst[i + half] = src[i + half];
    }
}

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ROPE_SPLIT(NAME, T)                                                                       \
    extern "C" __global__ void NAME(const T* qkv, const T* cos, const T* sin, T* q, T* k, T* v, \
                                    int s, int n_h, int n_kv, int d) {                           \
        rope_split<T>(qkv, cos, sin, q, k, v, s, n_h, n_kv, d);                                   \
    }
ROPE_SPLIT(rope_split_bf16, __nv_bfloat16)
ROPE_SPLIT(rope_split_f16, __half)
ROPE_SPLIT(rope_split_f32, float)

// Writes one decode step's new keys (or values) into each row's own cache: src (n_kv, b, row)
// contiguous (head-major rows of `row_bytes`, a multiple of 4); rows row0.. of it go where
// dst.r[i] says = {base of the row's cache buffer, its head stride in bytes, the byte offset of its
// slot}; a null base skips the row. The table travels by value (kernel parameter space): a step
// launches this once per layer, and an upload from pageable host memory each time could hold the
// host until the GPU caught up. Grid (rows of this launch ≤ ROWS_BY_VALUE, n_kv).
#define ROWS_BY_VALUE 64
struct RowDst {
    char* base;
    int64_t hstride_bytes, offset_bytes;
};
struct RowDsts {
    RowDst r[ROWS_BY_VALUE];
};

extern "C" __global__ void write_rows(const char* __restrict__ src, const __grid_constant__ RowDsts dst,
                                      int b, int row0, int row_bytes) {
    const int i = blockIdx.x, h = blockIdx.y;
    const RowDst r = dst.r[i];
    if (!r.base) return;
    const char* s = src + ((int64_t)h * b + row0 + i) * row_bytes;
    char* t = r.base + h * r.hstride_bytes + r.offset_bytes;
    for (int x = threadIdx.x * 4; x < row_bytes; x += blockDim.x * 4)
        *reinterpret_cast<uint32_t*>(t + x) = *reinterpret_cast<const uint32_t*>(s + x);
}
