// Retaining-head post-processing kernels of APB-rs: pooling, top-k, packing the passing block.
// Generic over models: they see scores, indices and buffers, not layers.
#include <math_constants.h>
#include <climits>

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
        // Rows at or past `hi` (rank 0's question probe, padding) are not context: never pooled.
        unsigned a = i >= 2 ? i - 2 : 0, z = i + 3 < hi ? i + 3 : hi;
        for (unsigned j = a; j < z; ++j) m = fmaxf(m, scores[j * n_kv + h]);
    }
    out[idx] = m;
}

// Order-preserving map of a float to an unsigned key (larger float → larger key); NaN ranks lowest.
__device__ __forceinline__ unsigned radix_key(float x) {
    if (x != x) return 0u;
    unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive block-wide prefix count of `flag` (blockDim.x = 1024, in thread order); `total` gets the
// block's count. `warp_sums` is 32 words of shared memory.
__device__ __forceinline__ unsigned block_scan(bool flag, unsigned* warp_sums, unsigned* total) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned bal = __ballot_sync(0xffffffffu, flag);
    const unsigned in_warp = __popc(bal & ((1u << lane) - 1u));
    if (lane == 0) warp_sums[warp] = __popc(bal);
    __syncthreads();
    if (warp == 0) {
        unsigned x = warp_sums[lane], incl = x;
        for (int o = 1; o < 32; o <<= 1) {
            unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= (unsigned)o) incl += y;
        }
        warp_sums[lane] = incl - x;
        if (lane == 31) *total = incl;
    }
    __syncthreads();
    const unsigned r = warp_sums[warp] + in_warp;
    __syncthreads();
    return r;
}

// Top-k per row: of `scores` (rows, seq) f32, the k positions in [lo, hi) with the highest scores
// (ties → lower position first), written ascending to `out` (rows, k). Radix select on the 32-bit
// keys (4 passes of 8 bits), then one ordered compaction; rows of 64K+ candidates are fine. With
// fewer than k candidates all are taken and the list is padded by repeating its last entry.
// One block of 1024 threads per row.
extern "C" __global__ void __launch_bounds__(1024)
    topk_positions_f32(const float* __restrict__ scores, unsigned* __restrict__ out, unsigned seq,
                       unsigned lo, unsigned hi, unsigned k) {
    __shared__ unsigned hist[256];
    __shared__ unsigned warp_sums[32];
    __shared__ unsigned s_prefix, s_remaining, s_total;
    const float* row = scores + (size_t)blockIdx.x * seq;
    unsigned* dst = out + (size_t)blockIdx.x * k;
    hi = min(hi, seq);
    lo = min(lo, hi);
    const unsigned n = hi - lo;
    if (k == 0) return;
    if (n <= k) {
        for (unsigned i = threadIdx.x; i < k; i += blockDim.x) {
            unsigned last = n > 0 ? hi - 1 : min(lo, seq > 0 ? seq - 1 : 0);
            dst[i] = i < n ? lo + i : last;
        }
        return;
    }
    unsigned prefix = 0, mask = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (unsigned i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (unsigned i = lo + threadIdx.x; i < hi; i += blockDim.x) {
            unsigned u = radix_key(row[i]);
            if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned cum = 0;
            int b = 255;
            for (; b > 0; --b) {
                if (cum + hist[b] >= remaining) break;
                cum += hist[b];
            }
            s_prefix = prefix | ((unsigned)b << shift);
            s_remaining = remaining - cum;
        }
        __syncthreads();
        prefix = s_prefix;
        remaining = s_remaining;
        mask |= 255u << shift;
        __syncthreads();
    }
    // `prefix` is the k-th largest key; take every larger key and the first `remaining` equal ones.
    unsigned eq_base = 0, out_base = 0;
    for (unsigned c = lo; c < hi; c += blockDim.x) {
        const unsigned i = c + threadIdx.x;
        const unsigned u = i < hi ? radix_key(row[i]) : 0u;
        const bool eq = i < hi && u == prefix;
        const unsigned eq_rank = eq_base + block_scan(eq, warp_sums, &s_total);
        const unsigned eq_count = s_total;
        const bool take = i < hi && (u > prefix || (eq && eq_rank < remaining));
        const unsigned at = out_base + block_scan(take, warp_sums, &s_total);
        if (take) dst[at] = i;
        out_base += s_total;
        eq_base += eq_count;
        __syncthreads();
    }
}

// Packs the passing block: out (n_kv, k, 2d) holds, for KV head h and pick i, K[h, picks[h, i]]
// followed by V[h, picks[h, i]]. K and V rows are contiguous (d elements) with the given head
// strides; E is the element type's storage (2 bytes for bf16/f16, 4 for f32).
template <typename E>
__device__ void gather_kv(const E* __restrict__ k, const E* __restrict__ v,
                          const unsigned* __restrict__ picks, E* __restrict__ out, unsigned n_kv,
                          unsigned kk, unsigned d, long long k_hstride, long long v_hstride) {
    const size_t n = (size_t)n_kv * kk * 2 * d;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += (size_t)gridDim.x * blockDim.x) {
        const unsigned x = idx % (2 * d);
        const size_t hi_ = idx / (2 * d);
        const unsigned h = hi_ / kk;
        const size_t pos = picks[hi_];
        out[idx] = x < d ? k[h * k_hstride + pos * d + x] : v[h * v_hstride + pos * d + (x - d)];
    }
}
extern "C" __global__ void gather_kv_u16(const unsigned short* k, const unsigned short* v,
                                         const unsigned* picks, unsigned short* out, unsigned n_kv,
                                         unsigned kk, unsigned d, long long ks, long long vs) {
    gather_kv(k, v, picks, out, n_kv, kk, d, ks, vs);
}
extern "C" __global__ void gather_kv_u32(const unsigned* k, const unsigned* v, const unsigned* picks,
                                         unsigned* out, unsigned n_kv, unsigned kk, unsigned d,
                                         long long ks, long long vs) {
    gather_kv(k, v, picks, out, n_kv, kk, d, ks, vs);
}

// Greedy decoding's choice, per row of x (rows, n) f32 contiguous: the index of the row's largest
// value, the lowest on ties; NaN never wins, except that a row starting with NaN gives 0 (as the
// CPU reference's scan, `apb_kernels::argmax`). One block of 1024 threads per row; out (rows) u32.
__device__ __forceinline__ void argmax_take(float& bv, int& bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

extern "C" __global__ void argmax_rows_f32(const float* __restrict__ x, unsigned* __restrict__ out,
                                           int n) {
    const float* r = x + (int64_t)blockIdx.x * n;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float bv = -CUDART_INF_F;
    int bi = INT_MAX;
    for (int i = threadIdx.x; i < n; i += blockDim.x) argmax_take(bv, bi, r[i], i);
    for (int o = 16; o > 0; o >>= 1)
        argmax_take(bv, bi, __shfl_down_sync(0xffffffffu, bv, o), __shfl_down_sync(0xffffffffu, bi, o));
    __shared__ float sv[32];
    __shared__ int si[32];
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp != 0) return;
    const int warps = blockDim.x / 32;
    bv = lane < warps ? sv[lane] : -CUDART_INF_F;
    bi = lane < warps ? si[lane] : INT_MAX;
    for (int o = 16; o > 0; o >>= 1)
        argmax_take(bv, bi, __shfl_down_sync(0xffffffffu, bv, o), __shfl_down_sync(0xffffffffu, bi, o));
    if (lane == 0) out[blockIdx.x] = (n == 0 || r[0] != r[0] || bi == INT_MAX) ? 0u : (unsigned)bi;
}
