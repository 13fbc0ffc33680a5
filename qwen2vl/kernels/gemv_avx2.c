/* Weight-streaming matrix products for decoding on x86-64 CPUs with AVX2 + FMA.

   Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias[n]) for a few rows m (decode steps), with W stored as bf16
   (2 bytes) or int8 + one float scale per output row (1 byte), widened to float32 in registers and accumulated
   in float32. Memory-bound by design: each weight row is read from memory once per call and reused from L1 for
   every row of X. Every (n, m) pair is summed in the same order whatever M is (one accumulator, k ascending in
   steps of 8, then the same horizontal sum), so a row's result does not depend on which other rows share the
   call: batched decoding gives bit-identical results to decoding alone. Latency is hidden by working on several
   output rows at once when M is small. Output rows are split across threads with OpenMP. The plain-PyTorch
   path in qwen2vl/cpu.py is the reference these functions are tested against. */
#include <immintrin.h>
#include <stdint.h>

static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __m256 i8x8_to_f32(const int8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* One (weight row, x row) dot product with four accumulators over k in steps of 32 (then 8 for a tail),
   combined as (a0 + a1) + (a2 + a3). Every pair uses this same function, so the order never depends on M. */
#define DOT(NAME, WT, LOAD)                                                                               \
    static inline float NAME(const WT *w, const float *x, int64_t k) {                                   \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                       \
        int64_t j = 0;                                                                                    \
        for (; j + 32 <= k; j += 32) {                                                                    \
            a0 = _mm256_fmadd_ps(LOAD(w + j), _mm256_loadu_ps(x + j), a0);                                \
            a1 = _mm256_fmadd_ps(LOAD(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);                        \
            a2 = _mm256_fmadd_ps(LOAD(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);                      \
            a3 = _mm256_fmadd_ps(LOAD(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);                      \
        }                                                                                                 \
        for (; j < k; j += 8) a0 = _mm256_fmadd_ps(LOAD(w + j), _mm256_loadu_ps(x + j), a0);              \
        return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));                         \
    }

DOT(dot_bf16, uint16_t, bf16x8_to_f32)
DOT(dot_i8, int8_t, i8x8_to_f32)

#define CHUNK 16 /* output rows per task: they stay in L1 while every x row passes over them */

#define GEMM(NAME, DOTF, WT, SCALE_ARG, SCALE)                                                            \
    void NAME(const WT *w, SCALE_ARG const float *bias, const float *x, float *y, int64_t n, int64_t k,   \
              int64_t m, int threads) {                                                                   \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                 \
        for (int64_t c = 0; c < n; c += CHUNK) {                                                          \
            int64_t end = n - c < CHUNK ? n : c + CHUNK;                                                  \
            for (int64_t i = 0; i < m; i++)                                                               \
                for (int64_t r = c; r < end; r++)                                                         \
                    y[i * n + r] = DOTF(w + r * k, x + i * k, k) SCALE + (bias ? bias[r] : 0.0f);         \
        }                                                                                                 \
    }

GEMM(gemm_bf16, dot_bf16, uint16_t, , )
#define SCALE_PARAM const float *scale,
GEMM(gemm_i8, dot_i8, int8_t, SCALE_PARAM, * scale[r])
