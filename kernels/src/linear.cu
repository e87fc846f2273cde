// Linear layers of a decode step: Y (m, n) = X (m, k) · Wᵀ for few rows (m ≤ 64) and a weight
// W (n, k) row-major, the shape every projection of a batched decode step has. Such a GEMM reads
// W once and is bound by memory; the library GEMMs leave much of the bandwidth unused there (few
// output tiles for o_proj-sized weights). Here the weight is the tensor-core A operand ("swap
// AB"): each warp streams 16-byte pieces of weight rows straight into A fragments and the m rows
// of X are the n8 columns, so one weight read serves every row.
//
// The k order inside a 32-wide chunk is permuted the same way for W and X (thread t of a quad
// takes elements 8t..8t+7 of the chunk: 16 bytes, one load), which a dot product does not mind.
//
// A block of 8 warps owns 32 weight rows (two 16-row tiles) and splits k over its warps; the
// partial sums are added in shared memory in a fixed order. A row of Y therefore depends on its
// own row of X alone, never on how many rows run beside it: batched and alone decode agree bit
// for bit.
//
// `silu_mul`: W is [gate; up] (2·half rows); tile 0 holds gate rows, tile 1 the up rows `half`
// further, and the block writes silu(gate)·up (m, half): the MLP's first half in one kernel.
#include "common.cuh"

namespace {

constexpr int WARPS = 8;

// Weights are read once: do not keep them in L1 (X, read by every block, stays there).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// MT: n8 tiles of X rows (m ≤ 8·MT). TM: 16-row weight tiles of a block (2 with SILU: gate and
// up). U: 32-wide k chunks each warp loads before it computes.
template <typename T, int MT, int TM, int U, bool SILU>
__device__ void rows_linear(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                            int m, int n, int k, int half) {
    static_assert(!SILU || TM == 2, "silu_mul pairs a gate tile with an up tile");
    extern __shared__ float red[];  // (WARPS, TM·MT·4, 32)
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, tq = lane % 4;

    // The 16-row weight tiles of this block, and the weight rows this lane reads.
    int tile_row[TM], limit[TM];
#pragma unroll
    for (int t = 0; t < TM; ++t) {
        tile_row[t] = SILU ? t * half + blockIdx.x * 16 : (blockIdx.x * TM + t) * 16;
        limit[t] = SILU && t == 0 ? half : n;
    }
    const T* wrow[TM][2];
    bool wok[TM][2];
#pragma unroll
    for (int t = 0; t < TM; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = tile_row[t] + gq + 8 * h;
            wok[t][h] = r < limit[t];
            wrow[t][h] = w + (int64_t)(wok[t][h] ? r : 0) * k + 8 * tq;
        }
    const T* xrow[MT];
    bool xok[MT];
#pragma unroll
    for (int j = 0; j < MT; ++j) {
        const int r = 8 * j + gq;
        xok[j] = r < m;
        xrow[j] = x + (int64_t)(xok[j] ? r : 0) * k + 8 * tq;
    }

    float acc[TM][MT][4];
#pragma unroll
    for (int t = 0; t < TM; ++t)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[t][j][e] = 0.f;

    const int chunks = k / 32;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int c0 = warp; c0 < chunks; c0 += WARPS * U) {
        uint4 wa[U][TM][2], xb[U][MT];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + WARPS * u;
            const bool in = c < chunks;
#pragma unroll
            for (int t = 0; t < TM; ++t)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    wa[u][t][h] = in && wok[t][h] ? ld_stream(wrow[t][h] + c * 32) : zero;
#pragma unroll
            for (int j = 0; j < MT; ++j)
                xb[u][j] = in && xok[j] ? __ldg(reinterpret_cast<const uint4*>(xrow[j] + c * 32))
                                        : zero;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c0 + WARPS * u >= chunks) break;
#pragma unroll
            for (int s = 0; s < 2; ++s) {
#pragma unroll
                for (int t = 0; t < TM; ++t) {
                    const uint32_t a[4] = {word(wa[u][t][0], 2 * s), word(wa[u][t][1], 2 * s),
                                           word(wa[u][t][0], 2 * s + 1),
                                           word(wa[u][t][1], 2 * s + 1)};
#pragma unroll
                    for (int j = 0; j < MT; ++j) {
                        const uint32_t b[2] = {word(xb[u][j], 2 * s), word(xb[u][j], 2 * s + 1)};
                        Ty<T>::mma(acc[t][j], a, b);
                    }
                }
            }
        }
    }

    // The warps' partial sums, added in warp order.
#pragma unroll
    for (int t = 0; t < TM; ++t)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                red[(warp * TM * MT * 4 + (t * MT + j) * 4 + e) * 32 + lane] = acc[t][j][e];
    __syncthreads();
    auto total = [&](int idx, int ln) {
        float sum = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) sum += red[(v * TM * MT * 4 + idx) * 32 + ln];
        return sum;
    };
    // Value (t, j, e) of lane (gq, tq): weight row tile_row[t] + gq + 8·(e / 2), X row
    // 8·j + 2·tq + (e & 1).
    const int per_tile = MT * 4 * 32;
    for (int f = tid; f < (SILU ? 1 : TM) * per_tile; f += WARPS * 32) {
        const int ln = f % 32, idx = f / 32;
        const int t = idx / (MT * 4), j = (idx / 4) % MT, e = idx % 4;
        const int row = 8 * j + 2 * (ln % 4) + (e & 1);
        const int col = tile_row[t] + ln / 4 + 8 * (e / 2);
        if (row >= m) continue;
        if (SILU) {
            if (col >= half) continue;
            const float g = total(idx, ln), u = total(MT * 4 + idx, ln);
            y[(int64_t)row * half + col] = Ty<T>::from(g / (1.f + __expf(-g)) * u);
        } else {
            if (col >= n) continue;
            y[(int64_t)row * n + col] = Ty<T>::from(total(idx, ln));
        }
    }
}

}  // namespace

#define ROWS_LINEAR(NAME, T, MT, TM, U, SILU)                                                   \
    extern "C" __global__ void __launch_bounds__(256) NAME(const T* x, const T* w, T* y, int m, \
                                                           int n, int k, int half) {            \
        rows_linear<T, MT, TM, U, SILU>(x, w, y, m, n, k, half);                               \
    }
// Every shape the launcher may pick: _m{rows}_t{weight tiles}_u{chunks in flight}.
#define ROWS_LINEAR_U(TY, T, M, MT, TM)                                  \
    ROWS_LINEAR(rows_linear_##TY##_m##M##_t##TM##_u1, T, MT, TM, 1, false) \
    ROWS_LINEAR(rows_linear_##TY##_m##M##_t##TM##_u2, T, MT, TM, 2, false) \
    ROWS_LINEAR(rows_linear_##TY##_m##M##_t##TM##_u4, T, MT, TM, 4, false)
#define ROWS_SILU_U(TY, T, M, MT)                                       \
    ROWS_LINEAR(rows_silu_mul_##TY##_m##M##_t2_u1, T, MT, 2, 1, true) \
    ROWS_LINEAR(rows_silu_mul_##TY##_m##M##_t2_u2, T, MT, 2, 2, true) \
    ROWS_LINEAR(rows_silu_mul_##TY##_m##M##_t2_u4, T, MT, 2, 4, true)
#define ROWS_LINEAR_M(TY, T, M, MT) \
    ROWS_LINEAR_U(TY, T, M, MT, 1)  \
    ROWS_LINEAR_U(TY, T, M, MT, 2)  \
    ROWS_SILU_U(TY, T, M, MT)
#define ROWS_LINEAR_ALL(TY, T)       \
    ROWS_LINEAR_M(TY, T, 8, 1)       \
    ROWS_LINEAR_M(TY, T, 16, 2)      \
    ROWS_LINEAR_M(TY, T, 32, 4)      \
    ROWS_LINEAR_M(TY, T, 64, 8)
ROWS_LINEAR_ALL(bf16, __nv_bfloat16)
ROWS_LINEAR_ALL(f16, __half)
