// Attention kernels of APB-rs: one FlashAttention-2 style kernel for prefill and decode, and the
// f32 log-sum-exp merge of partial results. They see tensors and mask numbers, not models.
//
// Layouts (row-major, `d` innermost): q and o (b, n_kv, g·sq, d) — the query heads of one KV group
// are contiguous in a (b, n_h, sq, d) tensor, so grouped-query attention folds them into rows and
// each K/V tile loaded serves all g heads; k and v (b, n_kv, sk, d) with given batch/head strides
// (rows contiguous), so views of a longer cache need no copy.
//
// Mask, per query row at position `pos` (row % sq): bottom-right causal (key j visible iff
// j <= pos + sk - sq) and APB's anchor rule (rows with pos < anchor_rows skip keys j < passing).
// A row that sees no key gets output 0 and LSE -inf.
//
// Split-KV: with n_splits > 1 the keys are cut into n_splits ranges of split_len (a multiple of the
// tile); each block writes f32 partial outputs and LSEs, merged by lse_merge_* below.
#include <math_constants.h>

#include "common.cuh"

namespace {

constexpr int BC = 64;  // keys per tile

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 2^x on the special-function unit: exp2f() adds denormal range fix-ups (a compare, a select and
// two multiplies per call) that softmax does not need; ex2.approx(-inf) = 0 as masking requires.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Shared-memory tiles are rows of D 2-byte elements in 16-byte chunks; chunk c of row r is stored
// at c ^ (r & 7) so the 8 rows an ldmatrix reads fall in 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// ldmatrix addresses without one register per fragment: a lane reads row `row` (row & 7 fixed by
// the lane) and 16-byte chunk 2·kk + csel. Since (2·kk + csel) ^ (row & 7) =
// 8·(kk / 4) + ((csel ^ (row & 7)) ^ 2·(kk % 4)), four base addresses (one per kk % 4) plus
// compile-time offsets cover every kk and every 16-row step, so unrolled loops use [reg + imm].
template <int D>
struct FragAddr {
    uint32_t base[4];
    __device__ __forceinline__ FragAddr(const void* tile, int row, int csel) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            base[j] = smem_u32(tile) + 2 * (row * D + (((csel ^ (row & 7)) ^ (2 * j)) << 3));
    }
    // Address of chunk pair kk, `rows` rows further down, `extra` bytes on (buffer offset).
    __device__ __forceinline__ uint32_t at(int kk, int rows, uint32_t extra = 0) const {
        return base[kk & 3] + extra + 2 * ((kk >> 2) * 64 + rows * D);
    }
};

// Copies `rows` rows (starting at global row `row0`, `limit` rows exist) of a tile into smem;
// missing rows are zero-filled (a zero-byte cp.async reads nothing, so their address is unused).
template <int D, int ROWS, int NT, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t row0, int64_t limit,
                                          int tid) {
    constexpr int C = D / 8;
    static_assert(ROWS * C % NT == 0 && NT % C == 0, "tile chunks must split evenly over threads");
    // Thread tid copies chunk tid % C of rows tid / C + k·NT/C: one pointer, compile-time steps.
    const int r0 = tid / C, c = tid % C;
    const T* src = g + (row0 + r0) * D + c * 8;
    const uint32_t dst = smem_u32(smem + swz<D>(r0, c));  // (r0 + k·NT/C) & 7 == r0 & 7
#pragma unroll
    for (int k = 0; k < ROWS * C / NT; ++k)
        cp_async16(dst + 2 * k * (NT / C) * D, src + k * (NT / C) * D,
                   row0 + r0 + k * (NT / C) < limit);
}

// One decode row of a batch over separate caches (`RowsParams::rows`): its keys and values
// (n_kv, ≥ sk, d) with head strides, how many keys it has, and its own split length (a function
// of sk alone, so a row's result does not depend on the batch it runs in).
struct RowKv {
    const void* k;
    const void* v;
    int64_t k_hstride, v_hstride;
    int sk, split_len;
};

// Every field but the decode rows' table (`flash_rows_*` take that beside these, by value).
struct Params {
    const void* q;
    const void* k;
    const void* v;
    void* o;          // (b, n_kv, g·sq, d) in T, when n_splits == 1
    float* lse;       // (b, n_kv, g·sq) or null, when n_splits == 1
    float* o_part;    // (n_splits, b, n_kv, g·sq, d), when n_splits > 1
    float* lse_part;  // (n_splits, b, n_kv, g·sq), when n_splits > 1
    int64_t k_bstride, k_hstride, v_bstride, v_hstride;
    int b, n_kv, g, sq, sk;
    int causal, anchor_rows, passing;
    int n_splits, split_len;
    float scale_log2;  // softmax scale · log2(e)
};

// Each of the NW warps owns MT tiles of 16 query rows. MT = 1 keeps Q fragments in registers;
// MT = 2 re-reads them from shared memory but loads each K/V fragment once for 32 rows, halving
// shared-memory traffic per tensor-core op (what long prefills are bound by).
// `rows`: one entry per batch entry (b rows of sq = 1), or null: k, v, sk, split_len of `p`.
template <typename T, int D, int NW, int MT>
__device__ void flash_fwd(const Params& p, const RowKv* rows) {
    constexpr int BR = 16 * NW * MT;
    constexpr int NT = 32 * NW;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sq_tile = reinterpret_cast<T*>(smem_raw);
    T* sk_tile = sq_tile + BR * D;       // 2 buffers of BC × D
    T* sv_tile = sk_tile + 2 * BC * D;  // 2 buffers of BC × D

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int rows_total = p.g * p.sq;
    // Heaviest causal row blocks first.
    const int mb = gridDim.x - 1 - blockIdx.x;
    const int r0 = mb * BR;
    const int kvh = blockIdx.y;
    const int bi = blockIdx.z % p.b;
    const int split = blockIdx.z / p.b;

    const T* q = static_cast<const T*>(p.q) + ((int64_t)(bi * p.n_kv + kvh) * rows_total) * D;
    const RowKv* rk = rows ? rows + bi : nullptr;
    const T* k = rk ? static_cast<const T*>(rk->k) + kvh * rk->k_hstride
                    : static_cast<const T*>(p.k) + bi * p.k_bstride + kvh * p.k_hstride;
    const T* v = rk ? static_cast<const T*>(rk->v) + kvh * rk->v_hstride
                    : static_cast<const T*>(p.v) + bi * p.v_bstride + kvh * p.v_hstride;
    const int sk = rk ? rk->sk : p.sk;
    const int split_len = rk ? rk->split_len : p.split_len;
    const int64_t out_row0 = (int64_t)(bi * p.n_kv + kvh) * rows_total;

    // Positions this block covers (a block can straddle two heads of the group).
    const int rlast = min(r0 + BR, rows_total) - 1;
    int minpos, maxpos;
    if (r0 / p.sq == rlast / p.sq) {
        minpos = r0 % p.sq;
        maxpos = rlast % p.sq;
    } else {
        minpos = 0;
        maxpos = p.sq - 1;
    }
    const int off = sk - p.sq;
    int hi = p.causal ? min(sk, maxpos + off + 1) : sk;
    int lo = maxpos < p.anchor_rows ? min(p.passing, sk) : 0;
    if (p.n_splits > 1) {
        lo = max(lo, split * split_len);
        hi = min(hi, (split + 1) * split_len);
    }
    const int t0 = lo / BC;
    const int n_tiles = hi > lo ? (hi + BC - 1) / BC - t0 : 0;

    // Each thread's accumulator rows: g and g+8 of each of its warp's MT row tiles.
    const int gq = lane / 4, tq = lane % 4;
    const int wrow0 = warp * 16 * MT;
    int rowpos[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        rowpos[m][0] = (r0 + wrow0 + m * 16 + gq) % p.sq;
        rowpos[m][1] = (r0 + wrow0 + m * 16 + gq + 8) % p.sq;
    }

    float o_acc[MT][D / 8][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int i = 0; i < D / 8; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) o_acc[m][i][j] = 0.f;
    float m_run[MT][2], l_run[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        m_run[m][0] = m_run[m][1] = -CUDART_INF_F;
        l_run[m][0] = l_run[m][1] = 0.f;
    }

    if (n_tiles > 0) {
        load_tile<D, BR, NT>(sq_tile, q, r0, rows_total, tid);
        cp_async_commit();
        load_tile<D, BC, NT>(sk_tile, k, (int64_t)t0 * BC, sk, tid);
        load_tile<D, BC, NT>(sv_tile, v, (int64_t)t0 * BC, sk, tid);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
    }
    // Fragment addresses: Q and V rows lane % 8 + 8·((lane / 8) & 1), chunk select lane / 16;
    // K rows lane % 8 + 8·(lane / 16), chunk select (lane / 8) & 1.
    const FragAddr<D> qa_addr(sq_tile, wrow0 + (lane % 8) + ((lane / 8) & 1) * 8, lane / 16);
    const FragAddr<D> ka_addr(sk_tile, (lane % 8) + (lane / 16) * 8, (lane / 8) & 1);
    const FragAddr<D> va_addr(sv_tile, (lane % 8) + ((lane / 8) & 1) * 8, lane / 16);
    auto q_frag = [&](uint32_t* r, int m, int kk) { ldsm_x4(r, qa_addr.at(kk, m * 16)); };
    // MT = 1: Q fragments stay in registers for the whole loop.
    uint32_t qf[MT == 1 ? D / 16 : 1][4];
    if (MT == 1 && n_tiles > 0) {
#pragma unroll
        for (int kk = 0; kk < (MT == 1 ? D / 16 : 0); ++kk) q_frag(qf[kk], 0, kk);
    }

    for (int it = 0; it < n_tiles; ++it) {
        const int buf = it & 1;
        const int c0 = (t0 + it) * BC;
        if (it + 1 < n_tiles) {
            load_tile<D, BC, NT>(sk_tile + (buf ^ 1) * BC * D, k, (int64_t)c0 + BC, sk, tid);
            load_tile<D, BC, NT>(sv_tile + (buf ^ 1) * BC * D, v, (int64_t)c0 + BC, sk, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const uint32_t buf_off = buf * BC * D * 2;

        // S = Q Kᵀ: per warp MT × 16 rows × 64 keys.
        float s[MT][BC / 8][4];
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int i = 0; i < BC / 8; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) s[m][i][j] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (MT == 1) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) qa[m][j] = qf[MT == 1 ? kk : 0][j];
                } else {
                    q_frag(qa[m], m, kk);
                }
            }
#pragma unroll
            for (int np = 0; np < BC / 16; ++np) {
                uint32_t b[4];
                ldsm_x4(b, ka_addr.at(kk, 16 * np, buf_off));
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    Ty<T>::mma(s[m][2 * np], qa[m], b);
                    Ty<T>::mma(s[m][2 * np + 1], qa[m], b + 2);
                }
            }
        }

        // Mask only the tiles that need it.
        const bool need_mask = c0 + BC > hi || c0 < lo ||
                               (p.causal && c0 + BC - 1 > minpos + off) ||
                               (minpos < p.anchor_rows && c0 < p.passing);
        if (need_mask) {
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        int j = c0 + nt * 8 + 2 * tq + (e & 1);
                        int pos = rowpos[m][e / 2];
                        bool ok = j >= lo && j < hi && (!p.causal || j <= pos + off) &&
                                  !(pos < p.anchor_rows && j < p.passing);
                        if (!ok) s[m][nt][e] = -CUDART_INF_F;
                    }
        }

        // Online softmax in base 2; each row's max is shared by the 4 threads of a quad.
        uint32_t pa[MT][BC / 16][4];
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = -CUDART_INF_F;
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt)
                    mx = fmaxf(mx, fmaxf(s[m][nt][2 * h], s[m][nt][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                const float m_new = fmaxf(m_run[m][h], mx * p.scale_log2);
                const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
                const float alpha = fast_exp2(m_run[m][h] - m_use);
                m_run[m][h] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt) {
                    const float e0 = fast_exp2(s[m][nt][2 * h] * p.scale_log2 - m_use);
                    const float e1 = fast_exp2(s[m][nt][2 * h + 1] * p.scale_log2 - m_use);
                    sum += e0 + e1;
                    // P straight into the A-fragment layout of the P·V product (half the registers).
                    pa[m][nt / 2][(nt & 1) * 2 + h] = Ty<T>::pack(e0, e1);
                }
                l_run[m][h] = l_run[m][h] * alpha + sum;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    o_acc[m][dt][2 * h] *= alpha;
                    o_acc[m][dt][2 * h + 1] *= alpha;
                }
            }

        // O += P V; P never leaves registers.
#pragma unroll
        for (int ks16 = 0; ks16 < BC / 16; ++ks16) {
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                uint32_t b[4];
                ldsm_x4_t(b, va_addr.at(dp, 16 * ks16, buf_off));
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    Ty<T>::mma(o_acc[m][2 * dp], pa[m][ks16], b);
                    Ty<T>::mma(o_acc[m][2 * dp + 1], pa[m][ks16], b + 2);
                }
            }
        }
        __syncthreads();
    }

    // Finish: full row sums across the quad, normalise, write.
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = l_run[m][h];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const int r = r0 + wrow0 + m * 16 + gq + 8 * h;
            if (r >= rows_total) continue;
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const float lse =
                l > 0.f ? (m_run[m][h] + log2f(l)) * 0.69314718055994531f : -CUDART_INF_F;
            const int64_t row = out_row0 + r;
            if (p.n_splits == 1) {
                T* o = static_cast<T*>(p.o) + row * D;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    uint32_t v2 =
                        Ty<T>::pack(o_acc[m][dt][2 * h] * inv, o_acc[m][dt][2 * h + 1] * inv);
                    *reinterpret_cast<uint32_t*>(o + dt * 8 + 2 * tq) = v2;
                }
                if (p.lse && tq == 0) p.lse[row] = lse;
            } else {
                const int64_t prow = (int64_t)split * p.b * p.n_kv * rows_total + row;
                float* o = p.o_part + prow * D;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    *reinterpret_cast<float2*>(o + dt * 8 + 2 * tq) =
                        make_float2(o_acc[m][dt][2 * h] * inv, o_acc[m][dt][2 * h + 1] * inv);
                }
                if (tq == 0) p.lse_part[prow] = lse;
            }
        }
}

// Decode rows (sq = 1; the g ≤ 16 query heads of a KV head are a block's 16 query rows): the
// block's 4 warps share those rows and split every 64-key tile, 16 keys a warp, so a tile's
// tensor-core and softmax work runs on all 4 warps (on one, with 3 idle, in `flash_fwd`); each
// warp keeps its own running max, sum and output, merged through shared memory at the end. The
// query tile is 16 rows, so 3 blocks fit an SM. Keys [split·split_len, min(sk, (split+1)·split_len))
// of the row; always writes f32 parts (`flash_rows` merges them). S K/V tile buffers: S − 1 tiles
// load while one is computed (S = 2: one 32 KB tile in flight at d = 128, 3 blocks an SM; S = 3:
// two, 2 blocks an SM).
template <typename T, int D, int S>
__device__ void flash_decode(const Params& p, const RowKv* rows) {
    constexpr int NW = 4, NT = 32 * NW, BR = 16;
    static_assert(S >= 2, "at least one tile loads while one is computed");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sq_tile = reinterpret_cast<T*>(smem_raw);
    T* sk_tile = sq_tile + BR * D;      // S buffers of BC × D
    T* sv_tile = sk_tile + S * BC * D;  // S buffers of BC × D

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int rows_total = p.g;
    const int r0 = blockIdx.x * BR;
    const int kvh = blockIdx.y;
    const int bi = blockIdx.z % p.b;
    const int split = blockIdx.z / p.b;
    const RowKv& rk = rows[bi];
    const T* q = static_cast<const T*>(p.q) + ((int64_t)(bi * p.n_kv + kvh) * rows_total) * D;
    const T* k = static_cast<const T*>(rk.k) + kvh * rk.k_hstride;
    const T* v = static_cast<const T*>(rk.v) + kvh * rk.v_hstride;
    const int lo = min(split * rk.split_len, rk.sk);  // a multiple of BC
    const int hi = min(rk.sk, lo + rk.split_len);
    const int t0 = lo / BC;
    const int n_tiles = (hi - lo + BC - 1) / BC;
    const int gq = lane / 4, tq = lane % 4;

    float o_acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) o_acc[i][j] = 0.f;
    float m_run[2] = {-CUDART_INF_F, -CUDART_INF_F}, l_run[2] = {0.f, 0.f};

    if (n_tiles > 0) {
        load_tile<D, BR, NT>(sq_tile, q, r0, rows_total, tid);
        cp_async_commit();
        // The first S − 1 tiles, one commit group each (empty past the split's end).
#pragma unroll
        for (int i = 0; i < S - 1; ++i) {
            if (i < n_tiles) {
                load_tile<D, BC, NT>(sk_tile + i * BC * D, k, (int64_t)(t0 + i) * BC, rk.sk, tid);
                load_tile<D, BC, NT>(sv_tile + i * BC * D, v, (int64_t)(t0 + i) * BC, rk.sk, tid);
            }
            cp_async_commit();
        }
        cp_async_wait<S - 1>();  // the query tile
        __syncthreads();
    }
    const FragAddr<D> qa_addr(sq_tile, (lane % 8) + ((lane / 8) & 1) * 8, lane / 16);
    const FragAddr<D> ka_addr(sk_tile, (lane % 8) + (lane / 16) * 8, (lane / 8) & 1);
    const FragAddr<D> va_addr(sv_tile, (lane % 8) + ((lane / 8) & 1) * 8, lane / 16);
    uint32_t qf[D / 16][4];
    if (n_tiles > 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], qa_addr.at(kk, 0));
    }

    for (int it = 0; it < n_tiles; ++it) {
        const int c0 = (t0 + it) * BC;
        // Tile it + S − 1 into the buffer tile it − 1 used (free since the loop's last barrier).
        const int next = it + S - 1;
        if (next < n_tiles) {
            const int nb = next % S;
            load_tile<D, BC, NT>(sk_tile + nb * BC * D, k, (int64_t)(t0 + next) * BC, rk.sk, tid);
            load_tile<D, BC, NT>(sv_tile + nb * BC * D, v, (int64_t)(t0 + next) * BC, rk.sk, tid);
        }
        cp_async_commit();
        cp_async_wait<S - 1>();  // tile it has landed
        __syncthreads();
        const uint32_t buf_off = (it % S) * BC * D * 2;

        // S = Q Kᵀ over this warp's 16 keys of the tile.
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t b[4];
            ldsm_x4(b, ka_addr.at(kk, 16 * warp, buf_off));
            Ty<T>::mma(s[0], qf[kk], b);
            Ty<T>::mma(s[1], qf[kk], b + 2);
        }
        const int kw = c0 + 16 * warp;
        if (kw + 16 > hi) {
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (kw + nt * 8 + 2 * tq + (e & 1) >= hi) s[nt][e] = -CUDART_INF_F;
        }

        // Online softmax in base 2 over the warp's keys; P straight into A fragments.
        uint32_t pa[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float m_new = fmaxf(m_run[h], mx * p.scale_log2);
            const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
            const float alpha = fast_exp2(m_run[h] - m_use);
            m_run[h] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const float e0 = fast_exp2(s[nt][2 * h] * p.scale_log2 - m_use);
                const float e1 = fast_exp2(s[nt][2 * h + 1] * p.scale_log2 - m_use);
                sum += e0 + e1;
                pa[nt * 2 + h] = Ty<T>::pack(e0, e1);
            }
            l_run[h] = l_run[h] * alpha + sum;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o_acc[dt][2 * h] *= alpha;
                o_acc[dt][2 * h + 1] *= alpha;
            }
        }

        // O += P V over the warp's 16 keys.
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t b[4];
            ldsm_x4_t(b, va_addr.at(dp, 16 * warp, buf_off));
            Ty<T>::mma(o_acc[2 * dp], pa, b);
            Ty<T>::mma(o_acc[2 * dp + 1], pa, b + 2);
        }
        __syncthreads();
    }

    // Merge the warps: each writes its rows' max, sum and unnormalised output to shared memory
    // (over the K/V tiles, free now), then every thread finishes some (row, column) outputs.
    float* s_o = reinterpret_cast<float*>(sk_tile);  // NW × BR × D (≤ the K/V tiles' bytes)
    float* s_m = reinterpret_cast<float*>(sq_tile);  // NW × BR, then s_l: NW × BR
    float* s_l = s_m + NW * BR;
    static_assert(NW * BR * D * 4 <= 2 * S * BC * D * 2, "merge buffer fits the K/V tiles");
    static_assert(2 * NW * BR * 4 <= BR * D * 2, "row sums fit the query tile");
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = l_run[h];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        const int r = gq + 8 * h;
        if (tq == 0) {
            s_m[warp * BR + r] = m_run[h];
            s_l[warp * BR + r] = l;
        }
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            *reinterpret_cast<float2*>(s_o + (warp * BR + r) * D + dt * 8 + 2 * tq) =
                make_float2(o_acc[dt][2 * h], o_acc[dt][2 * h + 1]);
    }
    __syncthreads();
    const int64_t prow0 =
        (int64_t)split * p.b * p.n_kv * rows_total + (int64_t)(bi * p.n_kv + kvh) * rows_total;
    for (int i = tid; i < BR * D; i += NT) {
        const int r = i / D, c = i % D;
        if (r0 + r >= rows_total) break;  // rows ascend with i
        float mx = -CUDART_INF_F;
#pragma unroll
        for (int w = 0; w < NW; ++w) mx = fmaxf(mx, s_m[w * BR + r]);
        float l = 0.f, o = 0.f;
        if (mx != -CUDART_INF_F) {
#pragma unroll
            for (int w = 0; w < NW; ++w) {
                const float a = fast_exp2(s_m[w * BR + r] - mx);  // 0 for a warp that saw nothing
                l += s_l[w * BR + r] * a;
                o += s_o[(w * BR + r) * D + c] * a;
            }
        }
        const int64_t prow = prow0 + r0 + r;
        p.o_part[prow * D + c] = l > 0.f ? o / l : 0.f;
        if (c == 0) p.lse_part[prow] = l > 0.f ? (mx + log2f(l)) * 0.69314718055994531f : -CUDART_INF_F;
    }
}

}  // namespace

#define FLASH(NAME, T, D, NW, MT)                                                    \
    extern "C" __global__ void __launch_bounds__(32 * NW) NAME(const Params p) { \
        flash_fwd<T, D, NW, MT>(p, nullptr);                                       \
    }

// Short query blocks: 4 warps × 16 rows. Long prefills: 4 warps × 32 rows (MT = 2).
FLASH(flash_fwd_bf16_d64_w4, __nv_bfloat16, 64, 4, 1)
FLASH(flash_fwd_bf16_d128_w4, __nv_bfloat16, 128, 4, 1)
FLASH(flash_fwd_f16_d64_w4, __half, 64, 4, 1)
FLASH(flash_fwd_f16_d128_w4, __half, 128, 4, 1)
FLASH(flash_fwd_bf16_d64_w8, __nv_bfloat16, 64, 8, 1)
FLASH(flash_fwd_bf16_d128_w8, __nv_bfloat16, 128, 8, 1)
FLASH(flash_fwd_f16_d64_w8, __half, 64, 8, 1)
FLASH(flash_fwd_f16_d128_w8, __half, 128, 8, 1)
FLASH(flash_fwd_bf16_d64_w4m2, __nv_bfloat16, 64, 4, 2)
FLASH(flash_fwd_bf16_d128_w4m2, __nv_bfloat16, 128, 4, 2)
FLASH(flash_fwd_f16_d64_w4m2, __half, 64, 4, 2)
FLASH(flash_fwd_f16_d128_w4m2, __half, 128, 4, 2)

// Decode rows over separate caches, their table by value (kernel parameter space): a step runs
// this once per layer, and uploading the table from pageable host memory each time could hold
// the host until the GPU caught up, so the host could never run ahead. Up to ROWS_BY_VALUE rows a
// launch (2.7 KB of parameters; the limit is 4 KB).
#define ROWS_BY_VALUE 64
struct RowsParams {
    Params p;
    RowKv rows[ROWS_BY_VALUE];
};
// 4 warps a block sharing 16 query rows, each on a quarter of every key tile (`flash_decode`).
// Two K/V buffers: a third (`apb bench attention --decode-rows`, H100, 2026-12-06) changed
// nothing, the rows already stream at the copy bandwidth once a split is long enough.
#define FLASH_ROWS(NAME, T, D)                                                                    \
    extern "C" __global__ void __launch_bounds__(128) NAME(const __grid_constant__ RowsParams rp) { \
        flash_decode<T, D, 2>(rp.p, rp.rows);                                                     \
    }
FLASH_ROWS(flash_rows_bf16_d64, __nv_bfloat16, 64)
FLASH_ROWS(flash_rows_bf16_d128, __nv_bfloat16, 128)
FLASH_ROWS(flash_rows_f16_d64, __half, 64)
FLASH_ROWS(flash_rows_f16_d128, __half, 128)

// Log-sum-exp merge of `parts` partial results: o (parts, rows, d) and lse (parts, rows) in f32 →
// out (rows, d) in TO (f32, or the model's dtype: no cast after) and out_lse (rows). Parts with
// LSE -inf weigh 0; a row no part saw comes out 0 with LSE -inf. One block per row.
template <typename TO>
__device__ void lse_merge(const float* __restrict__ o, const float* __restrict__ lse,
                          TO* __restrict__ out, float* __restrict__ out_lse, int parts,
                          int64_t rows, int d) {
    const int64_t r = blockIdx.x;
    float m = -CUDART_INF_F;
    for (int i = 0; i < parts; ++i) m = fmaxf(m, lse[i * rows + r]);
    float den = 0.f;
    if (m != -CUDART_INF_F)
        for (int i = 0; i < parts; ++i) den += exp2f((lse[i * rows + r] - m) * 1.4426950408889634f);
    for (int x = threadIdx.x; x < d; x += blockDim.x) {
        float acc = 0.f;
        if (den > 0.f)
            for (int i = 0; i < parts; ++i) {
                float w = exp2f((lse[i * rows + r] - m) * 1.4426950408889634f) / den;
                if (w > 0.f) acc += w * o[(i * rows + r) * d + x];
            }
        out[r * d + x] = Ty<TO>::from(acc);
    }
    if (threadIdx.x == 0 && out_lse) out_lse[r] = den > 0.f ? m + logf(den) : -CUDART_INF_F;
}

#define LSE_MERGE(NAME, TO)                                                                     \
    extern "C" __global__ void NAME(const float* __restrict__ o, const float* __restrict__ lse, \
                                    TO* __restrict__ out, float* __restrict__ out_lse,          \
                                    int parts, int64_t rows, int d) {                           \
        lse_merge<TO>(o, lse, out, out_lse, parts, rows, d);                                    \
    }
LSE_MERGE(lse_merge_f32, float)
LSE_MERGE(lse_merge_bf16, __nv_bfloat16)
LSE_MERGE(lse_merge_f16, __half)
