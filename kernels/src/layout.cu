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
