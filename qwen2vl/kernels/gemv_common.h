/* What both instruction-set variants of the weight-streaming products share (gemv_avx2.c, gemv_avx512.c): the
   constants and the int16 rounding of x for the int8 product, which must be the same in both (and equal
   kernels.quantize_rows_int16, the PyTorch statement of it), so that both variants multiply the same integers. */
#ifndef QWEN2VL_GEMV_COMMON_H
#define QWEN2VL_GEMV_COMMON_H
#include <immintrin.h>
#include <stdint.h>

#define GROUP 128 /* int8 path: inputs per int16 scale; 128 * 2 * 127 * 32767 < 2^31, so int32 sums are exact */
/* Weights are prefetched 1 KB ahead as non-temporal, so the stream does not evict everything else from the
   caches between products (decode runs ~1,500 small operations between them): measured 75% -> 81% of the
   bandwidth bound per decode step on the AVX2 machine; 2 KB ahead was worse, 512 bytes no better. Prefetches never
   fault. */
#define AHEAD 1024 /* bytes */
#define CHUNK 16   /* output rows per task: they stay in L1 while every x row passes over them */

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* x (k floats) -> xq (k int16) and one scale per group of GROUP (the last group may be shorter):
   xq = round(x / s), s = max |x| / 32767 over the group (1 for an all-zero group). */
static void quantize_x(const float *x, int16_t *xq, float *xs, int64_t k) {
    for (int64_t g = 0; g < k; g += GROUP) {
        int64_t end = k - g < GROUP ? k : g + GROUP;
        float amax = 0.0f;
        for (int64_t j = g; j < end; j++) amax = x[j] > amax ? x[j] : (-x[j] > amax ? -x[j] : amax);
        float s = amax > 0.0f ? amax / 32767.0f : 1.0f, inv = 1.0f / s;
        for (int64_t j = g; j < end; j++) {
            float q = __builtin_nearbyintf(x[j] * inv);
            xq[j] = (int16_t)(q > 32767.0f ? 32767.0f : (q < -32767.0f ? -32767.0f : q));
        }
        xs[g / GROUP] = s;
    }
}
#endif
