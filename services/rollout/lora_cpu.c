/* Segmented LoRA matmuls for the CPU: the rows of a batch grouped by adapter (S-LoRA's SGMV, on
 * CPU). Built and loaded by services/rollout/cpu_kernels.py; used by lora_ops.py for batches
 * that mix adapters.
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

/* 1: built with the AVX-512 shrink; 0: portable loops only (the compiler's vectorization). */
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
 * segment's rows from cache. Plain loops that the compiler vectorizes (measured faster here than
 * a register-blocked AVX-512 version of the same). */
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

/* ---------------------------------------------------------------- entry points */

#define ENTRY_POINTS(SUF, T)                                                                     \
    void lora_shrink_##SUF(const T* x, int64_t ldx, const T* A, int64_t sA, int64_t lda,         \
                           int64_t R, int64_t K, const int64_t* rows, const int64_t* seg,        \
                           int64_t nseg, float scale, float* out, int64_t ldo, int round_out) {  \
        _Pragma("omp parallel for collapse(2) schedule(static)")                                 \
        for (int64_t s = 0; s < nseg; ++s)                                                       \
            for (int64_t r = 0; r < R; ++r)                                                      \
                shrink_item_##SUF(x, ldx, A, sA, lda, K, rows, seg, s, r, scale, out, ldo,       \
                                  round_out);                                                    \
    }                                                                                            \
    void lora_expand_##SUF(T* y, int64_t ldy, const float* buf, int64_t ldb, const T* B,         \
                           int64_t sB, int64_t ldB, int64_t R, int64_t N, const int64_t* rows,   \
                           const int64_t* seg, int64_t nseg) {                                   \
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
    void lora_linear_##SUF(T* y, int64_t ldy, const T* x, int64_t ldx, const T* A, int64_t sA,   \
                           int64_t lda, int64_t K, int64_t rank, int64_t nslice,                 \
                           const int64_t* b_ptr, const int64_t* sB, const int64_t* ldB,          \
                           const int64_t* n_out, const int64_t* off, const int64_t* rows,        \
                           const int64_t* seg, int64_t nseg, float scale, float* buf,            \
                           int64_t ldb, int round_out) {                                         \
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
