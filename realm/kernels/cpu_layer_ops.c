/* The onednn backend's per-token layer ops on the CPU, in float32: RMSNorm with the residual add, rotary embedding
 * (rotate-half) in place, and SiLU(gate) * up. realm/kernels/cpu_layer_ops.py calls them; the torch references
 * beside the Triton kernels (rms_norm_ref, apply_rope_ref, silu_mul_ref) define what they compute.
 *
 * Why C: each is several torch ops on a few rows (a decode, a verification): on a CPU each torch op costs
 * microseconds of dispatch and allocation whatever its size, and a SmolLM2 step calls these three ops 121 times.
 * Here each is one pass over its rows.
 *
 * Every row is computed alone and alike (the same loop, the same summation order, whatever the rows with it or the
 * thread), so a row's bits do not depend on its batch: a decode and the same row inside a verification agree.
 * Threads split the work from PARALLEL_FROM elements on (RMSNorm and RoPE by rows, SiLU by pieces of rows). Built
 * with -ffast-math (glibc's vector expf in the SiLU loop, a vectorised sum of squares in a fixed order): no op here
 * compares values, so NaN and infinity pass through as in torch's ops.
 *
 * Layouts: rows with a row stride and their last dimension contiguous; the RoPE table [max_positions, 2, half]:
 * cos then sin of each position's half angles (realm/kernels/rope.py's rope_cache).
 */
#include <math.h>
#include <stdint.h>

/* Elements from which a call splits its work among threads (an OpenMP region costs more than the work of a row or
 * two). Low: inside the model these ops run right after the linear kernel's parallel region, and one thread alone ran
 * them slower there than in isolation; split, a verification's rows took less (timed by hand on an Intel Xeon, no
 * figures kept). */
#define PARALLEL_FROM 2048
/* SiLU's work unit: a row's columns cut in pieces of this many, so that a few rows split evenly among the threads (3
 * rows of SmolLM2: 9 pieces, 5 and 4, not 2 rows and 1). */
#define SILU_PIECE 512

/* h = x + residual (when residual), y = weight * (h * 1/sqrt(mean(h^2) + eps)). h may be NULL without a residual
 * (h is x then). Strides in elements. */
void realm_rms_norm_f32(const float *x, int64_t x_stride, const float *residual, int64_t r_stride,
                        const float *weight, float *y, int64_t y_stride, float *h, int64_t h_stride, int rows,
                        int dim, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if ((int64_t)rows * dim >= PARALLEL_FROM)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *yr = y + r * y_stride;
        const float *hr = xr;
        if (residual) {
            float *out = h + r * h_stride;
            const float *res = residual + r * r_stride;
#pragma omp simd
            for (int i = 0; i < dim; i++) out[i] = xr[i] + res[i];
            hr = out;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < dim; i++) sum += hr[i] * hr[i];
        const float inv = 1.0f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
        for (int i = 0; i < dim; i++) yr[i] = weight[i] * (hr[i] * inv);
    }
}

static inline void rotate_heads(float *x, int64_t head_stride, int heads, int half, const float *cos,
                                const float *sin) {
    for (int hd = 0; hd < heads; hd++) {
        float *a = x + hd * head_stride, *b = a + half;
#pragma omp simd
        for (int i = 0; i < half; i++) {
            const float xa = a[i], xb = b[i];
            a[i] = xa * cos[i] - xb * sin[i];
            b[i] = xb * cos[i] + xa * sin[i];
        }
    }
}

/* q [tokens, n_heads, 2 * half] and k [tokens, n_kv_heads, 2 * half] rotated in place by each token's position.
 * Returns -1 - t for the first token t whose position is outside the table (nothing is rotated then), else 0. */
int realm_rope_f32(float *q, int64_t q_stride, int64_t q_head_stride, float *k, int64_t k_stride,
                   int64_t k_head_stride, const int32_t *positions, const float *table, int64_t max_positions,
                   int tokens, int n_heads, int n_kv_heads, int half, int threads) {
    for (int t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= max_positions) return -1 - t;
#pragma omp parallel for schedule(static) num_threads(threads) \
    if ((int64_t)tokens * (n_heads + n_kv_heads) * half * 2 >= PARALLEL_FROM)
    for (int t = 0; t < tokens; t++) {
        const float *cos = table + (int64_t)positions[t] * 2 * half, *sin = cos + half;
        rotate_heads(q + t * q_stride, q_head_stride, n_heads, half, cos, sin);
        rotate_heads(k + t * k_stride, k_head_stride, n_kv_heads, half, cos, sin);
    }
    return 0;
}

/* out [rows, ffn] = silu(gate) * up, gate_up [rows, 2 * ffn] (gate first, as gate_up's weights are stacked). */
void realm_silu_mul_f32(const float *gate_up, int64_t gu_stride, float *out, int64_t out_stride, int rows, int ffn,
                        int threads) {
    const int pieces = (ffn + SILU_PIECE - 1) / SILU_PIECE;
#pragma omp parallel for schedule(static) num_threads(threads) if ((int64_t)rows * ffn >= PARALLEL_FROM)
    for (int64_t job = 0; job < (int64_t)rows * pieces; job++) {
        const int r = job / pieces, i0 = job % pieces * SILU_PIECE, i1 = i0 + SILU_PIECE < ffn ? i0 + SILU_PIECE : ffn;
        const float *g = gate_up + r * gu_stride, *u = g + ffn;
        float *o = out + r * out_stride;
#pragma omp simd
        for (int i = i0; i < i1; i++) {  // sigmoid from exp(-|g|) <= 1: no overflow (fast-math's expf gave NaN at 100)
            const float e = expf(-fabsf(g[i]));
            o[i] = g[i] * ((g[i] >= 0.0f ? 1.0f : e) / (1.0f + e)) * u[i];
        }
    }
}
