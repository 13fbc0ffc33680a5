/* Weight-streaming matrix products for decoding on x86-64 CPUs with AVX2 + FMA.

   Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias[n]) for a few rows m (decode steps, M <= 8), with W stored as
   bf16 (2 bytes) or int8 + one float scale per output row (1 byte), widened to float32 in registers and
   accumulated in float32. Memory-bound by design: each weight is read once per call whatever M is. Output rows
   are split across threads with OpenMP. The plain-PyTorch path in qwen2vl/kernels/__init__.py is the reference
   these functions are tested against. */
#include <immintrin.h>
#include <stdint.h>

#define MAXM 8

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

/* One output row for M input rows, M a compile-time constant so the accumulators stay in registers;
   K must be a multiple of 8 (checked by the caller). */
#define ROW_KERNEL(NAME, WT, LOAD, M)                                                                     \
    static void NAME(const WT *w, const float *x, int64_t ldx, int64_t k, float *out) {                  \
        __m256 acc[M];                                                                                    \
        for (int i = 0; i < M; i++) acc[i] = _mm256_setzero_ps();                                         \
        for (int64_t j = 0; j < k; j += 8) {                                                              \
            __m256 wv = LOAD(w + j);                                                                      \
            for (int i = 0; i < M; i++)                                                                   \
                acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * ldx + j), acc[i]);                   \
        }                                                                                                 \
        for (int i = 0; i < M; i++) out[i] = hsum(acc[i]);                                                \
    }

#define ROW_KERNELS(PREFIX, WT, LOAD)                                                                     \
    ROW_KERNEL(PREFIX##2, WT, LOAD, 2) ROW_KERNEL(PREFIX##3, WT, LOAD, 3) ROW_KERNEL(PREFIX##4, WT, LOAD, 4) \
    ROW_KERNEL(PREFIX##5, WT, LOAD, 5) ROW_KERNEL(PREFIX##6, WT, LOAD, 6) ROW_KERNEL(PREFIX##7, WT, LOAD, 7) \
    ROW_KERNEL(PREFIX##8, WT, LOAD, 8)                                                                    \
    static void PREFIX(const WT *w, const float *x, int64_t ldx, int64_t m, int64_t k, float *out) {     \
        switch (m) {                                                                                      \
        case 2: PREFIX##2(w, x, ldx, k, out); break;                                                      \
        case 3: PREFIX##3(w, x, ldx, k, out); break;                                                      \
        case 4: PREFIX##4(w, x, ldx, k, out); break;                                                      \
        case 5: PREFIX##5(w, x, ldx, k, out); break;                                                      \
        case 6: PREFIX##6(w, x, ldx, k, out); break;                                                      \
        case 7: PREFIX##7(w, x, ldx, k, out); break;                                                      \
        default: PREFIX##8(w, x, ldx, k, out); break;                                                     \
        }                                                                                                 \
    }

ROW_KERNELS(row_bf16_, uint16_t, bf16x8_to_f32)
ROW_KERNELS(row_i8_, int8_t, i8x8_to_f32)

/* M == 1: four independent accumulators hide the FMA latency; K must be a multiple of 32 here. */
#define DOT_KERNEL(NAME, WT, LOAD)                                                                        \
    static float NAME(const WT *w, const float *x, int64_t k) {                                          \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                       \
        for (int64_t j = 0; j < k; j += 32) {                                                             \
            a0 = _mm256_fmadd_ps(LOAD(w + j), _mm256_loadu_ps(x + j), a0);                                \
            a1 = _mm256_fmadd_ps(LOAD(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);                        \
            a2 = _mm256_fmadd_ps(LOAD(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);                      \
            a3 = _mm256_fmadd_ps(LOAD(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);                      \
        }                                                                                                 \
        return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));                         \
    }

DOT_KERNEL(dot_bf16, uint16_t, bf16x8_to_f32)
DOT_KERNEL(dot_i8, int8_t, i8x8_to_f32)

void gemm_bf16(const uint16_t *w, const float *bias, const float *x, float *y, int64_t n, int64_t k, int64_t m,
               int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float out[MAXM];
        if (m == 1 && k % 32 == 0) out[0] = dot_bf16(w + r * k, x, k);
        else row_bf16_(w + r * k, x, k, m, k, out);
        for (int64_t i = 0; i < m; i++) y[i * n + r] = out[i] + (bias ? bias[r] : 0.0f);
    }
}

void gemm_i8(const int8_t *w, const float *scale, const float *bias, const float *x, float *y, int64_t n,
             int64_t k, int64_t m, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float out[MAXM];
        if (m == 1 && k % 32 == 0) out[0] = dot_i8(w + r * k, x, k);
        else row_i8_(w + r * k, x, k, m, k, out);
        for (int64_t i = 0; i < m; i++) y[i * n + r] = out[i] * scale[r] + (bias ? bias[r] : 0.0f);
    }
}
