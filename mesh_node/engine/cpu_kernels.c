/* bfloat16 products for CPU decoding: a few rows times a weight matrix, and the routed experts
 * of one token fused into one call. Built and loaded by cpu_kernels.py, which documents why.
 *
 * Weights are row-major [out, in] (the checkpoint's layout). Every output is a float32 dot product
 * rounded to bfloat16 once, as torch's bf16 linear does; the fused expert block rounds where the
 * torch ops it replaces round (linear outputs, silu, the gate * up product, the final sum).
 * Work is split into blocks of output rows handed out dynamically over the calling thread's
 * OpenMP team (torch's own, which this library shares): each output is computed by one thread in
 * a fixed order, so results do not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

#define BLOCK 64                     /* output rows per work item */
#define PARALLEL_MIN (256L * 1024L)  /* weight elements below which one thread does it all */

static inline float to_float(bf16 v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline bf16 to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16)(bits >> 16);
}

static inline float round_bf16(float f) { return to_float(to_bf16(f)); }

#ifdef __AVX512BF16__
#include <immintrin.h>

int mesh_kernels_available(void) { return 1; }

static inline __m512bh load(const bf16 *p, long i, long n) {
    if (i + 32 <= n) return (__m512bh)_mm512_loadu_si512(p + i);
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << (n - i)) - 1), p + i);
}

/* y[0..3] = rows w, w + n, w + 2n, w + 3n dotted with x (n elements each) */
static void dot4(const bf16 *w, long n, const bf16 *x, float *y) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long i = 0; i < n; i += 32) {
        __m512bh xv = load(x, i, n);
        a0 = _mm512_dpbf16_ps(a0, load(w, i, n), xv);
        a1 = _mm512_dpbf16_ps(a1, load(w + n, i, n), xv);
        a2 = _mm512_dpbf16_ps(a2, load(w + 2 * n, i, n), xv);
        a3 = _mm512_dpbf16_ps(a3, load(w + 3 * n, i, n), xv);
    }
    y[0] = _mm512_reduce_add_ps(a0);
    y[1] = _mm512_reduce_add_ps(a1);
    y[2] = _mm512_reduce_add_ps(a2);
    y[3] = _mm512_reduce_add_ps(a3);
}

static float dot1(const bf16 *w, long n, const bf16 *x) {
    __m512 a = _mm512_setzero_ps();
    for (long i = 0; i < n; i += 32) a = _mm512_dpbf16_ps(a, load(w, i, n), load(x, i, n));
    return _mm512_reduce_add_ps(a);
}

/* y[r - r0] = row r of w dotted with x, for r in [r0, r1) */
static void dot_rows(const bf16 *w, long n, const bf16 *x, long r0, long r1, float *y) {
    long r = r0;
    for (; r + 4 <= r1; r += 4) dot4(w + r * n, n, x, y + (r - r0));
    for (; r < r1; r++) y[r - r0] = dot1(w + r * n, n, x);
}

static inline long min_long(long a, long b) { return a < b ? a : b; }

/* y[m * ldy + r] = row r of w dotted with row m of x, for r < 4 and m < 4: each weight vector
 * loaded once serves four rows of x (several rows become compute- rather than memory-bound) */
static void dot4x4(const bf16 *w, long n, const bf16 *x, float *y, long ldy) {
    __m512 a[4][4];
    for (int m = 0; m < 4; m++)
        for (int r = 0; r < 4; r++) a[m][r] = _mm512_setzero_ps();
    for (long i = 0; i < n; i += 32) {
        __m512bh wv[4], xv[4];
        for (int r = 0; r < 4; r++) wv[r] = load(w + r * n, i, n);
        for (int m = 0; m < 4; m++) xv[m] = load(x + m * n, i, n);
        for (int m = 0; m < 4; m++)
            for (int r = 0; r < 4; r++) a[m][r] = _mm512_dpbf16_ps(a[m][r], wv[r], xv[m]);
    }
    for (int m = 0; m < 4; m++)
        for (int r = 0; r < 4; r++) y[m * ldy + r] = _mm512_reduce_add_ps(a[m][r]);
}

/* y[rows, out] = x[rows, n] @ w[out, n]^T (+ bias[out]) */
void mesh_linear_bf16(const bf16 *x, long rows, long n, const bf16 *w, long out, const bf16 *bias,
                      bf16 *y, int threads) {
    long blocks = (out + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (out * n * rows >= PARALLEL_MIN)
    for (long b = 0; b < blocks; b++) {
        long r0 = b * BLOCK, r1 = min_long(out, r0 + BLOCK);
        float acc[4][BLOCK];
        for (long m = 0; m < rows; m += 4) { /* the block's weights stay in L1/L2 across rows */
            long group = min_long(4, rows - m), r = r0;
            if (group == 4)
                for (; r + 4 <= r1; r += 4) dot4x4(w + r * n, n, x + m * n, &acc[0][r - r0], BLOCK);
            for (long g = 0; g < group; g++) dot_rows(w, n, x + (m + g) * n, r, r1, &acc[g][r - r0]);
            for (long g = 0; g < group; g++)
                for (long q = r0; q < r1; q++) {
                    float v = acc[g][q - r0] + (bias ? to_float(bias[q]) : 0.0f);
                    y[(m + g) * out + q] = to_bf16(v);
                }
        }
    }
}

/* One token's routed experts, weighted and summed:
 *   out = sum_j weights[j] * down_e (silu(gate_e x) * up_e x),  e = experts[j], j < k
 * gate_up: [E, 2 * inter, hidden] (gate rows first), down: [E, hidden, inter], scratch: k * inter
 * bf16. Two passes over the k experts' weights: gate/up rows into scratch, then down rows.
 * The float32 sums go to out32 when it is given (a partial sum that is added to others before
 * rounding: an expert peer's answer), else rounded to bf16 into out. */
void mesh_moe_token_bf16(const bf16 *x, long hidden, long inter, long k, const bf16 *gate_up,
                         const bf16 *down, const int64_t *experts, const float *weights,
                         bf16 *scratch, bf16 *out, float *out32, int threads) {
    long inter_blocks = (inter + BLOCK - 1) / BLOCK;
    long hidden_blocks = (hidden + BLOCK - 1) / BLOCK;
#pragma omp parallel num_threads(threads) if (k * inter * hidden >= PARALLEL_MIN)
    {
#pragma omp for schedule(dynamic)
        for (long item = 0; item < k * inter_blocks; item++) {
            long j = item / inter_blocks;
            long r0 = (item % inter_blocks) * BLOCK, r1 = min_long(inter, r0 + BLOCK);
            const bf16 *gate = gate_up + experts[j] * 2 * inter * hidden;
            const bf16 *up = gate + inter * hidden;
            float g[BLOCK], u[BLOCK];
            dot_rows(gate, hidden, x, r0, r1, g);
            dot_rows(up, hidden, x, r0, r1, u);
            for (long r = r0; r < r1; r++) {
                float gv = round_bf16(g[r - r0]);
                float silu = round_bf16(gv / (1.0f + expf(-gv)));
                scratch[j * inter + r] = to_bf16(silu * round_bf16(u[r - r0]));
            }
        }
        /* implicit barrier: every expert's hidden row is complete */
#pragma omp for schedule(dynamic)
        for (long b = 0; b < hidden_blocks; b++) {
            long r0 = b * BLOCK, r1 = min_long(hidden, r0 + BLOCK);
            float sum[BLOCK] = {0}, y[BLOCK];
            for (long j = 0; j < k; j++) {
                dot_rows(down + experts[j] * hidden * inter, inter, scratch + j * inter, r0, r1, y);
                for (long r = r0; r < r1; r++) sum[r - r0] += weights[j] * round_bf16(y[r - r0]);
            }
            if (out32)
                for (long r = r0; r < r1; r++) out32[r] = sum[r - r0];
            else
                for (long r = r0; r < r1; r++) out[r] = to_bf16(sum[r - r0]);
        }
    }
}

#else /* no bf16 dot-product instructions: the engine keeps torch's kernels */

int mesh_kernels_available(void) { return 0; }

void mesh_linear_bf16(const bf16 *x, long rows, long n, const bf16 *w, long out, const bf16 *bias,
                      bf16 *y, int threads) {}

void mesh_moe_token_bf16(const bf16 *x, long hidden, long inter, long k, const bf16 *gate_up,
                         const bf16 *down, const int64_t *experts, const float *weights,
                         bf16 *scratch, bf16 *out, float *out32, int threads) {}

#endif
