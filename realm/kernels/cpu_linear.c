/* A linear layer's product for steps of few rows (decodes, speculative verification) on the CPU, in float32:
 * y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
 *
 * Memory-bound: a step of up to a few dozen rows reads every weight once and does little arithmetic per byte, so
 * what matters is streaming the weights at the memory's rate whatever the row count. The weights are kept in panels
 * of PANEL output columns, [ceil(N / PANEL)][K][PANEL] (realm/kernels/cpu_linear.py packs them once, zero-padded),
 * so that one panel is one contiguous stream. A thread takes whole panels; for each tile of up to TILE_ROWS rows it
 * walks the panel's K steps, broadcasting x[m, k] against the panel's PANEL weights of step k into two vector
 * accumulators per row (no horizontal sums). The weights are prefetched PREFETCH_STEPS steps ahead into L2: without
 * it the core waited for each line, then computed, and a tile of 8 rows streamed far below one row's rate (timed by
 * hand on the output head's shape, 2 threads). Far ahead and into L2, not 2 KiB ahead into L1: the arithmetic of a
 * tile of several rows must overlap the stream, and a near prefetch leaves each line's wait exposed once a k step
 * holds a dozen FMAs (timed by hand, no figures kept; its effect on speculation's ratio at batch 1 is in
 * bench/results/speculative_batch1_kernels.jsonl, commit d2c83ed, against 44e3c7f's rows in speculative.jsonl).
 *
 * More rows than one tile holds (a verification of 13-16 rows) are a group of tiles that walk the panel together, a
 * chunk of k steps at a time (panel_group): one stream from memory, the prefetches shared among the tiles.
 *
 * Each output is one chain of fused multiply-adds over k = 0 .. K-1, the same whatever the number of rows, the tile
 * a row falls in, or the thread: a row's result does not depend on the rows computed with it (tests hold it to the
 * bit). Built without -ffast-math, so the compiler keeps that order.
 *
 * Layouts: x [M, K] with a row stride, float32 contiguous along K; panels as above; y [M, N] with a row stride;
 * bias [N] or NULL. Built by realm/kernels/cpu_linear.py with the system C compiler and OpenMP.
 */
#include <stdint.h>
#include <string.h>

#define LANES 16
#define PANEL (2 * LANES)
#ifdef __AVX512F__
#define TILE_ROWS 12 /* 24 accumulators, the two weight vectors and a broadcast: within AVX-512's 32 registers */
#else
#define TILE_ROWS 8 /* AVX2's 16 registers hold half the vectors: no larger tile than before 12 was tried */
#endif
_Static_assert(TILE_ROWS <= 12, "realm_linear_f32's switch takes the last rows of a tile of up to 12");
/* The switches that make a tile's row count a constant: one case per size up to 12. */
#define EACH_TILE_SIZE(X) X(12) X(11) X(10) X(9) X(8) X(7) X(6) X(5) X(4) X(3) X(2) X(1)
#define PREFETCH_STEPS 64 /* 8 KiB ahead: tried 16 to 256 steps and the L1/L2 hints by hand, 64 into L2 the best */
#define PREFETCH_L2 1     /* __builtin_prefetch's locality 1: prefetcht2, into L2 on x86 (not L1's prefetcht0) */
#define CHUNK_STEPS 64    /* k steps every tile of a group walks in turn: 8 KiB of panel, in L1 after the first */
#define GROUP_ROWS 64     /* rows panel_group takes at most: their accumulators, 8 KiB on the stack */

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));

static inline vfloat vload(const float *p) {
    vfloat x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void vstore(float *p, vfloat x) { memcpy(p, &x, sizeof x); }

/* The bias of a panel's cols columns as its two vectors (zeros where there is none or past cols). */
static inline void panel_bias(const float *restrict bias, int cols, vfloat *b_lo, vfloat *b_hi) {
    float b[PANEL] = {0};
    if (bias) memcpy(b, bias, cols * sizeof(float));
    *b_lo = vload(b);
    *b_hi = vload(b + LANES);
}

/* One output row's PANEL sums plus the bias, of which cols columns are real (the last panel of an N that is not a
 * multiple of PANEL has fewer). */
static inline void store_row(float *restrict out, vfloat lo, vfloat hi, vfloat b_lo, vfloat b_hi, int cols) {
    if (cols == PANEL) {
        vstore(out, lo + b_lo);
        vstore(out + LANES, hi + b_hi);
    } else {
        float t[PANEL];
        vstore(t, lo + b_lo);
        vstore(t + LANES, hi + b_hi);
        memcpy(out, t, cols * sizeof(float));
    }
}

/* rows m0 .. m0 + rows - 1 against one panel (cols of its PANEL columns are real); rows is a constant where inlined,
 * so that the accumulators stay in registers. */
static inline __attribute__((always_inline)) void panel_tile(const float *restrict x, int64_t x_stride,
                                                              const float *restrict panel, int64_t K,
                                                              const float *restrict bias, float *restrict y,
                                                              int64_t y_stride, int m0, const int rows, int cols) {
    vfloat lo[TILE_ROWS] = {0}, hi[TILE_ROWS] = {0};
    for (int64_t k = 0; k < K; k++) {
        const float *wk = panel + k * PANEL;
        __builtin_prefetch(wk + PREFETCH_STEPS * PANEL, 0, PREFETCH_L2);
        __builtin_prefetch(wk + PREFETCH_STEPS * PANEL + LANES, 0, PREFETCH_L2);
        vfloat w_lo = vload(wk), w_hi = vload(wk + LANES);
        for (int m = 0; m < rows; m++) {
            float xm = x[(m0 + m) * x_stride + k];
            lo[m] += xm * w_lo;
            hi[m] += xm * w_hi;
        }
    }
    vfloat b_lo, b_hi;
    panel_bias(bias, cols, &b_lo, &b_hi);
    for (int m = 0; m < rows; m++) store_row(y + (m0 + m) * y_stride, lo[m], hi[m], b_lo, b_hi, cols);
}

int realm_linear_panel_width(void) { return PANEL; }

/* One tile's rows over k steps [k0, k1) of a panel, its accumulators kept across the chunks in acc (lo, hi per row).
 * It prefetches the k steps PREFETCH_STEPS ahead whose offset in the chunk is `share` modulo `tiles`: each tile of the
 * group issues its share of the stream's prefetches, so that they go out at one rate while every tile computes. */
static inline __attribute__((always_inline)) void chunk_tile(const float *restrict x, int64_t x_stride,
                                                              const float *restrict panel, int64_t k0, int64_t k1,
                                                              vfloat *restrict acc, int m0, const int rows,
                                                              int share, int tiles) {
    vfloat lo[TILE_ROWS], hi[TILE_ROWS];
    for (int m = 0; m < rows; m++) lo[m] = acc[2 * (m0 + m)], hi[m] = acc[2 * (m0 + m) + 1];
    int turn = 0;
    for (int64_t k = k0; k < k1; k++) {
        const float *wk = panel + k * PANEL;
        if (turn == share) {
            __builtin_prefetch(wk + PREFETCH_STEPS * PANEL, 0, PREFETCH_L2);
            __builtin_prefetch(wk + PREFETCH_STEPS * PANEL + LANES, 0, PREFETCH_L2);
        }
        turn = turn + 1 == tiles ? 0 : turn + 1;
        vfloat w_lo = vload(wk), w_hi = vload(wk + LANES);
        for (int m = 0; m < rows; m++) {
            float xm = x[(m0 + m) * x_stride + k];
            lo[m] += xm * w_lo;
            hi[m] += xm * w_hi;
        }
    }
    for (int m = 0; m < rows; m++) acc[2 * (m0 + m)] = lo[m], acc[2 * (m0 + m) + 1] = hi[m];
}

static void chunk_tile_any(const float *restrict x, int64_t x_stride, const float *restrict panel, int64_t k0,
                           int64_t k1, vfloat *restrict acc, int m0, int rows, int share, int tiles) {
    switch (rows) {  // constant row counts, for the registers
#define CHUNK_TILE(n) case n: chunk_tile(x, x_stride, panel, k0, k1, acc, m0, n, share, tiles); break;
        EACH_TILE_SIZE(CHUNK_TILE)
#undef CHUNK_TILE
        default: break;
    }
}

/* Rows m0 .. m0 + rows - 1 (more than one tile, at most GROUP_ROWS) against one panel, CHUNK_STEPS k steps at a
 * time: every tile walks a chunk before the next chunk, so the panel is read from memory once, the tiles after the
 * first reading the chunk from L1. The tiles share the rows evenly (13 rows: 7 + 6, not 12 + 1, whose one-row pass
 * is a latency-bound chain). Each output is still one FMA chain over k, its partial sum stored and reloaded exactly. */
static void panel_group(const float *restrict x, int64_t x_stride, const float *restrict panel, int64_t K,
                        const float *restrict bias, float *restrict y, int64_t y_stride, int m0, int rows, int cols) {
    vfloat acc[2 * GROUP_ROWS];
    memset(acc, 0, sizeof(vfloat) * 2 * (size_t)rows);
    const int tiles = (rows + TILE_ROWS - 1) / TILE_ROWS, base = rows / tiles, extra = rows % tiles;
    for (int64_t k0 = 0; k0 < K; k0 += CHUNK_STEPS) {
        const int64_t k1 = k0 + CHUNK_STEPS < K ? k0 + CHUNK_STEPS : K;
        for (int t = 0, m = 0; t < tiles; t++) {
            const int size = base + (t < extra);
            chunk_tile_any(x + (int64_t)m0 * x_stride, x_stride, panel, k0, k1, acc, m, size, t, tiles);
            m += size;
        }
    }
    vfloat b_lo, b_hi;
    panel_bias(bias, cols, &b_lo, &b_hi);
    for (int m = 0; m < rows; m++) store_row(y + (m0 + m) * y_stride, acc[2 * m], acc[2 * m + 1], b_lo, b_hi, cols);
}

void realm_linear_f32(const float *x, int64_t x_stride, const float *panels, const float *bias, float *y,
                      int64_t y_stride, int M, int N, int64_t K, int threads) {
    const int n_panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int p = 0; p < n_panels; p++) {
        const float *panel = panels + (int64_t)p * K * PANEL;
        const float *b = bias ? bias + (int64_t)p * PANEL : NULL;
        float *yp = y + (int64_t)p * PANEL;
        const int cols = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        int m0 = 0;
        for (; M - m0 > TILE_ROWS; m0 += GROUP_ROWS)  // several tiles: chunk by chunk (panel_group)
            panel_group(x, x_stride, panel, K, b, yp, y_stride, m0, M - m0 < GROUP_ROWS ? M - m0 : GROUP_ROWS, cols);
        switch (M - m0) {  // one tile: a single pass over the panel, the tile's size constant (for the registers)
#define PANEL_TILE(n) case n: panel_tile(x, x_stride, panel, K, b, yp, y_stride, m0, n, cols); break;
            EACH_TILE_SIZE(PANEL_TILE)
#undef PANEL_TILE
            default: break;  // none left (M - m0 <= 0 after the groups)
        }
    }
}
