/* Weight-streaming matrix products for decoding on x86-64 CPUs with AVX2 + FMA.

   Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias[n]) for a few rows m (decode steps), with W stored as bf16
   (2 bytes) or int8 + one float scale per output row (1 byte). Memory-bound by design: each weight row is read
   from memory once per call and reused from L1 for every row of X, so the work per weight byte must stay small
   enough for two cores to keep up with memory (~30-40 GB/s here):

   - bf16: 32 bytes (16 weights) per load, widened in-lane by a shift (even weights) and a mask (odd weights),
     against a copy of x whose 16-blocks are reordered to match (evens, then odds); float32 FMA.
   - int8: x is first rounded to int16 with one float scale per group of 128 inputs (|error| <= the group's
     max |x| / 65534, far below the int8 weights' own rounding); each group's products are summed exactly in
     int32 (vpmaddwd), then scaled and accumulated in float32. 16 weights per sign-extension, no float convert.

   Every (n, m) pair is summed in the same order whatever M is, and x rows are prepared independently, so a
   row's result does not depend on which other rows share the call: batched decoding gives bit-identical results
   to decoding alone. Output rows are split across threads with OpenMP. K must be a multiple of 8. The
   plain-PyTorch path in qwen2vl/cpu.py is the reference these functions are tested against. */
#include <stdlib.h>

#include "gemv_common.h"

/* ---- bf16 ---------------------------------------------------------------------------------------------- */

/* Reorder each full 16-block of x as [x0 x2 .. x14 x1 x3 .. x15]: lane i of a 32-byte bf16 load holds weights
   2i (low half) and 2i+1 (high half). The tail (k % 16, a multiple of 8) keeps its natural order. */
static void deinterleave16(const float *x, float *xp, int64_t k) {
    int64_t j = 0;
    for (; j + 16 <= k; j += 16)
        for (int i = 0; i < 8; i++) {
            xp[j + i] = x[j + 2 * i];
            xp[j + 8 + i] = x[j + 2 * i + 1];
        }
    for (; j < k; j++) xp[j] = x[j];
}

static inline float dot_bf16(const uint16_t *w, const float *xp, int64_t k) {
    const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
        _mm_prefetch((const char *)(w + j) + AHEAD, _MM_HINT_NTA);
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + j));
        __m256i u = _mm256_loadu_si256((const __m256i *)(w + j + 16));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xp + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), _mm256_loadu_ps(xp + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), _mm256_loadu_ps(xp + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(u, odd)), _mm256_loadu_ps(xp + j + 24), a3);
    }
    if (j + 16 <= k) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + j));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xp + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), _mm256_loadu_ps(xp + j + 8), a1);
        j += 16;
    }
    if (j < k) { /* 8 left, natural order */
        __m128i h = _mm_loadu_si128((const __m128i *)(w + j));
        __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        a2 = _mm256_fmadd_ps(f, _mm256_loadu_ps(xp + j), a2);
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

int gemm_bf16(const uint16_t *w, const float *unused_scale, const float *bias, const float *x, float *y, int64_t n,
              int64_t k, int64_t m, int threads) {
    (void)unused_scale; /* same signature as gemm_i8 */
    float *xp = malloc(sizeof(float) * m * k);
    if (!xp) return -1;
    for (int64_t i = 0; i < m; i++) deinterleave16(x + i * k, xp + i * k, k);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t end = n - c < CHUNK ? n : c + CHUNK;
        for (int64_t i = 0; i < m; i++)
            for (int64_t r = c; r < end; r++)
                y[i * n + r] = dot_bf16(w + r * k, xp + i * k, k) + (bias ? bias[r] : 0.0f);
    }
    free(xp);
    return 0;
}

/* ---- int8 ---------------------------------------------------------------------------------------------- */

static inline float dot_i8(const int8_t *w, const int16_t *xq, const float *xs, int64_t k) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < k; g += GROUP) {
        int64_t end = k - g < GROUP ? k : g + GROUP, j = g;
        __m256i s0 = _mm256_setzero_si256(), s1 = s0;
        for (; j + 32 <= end; j += 32) {
            if (!(j & 63)) _mm_prefetch((const char *)(w + j) + AHEAD, _MM_HINT_NTA);
            __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j)));
            __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j + 16)));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + j))));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + j + 16))));
        }
        if (j + 16 <= end) {
            __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + j)));
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(xq + j))));
            j += 16;
        }
        if (j < end) { /* 8 left */
            __m128i lo = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(w + j)));
            __m128i p = _mm_madd_epi16(lo, _mm_loadu_si128((const __m128i *)(xq + j)));
            s1 = _mm256_add_epi32(s1, _mm256_inserti128_si256(_mm256_setzero_si256(), p, 0));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), _mm256_set1_ps(xs[g / GROUP]), acc);
    }
    return hsum256(acc);
}

int gemm_i8(const int8_t *w, const float *scale, const float *bias, const float *x, float *y, int64_t n,
            int64_t k, int64_t m, int threads) {
    int64_t groups = (k + GROUP - 1) / GROUP;
    int16_t *xq = malloc(sizeof(int16_t) * m * k);
    float *xs = malloc(sizeof(float) * m * groups);
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    for (int64_t i = 0; i < m; i++) quantize_x(x + i * k, xq + i * k, xs + i * groups, k);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t end = n - c < CHUNK ? n : c + CHUNK;
        for (int64_t i = 0; i < m; i++)
            for (int64_t r = c; r < end; r++)
                y[i * n + r] = dot_i8(w + r * k, xq + i * k, xs + i * groups, k) * scale[r] + (bias ? bias[r] : 0.0f);
    }
    free(xq);
    free(xs);
    return 0;
}

/* ---- 4-bit, group-quantized (AWQ / GPTQ as qwen2vl.quant.QuantLinear stores them) ---------------------------

   w (N, K/2) uint8: byte j of a row holds column 2j in its low nibble and 2j+1 in its high nibble; scales (N,
   groups) float16 bits, zeros (N, groups) int16; column j is in group j / G. The reference weight is float16:
   W = fp16((q - z) * s). Per row and group the 16 values it can take are computed once into a table (the product
   of a 5-bit integer and a float16 is exact in float32, so rounding it to float16 gives exactly the float16
   product); each weight is then a lookup in that table (two 8-lane vpermps and a blend on the index's bit 3): the
   kernel multiplies exactly the reference's weights, in float32. x is deinterleaved in 16-blocks as for bf16 (an
   8-byte load holds 8 even columns in its low nibbles, 8 odd ones in its high nibbles). G and K must be multiples
   of 32 (as in the AVX-512 variant). */

static inline __m256 q4_lookup(__m256i idx, __m256 lo, __m256 hi) {
    __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)); /* sign bit = bit 3 of the index */
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), high);
}

static inline __m256 q4_half_table(int first, uint16_t scale, int16_t zero) {
    __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(
        _mm256_setr_epi32(first, first + 1, first + 2, first + 3, first + 4, first + 5, first + 6, first + 7),
        _mm256_set1_epi32(zero)));
    __m256 s = _mm256_cvtph_ps(_mm_set1_epi16((short)scale));
    return _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_mul_ps(q, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

static inline float dot_q4(const uint8_t *w, const uint16_t *scales, const int16_t *zeros, const float *xp, int64_t k,
                           int64_t group) {
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t g = 0; g * group < k; g++) {
        __m256 lo = q4_half_table(0, scales[g], zeros[g]), hi = q4_half_table(8, scales[g], zeros[g]);
        int64_t end = (g + 1) * group < k ? (g + 1) * group : k;
        for (int64_t j = g * group; j < end; j += 32) {
            if (!(j & 127)) _mm_prefetch((const char *)(w + j / 2) + AHEAD, _MM_HINT_NTA);
            __m128i b = _mm_loadu_si128((const __m128i *)(w + j / 2)); /* 32 columns */
            __m128i e = _mm_and_si128(b, low), o = _mm_and_si128(_mm_srli_epi16(b, 4), low);
            a0 = _mm256_fmadd_ps(q4_lookup(_mm256_cvtepu8_epi32(e), lo, hi), _mm256_loadu_ps(xp + j), a0);
            a1 = _mm256_fmadd_ps(q4_lookup(_mm256_cvtepu8_epi32(o), lo, hi), _mm256_loadu_ps(xp + j + 8), a1);
            a2 = _mm256_fmadd_ps(q4_lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(e, 8)), lo, hi),
                                 _mm256_loadu_ps(xp + j + 16), a2);
            a3 = _mm256_fmadd_ps(q4_lookup(_mm256_cvtepu8_epi32(_mm_srli_si128(o, 8)), lo, hi),
                                 _mm256_loadu_ps(xp + j + 24), a3);
        }
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

int gemm_q4(const uint8_t *w, const uint16_t *scales, const int16_t *zeros, const float *bias, const float *x,
            float *y, int64_t n, int64_t k, int64_t m, int64_t group, int threads) {
    if (k % 32 || group % 32) return -2;
    int64_t groups = (k + group - 1) / group;
    float *xp = malloc(sizeof(float) * m * k);
    if (!xp) return -1;
    for (int64_t i = 0; i < m; i++) deinterleave16(x + i * k, xp + i * k, k);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t end = n - c < CHUNK ? n : c + CHUNK;
        for (int64_t i = 0; i < m; i++)
            for (int64_t r = c; r < end; r++)
                y[i * n + r] = dot_q4(w + r * (k / 2), scales + r * groups, zeros + r * groups, xp + i * k, k, group)
                               + (bias ? bias[r] : 0.0f);
    }
    free(xp);
    return 0;
}

/* 4-bit weights times x rounded to int16, for models computing in bf16 (gemv_avx512.c's gemm_q4_i16in, on AVX2):
   each 64 columns one 32-byte load of packed weights, two masks, and for the high and the low bytes of x vpmaddubsw
   over the even and the odd columns (nibble times signed byte, pairs summed: at most 2 * 15 * 128 each, their sum
   at most 7680: no saturation) widened to four-byte int32 sums by vpmaddwd; then as there. The same statement:
   Y = X' @ W'.T with W' = (q - z) * s unrounded, up to float32 summation order. */

static inline __m256i dot_nibbles(__m256i lo, __m256i hi, const int8_t *x) {
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)x)),
                                 _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(x + XCHUNK / 2))));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

static inline float dot_q4_i16(const uint8_t *w, const uint16_t *scales, const int16_t *zeros, const int8_t *xh,
                               const int8_t *xl, const float *xs, const float *zsum, int64_t k, int64_t group,
                               int64_t groups) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 a = _mm256_setzero_ps();
    float c = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        __m256 ga = _mm256_setzero_ps();
        int64_t end = (g + 1) * group < k ? (g + 1) * group : k;
        for (int64_t j = g * group; j < end; j += XCHUNK) {
            _mm_prefetch((const char *)(w + j / 2) + AHEAD, _MM_HINT_NTA);
            __m256i d = _mm256_setzero_si256();
            for (int h = 0; h < XCHUNK / 2; h += 32) { /* 64 columns */
                __m256i b = _mm256_loadu_si256((const __m256i *)(w + j / 2 + h));
                __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
                d = _mm256_add_epi32(d, _mm256_add_epi32(_mm256_slli_epi32(dot_nibbles(lo, hi, xh + j + h), 8),
                                                         dot_nibbles(lo, hi, xl + j + h)));
            }
            ga = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(xs[j / XCHUNK]), ga);
        }
        float s = _cvtsh_ss(scales[g]);
        a = _mm256_fmadd_ps(ga, _mm256_set1_ps(s), a);
        c += s * (float)zeros[g] * zsum[g];
    }
    return hsum256(a) - c;
}

int gemm_q4_i16in(const uint8_t *w, const uint16_t *scales, const int16_t *zeros, const float *bias, const float *x,
                  float *y, int64_t n, int64_t k, int64_t m, int64_t group, int threads) {
    RoundedRows rows;
    int status = round_rows_q4(x, m, k, group, &rows);
    if (status != 0) return status;
    int64_t groups = rows.groups;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t end = n - c < CHUNK ? n : c + CHUNK;
        for (int64_t i = 0; i < m; i++)
            for (int64_t r = c; r < end; r++)
                y[i * n + r] = dot_q4_i16(w + r * (k / 2), scales + r * groups, zeros + r * groups, rows.xh + i * k,
                                          rows.xl + i * k, rows.xs + i * (k / XCHUNK), rows.zsum + i * groups, k,
                                          group, groups)
                               + (bias ? bias[r] : 0.0f);
    }
    free_rows_q4(&rows);
    return 0;
}
