/* act(x + bias + DWConv3x3(x)) on a channels-last map (B, H, W, Ch), forward and backward in
   one pass over the map each: rows (b, i) in parallel; the 3x3 weights tap-major, wt (9, Ch),
   so that every loop runs over contiguous channels. The backward recomputes the
   pre-activation instead of storing it. */
#include "common.h"
static inline scalar_t NAME(gelu)(scalar_t z) {
    return (scalar_t)0.5 * z * ((scalar_t)1 + ERF(z * (scalar_t)0.70710678118654752));
}

static inline scalar_t NAME(gelu_grad)(scalar_t z) {
    scalar_t u = z * (scalar_t)0.70710678118654752, e = EXP(-u * u);
    return (scalar_t)0.5 * ((scalar_t)1 + ERF_GIVEN_EXP(u, e)) + z * (scalar_t)0.39894228040143268 * e;
}

/* The 9 taps of column j: p[k], k = (di + 1) * 3 + dj + 1, points at column j + sign * dj of
   rows[di + 1] (NULL: a row outside the map), or at a row of zeros outside the map. */
static inline void NAME(taps)(const scalar_t **rows, const scalar_t *zeros, int W, int Ch, int j, int sign,
                              const scalar_t **p) {
    for (int di = 0; di < 3; di++)
        for (int dj = -1; dj <= 1; dj++) {
            int x = j + sign * dj;
            p[di * 3 + dj + 1] = (rows[di] && x >= 0 && x < W) ? rows[di] + (int64_t)x * Ch : zeros;
        }
}

/* out = base + bias + sum_k wt[k] * p[k]: all nine taps in one pass, the sum in registers */
static inline void NAME(tap_sum)(const scalar_t **p, const scalar_t *wt, const scalar_t *base, const scalar_t *bias,
                                 scalar_t *out, int Ch) {
    const scalar_t *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3], *p4 = p[4], *p5 = p[5], *p6 = p[6], *p7 = p[7],
                   *p8 = p[8];
#pragma omp simd
    for (int c = 0; c < Ch; c++)
        out[c] = base[c] + bias[c] + wt[c] * p0[c] + wt[Ch + c] * p1[c] + wt[2 * Ch + c] * p2[c]
                 + wt[3 * Ch + c] * p3[c] + wt[4 * Ch + c] * p4[c] + wt[5 * Ch + c] * p5[c]
                 + wt[6 * Ch + c] * p6[c] + wt[7 * Ch + c] * p7[c] + wt[8 * Ch + c] * p8[c];
}

/* rows i - 1, i, i + 1 of one image m (H, W, Ch) */
static inline void NAME(neighbour_rows)(const scalar_t *m, int H, int W, int Ch, int i, const scalar_t **rows) {
    for (int di = -1; di <= 1; di++)
        rows[di + 1] = (i + di >= 0 && i + di < H) ? m + (int64_t)(i + di) * W * Ch : NULL;
}

/* z = x + bias + dwconv(x) at row i of image xb, then (per pixel, while it is in L1) z is kept
   (go NULL, gelu 0), or gelu(z) (go NULL, gelu 1), or go * gelu'(z) (go: the output gradient) */
static void NAME(preactivation_row)(const scalar_t *xb, const scalar_t *wt, const scalar_t *bias,
                                    const scalar_t *zeros, int H, int W, int Ch, int i, int gelu,
                                    const scalar_t *go, scalar_t *z) {
    const scalar_t *rows[3], *p[9];
    NAME(neighbour_rows)(xb, H, W, Ch, i, rows);
    for (int j = 0; j < W; j++) {
        scalar_t *zj = z + (int64_t)j * Ch;
        NAME(taps)(rows, zeros, W, Ch, j, 1, p);
        NAME(tap_sum)(p, wt, rows[1] + (int64_t)j * Ch, bias, zj, Ch);
        if (go) {
            const scalar_t *gj = go + (int64_t)j * Ch;
#pragma omp simd
            for (int c = 0; c < Ch; c++) zj[c] = gj[c] * NAME(gelu_grad)(zj[c]);
        } else if (gelu) {
#pragma omp simd
            for (int c = 0; c < Ch; c++) zj[c] = NAME(gelu)(zj[c]);
        }
    }
}

/* With an input bias u (x_bias: the map is x + u), z = x + c + sum_k wt[k] x_k with c = bias + u (1 + sum_k
   wt[k]) and the taps outside the map reading edge = -u instead of zeros: u needs no pass of its own.
   The weight gradient read through edge is short of u sum(g), added by the caller. */
static void NAME(input_bias_terms)(const scalar_t *wt, const scalar_t *bias, const scalar_t *x_bias, int Ch,
                                   scalar_t *edge, scalar_t *c) {
    for (int ch = 0; ch < Ch; ch++) {
        scalar_t w = 1;
        for (int k = 0; k < 9; k++) w += wt[k * Ch + ch];
        edge[ch] = x_bias ? -x_bias[ch] : (scalar_t)0;
        c[ch] = x_bias ? bias[ch] + x_bias[ch] * w : bias[ch];
    }
}

void NAME(residual_dwconv_forward)(const scalar_t *x, const scalar_t *wt, const scalar_t *bias, const scalar_t *x_bias,
                                   scalar_t *out, int B, int H, int W, int Ch, int gelu, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        scalar_t *edge = (scalar_t *)malloc(sizeof(scalar_t) * 2 * (size_t)Ch), *c = edge + Ch;
        NAME(input_bias_terms)(wt, bias, x_bias, Ch, edge, c);
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < (int64_t)B * H; bi++) {
            NAME(preactivation_row)(x + bi / H * H * W * Ch, wt, c, edge, H, W, Ch, (int)(bi % H), gelu, NULL,
                                    out + bi * W * Ch);
        }
        free(edge);
    }
}

/* dw[k] += sum_j g[j] x[j + o_k] and db += sum_j g[j] along one row (taps outside the map read
   edge). The row order keeps every read contiguous: a walk over the columns for a block of
   channels strides by Ch, one L1 set for all its reads, and measured 2x slower. dw is read and
   written once per pair of columns; with (9 + 1) x Ch values it stays in L1. */
static inline void NAME(weight_grad_row)(const scalar_t **xrows, const scalar_t *g, const scalar_t *edge,
                                         const scalar_t *zeros, int W, int Ch, scalar_t *dw, scalar_t *db) {
    const scalar_t *p[9], *q[9];
    for (int j = 0; j < W; j += 2) {
        const scalar_t *g0 = g + (int64_t)j * Ch, *g1 = j + 1 < W ? g0 + Ch : zeros;
        NAME(taps)(xrows, edge, W, Ch, j, 1, p);
        NAME(taps)(xrows, edge, W, Ch, j + 1, 1, q);
#pragma omp simd
        for (int c = 0; c < Ch; c++) {
            scalar_t a = g0[c], b = g1[c];
            dw[c] += a * p[0][c] + b * q[0][c];
            dw[Ch + c] += a * p[1][c] + b * q[1][c];
            dw[2 * Ch + c] += a * p[2][c] + b * q[2][c];
            dw[3 * Ch + c] += a * p[3][c] + b * q[3][c];
            dw[4 * Ch + c] += a * p[4][c] + b * q[4][c];
            dw[5 * Ch + c] += a * p[5][c] + b * q[5][c];
            dw[6 * Ch + c] += a * p[6][c] + b * q[6][c];
            dw[7 * Ch + c] += a * p[7][c] + b * q[7][c];
            dw[8 * Ch + c] += a * p[8][c] + b * q[8][c];
            db[c] += a + b;
        }
    }
}

/* dwt (nthreads, 9, Ch), dbias and dx_bias (nthreads, Ch): per-thread accumulators. Tap k reads x at
   p + o_k: it sends g[p] x[p + o_k] to w_k and g[p - o_k] to x[p], g the gradient w.r.t. the
   pre-activation. With GELU, each thread keeps the rows of g it needs in a ring of three,
   recomputed from x (the rows next to its band twice), instead of a full-size buffer. */
void NAME(residual_dwconv_backward)(const scalar_t *x, const scalar_t *wt, const scalar_t *bias,
                                    const scalar_t *x_bias, const scalar_t *gout, scalar_t *gx, scalar_t *dwt,
                                    scalar_t *dbias, scalar_t *dx_bias,
                                    int B, int H, int W, int Ch, int gelu, int nthreads) {
    int64_t row_len = (int64_t)W * Ch;
#pragma omp parallel num_threads(nthreads)
    {
        scalar_t *dw = dwt + (int64_t)omp_get_thread_num() * 9 * Ch;
        scalar_t *db = dbias + (int64_t)omp_get_thread_num() * Ch;
        scalar_t *du = x_bias ? dx_bias + (int64_t)omp_get_thread_num() * Ch : NULL;
        scalar_t *zeros = (scalar_t *)calloc((size_t)Ch, sizeof(scalar_t));
        scalar_t *edge = (scalar_t *)malloc(sizeof(scalar_t) * 2 * (size_t)Ch), *c = edge + Ch;
        NAME(input_bias_terms)(wt, bias, x_bias, Ch, edge, c);
        scalar_t *ring = gelu ? (scalar_t *)malloc(sizeof(scalar_t) * (size_t)(3 * row_len)) : NULL;
        int64_t held[3] = {-1, -1, -1};
        const scalar_t *xrows[3], *grows[3], *p[9];
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < (int64_t)B * H; bi++) {
            int i = (int)(bi % H);
            const scalar_t *xb = x + bi / H * H * row_len;
            for (int di = -1; di <= 1; di++) {
                const scalar_t *row = NULL;
                if (i + di >= 0 && i + di < H) {
                    int64_t r = bi + di;
                    if (!gelu) {
                        row = gout + r * row_len;
                    } else {
                        scalar_t *slot = ring + (r % 3) * row_len;
                        if (held[r % 3] != r) {
                            NAME(preactivation_row)(xb, wt, c, edge, H, W, Ch, i + di, 1, gout + r * row_len, slot);
                            held[r % 3] = r;
                        }
                        row = slot;
                    }
                }
                grows[1 - di] = row;  /* the input gradient reads g at row i - di */
            }
            NAME(neighbour_rows)(xb, H, W, Ch, i, xrows);
            for (int j = 0; j < W; j++) {
                NAME(taps)(grows, zeros, W, Ch, j, -1, p);
                scalar_t *gxj = gx + bi * row_len + (int64_t)j * Ch;
                NAME(tap_sum)(p, wt, grows[1] + (int64_t)j * Ch, zeros, gxj, Ch);
                if (du) {
#pragma omp simd
                    for (int c = 0; c < Ch; c++) du[c] += gxj[c];
                }
            }
            NAME(weight_grad_row)(xrows, grows[1], edge, zeros, W, Ch, dw, db);
        }
        free(ring);
        free(edge);
        free(zeros);
    }
}
