/* The small float32 operations around the matrix products of a decode step, one call each instead of 6-8 torch
   operations (each of which costs microseconds of dispatch for a few thousand numbers).

   Same arithmetic as the PyTorch forms in qwen2vl/model/layers.py, which the tests compare against:
   - rms_norm:  y = w * (x * 1 / sqrt(mean(x^2) + eps))        (transformers Qwen2RMSNorm, float32)
   - rope:      x = x * cos + rotate_half(x) * sin, in place     (apply_multimodal_rotary_pos_emb)
   Rows are independent, so results do not depend on how many rows share a call. */
#include <math.h>
#include <stdint.h>

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
