/* The small float32 operations around the matrix products of a decode step, one call each instead of 6-8 torch
   operations (each of which costs microseconds of dispatch for a few thousand numbers).

   Same arithmetic as the PyTorch forms in qwen2vl/model/layers.py, which the tests compare against:
   - rms_norm:  y = w * (x * 1 / sqrt(mean(x^2) + eps))        (transformers Qwen2RMSNorm, float32)
   - rope:      x = x * cos + rotate_half(x) * sin, in place     (apply_multimodal_rotary_pos_emb)
   - decode_attention: one new token per sequence written into the KV cache, then attention over the cache
     (F.scaled_dot_product_attention with a boolean mask, grouped-query)
   Rows are independent, so results do not depend on how many rows share a call. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "gemv_common.h" /* hsum256 */

void rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        double ss = 0.0; /* at least as precise as torch's float32 reduction */
        for (int64_t j = 0; j < n; j++) ss += (double)xr[j] * xr[j];
        float inv = 1.0f / sqrtf((float)(ss / n) + eps);
        for (int64_t j = 0; j < n; j++) yr[j] = w[j] * (xr[j] * inv);
    }
}

/* x: rows of `heads` vectors of `dim` (contiguous), cos/sin: one `dim` vector per row. */
void rope(float *x, const float *cos, const float *sin, int64_t rows, int64_t heads, int64_t dim) {
    int64_t half = dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * dim, *s = sin + r * dim;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + (r * heads + h) * dim;
            for (int64_t j = 0; j < half; j++) {
                float a = v[j], b = v[j + half];
                v[j] = a * c[j] - b * s[j];
                v[j + half] = b * c[j + half] + a * s[j + half];
            }
        }
    }
}

/* One decode step's attention, for every sequence b and head h: the new key and value (k_new, v_new: (B, KVH, D))
   go to slot pos[b] of cache row rows[b] (ck, cv: (rows, KVH, max_len, D), contiguous; rows NULL: row b), then
   out[b, h] = softmax(scale * q[b, h] . K[t]) @ V[t] over t = 0..pos[b] of that row's head h / (H / KVH), where
   mask[b, t] (mask: bytes with row stride mask_stride, or NULL: every slot), as F.scaled_dot_product_attention
   computes it in float32: scores, their maximum subtracted, exp, sum, weighted sum of values, one division. The
   layouts are a projection's output viewed per head: q, out (B, H, D). Heads run in parallel. */
static inline float dot8(const float *a, const float *b, int64_t n) { /* n % 8 == 0 */
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    if (j < n) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    return hsum256(_mm256_add_ps(s0, s1));
}

int decode_attention(const float *q, const float *k_new, const float *v_new, float *ck, float *cv, float *out,
                     int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t max_len, const int64_t *pos,
                     const int64_t *rows, const uint8_t *mask, int64_t mask_stride, float scale, int threads) {
    int64_t group = heads / kv_heads, longest = 0;
    for (int64_t b = 0; b < batch; b++) {
        int64_t row = rows ? rows[b] : b;
        longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t at = ((row * kv_heads + h) * max_len + pos[b]) * dim;
            __builtin_memcpy(ck + at, k_new + (b * kv_heads + h) * dim, sizeof(float) * dim);
            __builtin_memcpy(cv + at, v_new + (b * kv_heads + h) * dim, sizeof(float) * dim);
        }
    }
    float *scores = malloc(sizeof(float) * batch * heads * longest);
    if (!scores) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < batch * heads; bh++) {
        int64_t b = bh / heads, len = pos[b] + 1, kvh = (rows ? rows[b] : b) * kv_heads + (bh % heads) / group;
        const float *qv = q + bh * dim, *K = ck + kvh * max_len * dim, *V = cv + kvh * max_len * dim;
        const uint8_t *keep = mask ? mask + b * mask_stride : NULL;
        float *s = scores + bh * longest, *o = out + bh * dim, top = -INFINITY;
        for (int64_t t = 0; t < len; t++) {
            s[t] = keep && !keep[t] ? -INFINITY : dot8(qv, K + t * dim, dim) * scale;
            top = s[t] > top ? s[t] : top;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < dim; j++) o[j] = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            if (s[t] == -INFINITY) continue;
            float p = expf(s[t] - top);
            sum += p;
            const float *vt = V + t * dim;
            for (int64_t j = 0; j < dim; j++) o[j] += p * vt[j];
        }
        float inv = 1.0f / sum;
        for (int64_t j = 0; j < dim; j++) o[j] *= inv;
    }
    free(scores);
    return 0;
}

/* ---- weight quantization at load: the PyTorch statements are qwen2vl.cpu.quantize_int8 and
   qwen2vl.quant.rtn.quantize_rtn, which the tests compare bit for bit. One row at a time, rows in parallel; w is
   bf16 (`bf16` != 0) or float32, row-major (n, k). Divisions stay divisions and rounding is nearbyintf (nearest,
   ties to even, as torch.round), so every value is the one PyTorch computes. */

/* Row r of w (bf16 when `bf16`, else float32) as float32, exactly. */
static void row_as_float(const void *w, int bf16, int64_t r, int64_t k, float *out) {
    if (bf16) {
        const uint16_t *src = (const uint16_t *)w + r * k;
        uint32_t *bits = (uint32_t *)out;
        for (int64_t j = 0; j < k; j++) bits[j] = (uint32_t)src[j] << 16;
    } else {
        __builtin_memcpy(out, (const float *)w + r * k, (size_t)k * sizeof(float));
    }
}

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* The float16 nearest to x >= 0 (ties to even), as a float: torch's .to(torch.float16) of a float32. */
static float nearest_half(float x) {
    if (!(x < 65520.0f)) return x != x ? x : INFINITY; /* NaN stays NaN; 65520 and above round to inf */
    if (x < 6.103515625e-05f) return nearbyintf(x * 16777216.0f) / 16777216.0f; /* subnormal: steps of 2^-24 */
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    u = (u + 0xFFFu + ((u >> 13) & 1u)) & ~0x1FFFu; /* 23 -> 10 mantissa bits, ties to even */
    float r;
    __builtin_memcpy(&r, &u, 4);
    return r;
}

/* The float16 bits of x, a value float16 represents exactly (nearest_half's results). */
static uint16_t half_bits(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    uint32_t e = (u >> 23) & 0xFF, m = u & 0x7FFFFF;
    if (e == 255) return (uint16_t)(0x7C00u | (m ? 0x200u : 0u)); /* inf, NaN */
    if (e < 113) return (uint16_t)(x * 16777216.0f);             /* subnormal: x / 2^-24 */
    return (uint16_t)(((e - 112) << 10) | (m >> 13));
}

/* Symmetric per-row int8: scale = max(max|w|, 1e-12) / 127, q = clamp(round(w / scale), -127, 127).
   amax_only: write each row's max|w| into `scale` and stop (tensor parallelism reduces it across ranks first);
   given_amax: take the rows' max|w| from `scale` instead of computing it. Returns 0, or -1 out of memory. */
int quantize_int8_rows(const void *w, int bf16, int8_t *q, float *scale, int64_t n, int64_t k, int amax_only,
                       int given_amax, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *row = malloc((size_t)(k > 0 ? k : 1) * sizeof(float));
        if (!row) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (!row) continue;
            row_as_float(w, bf16, r, k, row);
            float amax = 0.0f;
            if (given_amax) {
                amax = scale[r];
            } else {
#pragma omp simd reduction(max : amax)
                for (int64_t j = 0; j < k; j++) {
                    float a = fabsf(row[j]);
                    amax = a > amax ? a : amax;
                }
            }
            if (amax_only) {
                scale[r] = amax;
                continue;
            }
            float s = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
            scale[r] = s;
            int8_t *qr = q + r * k;
#pragma omp simd
            for (int64_t j = 0; j < k; j++) qr[j] = (int8_t)clampf(nearbyintf(row[j] / s), -127.0f, 127.0f);
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* Group-wise asymmetric 4-bit (`--quantize int4`): per row and group of `group` inputs (the last may be shorter),
   lo = min(min w, 0), hi = max(max w, 0), s = max(float16((hi - lo) / 15), 2^-24), z = clamp(round(-lo / s), 0, 15),
   q = clamp(round(w / s) + z, 0, 15); packed two per byte, low nibble first (QuantLinear's layout, a zero padding
   nibble when k is odd). scales: float16 bits (n, groups), zeros int16 (n, groups). Returns 0, or -1 out of memory. */
int quantize_q4_rows(const void *w, int bf16, uint8_t *packed, uint16_t *scales, int16_t *zeros, int64_t n,
                     int64_t k, int64_t group, int threads) {
    int64_t groups = (k + group - 1) / group, bytes = (k + 1) / 2;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *row = malloc((size_t)(k + 1) * sizeof(float));
        uint8_t *qs = malloc((size_t)(k + 1));
        if (!row || !qs) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (!row || !qs) continue;
            row_as_float(w, bf16, r, k, row);
            qs[k] = 0; /* the padding nibble of an odd k */
            for (int64_t g = 0; g < groups; g++) {
                int64_t first = g * group, len = (first + group < k ? first + group : k) - first;
                const float *v = row + first;
                float lo = 0.0f, hi = 0.0f;
#pragma omp simd reduction(min : lo) reduction(max : hi)
                for (int64_t j = 0; j < len; j++) {
                    lo = v[j] < lo ? v[j] : lo;
                    hi = v[j] > hi ? v[j] : hi;
                }
                float s = nearest_half((hi - lo) / 15.0f);
                s = s > 5.9604644775390625e-08f ? s : 5.9604644775390625e-08f; /* at least 2^-24 */
                float z = clampf(nearbyintf(-lo / s), 0.0f, 15.0f);
                scales[r * groups + g] = half_bits(s);
                zeros[r * groups + g] = (int16_t)z;
                uint8_t *qg = qs + first;
#pragma omp simd
                for (int64_t j = 0; j < len; j++) qg[j] = (uint8_t)clampf(nearbyintf(v[j] / s) + z, 0.0f, 15.0f);
            }
            uint8_t *out = packed + r * bytes;
            for (int64_t j = 0; j < bytes; j++) out[j] = (uint8_t)(qs[2 * j] | (qs[2 * j + 1] << 4));
        }
        free(row);
        free(qs);
    }
    return failed ? -1 : 0;
}

/* float16 bits -> float, exactly. */
static float half_value(uint16_t h) {
    uint32_t e = (h >> 10) & 31, m = h & 1023, sign = (uint32_t)(h >> 15) << 31, u;
    if (e == 0) {
        float v = (float)m / 16777216.0f; /* zero or subnormal: m * 2^-24 */
        return sign ? -v : v;
    }
    u = sign | (e == 31 ? 0x7F800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

/* bf16 bits of x, nearest with ties to even (torch's .to(torch.bfloat16)); NaN stays a quiet NaN. */
static inline uint16_t bf16_bits(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* 4-bit weights in QuantLinear's layout -> rows of the reference weight float16(float16(q - z) * s) (as
   QuantLinear.dequantize_stored), stored as float32 (out_bf16 == 0, exact) or rounded to bf16 (!= 0): the weight a
   many-row product multiplies. Per row and group, the 16 values a nibble can take are formed once. */
void dequantize_q4_rows(const uint8_t *packed, const uint16_t *scales, const int16_t *zeros, void *out, int out_bf16,
                        int64_t n, int64_t k, int64_t group, int threads) {
    int64_t groups = (k + group - 1) / group, bytes = (k + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = packed + r * bytes;
        for (int64_t g = 0; g < groups; g++) {
            float s = half_value(scales[r * groups + g]), table[16];
            uint16_t table16[16];
            for (int q = 0; q < 16; q++) {
                float v = (float)(q - zeros[r * groups + g]) * s; /* exact: an integer of 5 bits times 11 */
                table[q] = v < 0 ? -nearest_half(-v) : nearest_half(v);
                table16[q] = bf16_bits(table[q]);
            }
            int64_t first = g * group, last = first + group < k ? first + group : k;
            if (out_bf16) {
                uint16_t *o = (uint16_t *)out + r * k;
                for (int64_t j = first; j < last; j++) o[j] = table16[(row[j >> 1] >> ((j & 1) * 4)) & 15];
            } else {
                float *o = (float *)out + r * k;
                for (int64_t j = first; j < last; j++) o[j] = table[(row[j >> 1] >> ((j & 1) * 4)) & 15];
            }
        }
    }
}
