/* What both instruction-set variants of the weight-streaming products share (gemv_avx2.c, gemv_avx512.c): the
   constants and the int16 rounding of x for the integer products (int8 weights, and 4-bit weights under bf16
   products), which must be the same in both (and equal kernels.quantize_rows_int16, the PyTorch statement of it),
   so that both variants multiply the same integers. */
#ifndef QWEN2VL_GEMV_COMMON_H
#define QWEN2VL_GEMV_COMMON_H
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 128 /* inputs per scale of the rounded x; 128 * 2 * 127 * XMAX < 2^31, so int32 sums are exact */
/* The rounded x's largest value: 127 * 256, so that the 4-bit product can split it into two signed bytes (below) */
#define XMAX 32512
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

/* ---- the rounding of x for the integer products (AVX2 code, which both variants run) -----------------------

   Per row and group of GROUP inputs (the last may be shorter, a multiple of 8): s = max |x| / XMAX (1 for an
   all-zero group), q = clamp(round(x * (1 / s)), -XMAX, XMAX), rounded to nearest even (vcvtps2dq under the
   default rounding mode). kernels.quantize_rows_int16 is the PyTorch statement; |x - q * s| <= s / 2, 1/65024 of
   the group's largest |x|. */

/* the scale of the group x[0 .. len) (len a multiple of 8), and 1 / scale. A NaN in the group makes the scale NaN,
   so that the products' sums (all multiplied by it) are NaN too, as the float product's would be: vmaxps alone
   drops a NaN operand. */
static inline float group_scale(const float *x, int64_t len, __m256 *inv) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
    float s = _mm256_movemask_ps(nan) ? __builtin_nanf("") : amax > 0.0f ? amax / (float)XMAX : 1.0f;
    *inv = _mm256_set1_ps(1.0f / s);
    return s;
}

static inline __m256i round_x(__m256 v, __m256 inv) {
    const __m256i hi = _mm256_set1_epi32(XMAX), lo = _mm256_set1_epi32(-XMAX);
    return _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v, inv)), lo), hi);
}

/* For the int8 product: x (k floats, k % 8 == 0) -> xq (k int16, natural order) and xs, one scale per group. */
static void quantize_x(const float *x, int16_t *xq, float *xs, int64_t k) {
    for (int64_t g = 0; g < k; g += GROUP) {
        int64_t len = k - g < GROUP ? k - g : GROUP;
        __m256 inv;
        xs[g / GROUP] = group_scale(x + g, len, &inv);
        for (int64_t j = g; j < g + len; j += 8) { /* 8 int32 -> 8 int16 (within range: no saturation) */
            __m256i q = round_x(_mm256_loadu_ps(x + j), inv);
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(q, q), _MM_SHUFFLE(3, 1, 2, 0));
            _mm_storeu_si128((__m128i *)(xq + j), _mm256_castsi256_si128(p));
        }
    }
}

/* ---- the same rounded x, as the 4-bit product reads it (both variants' gemm_q4_i16in) ------------------------

   The nibbles of a packed 4-bit weight meet x in signed-byte dot products (vpdpbusd, or vpmaddubsw + vpmaddwd):
   q = 256 * h + l with l = q's low byte read as signed (-128..127) and h = (q - l) / 256, which |q| <= XMAX keeps
   within -127..127; the product sums 256 * (w . h) + (w . l), exact in int32. Per XCHUNK (= GROUP) columns the
   rounded row is laid out as its 64 even columns, then its 64 odd ones (hi and lo separately), so that the chunk's
   64 packed weight bytes (low nibbles: even columns, high nibbles: odd ones) meet their inputs byte for byte.
   zsum: per weight group, the sum over its chunks of s * (sum of the chunk's q), in chunk order: the zero point's
   term, sum_j (q_j - z) x_j = sum_j q_j x_j - z * zsum. K and the group size must be multiples of XCHUNK. */
#define XCHUNK GROUP

/* The low byte of each int32 lane of v (values already within int8), in order, into 8 bytes at out. */
static inline void store_low_bytes(__m256i v, int8_t *out) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
                                          -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, pick), _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
    _mm_storel_epi64((__m128i *)out, _mm256_castsi256_si128(b));
}

/* q's two signed bytes into hi[0..8) and lo[0..8); returns q for the chunk's sum */
static inline __m256i split_x(__m256 v, __m256 inv, int8_t *hi, int8_t *lo) {
    __m256i q = round_x(v, inv);
    __m256i l = _mm256_srai_epi32(_mm256_slli_epi32(q, 24), 24);
    store_low_bytes(l, lo);
    store_low_bytes(_mm256_srai_epi32(_mm256_sub_epi32(q, l), 8), hi);
    return q;
}

static void quantize_x_q4(const float *x, int8_t *xh, int8_t *xl, float *xs, float *zsum, int64_t k, int64_t group) {
    for (int64_t g = 0; g * group < k; g++) zsum[g] = 0.0f;
    for (int64_t c = 0; c < k; c += XCHUNK) {
        __m256 inv;
        float s = group_scale(x + c, XCHUNK, &inv);
        __m256i sum = _mm256_setzero_si256();
        for (int64_t i = 0; i < XCHUNK; i += 16) { /* 8 even columns, 8 odd ones (shufps + vpermpd) */
            __m256 a = _mm256_loadu_ps(x + c + i), b = _mm256_loadu_ps(x + c + i + 8);
            __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
            e = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
            o = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
            int64_t at = c + i / 2;
            sum = _mm256_add_epi32(sum, split_x(e, inv, xh + at, xl + at));
            sum = _mm256_add_epi32(sum, split_x(o, inv, xh + at + XCHUNK / 2, xl + at + XCHUNK / 2));
        }
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
        xs[c / XCHUNK] = s;
        zsum[c / group] += s * (float)_mm_cvtsi128_si32(t);
    }
}

/* The scratch gemm_q4_i16in needs for m rows: the rounded rows' high and low bytes, scales, zero-point sums. */
typedef struct {
    int8_t *xh, *xl;
    float *xs, *zsum;
    int64_t groups;
} RoundedRows;

static void free_rows_q4(RoundedRows *r) {
    free(r->xh);
    free(r->xl);
    free(r->xs);
    free(r->zsum);
}

/* Both variants' gemm_q4_i16in start here: 0, or -2 for a shape the product does not take (K and the group size
   multiples of XCHUNK), -1 out of memory (nothing left allocated). */
static int round_rows_q4(const float *x, int64_t m, int64_t k, int64_t group, RoundedRows *r) {
    if (k % XCHUNK || group % XCHUNK) return -2;
    int64_t groups = r->groups = (k + group - 1) / group;
    size_t bytes = (size_t)(m * k + 63) / 64 * 64;
    r->xh = aligned_alloc(64, bytes); /* 64-byte loads never straddle two cache lines */
    r->xl = aligned_alloc(64, bytes);
    r->xs = malloc(sizeof(float) * m * (k / XCHUNK));
    r->zsum = malloc(sizeof(float) * m * groups);
    if (!r->xh || !r->xl || !r->xs || !r->zsum) {
        free_rows_q4(r);
        return -1;
    }
    for (int64_t i = 0; i < m; i++)
        quantize_x_q4(x + i * k, r->xh + i * k, r->xl + i * k, r->xs + i * (k / XCHUNK), r->zsum + i * groups, k,
                      group);
    return 0;
}
#endif
