/* Paged attention for short query chunks (decodes and speculative verification) on the CPU, in float32.
 *
 * The onednn backend's attention for the rows the Triton backend sends to paged_decode / paged_verify. Each
 * (sequence, KV head) is one task (cut into tiles of query rows only when tasks are fewer than the threads can
 * share), which walks the sequence's blocks in place (no gather: the reference copies every key and value of every
 * sequence before SDPA, more than half of its time at 32 sequences) and keeps, for every query row the KV head
 * serves (its group of query heads times the chunk's queries), an online softmax (Milakov & Gimelshein 2018) over
 * the keys that row may see: causal, optionally within a sliding window, with optionally soft-capped scores
 * (Gemma 2). Each key and value is read once per task, for all its rows.
 *
 * Layouts (realm/kernels/paged.py): q [tokens, n_heads, head_dim] with a row stride, heads adjacent; out the same,
 * contiguous; k_cache, v_cache [num_blocks, block_size, n_kv_heads, head_dim] contiguous; block_tables int32
 * [batch, bt_stride]. Sequence b's queries are rows q_start[b] .. q_start[b] + q_len[b] - 1, the last q_len[b] of
 * its seq_len[b] tokens. The caller checked every index (block ids in range, lengths within the table).
 *
 * Built by realm/kernels/cpu_attention.py with the system C compiler and OpenMP (torch's libgomp, shared by soname).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A masked score: finite, so that the build's -ffast-math (which lets GCC call glibc's vector expf) keeps its
 * meaning; exp(MASKED - m) is 0 for any score m of a real key. */
#define MASKED (-1e30f)

static inline int min_int(int a, int b) { return a < b ? a : b; }
static inline int max_int(int a, int b) { return a > b ? a : b; }

/* LANES floats in one GCC/Clang vector: one 512-bit register with AVX-512, two 256-bit ones otherwise. Written as
 * vectors because GCC turns fixed-width scalar loops into unrolled scalar code here, not vector code. */
#define LANES 16
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));

static inline vfloat vload(const float *p) {
    vfloat x;
    memcpy(&x, p, sizeof x);  // unaligned
    return x;
}

static inline void vstore(float *p, vfloat x) { memcpy(p, &x, sizeof x); }

static inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

static inline float hsum(vfloat x) {
    float s = 0.0f;
    for (int u = 0; u < LANES; u++) s += x[u];
    return s;
}

/* Scores of one row against a block's keys, LANES keys at a time: s[t] = q . k_t, from K transposed (kt [head_dim,
 * width], zero past the block's keys); summed in the order of block_scores_transposed's four-row loop, so that a row
 * gets the same bits whichever loop computes it. */
static void row_scores_transposed(const float *restrict qr, const float *restrict kt, int head_dim, int width,
                                  float *restrict s) {
    for (int c = 0; c < width; c += LANES) {
        vfloat a = {0};
        for (int d = 0; d < head_dim; d++) a += qr[d] * vload(kt + (int64_t)d * width + c);
        vstore(s + c, a);
    }
}

/* Every row's scores against a block from K transposed, four rows at a time: each load of K feeds four independent
 * FMA chains (the rows), instead of one. s: [rows, width]. */
static void block_scores_transposed(const float *restrict qs, const float *restrict kt, int rows, int head_dim,
                                    int width, float *restrict s) {
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *q0 = qs + (int64_t)r * head_dim, *q1 = q0 + head_dim, *q2 = q1 + head_dim, *q3 = q2 + head_dim;
        for (int c = 0; c < width; c += LANES) {
            vfloat a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int d = 0; d < head_dim; d++) {
                const vfloat kd = vload(kt + (int64_t)d * width + c);
                a0 += q0[d] * kd, a1 += q1[d] * kd, a2 += q2[d] * kd, a3 += q3[d] * kd;
            }
            float *sr = s + (int64_t)r * width + c;
            vstore(sr, a0), vstore(sr + width, a1), vstore(sr + 2 * width, a2), vstore(sr + 3 * width, a3);
        }
    }
    for (; r < rows; r++) row_scores_transposed(qs + (int64_t)r * head_dim, kt, head_dim, width, s + (int64_t)r * width);
}

/* The same scores as dot products along head_dim (for few rows per block, where transposing K costs more than it
 * saves). */
static void row_scores_direct(const float *restrict qr, const float *restrict k, int64_t key_stride, int keys,
                              int head_dim, float *restrict s) {
    for (int t = 0; t < keys; t++) {
        const float *kr = k + t * key_stride;
        vfloat x = {0};
        int d = 0;
        for (; d + LANES <= head_dim; d += LANES) x += vload(qr + d) * vload(kr + d);
        float tail = 0.0f;
        for (; d < head_dim; d++) tail += qr[d] * kr[d];
        s[t] = hsum(x) + tail;
    }
}

/* a = a * alpha + sum_t p[t] v_t over t in [t_lo, t_hi): 4 * LANES dimensions at a time, then LANES (two
 * accumulators), then one by one. */
static void row_values(float *restrict a, float alpha, const float *restrict p, const float *restrict v,
                       int64_t key_stride, int t_lo, int t_hi, int head_dim) {
    int d0 = 0;
    for (; d0 + 4 * LANES <= head_dim; d0 += 4 * LANES) {  // four independent chains: 64 dimensions in registers
        vfloat a0 = vload(a + d0) * alpha, a1 = vload(a + d0 + LANES) * alpha;
        vfloat a2 = vload(a + d0 + 2 * LANES) * alpha, a3 = vload(a + d0 + 3 * LANES) * alpha;
        for (int t = t_lo; t < t_hi; t++) {
            const float pt = p[t], *vt = v + t * key_stride + d0;
            a0 += pt * vload(vt), a1 += pt * vload(vt + LANES), a2 += pt * vload(vt + 2 * LANES);
            a3 += pt * vload(vt + 3 * LANES);
        }
        vstore(a + d0, a0), vstore(a + d0 + LANES, a1), vstore(a + d0 + 2 * LANES, a2), vstore(a + d0 + 3 * LANES, a3);
    }
    for (; d0 + LANES <= head_dim; d0 += LANES) {
        vfloat even = vload(a + d0) * alpha, odd = {0};
        int t = t_lo;
        for (; t + 1 < t_hi; t += 2) {
            even += p[t] * vload(v + t * key_stride + d0);
            odd += p[t + 1] * vload(v + (t + 1) * key_stride + d0);
        }
        if (t < t_hi) even += p[t] * vload(v + t * key_stride + d0);
        vstore(a + d0, even + odd);
    }
    for (; d0 < head_dim; d0++) {
        float x = a[d0] * alpha;
        for (int t = t_lo; t < t_hi; t++) x += p[t] * v[t * key_stride + d0];
        a[d0] = x;
    }
}

/* From this many rows per task (query heads per KV head x queries), scores come from K transposed once per block. */
#define TRANSPOSE_FROM_ROWS 8

/* One (sequence, KV head, tile of rows). The sequence's rows = q_len * group query rows (row r: query r / group of
 * head kv_head * group + r % group); this task takes rows [row_begin, row_end), each keeping an online softmax over
 * the blocks of keys it may see: scores (from K transposed once per block when the tile has many rows), masked
 * (causal, window), exponentiated in one vector loop, then P @ V. Scratch: see the caller's scratch_floats. */
static void attend(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache, float *out,
                   const int32_t *blocks, int q0, int q_len, int seq_len, int kv_head, int row_begin, int row_end,
                   int n_heads, int n_kv_heads, int head_dim, int block_size, float scale, int window, float softcap,
                   float *scratch) {
    const int group = n_heads / n_kv_heads, rows = row_end - row_begin, start = seq_len - q_len;
    const int width = round_up(block_size, LANES);
    const int64_t key_stride = (int64_t)n_kv_heads * head_dim;
    float *qs = scratch, *acc = qs + (int64_t)rows * head_dim, *m = acc + (int64_t)rows * head_dim, *l = m + rows;
    float *kt = l + rows, *s = kt + (int64_t)head_dim * width;
    for (int i = 0; i < rows; i++) {
        const int r = row_begin + i;
        const float *src = q + (int64_t)(q0 + r / group) * q_row_stride + (int64_t)(kv_head * group + r % group) * head_dim;
        for (int d = 0; d < head_dim; d++) qs[(int64_t)i * head_dim + d] = src[d] * scale;
        m[i] = MASKED, l[i] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)rows * head_dim);
    const int first_pos = start + row_begin / group, last_pos = start + (row_end - 1) / group;
    const int first_key = window > 0 ? max_int(first_pos - window + 1, 0) : 0;
    // Chosen per sequence, not per tile: a row's bits must not depend on how its sequence was tiled (threads).
    const int transposed = q_len * group >= TRANSPOSE_FROM_ROWS;
    for (int j = first_key / block_size; j * block_size <= last_pos; j++) {
        const int t0 = j * block_size, keys = min_int(seq_len - t0, block_size);
        const int64_t base = ((int64_t)blocks[j] * block_size * n_kv_heads + kv_head) * head_dim;
        const float *k = k_cache + base, *v = v_cache + base;
        if (transposed) {
            for (int d = 0; d < head_dim; d++) {
                float *kd = kt + (int64_t)d * width;
                for (int t = 0; t < keys; t++) kd[t] = k[t * key_stride + d];
                for (int t = keys; t < width; t++) kd[t] = 0.0f;
            }
            block_scores_transposed(qs, kt, rows, head_dim, width, s);  // rows that see no key here are not read
        }
        for (int i = 0; i < rows; i++) {
            const int pos = start + (row_begin + i) / group;  // this row's query position: it sees keys lo .. pos
            const int t_lo = max_int((window > 0 ? pos - window + 1 : 0) - t0, 0), t_hi = min_int(pos - t0 + 1, keys);
            if (t_hi <= t_lo) continue;  // no key of this block is visible to this row
            float *sr = s + (int64_t)i * width;
            if (!transposed)
                row_scores_direct(qs + (int64_t)i * head_dim, k, key_stride, keys, head_dim, sr);
            if (softcap > 0.0f) {
#pragma omp simd
                for (int t = 0; t < keys; t++) sr[t] = softcap * tanhf(sr[t] / softcap);
            }
            float block_max = MASKED;
            for (int t = t_lo; t < t_hi; t++) block_max = sr[t] > block_max ? sr[t] : block_max;
            const float m_new = block_max > m[i] ? block_max : m[i];
            const float alpha = expf(m[i] - m_new);  // 0 on the row's first block (m = MASKED, acc = 0)
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int t = t_lo; t < t_hi; t++) {
                sr[t] = expf(sr[t] - m_new);
                sum += sr[t];
            }
            l[i] = l[i] * alpha + sum;
            m[i] = m_new;
            row_values(acc + (int64_t)i * head_dim, alpha, sr, v, key_stride, t_lo, t_hi, head_dim);
        }
    }
    for (int i = 0; i < rows; i++) {
        const int r = row_begin + i;
        float *o = out + ((int64_t)(q0 + r / group) * n_heads + kv_head * group + r % group) * head_dim;
        const float inv = 1.0f / l[i];
        for (int d = 0; d < head_dim; d++) o[d] = acc[(int64_t)i * head_dim + d] * inv;
    }
}

/* Rows per task at most when tasks are few: a verification chunk's 16 queries x 3 heads (SmolLM2) become two tasks
 * per KV head, so that a single sequence's 3 KV heads split evenly over 2 threads (6 tasks, not 3). */
#define TILE_ROWS 24
#define MIN_TILE_ROWS 8

/* Tiles per (sequence, KV head) when tasks are few: enough for tiles of at most TILE_ROWS rows, and more while the
 * tasks do not divide evenly among the threads and each tile keeps MIN_TILE_ROWS rows (a tile reads and transposes
 * the sequence's K again: worth it only for rows enough). */
static int tiles_for(int max_rows, int heads, int threads) {
    int tiles = (max_rows + TILE_ROWS - 1) / TILE_ROWS;
    while ((heads * tiles) % threads && max_rows / (tiles + 1) >= MIN_TILE_ROWS) tiles++;
    return tiles;
}

/* Returns 0, or -1 when scratch memory could not be allocated (out is then incomplete). */
int realm_paged_attention_f32(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache,
                              float *out, const int32_t *block_tables, int64_t bt_stride, const int32_t *q_start,
                              const int32_t *q_len, const int32_t *seq_lens, int batch, int n_heads, int n_kv_heads,
                              int head_dim, int block_size, float scale, int window, float softcap, int threads) {
    int max_q = 0;
    for (int b = 0; b < batch; b++) max_q = q_len[b] > max_q ? q_len[b] : max_q;
    const int group = n_heads / n_kv_heads, max_rows = max_q * group;
    // Tiles only where (sequence, KV head) tasks are too few to keep the threads busy: each tile reads and transposes
    // the sequence's K again.
    const int split = batch * n_kv_heads < 4 * threads;
    const int wanted = split ? tiles_for(max_rows, batch * n_kv_heads, threads) : 1;
    const int tile_rows = (max_rows + wanted - 1) / wanted;
    const int tiles = (max_rows + tile_rows - 1) / tile_rows, rows = tile_rows;
    const int width = round_up(block_size, LANES);
    const size_t scratch_floats = (size_t)rows * (2 * head_dim + 2 + width) + (size_t)head_dim * width;
    const int tasks = batch * n_kv_heads * tiles;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats);
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < tasks; task++) {
            const int b = task / (n_kv_heads * tiles), kv_head = task / tiles % n_kv_heads, tile = task % tiles;
            const int row_begin = tile * tile_rows, row_end = min_int(row_begin + tile_rows, q_len[b] * group);
            if (row_begin >= row_end) continue;  // a shorter chunk than the longest
            if (!scratch) {  // every thread must reach the loop; one without memory marks the call failed
                failed = 1;
                continue;
            }
            attend(q, q_row_stride, k_cache, v_cache, out, block_tables + (int64_t)b * bt_stride, q_start[b],
                   q_len[b], seq_lens[b], kv_head, row_begin, row_end, n_heads, n_kv_heads, head_dim, block_size,
                   scale, window, softcap, scratch);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
