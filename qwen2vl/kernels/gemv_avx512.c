/* The weight-streaming products of gemv_avx2.c for x86-64 CPUs with AVX-512 (F and BW): same functions, same
   signatures, same contract (Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias[n]) for a few rows m, W as bf16 or as
   int8 with one float scale per output row, float32 arithmetic). Two differences:

   - 64-byte loads (32 bf16 or 32 int8 weights each) into 32 zmm registers;
   - each weight vector is widened once and used for up to ROWS rows of x before the next one is loaded. At
     batch 4 the AVX2 kernel widens every weight four times and becomes compute-bound; here the widening is
     paid once per weight, so a batch costs little more than one row.

   bf16 weights are widened by a shift (even weights) and a mask (odd weights) against a copy of x whose 32-blocks
   are reordered to match (evens, then odds); int8 weights are sign-extended to int16 and multiplied exactly with
   x rounded to int16 per group of GROUP inputs (the same rounding as gemv_avx2.c and
   kernels.quantize_rows_int16), summed in int32 per group, scaled and accumulated in float32.

   Every (n, m) pair is summed in the same order whatever M is and whichever rows share a pass, so batched decoding
   gives bit-identical results to decoding alone. The summation order differs from gemv_avx2.c's (16 lanes, not
   8): the two variants agree to float32 rounding, not bit for bit; each is tested against the PyTorch path. */
#include <math.h>
#include <stdlib.h>

#include "gemv_common.h"

#define ROWS 4    /* rows of x per pass over a weight row: 4 x 4 accumulators + temporaries fit 32 registers */

#define INLINE static inline __attribute__((always_inline))

/* The weights' software prefetch (gemv_common.h's AHEAD), for a batch only: measured on Zen 4 (interleaved A/B
   of builds, the 2B's shapes), one row of x streams faster without it, the hardware prefetcher alone keeping more
   reads in flight: bf16 pairs 7-25% faster (the output projection 33 -> 52 GB/s), int8 up to 14%, the 4-bit
   integer product 8-14% on the 8960-wide product, nothing slower; at four rows it is 4-27% faster with it. R, the
   x rows of the pass, is a compile-time constant where this is used: the test costs nothing. (The AVX2 variant
   keeps its prefetch: it was measured to help on the AVX2-only Zen 3.) */
#define PREFETCH_FOR_BATCH(p) \
    if (R > 1) _mm_prefetch((const char *)(p) + AHEAD, _MM_HINT_NTA)

/* The loop every product below shares: output rows split in CHUNKs over the threads; each weight row meets the x
   rows ROWS at a time, then the 1-3 left over, so that DOT's row count R is a compile-time constant in each call.
   DOT(R) is an expression over r (the weight row), i (the first x row) and R; PER_ROW sets up before it (pointers
   into the weight row), AFTER finishes the output row (bias, scale). */
#define FOR_EACH_WEIGHT_ROW(PER_ROW, DOT, AFTER)                                                                  \
    _Pragma("omp parallel for num_threads(threads) schedule(static)") for (int64_t c = 0; c < n; c += CHUNK) {   \
        int64_t end = n - c < CHUNK ? n : c + CHUNK;                                                              \
        for (int64_t r = c; r < end; r++) {                                                                       \
            PER_ROW;                                                                                              \
            int64_t i = 0;                                                                                        \
            for (; i + ROWS <= m; i += ROWS) DOT(ROWS);                                                           \
            switch (m - i) {                                                                                      \
                case 3: DOT(3); break;                                                                            \
                case 2: DOT(2); break;                                                                            \
                case 1: DOT(1); break;                                                                            \
            }                                                                                                     \
            AFTER;                                                                                                \
        }                                                                                                         \
    }
#define ADD_BIAS if (bias) for (int64_t q = 0; q < m; q++) y[q * n + r] += bias[r]
/* a 4-bit weight row r: its packed bytes, its groups' scales and zeros */
#define Q4_ROW_POINTERS                                                                                           \
    const uint8_t *wr = w + r * (k / 2);                                                                          \
    const uint16_t *sr = scales + r * groups;                                                                     \
    const int16_t *zr = zeros + r * groups

/* ---- bf16 ---------------------------------------------------------------------------------------------- */

/* Reorder each full 32-block of x as [x0 x2 .. x30 x1 x3 .. x31]: 32-bit lane i of a 64-byte bf16 load holds
   weights 2i (low half) and 2i+1 (high half). The tail (k % 32, a multiple of 8) keeps its natural order. */
static void deinterleave32(const float *x, float *xp, int64_t k) {
    int64_t j = 0;
    for (; j + 32 <= k; j += 32)
        for (int i = 0; i < 16; i++) {
            xp[j + i] = x[j + 2 * i];
            xp[j + 16 + i] = x[j + 2 * i + 1];
        }
    for (; j < k; j++) xp[j] = x[j];
}

/* y[r * ystride] = w . xp[r * k ..] for r < R (R a compile-time constant after inlining). */
INLINE void dot_bf16(const uint16_t *w, const float *xp, int64_t k, float *y, int64_t ystride, int R) {
    const __m512i odd = _mm512_set1_epi32((int)0xFFFF0000);
    __m512 a[ROWS][4];
    __m256 t[ROWS];
    for (int r = 0; r < R; r++) {
        a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
        t[r] = _mm256_setzero_ps();
    }
    int64_t j = 0;
    for (; j + 64 <= k; j += 64) {
        PREFETCH_FOR_BATCH(w + j);
        __m512i v = _mm512_loadu_si512((const void *)(w + j));
        __m512i u = _mm512_loadu_si512((const void *)(w + j + 32));
        __m512 ve = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), vo = _mm512_castsi512_ps(_mm512_and_si512(v, odd));
        __m512 ue = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), uo = _mm512_castsi512_ps(_mm512_and_si512(u, odd));
        for (int r = 0; r < R; r++) {
            const float *x = xp + r * k + j;
            a[r][0] = _mm512_fmadd_ps(ve, _mm512_loadu_ps(x), a[r][0]);
            a[r][1] = _mm512_fmadd_ps(vo, _mm512_loadu_ps(x + 16), a[r][1]);
            a[r][2] = _mm512_fmadd_ps(ue, _mm512_loadu_ps(x + 32), a[r][2]);
            a[r][3] = _mm512_fmadd_ps(uo, _mm512_loadu_ps(x + 48), a[r][3]);
        }
    }
    if (j + 32 <= k) {
        __m512i v = _mm512_loadu_si512((const void *)(w + j));
        __m512 ve = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), vo = _mm512_castsi512_ps(_mm512_and_si512(v, odd));
        for (int r = 0; r < R; r++) {
            const float *x = xp + r * k + j;
            a[r][0] = _mm512_fmadd_ps(ve, _mm512_loadu_ps(x), a[r][0]);
            a[r][1] = _mm512_fmadd_ps(vo, _mm512_loadu_ps(x + 16), a[r][1]);
        }
        j += 32;
    }
    for (; j < k; j += 8) { /* 8, 16 or 24 left, natural order */
        __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + j))), 16));
        for (int r = 0; r < R; r++) t[r] = _mm256_fmadd_ps(f, _mm256_loadu_ps(xp + r * k + j), t[r]);
    }
    for (int r = 0; r < R; r++)
        y[r * ystride] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3])))
                         + hsum256(t[r]);
}

int gemm_bf16(const uint16_t *w, const float *unused_scale, const float *bias, const float *x, float *y, int64_t n,
              int64_t k, int64_t m, int threads) {
    (void)unused_scale; /* same signature as gemm_i8 */
    float *xp = malloc(sizeof(float) * m * k);
    if (!xp) return -1;
    for (int64_t i = 0; i < m; i++) deinterleave32(x + i * k, xp + i * k, k);
#define DOT_BF16_ROWS(R) dot_bf16(wr, xp + i * k, k, y + i * n + r, n, R)
    FOR_EACH_WEIGHT_ROW(const uint16_t *wr = w + r * k, DOT_BF16_ROWS, ADD_BIAS)
#undef DOT_BF16_ROWS
    free(xp);
    return 0;
}

/* ---- int8 ---------------------------------------------------------------------------------------------- */

INLINE void dot_i8(const int8_t *w, const int16_t *xq, const float *xs, int64_t k, int64_t groups, float *y,
                   int64_t ystride, int R) {
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < k; g += GROUP) {
        int64_t end = k - g < GROUP ? k : g + GROUP, j = g;
        __m512i s[ROWS];
        for (int r = 0; r < R; r++) s[r] = _mm512_setzero_si512();
        for (; j + 32 <= end; j += 32) {
            if (!(j & 63)) PREFETCH_FOR_BATCH(w + j);
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + j)));
            for (int r = 0; r < R; r++)
                s[r] = _mm512_add_epi32(s[r], _mm512_madd_epi16(wv, _mm512_loadu_si512((const void *)(xq + r * k + j))));
        }
        for (; j < end; j += 8) { /* 8, 16 or 24 left */
            __m128i wv = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(w + j)));
            for (int r = 0; r < R; r++) {
                __m128i p = _mm_madd_epi16(wv, _mm_loadu_si128((const __m128i *)(xq + r * k + j)));
                s[r] = _mm512_add_epi32(s[r], _mm512_zextsi128_si512(p));
            }
        }
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), _mm512_set1_ps(xs[r * groups + g / GROUP]), acc[r]);
    }
    for (int r = 0; r < R; r++) y[r * ystride] = _mm512_reduce_add_ps(acc[r]);
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
#define DOT_I8_ROWS(R) dot_i8(wr, xq + i * k, xs + i * groups, k, groups, y + i * n + r, n, R)
    FOR_EACH_WEIGHT_ROW(const int8_t *wr = w + r * k, DOT_I8_ROWS,
                        for (int64_t q = 0; q < m; q++) y[q * n + r] = y[q * n + r] * scale[r] + (bias ? bias[r] : 0.0f))
#undef DOT_I8_ROWS
    free(xq);
    free(xs);
    return 0;
}

/* ---- 4-bit, group-quantized (AWQ / GPTQ as qwen2vl.quant.QuantLinear stores them) ---------------------------

   w (N, K/2) uint8: byte j of a row holds column 2j in its low nibble and 2j+1 in its high nibble; scales (N,
   groups) float16 bits, zeros (N, groups) int16; column j is in group j / G. The reference weight is float16:
   W = fp16((q - z) * s). Per row and group the 16 values it can take are computed once into a table (the product
   of a 5-bit integer and a float16 is exact in float32, so rounding it to float16 gives exactly the float16
   product), and each weight is then one table lookup (vpermps over 16 lanes): the kernel multiplies exactly the
   reference's weights, in float32. x is deinterleaved in 32-blocks as for bf16 (a 16-byte load holds 16 even
   columns in its low nibbles, 16 odd ones in its high nibbles). G and K must be multiples of 32. */

INLINE __m512 q4_table(uint16_t scale, int16_t zero) {
    __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(zero)));
    __m512 s = _mm512_cvtph_ps(_mm256_set1_epi16((short)scale));
    return _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_mul_ps(q, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

INLINE void dot_q4(const uint8_t *w, const uint16_t *scales, const int16_t *zeros, const float *xp, int64_t k,
                   int64_t group, float *y, int64_t ystride, int R) {
    const __m128i low = _mm_set1_epi8(0x0F);
    __m512 a[ROWS][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g * group < k; g++) {
        __m512 table = q4_table(scales[g], zeros[g]);
        int64_t end = (g + 1) * group < k ? (g + 1) * group : k;
        for (int64_t j = g * group; j < end; j += 32) {
            if (!(j & 127)) PREFETCH_FOR_BATCH(w + j / 2);
            __m128i b = _mm_loadu_si128((const __m128i *)(w + j / 2));
            __m512 we = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low)), table);
            __m512 wo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low)), table);
            for (int r = 0; r < R; r++) {
                const float *x = xp + r * k + j;
                a[r][0] = _mm512_fmadd_ps(we, _mm512_loadu_ps(x), a[r][0]);
                a[r][1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + 16), a[r][1]);
            }
        }
    }
    for (int r = 0; r < R; r++) y[r * ystride] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
}

int gemm_q4(const uint8_t *w, const uint16_t *scales, const int16_t *zeros, const float *bias, const float *x,
            float *y, int64_t n, int64_t k, int64_t m, int64_t group, int threads) {
    if (k % 32 || group % 32) return -2;
    int64_t groups = (k + group - 1) / group;
    float *xp = malloc(sizeof(float) * m * k);
    if (!xp) return -1;
    for (int64_t i = 0; i < m; i++) deinterleave32(x + i * k, xp + i * k, k);
#define DOT_Q4_ROWS(R) dot_q4(wr, sr, zr, xp + i * k, k, group, y + i * n + r, n, R)
    FOR_EACH_WEIGHT_ROW(Q4_ROW_POINTERS, DOT_Q4_ROWS, ADD_BIAS)
#undef DOT_Q4_ROWS
    free(xp);
    return 0;
}

/* ---- bf16 weights times bf16-rounded inputs (CPUs with AVX-512 BF16) ------------------------------------------

   Where the model computes its products in bf16 (qwen2vl.machine chose, or was told, "bf16"), the decode step's
   few-row products take x rounded to bf16 (to nearest even, as torch's .to(torch.bfloat16)) and multiply pairs of
   bf16 with vdpbf16ps: each product of two bf16 is exact in float32 and the sums are float32, so the result is the
   float32 product of the rounded x and W up to summation order (kernels.gemm_bf16(..., inputs="bf16") states it
   in PyTorch). Against the float32-input kernel above it halves the bytes of x read per weight and needs no
   widening: 32 weights per instruction and row. The instruction set is asked for on these functions only, so the
   rest of this file still runs on AVX-512 CPUs without BF16; Python calls them only where the CPU has it.
   Rows are summed in the same order whatever M is, as above. */

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* float32 -> bf16 bits, rounded to nearest even as torch's .to(torch.bfloat16); a NaN stays a (quiet) NaN */
INLINE uint16_t bf16_round(float v) {
    uint32_t b;
    __builtin_memcpy(&b, &v, sizeof b);
    return (b & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)((b >> 16) | 0x40u)
                                           : (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

/* bf16_round on 16 floats: to nearest even, denormals kept, a NaN quiet (vcvtneps2bf16 would flush denormals) */
INLINE __m256i bf16_round16(__m512 v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i even = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(b, 16),
                                                                                      _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, even), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

BF16_TARGET INLINE __mmask32 first_n(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << n) - 1u); }

BF16_TARGET INLINE void dot_bf16_pairs(const uint16_t *w, const uint16_t *xb, int64_t k, float *y, int64_t ystride,
                                       int R) {
    __m512 a[ROWS][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 64 <= k; j += 64) {
        PREFETCH_FOR_BATCH(w + j);
        __m512bh v = (__m512bh)_mm512_loadu_si512((const void *)(w + j));
        __m512bh u = (__m512bh)_mm512_loadu_si512((const void *)(w + j + 32));
        for (int r = 0; r < R; r++) {
            const uint16_t *x = xb + r * k + j;
            a[r][0] = _mm512_dpbf16_ps(a[r][0], v, (__m512bh)_mm512_loadu_si512((const void *)x));
            a[r][1] = _mm512_dpbf16_ps(a[r][1], u, (__m512bh)_mm512_loadu_si512((const void *)(x + 32)));
        }
    }
    for (int half = 0; j < k; j += 32, half++) { /* under 64 left (k % 8 == 0, so pairs never split): masked */
        __mmask32 m = first_n(k - j);
        __m512bh v = (__m512bh)_mm512_maskz_loadu_epi16(m, w + j);
        for (int r = 0; r < R; r++)
            a[r][half] = _mm512_dpbf16_ps(a[r][half], v, (__m512bh)_mm512_maskz_loadu_epi16(m, xb + r * k + j));
    }
    for (int r = 0; r < R; r++) y[r * ystride] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
}

BF16_TARGET int gemm_bf16_bf16in(const uint16_t *w, const float *unused_scale, const float *bias, const float *x,
                                 float *y, int64_t n, int64_t k, int64_t m, int threads) {
    (void)unused_scale; /* same signature as gemm_bf16 */
    uint16_t *xb = malloc(sizeof(uint16_t) * m * k);
    if (!xb) return -1;
    for (int64_t i = 0; i < m * k; i++) xb[i] = bf16_round(x[i]);
#define DOT_BF16_PAIRS_ROWS(R) dot_bf16_pairs(wr, xb + i * k, k, y + i * n + r, n, R)
    FOR_EACH_WEIGHT_ROW(const uint16_t *wr = w + r * k, DOT_BF16_PAIRS_ROWS, ADD_BIAS)
#undef DOT_BF16_PAIRS_ROWS
    free(xb);
    return 0;
}

/* 4-bit weights as bf16 pairs (AVX-512 BF16), for models computing in bf16: per row and group the 16 values of
   the reference weight float16((q - z) * s) rounded to bf16 form a table, each 64 columns are two vpermw lookups
   (32 even columns from the low nibbles, 32 odd from the high ones) and each x row two vdpbf16ps against x rounded
   to bf16 and reordered per 64-block to match (the 32 even columns, then the 32 odd ones). The group size and K
   must be multiples of 64. */

BF16_TARGET INLINE void dot_q4_pairs(const uint8_t *w, const uint16_t *scales, const int16_t *zeros,
                                     const uint16_t *xb, int64_t k, int64_t group, float *y, int64_t ystride, int R) {
    const __m512i low = _mm512_set1_epi16(0x0F);
    __m512 a[ROWS][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g * group < k; g++) {
        __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(q4_table(scales[g], zeros[g])));
        int64_t end = (g + 1) * group < k ? (g + 1) * group : k;
        for (int64_t j = g * group; j < end; j += 64) {
            PREFETCH_FOR_BATCH(w + j / 2);
            __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + j / 2)));
            __m512bh we = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(b, low), table);
            __m512bh wo = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
            for (int r = 0; r < R; r++) {
                const uint16_t *x = xb + r * k + j;
                a[r][0] = _mm512_dpbf16_ps(a[r][0], we, (__m512bh)_mm512_loadu_si512((const void *)x));
                a[r][1] = _mm512_dpbf16_ps(a[r][1], wo, (__m512bh)_mm512_loadu_si512((const void *)(x + 32)));
            }
        }
    }
    for (int r = 0; r < R; r++) y[r * ystride] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
}

BF16_TARGET int gemm_q4_bf16in(const uint8_t *w, const uint16_t *scales, const int16_t *zeros, const float *bias,
                               const float *x, float *y, int64_t n, int64_t k, int64_t m, int64_t group, int threads) {
    if (k % 64 || group % 64) return -2;
    int64_t groups = (k + group - 1) / group;
    uint16_t *xb = malloc(sizeof(uint16_t) * m * k);
    if (!xb) return -1;
    for (int64_t i = 0; i < m * k; i += 64) /* per 64-block: even columns, then odd ones */
        for (int t = 0; t < 32; t++) {
            xb[i + t] = bf16_round(x[i + 2 * t]);
            xb[i + 32 + t] = bf16_round(x[i + 2 * t + 1]);
        }
#define DOT_Q4_PAIRS_ROWS(R) dot_q4_pairs(wr, sr, zr, xb + i * k, k, group, y + i * n + r, n, R)
    FOR_EACH_WEIGHT_ROW(Q4_ROW_POINTERS, DOT_Q4_PAIRS_ROWS, ADD_BIAS)
#undef DOT_Q4_PAIRS_ROWS
    free(xb);
    return 0;
}

/* 4-bit weights times x rounded to int16 (AVX-512 VNNI), for models computing in bf16: x rounded as for the int8
   product (gemv_common.h's quantize_x_q4: per 128 inputs, |error| <= 1/65024 of their largest) and split into two
   signed bytes; each 128 columns one 64-byte load of packed weights, two masks for the nibbles, and per x row four
   vpdpbusd (unsigned nibble times signed byte, four-byte sums, for the high and the low bytes), the high sums
   shifted by 8 and added (exact in int32), one convert and one FMA by the chunk's input scale; per group, times the
   weight scale s; the zero point's term s * z * zsum is taken off 16 groups at a time. The weight multiplied is
   (q - z) * s exactly, not rounded to float16: Y = X' @ W'.T up to float32 summation order
   (kernels.Q4Product(..., inputs="int16") states it in PyTorch). No table lookups and no per-weight conversion:
   the fastest 4-bit product here. Compiled for VNNI here only; Python calls it only where the CPU has it. Rows
   are summed in the same order whatever M is, as above. Tried and dropped (interleaved A/B, 2B shapes): two weight
   rows per pass sharing the loads of x, and the task's rows taken 2048 columns at a time so that x stays in L1,
   both faster from cache and slower from memory (the weights are then no longer one sequential stream); x
   rounded to int8 instead of split into two bytes, 15% faster but drifting 1.4x more than the reference in bf16. */

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,f16c")))

VNNI_TARGET INLINE __m512i dot_nibbles(__m512i lo, __m512i hi, const int8_t *x) {
    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512((const void *)x));
    return _mm512_dpbusd_epi32(d, hi, _mm512_load_si512((const void *)(x + XCHUNK / 2)));
}

/* Weight row w's dot products with the rounded x rows i..i+R as integers, one chunk at column j: 16 int32 lanes */
VNNI_TARGET INLINE void q4_chunk(const uint8_t *w, const RoundedRows *x, int64_t i, int64_t k, int64_t j, __m512i *d,
                                 int R) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    PREFETCH_FOR_BATCH(w + j / 2);
    __m512i b = _mm512_loadu_si512((const void *)(w + j / 2));
    __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
    for (int r = 0; r < R; r++) {
        int64_t at = (i + r) * k + j; /* 64-byte aligned (round_rows_q4) */
        d[r] = _mm512_add_epi32(_mm512_slli_epi32(dot_nibbles(lo, hi, x->xh + at), 8), dot_nibbles(lo, hi, x->xl + at));
    }
}

/* A weight row's start: its scales as floats into sf, and a[r] = -(s * z * zsum) summed 16 groups a step */
VNNI_TARGET INLINE void q4_start(const uint16_t *scales, const int16_t *zeros, const RoundedRows *x, int64_t i,
                                 int64_t groups, float *sf, __m512 *a, int R) {
    for (int r = 0; r < R; r++) a[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 m = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1u);
        __m512 s = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(m, scales + g)));
        __m256i z = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(m, zeros + g)); /* (AVX-512 BW, not VL) */
        __m512 sz = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(z)));
        _mm512_mask_storeu_ps(sf + g, m, s);
        for (int r = 0; r < R; r++)
            a[r] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(m, x->zsum + (i + r) * groups + g), a[r]);
    }
}

/* Groups of one chunk (the official releases' 128): groups g0..g1 of a weight row, each one FMA by the chunk's
   input scale times the group's weight scale */
VNNI_TARGET INLINE void q4_groups_of_one_chunk(const uint8_t *w, const float *sf, const RoundedRows *x, int64_t i,
                                               int64_t k, int64_t g0, int64_t g1, __m512 *a, int R) {
    for (int64_t g = g0; g < g1; g++) {
        __m512i d[ROWS];
        q4_chunk(w, x, i, k, g * XCHUNK, d, R);
        for (int r = 0; r < R; r++)
            a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_set1_ps(x->xs[(i + r) * (k / XCHUNK) + g] * sf[g]),
                                   a[r]);
    }
}

/* Any group size (a multiple of XCHUNK): per chunk one FMA by the input scale, per group one by the weight scale */
VNNI_TARGET INLINE void q4_groups(const uint8_t *w, const float *sf, const RoundedRows *x, int64_t i, int64_t k,
                                  int64_t group, int64_t groups, __m512 *a, int R) {
    for (int64_t g = 0; g < groups; g++) {
        __m512 ga[ROWS];
        for (int r = 0; r < R; r++) ga[r] = _mm512_setzero_ps();
        int64_t end = (g + 1) * group < k ? (g + 1) * group : k;
        for (int64_t j = g * group; j < end; j += XCHUNK) {
            __m512i d[ROWS];
            q4_chunk(w, x, i, k, j, d, R);
            for (int r = 0; r < R; r++)
                ga[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_set1_ps(x->xs[(i + r) * (k / XCHUNK) + j / XCHUNK]),
                                        ga[r]);
        }
        __m512 sv = _mm512_set1_ps(sf[g]);
        for (int r = 0; r < R; r++) a[r] = _mm512_fmadd_ps(ga[r], sv, a[r]);
    }
}

VNNI_TARGET INLINE void dot_q4_i16(const uint8_t *w, const uint16_t *scales, const int16_t *zeros,
                                   const RoundedRows *x, int64_t i, int64_t k, int64_t group, int64_t groups, float *y,
                                   int64_t ystride, int R) {
    float sf[groups];
    __m512 a[ROWS];
    q4_start(scales, zeros, x, i, groups, sf, a, R);
    if (group == XCHUNK)
        q4_groups_of_one_chunk(w, sf, x, i, k, 0, groups, a, R);
    else
        q4_groups(w, sf, x, i, k, group, groups, a, R);
    for (int r = 0; r < R; r++) y[r * ystride] = _mm512_reduce_add_ps(a[r]);
}

VNNI_TARGET int gemm_q4_i16in(const uint8_t *w, const uint16_t *scales, const int16_t *zeros, const float *bias,
                              const float *x, float *y, int64_t n, int64_t k, int64_t m, int64_t group, int threads) {
    RoundedRows rows;
    int status = round_rows_q4(x, m, k, group, &rows);
    if (status != 0) return status;
    int64_t groups = rows.groups;
#define DOT_Q4_I16_ROWS(R) dot_q4_i16(wr, sr, zr, &rows, i, k, group, groups, y + i * n + r, n, R)
    FOR_EACH_WEIGHT_ROW(Q4_ROW_POINTERS, DOT_Q4_I16_ROWS, ADD_BIAS)
#undef DOT_Q4_I16_ROWS
    free_rows_q4(&rows);
    return 0;
}

/* ---- attention over bf16 rows (AVX-512 BF16), for the vision tower under bf16 products -----------------------

   out[i, h] = softmax(scale * q[i, h] . k[j, h] over j) . v[j, h] for nq query rows i and nk key rows j of one
   segment, heads h consecutive within a row (element e of row i, head h at q[i * qs + h * d + e]; likewise k, v,
   out with their row strides). The scores are float32 sums of exact bf16 products (vdpbf16ps), their exponentials
   (the row's maximum subtracted) float32, rounded to bf16 for the product with v (float32 sums), which is divided
   by the float32 sum of the exponentials and rounded to bf16: the arithmetic of torch's CPU flash attention on bf16
   (scaled_dot_product_attention), but with the scores kept whole instead of tiled, so the products run at the
   instruction's rate: torch's kernel reaches 130-165 GFLOP/s on the 2B's vision shapes on Zen 5, a sixth of its
   GEMM rate, this one 3.1-3.4x that (benchmarks/bench_vision_ops.py). Each (row, head) is computed alone, the same
   way whatever rows and heads share the call, so any split of a segment's rows or heads gives the same bits.

   Layouts, per head: k packed in blocks of 16 keys as bf16 pairs along d (a vdpbf16ps of a broadcast pair of q
   gives 16 scores), v packed in pairs of keys along d (a broadcast pair of probabilities times 16 columns); both
   zero-padded (d to even and to a multiple of 16, the keys to a multiple of 16), so any d and nk work. */

#define QROWS 8 /* query rows per task: their scores share each load of k */

BF16_TARGET INLINE __m512 exp512(__m512 x) {
    /* e^x as 2^n e^r, |r| <= ln2 / 2, degree-6 Taylor (relative error ~1e-7); x clamped to [-104, 89], where the
       result is already 0 (scalef rounds through the denormals) or inf, as float32's expf; a NaN stays NaN (vmaxps
       and vminps return their second operand when either is NaN) */
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* scores s[r][j] = scale * q_r . k_j for R query rows (qp: R rows of dp pairs) against all 16-key blocks */
BF16_TARGET INLINE void scores_rows(const uint32_t *qp, const uint16_t *kp, int64_t blocks, int64_t dp, float scale,
                                    float *s, int64_t sstride, int R) {
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t b = 0; b < blocks; b++) {
        __m512 a[QROWS];
        for (int r = 0; r < R; r++) a[r] = _mm512_setzero_ps();
        const uint16_t *kb = kp + b * dp * 32;
        for (int64_t p = 0; p < dp; p++) {
            __m512bh kv = (__m512bh)_mm512_loadu_si512((const void *)(kb + p * 32));
            for (int r = 0; r < R; r++)
                a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32((int)qp[r * dp + p]), kv);
        }
        for (int r = 0; r < R; r++) _mm512_storeu_ps(s + r * sstride + b * 16, _mm512_mul_ps(a[r], sc));
    }
}

/* o[r] = sum_j p[r][j] v_j over key pairs, for R <= 4 rows and NV <= 6 16-column vectors of d from vector c */
BF16_TARGET INLINE void weigh_rows(const uint32_t *pp, int64_t pstride, const uint16_t *vp, int64_t pairs, int64_t dv,
                                   int64_t c, float *o, int64_t ostride, int R, int NV) {
    __m512 a[4][6];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NV; t++) a[r][t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < pairs; j++) {
        const uint16_t *vj = vp + (j * dv + c) * 32;
        __m512bh w[6];
        for (int t = 0; t < NV; t++) w[t] = (__m512bh)_mm512_loadu_si512((const void *)(vj + t * 32));
        for (int r = 0; r < R; r++) {
            __m512bh b = (__m512bh)_mm512_set1_epi32((int)pp[r * pstride + j]);
            for (int t = 0; t < NV; t++) a[r][t] = _mm512_dpbf16_ps(a[r][t], b, w[t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NV; t++) _mm512_storeu_ps(o + r * ostride + (c + t) * 16, a[r][t]);
}

BF16_TARGET int attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t nq,
                               int64_t nk, int64_t heads, int64_t d, int64_t qs, int64_t ks, int64_t vs, int64_t os,
                               float scale, int threads) {
    const int64_t dp = (d + 1) / 2, dv = (d + 15) / 16, blocks = (nk + 15) / 16, keys = blocks * 16, pairs = keys / 2;
    /* one head at a time (a head's packed k and v: 4 bytes a key and dimension, 21 MB for a 65k-patch image): k as
       [block][pair][16 keys][2], v as [key pair][vector][16 columns][2]; the padding is never written, so stays 0 */
    uint16_t *kp = calloc((size_t)(blocks * dp * 32), sizeof(uint16_t));
    uint16_t *vp = calloc((size_t)(pairs * dv * 32), sizeof(uint16_t));
    int status = 0;
    if (!kp || !vp) {
        free(kp);
        free(vp);
        return -1;
    }
    const int64_t tiles = (nq + QROWS - 1) / QROWS;
    _Pragma("omp parallel num_threads(threads)") {
        uint32_t *qp = malloc(sizeof(uint32_t) * QROWS * dp);
        float *s = malloc(sizeof(float) * QROWS * keys);
        uint32_t *pp = malloc(sizeof(uint32_t) * QROWS * pairs); /* bf16 probabilities, in pairs of keys */
        float *o = malloc(sizeof(float) * QROWS * dv * 16);
        const int ok = qp && s && pp && o;
        if (!ok) {
#pragma omp atomic write
            status = -1;
        }
        uint16_t *p16 = (uint16_t *)pp, *q16 = (uint16_t *)qp;
        /* every thread meets every loop below (their barriers), one without buffers idle */
        for (int64_t h = 0; h < heads; h++) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < nk; j++) {
                const uint16_t *kj = k + j * ks + h * d, *vj = v + j * vs + h * d;
                for (int64_t e = 0; e < d; e++) {
                    kp[((j / 16) * dp + e / 2) * 32 + (j % 16) * 2 + e % 2] = kj[e];
                    vp[((j / 2) * dv + e / 16) * 32 + (e % 16) * 2 + j % 2] = vj[e];
                }
            }
#pragma omp for schedule(static)
            for (int64_t tile = 0; tile < tiles; tile++) {
                if (!ok) continue;
                const int64_t i0 = tile * QROWS;
                const int R = nq - i0 < QROWS ? (int)(nq - i0) : QROWS;
                float inv[QROWS]; /* 1 / each row's sum of exponentials */
                for (int r = 0; r < R; r++) {
                    const uint16_t *qi = q + (i0 + r) * qs + h * d;
                    for (int64_t e = 0; e < 2 * dp; e++) q16[r * 2 * dp + e] = e < d ? qi[e] : 0;
                }
                const uint16_t *kh = kp, *vh = vp;
                switch (R) {
                    case QROWS: scores_rows(qp, kh, blocks, dp, scale, s, keys, QROWS); break;
                    default:
                        for (int r = 0; r < R; r++) scores_rows(qp + r * dp, kh, blocks, dp, scale, s + r * keys, keys, 1);
                }
                for (int r = 0; r < R; r++) { /* softmax over the nk real keys; the padding's probability is 0 */
                    float *sr = s + r * keys;
                    __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
                    for (int64_t j = 0; j < keys; j += 16)
                        top = _mm512_mask_max_ps(top, first_n(nk - j > 16 ? 16 : nk - j), top, _mm512_loadu_ps(sr + j));
                    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
                    for (int64_t j = 0; j < keys; j += 16) {
                        __m512 e = _mm512_maskz_mov_ps(first_n(nk - j > 16 ? 16 : nk - j),
                                                       exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m)));
                        _mm512_storeu_ps(sr + j, e);
                        sum = _mm512_add_ps(sum, e);
                    }
                    inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
                    for (int64_t j = 0; j < keys; j += 16)
                        _mm256_storeu_si256((__m256i *)(p16 + r * 2 * pairs + j), bf16_round16(_mm512_loadu_ps(sr + j)));
                }
                /* d's vectors in as few passes over the probabilities as 6 vectors a pass allow, evenly split */
                const int64_t passes = (dv + 5) / 6, per = (dv + passes - 1) / passes;
                for (int r0 = 0; r0 < R; r0 += 4) {
                    const int rr = R - r0 < 4 ? R - r0 : 4;
                    for (int64_t c = 0; c < dv; c += per) {
                        const int nv = dv - c < per ? (int)(dv - c) : (int)per;
#define WEIGH(RR, NV) weigh_rows(pp + r0 * pairs, pairs, vh, pairs, dv, c, o + r0 * dv * 16, dv * 16, RR, NV)
#define WEIGH_NV(RR)                 \
    switch (nv) {                    \
        case 6: WEIGH(RR, 6); break; \
        case 5: WEIGH(RR, 5); break; \
        case 4: WEIGH(RR, 4); break; \
        case 3: WEIGH(RR, 3); break; \
        case 2: WEIGH(RR, 2); break; \
        default: WEIGH(RR, 1);       \
    }
                        switch (rr) {
                            case 4: WEIGH_NV(4); break;
                            case 3: WEIGH_NV(3); break;
                            case 2: WEIGH_NV(2); break;
                            default: WEIGH_NV(1);
                        }
#undef WEIGH_NV
#undef WEIGH
                    }
                }
                for (int r = 0; r < R; r++) {
                    uint16_t *oi = out + (i0 + r) * os + h * d;
                    for (int64_t e = 0; e < d; e++) oi[e] = bf16_round(o[r * dv * 16 + e] * inv[r]);
                }
            }
        }
        free(qp);
        free(s);
        free(pp);
        free(o);
    }
    free(kp);
    free(vp);
    return status;
}

/* ---- the vision tower's rotary under bf16 products (AVX-512 BF16) ----------------------------------------------

   For each row r of a qkv product (rows, 3, heads, dim) in bf16 (row stride `stride`), q and k rotated as
   `apply_rotary_pos_emb_vision` does on bf16 (upcast to float32, x * cos + rotate_half(x) * sin, back to bf16), into
   q_out, k_out (rows, heads, dim) contiguous: the same float32 operations in the same order (no fused multiply-add),
   so the same bits, in one pass instead of eight tensor operations. cos, sin: (rows, dim) float32. */
INLINE __m512 bf16_widen16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

BF16_TARGET INLINE __m512 bf16_load16(const uint16_t *p, __mmask16 m) {
    return bf16_widen16(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16((__mmask32)m, p))); /* no AVX512VL needed */
}

BF16_TARGET void rope_bf16(const uint16_t *qkv, int64_t stride, const float *cos, const float *sin, uint16_t *q_out,
                           uint16_t *k_out, int64_t rows, int64_t heads, int64_t dim, int threads) {
    const int64_t half = dim / 2;
    _Pragma("omp parallel for num_threads(threads) schedule(static)") for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * dim, *s = sin + r * dim;
        for (int64_t which = 0; which < 2; which++) {
            for (int64_t h = 0; h < heads; h++) {
                const uint16_t *x = qkv + r * stride + (which * heads + h) * dim;
                uint16_t *y = (which ? k_out : q_out) + (r * heads + h) * dim;
                for (int64_t j = 0; j < half; j += 16) {
                    const __mmask16 m = half - j >= 16 ? 0xFFFF : (__mmask16)((1u << (half - j)) - 1u);
                    __m512 a = bf16_load16(x + j, m), b = bf16_load16(x + half + j, m);
                    __m512 lo = _mm512_sub_ps(_mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, c + j)),
                                              _mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, s + j)));
                    __m512 hi = _mm512_add_ps(_mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, c + half + j)),
                                              _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, s + half + j)));
                    _mm512_mask_storeu_epi16(y + j, m, _mm512_castsi256_si512(bf16_round16(lo)));
                    _mm512_mask_storeu_epi16(y + half + j, m, _mm512_castsi256_si512(bf16_round16(hi)));
                }
            }
        }
    }
}
