/* Segmented LoRA matmuls for the CPU: the rows of a batch grouped by adapter (S-LoRA's SGMV, on
 * CPU). Built and loaded by services/rollout/cpu_kernels.py; used by lora_ops.py for batches
 * that mix adapters, and (where the blocked AVX-512 items below are built) for one adapter on
 * every row as one segment.
 *
 * The rows are given as `rows` (row ids sorted by adapter slot) and `seg`, nseg triples
 * (slot, start, end) that index `rows`. For every row i of a segment with slot s:
 *   shrink:  out[i, r] = scale * sum_k x[i, k] * A[s, r, k]       float32 accumulation; rounded
 *                                                               to bfloat16 when round_out
 *   expand:  y[i, n]  += sum_r buf[i, r] * B[s, r, n]             in place, rounded once
 * Rows in no segment (no adapter) are not touched. x, y, A, B are bfloat16 (uint16 storage) or
 * float32; out/buf are float32. Each work item reads one adapter's weights once for all the rows
 * of its segment, and writes straight into y: no gather of x, no scatter of the outputs, no
 * per-adapter op dispatch (what torch ops cost for mixed batches: see lora_ops.py).
 *
 * Two sets of work items: register-blocked AVX-512 ones (float32 FMAs; bf16 with vdpbf16ps where
 * the CPU has AVX512_BF16) that prefetch the weights, which come from memory in a real step; and
 * portable loops for CPUs without AVX-512, and for bf16 on CPUs without AVX512_BF16 (or without
 * round_out). Prefetches near the end of the last tile may name addresses past an array: a
 * prefetch never faults. Tests build and check all three builds.
 *
 * Threads: OpenMP. Linked against libgomp.so.1, which in a torch process resolves to the runtime
 * torch has already loaded, so both share one thread pool (torch.set_num_threads applies).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LL_AVX512 1
#endif

#define TILE 256 /* expand: output columns per work item (the accumulators, 1 KiB, stay in L1) */

static inline float bf2f(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    union { uint32_t u; float f; } c;
    c.f = f;
    uint32_t u = c.u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f32id(float v) { return v; }

/* 1: built with AVX-512 (the blocked items, and the portable shrink's 4-row AVX-512 loop);
 * 0: portable loops only (the compiler's vectorization). */
int lora_cpu_isa(void) {
#ifdef LL_AVX512
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- shrink */

#define SHRINK_ROWS(T, LOAD)                                                                     \
    for (; i < end; ++i) {                                                                       \
        const T* xr = x + rows[i] * ldx;                                                         \
        float acc = 0.f;                                                                         \
        _Pragma("omp simd reduction(+:acc)")                                                     \
        for (int64_t k = 0; k < K; ++k) acc += LOAD(xr[k]) * LOAD(a[k]);                         \
        acc *= scale;                                                                            \
        out[rows[i] * ldo + r] = round_out ? bf2f(f2bf(acc)) : acc;                              \
    }

#ifdef LL_AVX512
static inline __m512 ld_bf16(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256((const __m256i*)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 ld_bf16_m(const uint16_t* p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 ld_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld_f32_m(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

/* Four rows at a time against one row of A: each A vector is loaded once for four rows. */
#define SHRINK_ROWS4(T, LDV, LDVM)                                                               \
    for (; i + 4 <= end; i += 4) {                                                               \
        const T *x0 = x + rows[i] * ldx, *x1 = x + rows[i + 1] * ldx;                            \
        const T *x2 = x + rows[i + 2] * ldx, *x3 = x + rows[i + 3] * ldx;                        \
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;                              \
        int64_t k = 0;                                                                           \
        for (; k + 16 <= K; k += 16) {                                                           \
            __m512 av = LDV(a + k);                                                              \
            s0 = _mm512_fmadd_ps(LDV(x0 + k), av, s0);                                           \
            s1 = _mm512_fmadd_ps(LDV(x1 + k), av, s1);                                           \
            s2 = _mm512_fmadd_ps(LDV(x2 + k), av, s2);                                           \
            s3 = _mm512_fmadd_ps(LDV(x3 + k), av, s3);                                           \
        }                                                                                        \
        if (k < K) {                                                                             \
            __mmask16 m = (__mmask16)((1u << (K - k)) - 1);                                      \
            __m512 av = LDVM(a + k, m);                                                          \
            s0 = _mm512_fmadd_ps(LDVM(x0 + k, m), av, s0);                                       \
            s1 = _mm512_fmadd_ps(LDVM(x1 + k, m), av, s1);                                       \
            s2 = _mm512_fmadd_ps(LDVM(x2 + k, m), av, s2);                                       \
            s3 = _mm512_fmadd_ps(LDVM(x3 + k, m), av, s3);                                       \
        }                                                                                        \
        float v[4] = {_mm512_reduce_add_ps(s0), _mm512_reduce_add_ps(s1),                        \
                      _mm512_reduce_add_ps(s2), _mm512_reduce_add_ps(s3)};                       \
        for (int q = 0; q < 4; ++q) {                                                            \
            float o = v[q] * scale;                                                              \
            out[rows[i + q] * ldo + r] = round_out ? bf2f(f2bf(o)) : o;                          \
        }                                                                                        \
    }
#else
#define SHRINK_ROWS4(T, LDV, LDVM)
#endif

/* Work item: one segment x one row of A (one rank index r over all slices). */
#define SHRINK_ITEM(SUF, T, LOAD, LDV, LDVM)                                                     \
    static inline void shrink_item_##SUF(const T* x, int64_t ldx, const T* A, int64_t sA,       \
                                         int64_t lda, int64_t K, const int64_t* rows,            \
                                         const int64_t* seg, int64_t s, int64_t r, float scale,  \
                                         float* out, int64_t ldo, int round_out) {               \
        const T* a = A + seg[3 * s] * sA + r * lda;                                              \
        int64_t i = seg[3 * s + 1], end = seg[3 * s + 2];                                        \
        SHRINK_ROWS4(T, LDV, LDVM)                                                               \
        SHRINK_ROWS(T, LOAD)                                                                     \
    }

SHRINK_ITEM(bf16, uint16_t, bf2f, ld_bf16, ld_bf16_m)
SHRINK_ITEM(f32, float, f32id, ld_f32, ld_f32_m)

/* ---------------------------------------------------------------- expand */

/* Work item: one segment x TILE columns (tile t). Each row's accumulators stay in L1 while the r
 * loop streams the segment's B rows through them; the B tile (R x TILE) is shared by the
 * segment's rows from cache. Plain loops that the compiler vectorizes: the portable expand. (The
 * blocked items below are faster where they are built, provided their accumulators stay in
 * registers: see their notes.) */
#define EXPAND_ITEM(SUF, T, LOAD, STORE)                                                         \
    static inline void expand_item_##SUF(T* y, int64_t ldy, const float* buf, int64_t ldb,       \
                                         const T* B, int64_t sB, int64_t ldB, int64_t R,         \
                                         int64_t N, const int64_t* rows, const int64_t* seg,     \
                                         int64_t s, int64_t t) {                                 \
        int64_t n0 = t * TILE, nn = N - n0 < TILE ? N - n0 : TILE;                               \
        const T* b = B + seg[3 * s] * sB + n0;                                                   \
        for (int64_t i = seg[3 * s + 1]; i < seg[3 * s + 2]; ++i) {                              \
            float acc[TILE];                                                                     \
            T* yr = y + rows[i] * ldy + n0;                                                      \
            const float* c = buf + rows[i] * ldb;                                                \
            _Pragma("omp simd")                                                                  \
            for (int64_t j = 0; j < nn; ++j) acc[j] = LOAD(yr[j]);                               \
            for (int64_t r = 0; r < R; ++r) {                                                    \
                const float cr = c[r];                                                           \
                const T* br = b + r * ldB;                                                       \
                _Pragma("omp simd")                                                              \
                for (int64_t j = 0; j < nn; ++j) acc[j] += cr * LOAD(br[j]);                     \
            }                                                                                    \
            _Pragma("omp simd")                                                                  \
            for (int64_t j = 0; j < nn; ++j) yr[j] = STORE(acc[j]);                              \
        }                                                                                        \
    }

EXPAND_ITEM(bf16, uint16_t, bf2f, f2bf)
EXPAND_ITEM(f32, float, f32id, f32id)

/* ---------------------------------------------------------------- blocked items (AVX-512) */

/* The shrink's work items split segments into chunks of up to ROW_CHUNK rows, so a batch with
 * one adapter still gives every thread work. Chunk c of the batch -> its segment and rows. */
#define ROW_CHUNK 16
#define DP_COLS 64 /* expand: columns per blocked item (4 zmm of float32 per row) */
#ifndef PF_TILES
#define PF_TILES 2 /* expand: prefetch distance, in items of the same slice and slot */
#endif
#ifdef LL_AVX512
static inline __mmask32 mask32(int64_t n) { /* the first n lanes (none for n <= 0) */
    return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (n > 0 ? n : 0)) - 1u);
}
static inline __mmask16 mask16(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n > 0 ? n : 0)) - 1u);
}

/* Shrink item: one segment (rows[i0..i1)) x ranks r0 .. r0+3 of A (the slot's (R, K) rows), in
 * blocks of 4 rows x 4 ranks: 16 accumulators of 16 float32 lanes, K in steps of KSTEP elements
 * (one vector), DOT(acc, x, a) adding their products. Row and rank blocks shorter than 4 repeat
 * their last member; only real ones are written, rounded to bf16 when ROUND. The accumulators
 * are indexed with constants only (unrolled, guarded): indexed at run time, they would make the
 * compiler keep the array in memory and store every accumulator on every step. */
#define BLOCKED_SHRINK_FN(NAME, T, VT, KSTEP, MT, MASK, LOAD, DOT, ROUND)                         \
    static void NAME(const T* x, int64_t ldx, const T* A, int64_t lda, int64_t R, int64_t K,     \
                     const int64_t* rows, int64_t i0, int64_t i1, int64_t r0, float scale,       \
                     float* out, int64_t ldo, int round_out) {                                   \
        (void)round_out;                                                                         \
        int64_t nr = R - r0 < 4 ? R - r0 : 4;                                                    \
        const T* a[4];                                                                           \
        for (int q = 0; q < 4; ++q) a[q] = A + (r0 + (q < nr ? q : nr - 1)) * lda;               \
        for (int64_t i = i0; i < i1; i += 4) {                                                   \
            int64_t ni = i1 - i < 4 ? i1 - i : 4;                                                \
            const T* xr[4];                                                                      \
            for (int p = 0; p < 4; ++p) xr[p] = x + rows[i + (p < ni ? p : ni - 1)] * ldx;       \
            __m512 acc[4][4];                                                                    \
            _Pragma("GCC unroll 4") for (int p = 0; p < 4; ++p)                                  \
                _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q) acc[p][q] = _mm512_setzero_ps(); \
            for (int64_t k = 0; k < K; k += KSTEP) {                                             \
                MT m = MASK(K - k);                                                              \
                VT av[4], xv;                                                                    \
                if (i == i0 && r0 + 4 < R) /* the next rank block: the thread's next item */     \
                    for (int q = 0; q < 4 && r0 + 4 + q < R; ++q)                                \
                        _mm_prefetch((const char*)(a[0] + (4 + q) * lda + k), _MM_HINT_T0);      \
                _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q) av[q] = LOAD(m, a[q] + k);   \
                _Pragma("GCC unroll 4") for (int p = 0; p < 4; ++p) {                            \
                    xv = LOAD(m, xr[p] + k);                                                     \
                    _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q)                          \
                        acc[p][q] = DOT(acc[p][q], xv, av[q]);                                   \
                }                                                                                \
            }                                                                                    \
            _Pragma("GCC unroll 4") for (int p = 0; p < 4; ++p)                                  \
                _Pragma("GCC unroll 4") for (int q = 0; q < 4; ++q)                              \
                    if (p < ni && q < nr) {                                                      \
                        float v = _mm512_reduce_add_ps(acc[p][q]) * scale;                       \
                        out[rows[i + p] * ldo + r0 + q] = (ROUND) ? bf2f(f2bf(v)) : v;           \
                    }                                                                            \
        }                                                                                        \
    }
#endif

static inline int64_t count_chunks(const int64_t* seg, int64_t nseg) {
    int64_t n = 0;
    for (int64_t s = 0; s < nseg; ++s) n += (seg[3 * s + 2] - seg[3 * s + 1] + ROW_CHUNK - 1) / ROW_CHUNK;
    return n;
}
static inline int64_t find_chunk(const int64_t* seg, int64_t nseg, int64_t c, int64_t* i0, int64_t* i1) {
    for (int64_t s = 0; s < nseg; ++s) {
        int64_t len = seg[3 * s + 2] - seg[3 * s + 1], n = (len + ROW_CHUNK - 1) / ROW_CHUNK;
        if (c < n) {
            *i0 = seg[3 * s + 1] + c * ROW_CHUNK;
            *i1 = *i0 + ROW_CHUNK < seg[3 * s + 2] ? *i0 + ROW_CHUNK : seg[3 * s + 2];
            return s;
        }
        c -= n;
    }
    return -1;
}

/* ---------------------------------------------------------------- bf16 dot products */
/* With AVX512_BF16 (vdpbf16ps: 32 bf16 products per instruction, accumulated in float32), bf16
 * layers use register-blocked items: 4 rows x 4 ranks per shrink block, 4 rows x 64 columns per
 * expand block, 16 accumulators in registers. The expand needs the rank in bf16 pairs: the shrink
 * output is already rounded to bf16 (round_out, as the stock ops round theirs), so the pairs are
 * exact, and B's tile is interleaved into (r, r+1) pairs once per work item. Results differ from
 * the portable items in the order of the float32 sums, and in denormals: vdpbf16ps treats
 * denormal inputs (x, A, B, y's accumulator) as zero and flushes denormal sums, which moves
 * results by less than 2^-126 (bf16 values of the model are far above that). */
#if defined(LL_AVX512) && defined(__AVX512BF16__)
#define LL_DPBF16 1

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

/* 16 floats to bf16 as f2bf does (nearest even; NaN stays NaN): the same rounding as the scalar
 * code for every value that is not denormal. */
static inline __m256i f2bf_v(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}


static inline __m512 dot_bf16(__m512 acc, __m512i x, __m512i a) {
    return _mm512_dpbf16_ps(acc, as_bh(x), as_bh(a)); /* acc += pairs of x * a, 16 float32 lanes */
}
/* Always rounded: the bf16 entries use it only with round_out. */
BLOCKED_SHRINK_FN(shrink_dp, uint16_t, __m512i, 32, __mmask32, mask32, _mm512_maskz_loadu_epi16,
                  dot_bf16, 1)

/* Expand item: one segment x DP_COLS columns from n0 of a slice with N columns; B the slot's
 * (rank, N) rows (stride ldB), buf the rows' rank values (bf16-exact floats). */
static void expand_dp(uint16_t* y, int64_t ldy, const float* buf, int64_t ldb, const uint16_t* B,
                      int64_t ldB, int64_t rank, int64_t N, const int64_t* rows, int64_t i0,
                      int64_t i1, int64_t n0) {
    const int64_t np = (rank + 1) / 2, nn = N - n0 < DP_COLS ? N - n0 : DP_COLS;
    __m512i bp[np][4]; /* B's tile as (r, r+1) pairs: lane j of chunk c = column n0 + 16c + j */
    __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
    /* The weights come from memory (a step streams the whole model through the caches): fetch
     * this slice's tile PF_TILES ahead, which the thread's next items read. */
    if (n0 + PF_TILES * DP_COLS < N)
        for (int64_t r = 0; r < rank; ++r) {
            const char* f = (const char*)(B + r * ldB + n0 + PF_TILES * DP_COLS);
            _mm_prefetch(f, _MM_HINT_T0);
            _mm_prefetch(f + 64, _MM_HINT_T0);
        }
    for (int64_t p = 0; p < np; ++p) {
        const uint16_t* b0 = B + 2 * p * ldB + n0;
        for (int h = 0; h < 2; ++h) {
            __mmask32 m = mask32(nn - 32 * h);
            __m512i lo = _mm512_maskz_loadu_epi16(m, b0 + 32 * h);
            __m512i hi = 2 * p + 1 < rank ? _mm512_maskz_loadu_epi16(m, b0 + ldB + 32 * h)
                                          : _mm512_setzero_si512();
            bp[p][2 * h] = _mm512_permutex2var_epi16(lo, lo_idx, hi);
            bp[p][2 * h + 1] = _mm512_permutex2var_epi16(lo, hi_idx, hi);
        }
    }
    __mmask16 mc[4];
    for (int c = 0; c < 4; ++c) mc[c] = mask16(nn - 16 * c);
    uint32_t pairs[4][np + 8];
    for (int64_t i = i0; i < i1; i += 4) {
        int64_t ni = i1 - i < 4 ? i1 - i : 4;
        uint16_t* yr[4];
        /* y's rows of the next block, or of this item's first block in the next tile */
        for (int64_t q = 0; q < 4; ++q) {
            int64_t j = i + 4 + q < i1 ? i + 4 + q : (n0 + DP_COLS < N ? i0 + q : i1);
            if (j >= i1) break;
            const char* f = (const char*)(y + rows[j] * ldy + n0 + (i + 4 + q < i1 ? 0 : DP_COLS));
            _mm_prefetch(f, _MM_HINT_T0);
            _mm_prefetch(f + 64, _MM_HINT_T0);
        }
        __m512 acc[4][4];
        for (int q = 0; q < 4; ++q) {
            int64_t row = rows[i + (q < ni ? q : ni - 1)];
            yr[q] = y + row * ldy + n0;
            const float* c = buf + row * ldb;
            uint16_t* pw = (uint16_t*)pairs[q];
            /* the floats' top halves (exact bf16s); lanes past rank are zero, so an odd rank's
             * last pair is (value, 0) */
            for (int64_t r = 0; r < rank; r += 16) {
                __m512i v = _mm512_maskz_loadu_epi32(mask16(rank - r), c + r);
                _mm256_storeu_si256((__m256i*)(pw + r), _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
            }
#pragma GCC unroll 4
            for (int cc = 0; cc < 4; ++cc)
                acc[q][cc] = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mc[cc], yr[q] + 16 * cc)), 16));
        }
        for (int64_t p = 0; p < np; ++p) {
#pragma GCC unroll 4
            for (int q = 0; q < 4; ++q) {
                __m512i cq = _mm512_set1_epi32((int)pairs[q][p]);
#pragma GCC unroll 4
                for (int cc = 0; cc < 4; ++cc)
                    acc[q][cc] = _mm512_dpbf16_ps(acc[q][cc], as_bh(cq), as_bh(bp[p][cc]));
            }
        }
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q)
#pragma GCC unroll 4
            for (int cc = 0; cc < 4; ++cc)
                if (q < ni && mc[cc]) _mm256_mask_storeu_epi16(yr[q] + 16 * cc, mc[cc], f2bf_v(acc[q][cc]));
    }
}

#endif /* LL_DPBF16 */

/* ---------------------------------------------------------------- float32, AVX-512 */
/* The same blocking and prefetching for float32 layers, with FMAs: 4 rows x 4 ranks per shrink
 * block (16-lane partial sums over K), 4 rows x 64 columns per expand block (the rank loop in
 * order, as the portable expand: the same sums). */
#ifdef LL_AVX512
static inline __m512 dot_f32(__m512 acc, __m512 x, __m512 a) { return _mm512_fmadd_ps(x, a, acc); }
BLOCKED_SHRINK_FN(shrink_f32v, float, __m512, 16, __mmask16, mask16, _mm512_maskz_loadu_ps, dot_f32,
                  round_out)

static void expand_f32v(float* y, int64_t ldy, const float* buf, int64_t ldb, const float* B,
                        int64_t ldB, int64_t rank, int64_t N, const int64_t* rows, int64_t i0,
                        int64_t i1, int64_t n0) {
    const int64_t nn = N - n0 < DP_COLS ? N - n0 : DP_COLS;
    if (n0 + PF_TILES * DP_COLS < N)
        for (int64_t r = 0; r < rank; ++r) {
            const char* f = (const char*)(B + r * ldB + n0 + PF_TILES * DP_COLS);
            for (int l = 0; l < 4; ++l) _mm_prefetch(f + 64 * l, _MM_HINT_T0);
        }
    __mmask16 mc[4];
    for (int c = 0; c < 4; ++c) mc[c] = mask16(nn - 16 * c);
    for (int64_t i = i0; i < i1; i += 4) {
        int64_t ni = i1 - i < 4 ? i1 - i : 4;
        float* yr[4];
        const float* c[4];
        for (int64_t q = 0; q < 4; ++q) {
            int64_t j = i + 4 + q < i1 ? i + 4 + q : (n0 + DP_COLS < N ? i0 + q : i1);
            if (j >= i1) break;
            const char* f = (const char*)(y + rows[j] * ldy + n0 + (i + 4 + q < i1 ? 0 : DP_COLS));
            for (int l = 0; l < 4; ++l) _mm_prefetch(f + 64 * l, _MM_HINT_T0);
        }
        __m512 acc[4][4];
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
            int64_t row = rows[i + (q < ni ? q : ni - 1)];
            yr[q] = y + row * ldy + n0;
            c[q] = buf + row * ldb;
#pragma GCC unroll 4
            for (int cc = 0; cc < 4; ++cc) acc[q][cc] = _mm512_maskz_loadu_ps(mc[cc], yr[q] + 16 * cc);
        }
        for (int64_t r = 0; r < rank; ++r) {
            const float* br = B + r * ldB + n0;
            __m512 bv[4];
#pragma GCC unroll 4
            for (int cc = 0; cc < 4; ++cc) bv[cc] = _mm512_maskz_loadu_ps(mc[cc], br + 16 * cc);
#pragma GCC unroll 4
            for (int q = 0; q < 4; ++q) {
                __m512 cq = _mm512_set1_ps(c[q][r]);
#pragma GCC unroll 4
                for (int cc = 0; cc < 4; ++cc) acc[q][cc] = _mm512_fmadd_ps(cq, bv[cc], acc[q][cc]);
            }
        }
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q)
#pragma GCC unroll 4
            for (int cc = 0; cc < 4; ++cc)
                if (q < ni && mc[cc]) _mm512_mask_storeu_ps(yr[q] + 16 * cc, mc[cc], acc[q][cc]);
    }
}
#endif /* LL_AVX512 */

#ifdef LL_DPBF16
/* Whether every rank value the expand will read is a bf16 (the pairs are then exact). */
static int buf_is_bf16(const float* buf, int64_t ldb, int64_t R, const int64_t* rows,
                       const int64_t* seg, int64_t nseg) {
    for (int64_t s = 0; s < nseg; ++s)
        for (int64_t i = seg[3 * s + 1]; i < seg[3 * s + 2]; ++i) {
            const uint32_t* c = (const uint32_t*)(buf + rows[i] * ldb);
            for (int64_t r = 0; r < R; ++r)
                if (c[r] & 0xffffu) return 0;
        }
    return 1;
}

int lora_cpu_has_dpbf16(void) { return 1; }
#else
int lora_cpu_has_dpbf16(void) { return 0; }
#endif

/* ---------------------------------------------------------------- entry points */

/* The portable versions, used where the blocked items are not built (no AVX-512) or do not
 * apply (bf16 without rounding the shrink output). */
#pragma GCC diagnostic ignored "-Wunused-function"

#define ENTRY_POINTS(SUF, T)                                                                     \
    static void shrink_generic_##SUF(const T* x, int64_t ldx, const T* A, int64_t sA,            \
                                     int64_t lda, int64_t R, int64_t K, const int64_t* rows,     \
                                     const int64_t* seg, int64_t nseg, float scale, float* out,  \
                                     int64_t ldo, int round_out) {                               \
        _Pragma("omp parallel for collapse(2) schedule(static)")                                 \
        for (int64_t s = 0; s < nseg; ++s)                                                       \
            for (int64_t r = 0; r < R; ++r)                                                      \
                shrink_item_##SUF(x, ldx, A, sA, lda, K, rows, seg, s, r, scale, out, ldo,       \
                                  round_out);                                                    \
    }                                                                                            \
    static void expand_generic_##SUF(T* y, int64_t ldy, const float* buf, int64_t ldb,           \
                                     const T* B, int64_t sB, int64_t ldB, int64_t R,             \
                                     int64_t N, const int64_t* rows, const int64_t* seg,         \
                                     int64_t nseg) {                                             \
        int64_t ntile = (N + TILE - 1) / TILE;                                                   \
        _Pragma("omp parallel for collapse(2) schedule(static)")                                 \
        for (int64_t t = 0; t < ntile; ++t)                                                      \
            for (int64_t s = 0; s < nseg; ++s)                                                   \
                expand_item_##SUF(y, ldy, buf, ldb, B, sB, ldB, R, N, rows, seg, s, t);          \
    }                                                                                            \
    /* A whole LoRA layer in one call and one parallel region: the shrink of all slices into    \
     * buf (rank columns per slice), then each slice's expand into y's columns off[i] ..         \
     * off[i] + n_out[i] from B_i = b_ptr[i] (strides sB[i], ldB[i]). Slices write disjoint      \
     * columns, so their expands run without a barrier between them. */                          \
    static void linear_generic_##SUF(T* y, int64_t ldy, const T* x, int64_t ldx, const T* A,     \
                                     int64_t sA, int64_t lda, int64_t K, int64_t rank,           \
                                     int64_t nslice, const int64_t* b_ptr, const int64_t* sB,    \
                                     const int64_t* ldB, const int64_t* n_out,                   \
                                     const int64_t* off, const int64_t* rows,                    \
                                     const int64_t* seg, int64_t nseg, float scale,              \
                                     float* buf, int64_t ldb, int round_out) {                   \
        int64_t R = rank * nslice;                                                               \
        _Pragma("omp parallel")                                                                  \
        {                                                                                        \
            _Pragma("omp for collapse(2) schedule(static)")                                      \
            for (int64_t s = 0; s < nseg; ++s)                                                   \
                for (int64_t r = 0; r < R; ++r)                                                  \
                    shrink_item_##SUF(x, ldx, A, sA, lda, K, rows, seg, s, r, scale, buf, ldb,   \
                                      round_out);                                                \
            for (int64_t i = 0; i < nslice; ++i) {                                               \
                int64_t ntile = (n_out[i] + TILE - 1) / TILE;                                    \
                _Pragma("omp for collapse(2) schedule(static) nowait")                           \
                for (int64_t t = 0; t < ntile; ++t)                                              \
                    for (int64_t s = 0; s < nseg; ++s)                                           \
                        expand_item_##SUF(y + off[i], ldy, buf + i * rank, ldb,                  \
                                          (const T*)(intptr_t)b_ptr[i], sB[i], ldB[i], rank,     \
                                          n_out[i], rows, seg, s, t);                            \
            }                                                                                    \
        }                                                                                        \
    }

ENTRY_POINTS(bf16, uint16_t)
ENTRY_POINTS(f32, float)

#define SHRINK_ARGS const T* x, int64_t ldx, const T* A, int64_t sA, int64_t lda, int64_t R,        \
    int64_t K, const int64_t* rows, const int64_t* seg, int64_t nseg, float scale, float* out,       \
    int64_t ldo, int round_out
#define EXPAND_ARGS T* y, int64_t ldy, const float* buf, int64_t ldb, const T* B, int64_t sB,       \
    int64_t ldB, int64_t R, int64_t N, const int64_t* rows, const int64_t* seg, int64_t nseg
#define LINEAR_ARGS T* y, int64_t ldy, const T* x, int64_t ldx, const T* A, int64_t sA,             \
    int64_t lda, int64_t K, int64_t rank, int64_t nslice, const int64_t* b_ptr, const int64_t* sB, \
    const int64_t* ldB, const int64_t* n_out, const int64_t* off, const int64_t* rows,             \
    const int64_t* seg, int64_t nseg, float scale, float* buf, int64_t ldb, int round_out

/* The blocked items, over one parallel region: the shrink's (row chunk x 4 ranks) items, then
 * each slice's (segment x 64 columns) items without a barrier between slices (disjoint columns).
 * SH and EX name the item functions; their own numerics are theirs. */
#define BLOCKED_LINEAR(T, SH, EX)                                                                \
    {                                                                                            \
        int64_t R = rank * nslice, nrb = (R + 3) / 4, nch = count_chunks(seg, nseg);            \
        _Pragma("omp parallel")                                                                  \
        {                                                                                        \
            _Pragma("omp for collapse(2) schedule(static)")                                      \
            for (int64_t c = 0; c < nch; ++c)                                                    \
                for (int64_t q = 0; q < nrb; ++q) {                                              \
                    int64_t i0 = 0, i1 = 0, s = find_chunk(seg, nseg, c, &i0, &i1);              \
                    SH(x, ldx, A + seg[3 * s] * sA, lda, R, K, rows, i0, i1, 4 * q, scale, buf,   \
                       ldb, round_out);                                                          \
                }                                                                                \
            for (int64_t i = 0; i < nslice; ++i) {                                               \
                int64_t ntile = (n_out[i] + DP_COLS - 1) / DP_COLS;                              \
                const T* b = (const T*)(intptr_t)b_ptr[i];                                       \
                _Pragma("omp for collapse(2) schedule(static) nowait")                           \
                for (int64_t s = 0; s < nseg; ++s)                                               \
                    for (int64_t t = 0; t < ntile; ++t)                                          \
                        EX(y + off[i], ldy, buf + i * rank, ldb, b + seg[3 * s] * sB[i], ldB[i],  \
                           rank, n_out[i], rows, seg[3 * s + 1], seg[3 * s + 2], t * DP_COLS);   \
            }                                                                                    \
        }                                                                                        \
    }
#define BLOCKED_SHRINK(SH)                                                                       \
    {                                                                                            \
        int64_t nrb = (R + 3) / 4, nch = count_chunks(seg, nseg);                                \
        _Pragma("omp parallel for collapse(2) schedule(static)")                                 \
        for (int64_t c = 0; c < nch; ++c)                                                        \
            for (int64_t q = 0; q < nrb; ++q) {                                                  \
                int64_t i0 = 0, i1 = 0, s = find_chunk(seg, nseg, c, &i0, &i1);                  \
                SH(x, ldx, A + seg[3 * s] * sA, lda, R, K, rows, i0, i1, 4 * q, scale, out, ldo,  \
                   round_out);                                                                   \
            }                                                                                    \
    }
#define BLOCKED_EXPAND(EX)                                                                       \
    {                                                                                            \
        int64_t ntile = (N + DP_COLS - 1) / DP_COLS;                                             \
        _Pragma("omp parallel for collapse(2) schedule(static)")                                 \
        for (int64_t s = 0; s < nseg; ++s)                                                       \
            for (int64_t t = 0; t < ntile; ++t)                                                  \
                EX(y, ldy, buf, ldb, B + seg[3 * s] * sB, ldB, R, N, rows, seg[3 * s + 1],       \
                   seg[3 * s + 2], t * DP_COLS);                                                 \
    }

/* float32: the AVX-512 blocked items where built, else the portable loops. */
#define T float
void lora_shrink_f32(SHRINK_ARGS) {
#ifdef LL_AVX512
    BLOCKED_SHRINK(shrink_f32v)
#else
    shrink_generic_f32(x, ldx, A, sA, lda, R, K, rows, seg, nseg, scale, out, ldo, round_out);
#endif
}
void lora_expand_f32(EXPAND_ARGS) {
#ifdef LL_AVX512
    BLOCKED_EXPAND(expand_f32v)
#else
    expand_generic_f32(y, ldy, buf, ldb, B, sB, ldB, R, N, rows, seg, nseg);
#endif
}
void lora_linear_f32(LINEAR_ARGS) {
#ifdef LL_AVX512
    BLOCKED_LINEAR(float, shrink_f32v, expand_f32v)
#else
    linear_generic_f32(y, ldy, x, ldx, A, sA, lda, K, rank, nslice, b_ptr, sB, ldB, n_out, off, rows,
                       seg, nseg, scale, buf, ldb, round_out);
#endif
}
#undef T

/* bf16: the dot-product items where the CPU has them and the shrink output is rounded to bf16. */
#define T uint16_t
void lora_shrink_bf16(SHRINK_ARGS) {
#ifdef LL_DPBF16
    if (round_out) {
        BLOCKED_SHRINK(shrink_dp)
        return;
    }
#endif
    shrink_generic_bf16(x, ldx, A, sA, lda, R, K, rows, seg, nseg, scale, out, ldo, round_out);
}

void lora_expand_bf16(EXPAND_ARGS) {
#ifdef LL_DPBF16
    if (buf_is_bf16(buf, ldb, R, rows, seg, nseg)) {
        BLOCKED_EXPAND(expand_dp)
        return;
    }
#endif
    expand_generic_bf16(y, ldy, buf, ldb, B, sB, ldB, R, N, rows, seg, nseg);
}

void lora_linear_bf16(LINEAR_ARGS) {
#ifdef LL_DPBF16
    if (round_out) {
        BLOCKED_LINEAR(uint16_t, shrink_dp, expand_dp)
        return;
    }
#endif
    linear_generic_bf16(y, ldy, x, ldx, A, sA, lda, K, rank, nslice, b_ptr, sB, ldB, n_out, off, rows,
                        seg, nseg, scale, buf, ldb, round_out);
}
#undef T
