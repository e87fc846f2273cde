// FlashInfer's Hopper (sm_90a) single-sequence prefill — FA3-style: wgmma, TMA, warp-specialised
// producer/consumer warpgroups — behind a C ABI for `apb_kernels::attention` (flashinfer.rs).
// Header-only sources from the pinned PyPI wheel flashinfer-python 0.7.2.post1 (Apache-2.0;
// scripts/cuda-env.sh fetches them); instantiated as FlashInfer's own JIT does
// (csrc/single_prefill_sm90_kernel_inst.jinja, variant DefaultAttention<false>) for
// {f16, bf16} x head_dim {64, 128} x {no mask, bottom-right causal}. Built by kernels/build.rs.
//
// What the wrapper adds: argument checks that FlashInfer's release build would only print
// (TMA needs 16-byte aligned bases and strides), and FlashInfer's LSE (log2, [rows, heads])
// turned into ours (natural log, [heads, rows]).

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

// flashinfer/cutlass_utils.cuh pulls in CUTLASS host/reference utilities (GEMM builders,
// HostTensor, tensor_fill.h -> curand_kernel.h) that the attention kernel does not use.
// Pre-empt it by defining its include guard and including only what is needed.
// Build with -DAPB_FI_FULL_CUTLASS_UTILS to use the original header (needs curand headers).
#if !defined(APB_FI_FULL_CUTLASS_UTILS)
#define FLASHINFER_CUTLASS_UTILS_CUH_
#include <cuda_fp8.h>
#include <sstream>
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#endif

#include <flashinfer/attention/hopper/prefill_sm90.cuh>
#include <flashinfer/attention/hopper/variants.cuh>
#include <flashinfer/attention/mask.cuh>

// ----------------------------------------------------------------------------
// C ABI
// ----------------------------------------------------------------------------
extern "C" {

enum ApbFiDtype { APB_FI_F16 = 0, APB_FI_BF16 = 1 };

// LSE output layout requested by the caller (values are always natural-log).
enum ApbFiLseLayout {
  APB_FI_LSE_HN = 0,  // lse[h * qo_len + i]   ((heads, rows), row contiguous)
  APB_FI_LSE_NH = 1,  // lse[i * num_qo_heads + h] (FlashInfer's native layout)
};

typedef struct ApbFiParams {
  // Device pointers, element type = dtype. Head dim must be contiguous (stride 1).
  const void* q;  // [qo_len, num_qo_heads, head_dim] via q_stride_n / q_stride_h
  const void* k;  // [kv_len, num_kv_heads, head_dim] via k_stride_n / k_stride_h
  const void* v;  // [kv_len, num_kv_heads, head_dim] via v_stride_n / v_stride_h
  void* o;        // [qo_len, num_qo_heads, head_dim] via o_stride_n / o_stride_h
  // Optional natural-log LSE output (float32), NULL = don't compute/store.
  float* lse;
  // Optional scratch of qo_len*num_qo_heads floats, used only when lse != NULL and
  // lse_layout == APB_FI_LSE_HN (FlashInfer writes [rows, heads] log2; we transpose).
  // If NULL in that case, the wrapper uses cudaMallocAsync/cudaFreeAsync on `stream`.
  float* lse_scratch;
  int32_t lse_layout;  // ApbFiLseLayout
  int32_t qo_len;
  int32_t kv_len;
  int32_t num_qo_heads;
  int32_t num_kv_heads;  // num_qo_heads % num_kv_heads == 0 (GQA / MQA)
  int32_t head_dim;      // 64 or 128
  // Strides in ELEMENTS (not bytes). n = token/row stride, h = head stride.
  int64_t q_stride_n, q_stride_h;
  int64_t k_stride_n, k_stride_h;
  int64_t v_stride_n, v_stride_h;
  int64_t o_stride_n, o_stride_h;
  int32_t causal;  // 0 = no mask; 1 = bottom-right aligned causal: row i sees key j iff
                   //     j <= i + kv_len - qo_len
  float sm_scale;  // softmax scale, typically 1/sqrt(head_dim)
  int32_t dtype;   // ApbFiDtype (q, k, v, o all share it)
  cudaStream_t stream;
} ApbFiParams;

int apb_fi_prefill(const ApbFiParams* p, char* err, size_t len);

}  // extern "C"

namespace apb_fi {

using namespace flashinfer;

// Mirrors the Params struct generated from single_prefill_sm90_customize_config.jinja
// (non-FP8 path: additional tensor maybe_scale_v, scalars logits_soft_cap, sm_scale,
// scale_v_scalar).
template <typename DTQ, typename DTKV, typename DTO>
struct Params {
  using DTypeQ = DTQ;
  using DTypeKV = DTKV;
  using DTypeO = DTO;
  using IdType = int32_t;

  DTypeQ* q_ptr;
  DTypeKV* k_ptr;
  DTypeKV* v_ptr;
  DTypeO* o_ptr;
  float* lse_ptr;

  struct AdditionalParams {
    float* maybe_scale_v;
    double logits_soft_cap;
    double sm_scale;
    double scale_v_scalar;
  } additional_params;

  int64_t q_stride_n;
  int64_t k_stride_n;
  int64_t v_stride_n;
  int64_t o_stride_n;
  int64_t q_stride_h;
  int64_t k_stride_h;
  int64_t v_stride_h;
  int64_t o_stride_h;

  int qo_len;
  int kv_len;
  int head_dim;
  int num_qo_heads;
  int num_kv_heads;
  int group_size;
  int window_left;

  bool causal;
};

using Variant = DefaultAttention</*use_logits_soft_cap=*/false>;  // == StandardAttention

template <typename CT, uint32_t D, MaskMode MASK>
cudaError_t run(const ApbFiParams& a, float* lse_nh_log2) {
  using P = Params<CT, CT, CT>;
  P params;
  std::memset(&params, 0, sizeof(params));
  params.q_ptr = static_cast<CT*>(const_cast<void*>(a.q));
  params.k_ptr = static_cast<CT*>(const_cast<void*>(a.k));
  params.v_ptr = static_cast<CT*>(const_cast<void*>(a.v));
  params.o_ptr = static_cast<CT*>(a.o);
  params.lse_ptr = lse_nh_log2;
  params.additional_params.maybe_scale_v = nullptr;
  params.additional_params.logits_soft_cap = 0.0;
  params.additional_params.sm_scale = a.sm_scale;
  params.additional_params.scale_v_scalar = 1.0;
  params.q_stride_n = a.q_stride_n;
  params.q_stride_h = a.q_stride_h;
  params.k_stride_n = a.k_stride_n;
  params.k_stride_h = a.k_stride_h;
  params.v_stride_n = a.v_stride_n;
  params.v_stride_h = a.v_stride_h;
  params.o_stride_n = a.o_stride_n;
  params.o_stride_h = a.o_stride_h;
  params.qo_len = a.qo_len;
  params.kv_len = a.kv_len;
  params.head_dim = a.head_dim;
  params.num_qo_heads = a.num_qo_heads;
  params.num_kv_heads = a.num_kv_heads;
  params.group_size = a.num_qo_heads / a.num_kv_heads;
  params.window_left = -1;
  params.causal = (MASK == MaskMode::kCausal);
  return SinglePrefillWithKVCacheDispatched<D, D, MASK, /*LEFT_SLIDING_WINDOW=*/false, Variant>(
      params, a.stream);
}

#if defined(APB_FI_ONLY_ONE)
#define APB_FI_NO_F16
#define APB_FI_NO_D64
#define APB_FI_NO_NONCAUSAL
#endif

template <typename CT, uint32_t D>
cudaError_t dispatch_mask(const ApbFiParams& a, float* lse) {
  if (a.causal) return run<CT, D, MaskMode::kCausal>(a, lse);
#if !defined(APB_FI_NO_NONCAUSAL)
  return run<CT, D, MaskMode::kNone>(a, lse);
#else
  return cudaErrorNotSupported;
#endif
}

template <typename CT>
cudaError_t dispatch_hd(const ApbFiParams& a, float* lse) {
#if !defined(APB_FI_NO_D64)
  if (a.head_dim == 64) return dispatch_mask<CT, 64>(a, lse);
#endif
#if !defined(APB_FI_NO_D128)
  if (a.head_dim == 128) return dispatch_mask<CT, 128>(a, lse);
#endif
  return cudaErrorNotSupported;
}

// FlashInfer LSE: lse2[i * H + h] = log2(sum_j exp(s_ij * sm_scale)) (base-2, [rows, heads]).
// Natural log = lse2 * ln(2).
__global__ void lse_scale_inplace(float* lse, int64_t n) {
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < n) lse[i] *= 0.69314718055994530942f;
}

// src [rows, H] (log2) -> dst [H, rows] (ln). 32x32 tiles, block (32, 8).
__global__ void lse_transpose_ln(const float* __restrict__ src, float* __restrict__ dst, int rows,
                                 int H) {
  __shared__ float tile[32][33];
  int h0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
  for (int k = threadIdx.y; k < 32; k += 8) {
    int r = r0 + k, h = h0 + threadIdx.x;
    if (r < rows && h < H) tile[k][threadIdx.x] = src[(int64_t)r * H + h];
  }
  __syncthreads();
  for (int k = threadIdx.y; k < 32; k += 8) {
    int h = h0 + k, r = r0 + threadIdx.x;
    if (r < rows && h < H) dst[(int64_t)h * rows + r] = tile[threadIdx.x][k] * 0.69314718055994530942f;
  }
}

static int fail(char* err, size_t len, const char* msg) {
  if (err && len) {
    std::snprintf(err, len, "%s", msg);
  }
  return 1;
}

static bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace apb_fi

// Instantiations (namespace scope, outside apb_fi so the qualified name is legal).
namespace flashinfer {
#define APB_FI_INST2(CT, D, MASK)                                                           \
  template cudaError_t SinglePrefillWithKVCacheDispatched<D, D, MASK, false, apb_fi::Variant, \
                                                          apb_fi::Params<CT, CT, CT>>(        \
      apb_fi::Params<CT, CT, CT> & params, cudaStream_t stream);
#if !defined(APB_FI_NO_BF16)
#if !defined(APB_FI_NO_D128)
APB_FI_INST2(cutlass::bfloat16_t, 128, MaskMode::kCausal)
#if !defined(APB_FI_NO_NONCAUSAL)
APB_FI_INST2(cutlass::bfloat16_t, 128, MaskMode::kNone)
#endif
#endif
#if !defined(APB_FI_NO_D64)
APB_FI_INST2(cutlass::bfloat16_t, 64, MaskMode::kCausal)
#if !defined(APB_FI_NO_NONCAUSAL)
APB_FI_INST2(cutlass::bfloat16_t, 64, MaskMode::kNone)
#endif
#endif
#endif
#if !defined(APB_FI_NO_F16)
#if !defined(APB_FI_NO_D128)
APB_FI_INST2(cutlass::half_t, 128, MaskMode::kCausal)
#if !defined(APB_FI_NO_NONCAUSAL)
APB_FI_INST2(cutlass::half_t, 128, MaskMode::kNone)
#endif
#endif
#if !defined(APB_FI_NO_D64)
APB_FI_INST2(cutlass::half_t, 64, MaskMode::kCausal)
#if !defined(APB_FI_NO_NONCAUSAL)
APB_FI_INST2(cutlass::half_t, 64, MaskMode::kNone)
#endif
#endif
#endif
}  // namespace flashinfer

extern "C" int apb_fi_prefill(const ApbFiParams* p, char* err, size_t len) {
  using namespace apb_fi;
  if (err && len) err[0] = '\0';
  if (!p) return fail(err, len, "apb_fi_prefill: null params");
  const ApbFiParams& a = *p;
  char buf[256];

  if (!a.q || !a.k || !a.v || !a.o) return fail(err, len, "apb_fi_prefill: null q/k/v/o");
  if (a.head_dim != 64 && a.head_dim != 128)
    return fail(err, len, "apb_fi_prefill: head_dim must be 64 or 128");
  if (a.dtype != APB_FI_F16 && a.dtype != APB_FI_BF16)
    return fail(err, len, "apb_fi_prefill: dtype must be APB_FI_F16 or APB_FI_BF16");
  if (a.qo_len <= 0 || a.kv_len <= 0)
    return fail(err, len, "apb_fi_prefill: qo_len and kv_len must be >= 1 (TMA dims >= 1)");
  if (a.num_qo_heads <= 0 || a.num_kv_heads <= 0 || a.num_qo_heads % a.num_kv_heads != 0)
    return fail(err, len, "apb_fi_prefill: num_qo_heads must be a positive multiple of num_kv_heads");
  if (a.num_qo_heads > 65535) return fail(err, len, "apb_fi_prefill: num_qo_heads > 65535 (grid.y)");
  // TMA (Q/K/V loads) needs 16-byte aligned base address and strides that are a
  // multiple of 16 bytes (< 2^40 bytes); O is written with 128-bit vector stores.
  if (!aligned16(a.q) || !aligned16(a.k) || !aligned16(a.v) || !aligned16(a.o))
    return fail(err, len, "apb_fi_prefill: q/k/v/o must be 16-byte aligned");
  const int64_t strides[8] = {a.q_stride_n, a.q_stride_h, a.k_stride_n, a.k_stride_h,
                              a.v_stride_n, a.v_stride_h, a.o_stride_n, a.o_stride_h};
  for (int i = 0; i < 8; ++i) {
    if (strides[i] < 0 || (strides[i] % 8) != 0 || strides[i] >= (int64_t(1) << 39)) {
      std::snprintf(buf, sizeof(buf),
                    "apb_fi_prefill: stride #%d (=%lld elems) must be >= 0, a multiple of 8 "
                    "elements (16 B) and < 2^39",
                    i, (long long)strides[i]);
      return fail(err, len, buf);
    }
  }
  if (a.lse && a.lse_layout != APB_FI_LSE_HN && a.lse_layout != APB_FI_LSE_NH)
    return fail(err, len, "apb_fi_prefill: bad lse_layout");

  // Where FlashInfer writes its (log2, [rows, heads]) LSE.
  float* lse_fi = nullptr;
  bool need_transpose = false, allocated = false;
  const int64_t nlse = int64_t(a.qo_len) * a.num_qo_heads;
  if (a.lse) {
    if (a.lse_layout == APB_FI_LSE_NH || a.num_qo_heads == 1) {
      lse_fi = a.lse;  // same memory layout; convert base in place afterwards
    } else {
      need_transpose = true;
      if (a.lse_scratch) {
        lse_fi = a.lse_scratch;
      } else {
        cudaError_t e = cudaMallocAsync((void**)&lse_fi, nlse * sizeof(float), a.stream);
        if (e != cudaSuccess) {
          std::snprintf(buf, sizeof(buf), "apb_fi_prefill: cudaMallocAsync(lse scratch): %s",
                        cudaGetErrorString(e));
          return fail(err, len, buf);
        }
        allocated = true;
      }
    }
  }

  cudaError_t st;
  if (a.dtype == APB_FI_BF16) {
#if !defined(APB_FI_NO_BF16)
    st = dispatch_hd<cutlass::bfloat16_t>(a, lse_fi);
#else
    st = cudaErrorNotSupported;
#endif
  } else {
#if !defined(APB_FI_NO_F16)
    st = dispatch_hd<cutlass::half_t>(a, lse_fi);
#else
    st = cudaErrorNotSupported;
#endif
  }

  if (st == cudaSuccess && a.lse) {
    if (need_transpose) {
      dim3 grid((a.num_qo_heads + 31) / 32, (a.qo_len + 31) / 32);
      lse_transpose_ln<<<grid, dim3(32, 8), 0, a.stream>>>(lse_fi, a.lse, a.qo_len,
                                                           a.num_qo_heads);
    } else {
      lse_scale_inplace<<<(unsigned)((nlse + 255) / 256), 256, 0, a.stream>>>(a.lse, nlse);
    }
    st = cudaGetLastError();
  }
  if (allocated) cudaFreeAsync(lse_fi, a.stream);

  if (st != cudaSuccess) {
    std::snprintf(buf, sizeof(buf), "apb_fi_prefill: %s (%d)%s", cudaGetErrorString(st), (int)st,
                  st == cudaErrorNotSupported ? " [config not compiled in]" : "");
    return fail(err, len, buf);
  }
  return 0;
}
