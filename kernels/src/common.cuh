// What our kernels share: per element type (bf16, f16, and f32 where a kernel writes it) the
// tensor-core MMA m16n8k16 with f32 accumulators and the conversions to and from f32. Included
// by each kernel file (nvcc finds it beside them); one PTX module per file.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// D (f32 4) += A (16×16, 4 regs) · B (16×8, 2 regs) for the PTX element type `ty`.
#define APB_MMA_M16N8K16(ty, c, a, b)                                                       \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ty "." ty                        \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"             \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

template <typename T>
struct Ty;
template <>
struct Ty<__nv_bfloat16> {
    static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
        APB_MMA_M16N8K16("bf16", c, a, b);
    }
    // Two values in one register, the first in the low half (an MMA fragment's order).
    static __device__ __forceinline__ uint32_t pack(float x, float y) {
        __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
};
template <>
struct Ty<__half> {
    static __device__ __forceinline__ void mma(float* c, const uint32_t* a, const uint32_t* b) {
        APB_MMA_M16N8K16("f16", c, a, b);
    }
    static __device__ __forceinline__ uint32_t pack(float x, float y) {
        __half2 h = __floats2half2_rn(x, y);
        return *reinterpret_cast<uint32_t*>(&h);
    }
    static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
};
template <>
struct Ty<float> {
    static __device__ __forceinline__ float from(float x) { return x; }
    static __device__ __forceinline__ float to(float x) { return x; }
};

}  // namespace
