/* Paged attention for short query chunks (decodes and speculative verification) on the CPU, in float32.
 *
 * The onednn backend's attention for the rows the Triton backend sends to paged_decode / paged_verify. Each
 * (sequence, KV head) is one task (cut into tiles of query rows only when tasks are fewer than the threads can
 * share), which walks the sequence's blocks in place (no gather: the reference copies every key and value of every
 * sequence before SDPA, more than half of its time at 32 sequences) and keeps, for every query row the KV head
 * serves (its group of query heads times the chunk's queries), an online softmax (Milakov & Gimelshein 2018) over
 * the keys that row may see: causal, optionally within a sliding window, with optionally soft-capped scores
 * (Gemma 2). Each key and value is read once per task, for all its rows, and the next block's are prefetched while
 * one block computes: inside the model a layer's pages are out of cache (the weights of the layers before evicted
 * them), and each block's first touch waited on memory.
 * The rows are the lanes of vectors (attend): every row is computed alike and alone, so a query gets the same bits
 * in a decode as inside a verification chunk, which is what makes greedy speculation equal plain decoding by
 * construction (tests/test_cpu_attention.py).
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

typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vfloat splat(float x) { return (vfloat){0} + x; }
static inline vint splat_i(int32_t x) { return (vint){0} + x; }
static inline vint vload_i(const int32_t *p) {
    vint x;
    memcpy(&x, p, sizeof x);
    return x;
}

/* a where mask (all ones), else b: bitwise, so that b passes through unchanged whatever a holds (NaN included). */
static inline vfloat vselect(vint mask, vfloat a, vfloat b) { return (vfloat)(((vint)a & mask) | ((vint)b & ~mask)); }
static inline vfloat vmax(vfloat a, vfloat b) { return vselect(a > b, a, b); }

static inline vfloat vexp(vfloat x) {
    vfloat y;
#pragma omp simd
    for (int u = 0; u < LANES; u++) y[u] = expf(x[u]);
    return y;
}

/* Row lanes whose visible keys [lo, hi] (absolute positions) hold key. */
static inline vint visible(vint lo, vint hi, int key) { return (lo <= splat_i(key)) & (splat_i(key) <= hi); }

/* acc[d][lanes] = acc * alpha + sum_t p[t] v[t][d] for the n (a constant: 8, or 1 for a tail) dimensions from d0, t
 * in [t_lo, t_hi) in order: keys in [f_lo, f_hi) every row lane sees, the others added only to the lanes that see
 * them (a lane's sum is then the same whichever rows share its vector). */
static inline __attribute__((always_inline)) void values_cols(float *restrict acc, int64_t padded, vfloat alpha,
                                                              const float *restrict p, const float *restrict v,
                                                              int64_t key_stride, int t_lo, int f_lo, int f_hi,
                                                              int t_hi, int t0, vint lo, vint hi, int d0,
                                                              const int n) {
    vfloat a[8];
    for (int u = 0; u < n; u++) a[u] = vload(acc + (d0 + u) * padded) * alpha;
    int t = t_lo;
    for (; t < f_lo; t++) {
        const vint vis = visible(lo, hi, t0 + t);
        const vfloat pt = vload(p + t * padded);
        for (int u = 0; u < n; u++) a[u] = vselect(vis, a[u] + v[t * key_stride + d0 + u] * pt, a[u]);
    }
    for (; t < f_hi; t++) {
        const vfloat pt = vload(p + t * padded);
        for (int u = 0; u < n; u++) a[u] += v[t * key_stride + d0 + u] * pt;
    }
    for (; t < t_hi; t++) {
        const vint vis = visible(lo, hi, t0 + t);
        const vfloat pt = vload(p + t * padded);
        for (int u = 0; u < n; u++) a[u] = vselect(vis, a[u] + v[t * key_stride + d0 + u] * pt, a[u]);
    }
    for (int u = 0; u < n; u++) vstore(acc + (d0 + u) * padded, a[u]);
}

/* s[t][lanes] = q[lanes] . k_t for the n (a constant: 8, or 1) keys from t: each score one FMA chain over d = 0 ..
 * head_dim - 1, whatever rows share the vector. */
static inline __attribute__((always_inline)) void scores_keys(const float *restrict qt, int64_t padded,
                                                              const float *restrict k, int64_t key_stride, int t,
                                                              int head_dim, float *restrict s, const int n) {
    vfloat c[8];
    for (int u = 0; u < n; u++) c[u] = (vfloat){0};
    for (int d = 0; d < head_dim; d++) {
        const vfloat qd = vload(qt + d * padded);
        for (int u = 0; u < n; u++) c[u] += k[(t + u) * key_stride + d] * qd;
    }
    for (int u = 0; u < n; u++) vstore(s + (t + u) * padded, c[u]);
}

/* One (sequence, KV head, tile of rows). The sequence's rows = q_len * group query rows (row r: query r / group of
 * head kv_head * group + r % group); this task takes rows [row_begin, row_end), LANES rows to a vector: queries,
 * scores and outputs are kept transposed ([head_dim][rows], [keys][rows]), so every step is a vector over rows. Each
 * row keeps an online softmax over the blocks of keys it may see (causal, optionally within a window), with
 * optionally soft-capped scores. Every operation is per lane, so a row's bits do not depend on which rows share its
 * vector, its tile or its step (a decode and the same query inside a verification agree to the bit). Scratch: see
 * the caller's scratch_floats. */
static void attend(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache, float *out,
                   const int32_t *blocks, int q0, int q_len, int seq_len, int kv_head, int row_begin, int row_end,
                   int n_heads, int n_kv_heads, int head_dim, int block_size, float scale, int window, float softcap,
                   float *scratch) {
    const int group = n_heads / n_kv_heads, rows = row_end - row_begin, start = seq_len - q_len;
    const int64_t padded = round_up(rows, LANES), key_stride = (int64_t)n_kv_heads * head_dim;
    float *qt = scratch, *acc = qt + head_dim * padded, *s = acc + head_dim * padded;
    float *m = s + block_size * padded, *l = m + padded;
    int32_t *lo = (int32_t *)(l + padded), *hi = lo + padded;  // row i sees the keys at positions lo[i] .. hi[i]
    for (int i = 0; i < padded; i++) {
        m[i] = MASKED, l[i] = 0.0f;
        if (i < rows) {
            const int r = row_begin + i, pos = start + r / group;
            const float *src = q + (int64_t)(q0 + r / group) * q_row_stride + (int64_t)(kv_head * group + r % group) * head_dim;
            for (int d = 0; d < head_dim; d++) qt[d * padded + i] = src[d] * scale;
            lo[i] = window > 0 ? max_int(pos - window + 1, 0) : 0, hi[i] = pos;
        } else {  // padding: sees no key
            for (int d = 0; d < head_dim; d++) qt[d * padded + i] = 0.0f;
            lo[i] = 0, hi[i] = -1;
        }
    }
    memset(acc, 0, sizeof(float) * (size_t)(head_dim * padded));
    const int first_pos = start + row_begin / group, last_pos = start + (row_end - 1) / group;
    const int first_key = window > 0 ? max_int(first_pos - window + 1, 0) : 0;
    for (int j = first_key / block_size; j * block_size <= last_pos; j++) {
        const int t0 = j * block_size, keys = min_int(seq_len - t0, block_size);
        const int64_t base = ((int64_t)blocks[j] * block_size * n_kv_heads + kv_head) * head_dim;
        const float *k = k_cache + base, *v = v_cache + base;
        if (j * block_size + block_size <= last_pos) {  // the next block's keys and values, while this one computes
            const int64_t next = ((int64_t)blocks[j + 1] * block_size * n_kv_heads + kv_head) * head_dim;
            for (int t = 0; t < block_size; t++)
                for (int d = 0; d < head_dim; d += LANES) {
                    __builtin_prefetch(k_cache + next + t * key_stride + d);
                    __builtin_prefetch(v_cache + next + t * key_stride + d);
                }
        }
        for (int64_t g = 0; g < padded; g += LANES) {
            // the keys of this block some real row of the vector sees, [t_lo, t_hi), and those all of them see
            int min_lo = seq_len, max_lo = 0, min_hi = seq_len, max_hi = -1;
            for (int i = g; i < g + LANES && i < rows; i++) {
                min_lo = min_int(min_lo, lo[i]), max_lo = max_int(max_lo, lo[i]);
                min_hi = min_int(min_hi, hi[i]), max_hi = max_int(max_hi, hi[i]);
            }
            const int t_lo = max_int(min_lo - t0, 0), t_hi = min_int(max_hi - t0 + 1, keys);
            if (t_hi <= t_lo) continue;
            const int f_lo = min_int(max_int(max_lo - t0, t_lo), t_hi), f_hi = max_int(min_int(min_hi - t0 + 1, t_hi), f_lo);
            const vint vlo = vload_i(lo + g), vhi = vload_i(hi + g);
            float *sg = s + g;
            int t = t_lo;
            for (; t + 8 <= t_hi; t += 8) scores_keys(qt + g, padded, k, key_stride, t, head_dim, sg, 8);
            for (; t < t_hi; t++) scores_keys(qt + g, padded, k, key_stride, t, head_dim, sg, 1);
            vfloat block_max = splat(MASKED);
            for (t = t_lo; t < t_hi; t++) {
                vfloat st = vload(sg + t * padded);
                if (softcap > 0.0f) {
#pragma omp simd
                    for (int u = 0; u < LANES; u++) st[u] = softcap * tanhf(st[u] / softcap);
                }
                st = vselect(visible(vlo, vhi, t0 + t), st, splat(MASKED));
                vstore(sg + t * padded, st);
                block_max = vmax(block_max, st);
            }
            const vfloat m_old = vload(m + g), m_new = vmax(block_max, m_old);
            const vfloat alpha = vexp(m_old - m_new);  // 0 on a row's first block (m = MASKED, acc = 0)
            vfloat sum = {0};
            for (t = t_lo; t < t_hi; t++) {
                const vfloat pt = vselect(visible(vlo, vhi, t0 + t), vexp(vload(sg + t * padded) - m_new), splat(0.0f));
                vstore(sg + t * padded, pt);
                sum += pt;
            }
            vstore(l + g, vload(l + g) * alpha + sum);
            vstore(m + g, m_new);
            int d = 0;
            for (; d + 8 <= head_dim; d += 8)
                values_cols(acc + g, padded, alpha, sg, v, key_stride, t_lo, f_lo, f_hi, t_hi, t0, vlo, vhi, d, 8);
            for (; d < head_dim; d++)
                values_cols(acc + g, padded, alpha, sg, v, key_stride, t_lo, f_lo, f_hi, t_hi, t0, vlo, vhi, d, 1);
        }
    }
    for (int i = 0; i < rows; i++) {
        const int r = row_begin + i;
        float *o = out + ((int64_t)(q0 + r / group) * n_heads + kv_head * group + r % group) * head_dim;
        const float inv = 1.0f / l[i];
        for (int d = 0; d < head_dim; d++) o[d] = acc[d * padded + i] * inv;
    }
}

/* Rows per task at most when tasks are few: a verification chunk's 16 queries x 3 heads (SmolLM2) become two tasks
 * per KV head, so that a single sequence's 3 KV heads split evenly over 2 threads (6 tasks, not 3). */
#define TILE_ROWS 24
#define MIN_TILE_ROWS 8

/* Tiles per (sequence, KV head) when tasks are few: enough for tiles of at most TILE_ROWS rows, and more while the
 * tasks do not divide evenly among the threads and each tile keeps MIN_TILE_ROWS rows (a tile reads the sequence's
 * K and V again: worth it only for rows enough). */
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
    // Tiles only where (sequence, KV head) tasks are too few to keep the threads busy: each tile reads the sequence's
    // K and V again.
    const int split = batch * n_kv_heads < 4 * threads;
    const int wanted = split ? tiles_for(max_rows, batch * n_kv_heads, threads) : 1;
    const int tile_rows = (max_rows + wanted - 1) / wanted;
    const int tiles = (max_rows + tile_rows - 1) / tile_rows, rows = tile_rows;
    // attend's: queries and accumulators [head_dim][rows], scores [block_size][rows], m, l, lo, hi [rows]; rows
    // padded to whole vectors
    const size_t scratch_floats = (size_t)round_up(rows, LANES) * (2 * head_dim + block_size + 4);
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
