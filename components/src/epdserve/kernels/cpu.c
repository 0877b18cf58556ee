/* Single-threaded AVX-512 fp32 kernels for the CPU decode path (built and loaded by cpu.py).
 *
 * MKL's sgemm is slow for the few rows of a decode step (14-17 ms for the bench model's
 * weights at 20 rows, where one row takes 5.5 ms): it neither streams the weights at memory
 * speed nor computes at peak. `linear` reads each weight once per call from panels packed for
 * it, prefetched ahead. `paged_decode_attention` attends every one-query sequence of a layer
 * in one call, reading each KV block once for all heads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PANEL 16     /* output columns per packed panel: one zmm */
#define MAX_ROWS 24  /* rows per pass over a panel: 24 accumulators + weights fit 32 zmm */
#define PREFETCH 512 /* panel rows ahead (32 KiB), into L2 */

/* w [n, k] row-major -> panels [ceil(n/16)][k][16] (w^T in 16-column slices), zero-padded. */
void pack_weight(const float *w, float *out, int64_t n, int64_t k) {
    for (int64_t p = 0; p < (n + PANEL - 1) / PANEL; p++)
        for (int64_t j = 0; j < k; j++)
            for (int64_t c = 0; c < PANEL; c++) {
                int64_t col = p * PANEL + c;
                out[(p * k + j) * PANEL + c] = col < n ? w[col * k + j] : 0.f;
            }
}

static inline __attribute__((always_inline)) void
panel_rows(const float *x, int64_t k, const float *panel, float *y, int64_t ldy, __mmask16 cols, const int rows) {
    __m512 acc[MAX_ROWS];
    _Pragma("GCC unroll 32") for (int m = 0; m < rows; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j++) {
        _mm_prefetch((const char *)(panel + (j + PREFETCH) * PANEL), _MM_HINT_T1);
        __m512 w = _mm512_loadu_ps(panel + j * PANEL);
        _Pragma("GCC unroll 32") for (int m = 0; m < rows; m++)
            acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * k + j]), w, acc[m]);
    }
    _Pragma("GCC unroll 32") for (int m = 0; m < rows; m++) _mm512_mask_storeu_ps(y + m * ldy, cols, acc[m]);
}

#define ROWS(r) case r: panel_rows(xr, k, panel, yr, n, cols, r); break;
/* y [m, n] = x [m, k] @ w^T, w packed by pack_weight. x, y contiguous. */
void linear(const float *x, const float *packed, float *y, int64_t m, int64_t n, int64_t k) {
    for (int64_t p = 0; p * PANEL < n; p++) {
        const float *panel = packed + p * k * PANEL;
        __mmask16 cols = n - p * PANEL >= PANEL ? 0xFFFF : (__mmask16)((1u << (n - p * PANEL)) - 1);
        for (int64_t r = 0; r < m; r += MAX_ROWS) {
            const float *xr = x + r * k;
            float *yr = y + r * n + p * PANEL;
            switch (m - r < MAX_ROWS ? m - r : MAX_ROWS) {
                ROWS(24) ROWS(23) ROWS(22) ROWS(21) ROWS(20) ROWS(19) ROWS(18) ROWS(17)
                ROWS(16) ROWS(15) ROWS(14) ROWS(13) ROWS(12) ROWS(11) ROWS(10) ROWS(9)
                ROWS(8) ROWS(7) ROWS(6) ROWS(5) ROWS(4) ROWS(3) ROWS(2) ROWS(1)
            }
        }
    }
}

/* e^x for 16 floats, ~1 ulp: 2^n * p(r) with r = x - n ln2 (Cephes expf coefficients). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

static inline void prefetch_row(const char *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

/* Online-softmax state of one query head over the blocks seen so far. */
typedef struct { float max, sum; } softmax_state;

/* Scores s[0..n) -> exp(s - new max) in place; rescales the head's accumulator acc [d]. */
static void softmax_block(float *s, int64_t n, softmax_state *st, float *acc, int64_t d) {
    float mb = st->max;
    for (int64_t p = 0; p < n; p++) mb = s[p] > mb ? s[p] : mb;
    float corr = expf(st->max - mb);   /* 0 on the first block (max was -inf) */
    __m512 sum = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; p += 16) {
        __mmask16 live = n - p >= 16 ? 0xFFFF : (__mmask16)((1u << (n - p)) - 1);
        __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + p), _mm512_set1_ps(mb))));
        _mm512_mask_storeu_ps(s + p, live, e);
        sum = _mm512_add_ps(sum, e);
    }
    st->sum = st->sum * corr + _mm512_reduce_add_ps(sum);
    st->max = mb;
    if (corr != 1.f)
        for (int64_t v = 0; v < d; v += 16)
            _mm512_storeu_ps(acc + v, _mm512_mul_ps(_mm512_set1_ps(corr), _mm512_loadu_ps(acc + v)));
}

/* One query per sequence attends its first ctx[s] cached positions (no mask).
 *   q, out: rows rows[s] of [*, hq, d] tensors (row strides q_stride, out_stride floats)
 *   kc, vc: one layer's cache [blocks, bs, hkv, d]; tables [S, max_blocks] int32; ctx [S] int32
 *   d % 16 == 0, hq % hkv == 0. Returns 0, or -1 when out of memory. */
int paged_decode_attention(const float *q, int64_t q_stride, const float *kc, const float *vc,
                           const int32_t *tables, int64_t max_blocks, const int32_t *ctx, const int64_t *rows,
                           int64_t num_seqs, int64_t hq, int64_t hkv, int64_t d, int64_t bs, float scale,
                           float *out, int64_t out_stride) {
    const int64_t groups = hq / hkv, row = hkv * d, block = bs * row;
    float *acc = malloc((size_t)(hq * d + hq * bs) * sizeof(float));
    softmax_state *st = malloc((size_t)hq * sizeof(softmax_state));
    if (!acc || !st) { free(acc); free(st); return -1; }
    float *scores = acc + hq * d;   /* [hq][bs] */
    for (int64_t s = 0; s < num_seqs; s++) {
        const float *qs = q + rows[s] * q_stride;
        const int32_t *table = tables + s * max_blocks;
        for (int64_t i = 0; i < hq * d; i++) acc[i] = 0.f;
        for (int64_t h = 0; h < hq; h++) st[h] = (softmax_state){-INFINITY, 0.f};
        for (int64_t b = 0; b * bs < ctx[s]; b++) {
            int64_t n = ctx[s] - b * bs < bs ? ctx[s] - b * bs : bs;
            const float *kb = kc + table[b] * block, *vb = vc + table[b] * block;
            /* The block after next streams into L2 while this one computes, a position's row per
               position (one burst per block measured slower): 11 -> 15 GB/s. */
            const int64_t ahead = (b + 2) * bs < ctx[s] ? table[b + 2] * block : table[b] * block;
            const char *next_k = (const char *)(kc + ahead), *next_v = (const char *)(vc + ahead);
            for (int64_t p = 0; p < n; p++) {
                prefetch_row(next_k + p * row * 4, row * 4);
                for (int64_t h = 0; h < hq; h++) {
                    const float *qh = qs + h * d, *kr = kb + p * row + (h / groups) * d;
                    __m512 dot = _mm512_setzero_ps();
                    for (int64_t v = 0; v < d; v += 16)
                        dot = _mm512_fmadd_ps(_mm512_loadu_ps(qh + v), _mm512_loadu_ps(kr + v), dot);
                    scores[h * bs + p] = _mm512_reduce_add_ps(dot) * scale;
                }
            }
            for (int64_t h = 0; h < hq; h++) softmax_block(scores + h * bs, n, st + h, acc + h * d, d);
            for (int64_t p = 0; p < n; p++) {
                prefetch_row(next_v + p * row * 4, row * 4);
                for (int64_t h = 0; h < hq; h++) {
                    const float *vr = vb + p * row + (h / groups) * d;
                    __m512 w = _mm512_set1_ps(scores[h * bs + p]);
                    for (int64_t v = 0; v < d; v += 16)
                        _mm512_storeu_ps(acc + h * d + v, _mm512_fmadd_ps(w, _mm512_loadu_ps(vr + v), _mm512_loadu_ps(acc + h * d + v)));
                }
            }
        }
        float *os = out + rows[s] * out_stride;
        for (int64_t h = 0; h < hq; h++)
            for (int64_t v = 0; v < d; v += 16)
                _mm512_storeu_ps(os + h * d + v, _mm512_mul_ps(_mm512_set1_ps(1.f / st[h].sum), _mm512_loadu_ps(acc + h * d + v)));
    }
    free(acc);
    free(st);
    return 0;
}

/* ---- elementwise: each reads its inputs once where torch runs several passes ---- */

/* LlamaRMSNorm in float32: out = w * (x * rsqrt(mean(x^2) + eps)), per row of h. */
void rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t h, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * h;
        float *yr = out + r * h;
        __m512 sq = _mm512_setzero_ps();
        for (int64_t i = 0; i < h; i += 16) {
            __mmask16 live = h - i >= 16 ? 0xFFFF : (__mmask16)((1u << (h - i)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(live, xr + i);
            sq = _mm512_fmadd_ps(v, v, sq);
        }
        float inv = 1.f / sqrtf(_mm512_reduce_add_ps(sq) / (float)h + eps);
        for (int64_t i = 0; i < h; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* Rotary embedding as transformers' apply_rotary_pos_emb: x [rows, heads, d] (rotate_half
   pairs i with i + d/2), cos/sin [rows, d]. Separate multiplies and add (no FMA): bit-equal. */
void rotary(const float *x, const float *cos, const float *sin, float *out, int64_t rows, int64_t heads, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + (r * heads + h) * d, *c = cos + r * d, *s = sin + r * d;
            float *o = out + (r * heads + h) * d;
            for (int64_t i = 0; i < half; i++) o[i] = xh[i] * c[i] + (-xh[i + half]) * s[i];
            for (int64_t i = half; i < d; i++) o[i] = xh[i] * c[i] + xh[i - half] * s[i];
        }
}

/* out = silu(gate) * up = gate / (1 + e^-gate) * up, n floats. */
void silu_mul(const float *gate, const float *up, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 live = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 g = _mm512_maskz_loadu_ps(live, gate + i);
        __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_mask_storeu_ps(out + i, live, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(live, up + i)));
    }
}
