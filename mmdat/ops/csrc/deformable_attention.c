/* Deformable attention with the bilinear relative-position bias: CPU kernels.

   C over scalar_t, compiled once per scalar type by mmdat/ops/build.py (see common.h). The
   ops that call it, mmdat::deformable_attention_forward / _backward, are in
   mmdat/ops/deformable/cpu.py; docs/kernels.md describes the algorithm.

   Two sets of kernels:
   - bias_forward / bias_backward / exp_shift: one tile's bias (and its gradients) for the
     tiled path, whose GEMMs and softmax PyTorch runs;
   - attention_forward / attention_backward: the whole attention in one parallel region per
     pass, the GEMMs by PyTorch's BLAS (MKL) called per tile inside the region.
*/
#include "common.h"

/* 16-lane float vectors (AVX-512) for the bias's column loops: a row's cells lie within a few
   vector lanes of its columns, so permutes replace gathers, and in-register prefix sums the
   per-cell sums of the backward pass. Elsewhere (and for double) the plain loops below. */
#undef PERMUTE16
#if FLOAT32 && defined(__AVX512F__)
#include <immintrin.h>
#define PERMUTE16 1
/* inclusive prefix sums over the lanes */
static inline __m512 NAME(scan16)(__m512 x) {
    const __m512i z = _mm512_setzero_si512();
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), z, 15)));
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), z, 14)));
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), z, 12)));
    return _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), z, 8)));
}
/* lane l = x[l - 1], lane 0 = 0 */
static inline __m512 NAME(shift1)(__m512 x) {
    return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), _mm512_setzero_si512(), 15));
}
#else
#define PERMUTE16 0
#endif

/* R[x] = table row y0 + fy * (row y0+1 - row y0) and D[x] = row y0+1 - row y0 (unless D is NULL),
   x over the key's band of columns xs ...; cells outside the table are zero. The bounds are
   checked per row and band, not per cell, so that the loops vectorize. */
static inline void NAME(rows)(const scalar_t *t, int Th, int Tw, int y0, scalar_t w, int xs, int bx,
                              scalar_t *R, scalar_t *D) {
    int x0 = xs < 0 ? -xs : 0, x1 = Tw - xs < bx ? Tw - xs : bx;
    x0 = x0 < bx ? x0 : bx;
    x1 = x1 > x0 ? x1 : x0;
    const scalar_t *r0 = y0 >= 0 && y0 < Th ? t + (int64_t)y0 * Tw + xs : NULL;
    const scalar_t *r1 = y0 + 1 >= 0 && y0 + 1 < Th ? t + (int64_t)(y0 + 1) * Tw + xs : NULL;
    for (int x = 0; x < x0; x++) R[x] = 0;
    for (int x = x1; x < bx; x++) R[x] = 0;
    if (r0 && r1) {
#pragma omp simd
        for (int x = x0; x < x1; x++) R[x] = r0[x] + w * (r1[x] - r0[x]);
    } else if (r0) {
#pragma omp simd
        for (int x = x0; x < x1; x++) R[x] = r0[x] + w * -r0[x];
    } else if (r1) {
#pragma omp simd
        for (int x = x0; x < x1; x++) R[x] = w * r1[x];
    } else {
        for (int x = x0; x < x1; x++) R[x] = 0;
    }
    if (!D) return;
    for (int x = 0; x < x0; x++) D[x] = 0;
    for (int x = x1; x < bx; x++) D[x] = 0;
#pragma omp simd
    for (int x = x0; x < x1; x++) D[x] = (r1 ? r1[x] : (scalar_t)0) - (r0 ? r0[x] : (scalar_t)0);
}

/* x[0 .. 16) = 0 (one vector): the padding that vector loads read past a band, and dR */
static inline void NAME(zero16)(scalar_t *x) {
#if PERMUTE16
    _mm512_storeu_ps(x, _mm512_setzero_ps());
#else
    for (int i = 0; i < 16; i++) x[i] = 0;
#endif
}

/* Scratch of add_row_bias and row_bias_grad for a band of bx cells and n columns */
static inline int64_t NAME(row_scratch)(int bx, int n) { return 6 * (int64_t)bx + n + 96; }

/* s[c] += the bias of one key at one query row and head (table t), over n columns whose first
   corners are table columns cell[c] (non-decreasing) with weights wx[c]; y0, w: the table row
   and its weight. R: row_scratch */
static inline void NAME(add_row_bias)(const scalar_t *t, int Th, int Tw, int y0, scalar_t w, const int32_t *cell,
                                      const scalar_t *wx, int n, scalar_t *s, scalar_t *R) {
    int xs = cell[0], bx = cell[n - 1] - xs + 2, c = 0;
    NAME(rows)(t, Th, Tw, y0, w, xs, bx, R, NULL);
    NAME(zero16)(R + bx);
#if PERMUTE16
    /* 16 columns at a time: their cells' corners are lanes of R from the first one's */
    for (; c < n; c += 16) {
        int m = n - c < 16 ? n - c : 16, base = cell[c] - xs;
        if (cell[c + m - 1] - cell[c] > 15) break;
        __mmask16 k = (__mmask16)((1u << m) - 1);
        __m512i idx = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, cell + c), _mm512_set1_epi32(cell[c]));
        __m512 r0 = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(R + base));
        __m512 r1 = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(R + base + 1));
        __m512 b = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, wx + c), _mm512_sub_ps(r1, r0), r0);
        _mm512_mask_storeu_ps(s + c, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, s + c), b));
    }
#endif
#pragma omp simd
    for (int i = c; i < n; i++) s[i] += R[cell[i] - xs] + wx[i] * (R[cell[i] - xs + 1] - R[cell[i] - xs]);
}

/* What row_bias_grad needs of a row segment's n columns (cells cell[c] - xs in [0, band)) into
   plan: generic: the columns of cell i are [plan[i], plan[i + 1]), and the most columns of one
   cell is returned; PERMUTE16: per 16 columns from c, plan[c + l] = the last of them whose cell
   is at most cell[c] + l, or plan[c] = -1 where their cells lie more than 14 apart (a vector of
   per-cell sums shifted by one cell must keep them all). plan: band + n + 16 */
static inline int NAME(column_plan)(const int32_t *cell, int n, int xs, int band, int *plan) {
#if PERMUTE16
    (void)xs, (void)band;
    for (int c = 0; c < n; c += 16) {
        int m = n - c < 16 ? n - c : 16, *L = plan + c;
        if (cell[c + m - 1] - cell[c] > 14) {
            L[0] = -1;
            continue;
        }
        for (int l = 0; l < 16; l++) L[l] = -1;
        for (int i = 0; i < m; i++) L[cell[c + i] - cell[c]] = i;
        for (int l = 1; l < 16; l++) L[l] = L[l] > L[l - 1] ? L[l] : L[l - 1];
    }
    return 0;
#else
    /* without branches, which runs of a few columns per cell mispredict */
    int *seg = plan, longest = 0;
    for (int i = 0; i <= band; i++) seg[i] = n;
    for (int c = n - 1; c >= 0; c--) seg[cell[c] - xs] = c;
    for (int i = band - 1; i >= 0; i--) {
        seg[i] = seg[i] < seg[i + 1] ? seg[i] : seg[i + 1];
        longest = seg[i + 1] - seg[i] > longest ? seg[i + 1] - seg[i] : longest;
    }
    return longest;
#endif
}

/* Gradients of add_row_bias (band cells xs .. xs + bx - 1; plan and longest from column_plan)
   given g, the logits' gradient at its n columns: into the head's table d and into *gy, *gx,
   those w.r.t. the key's table coordinates (y, x). bias[c] = R[i] + wx[c] (R[i + 1] - R[i]),
   i = cell[c] - xs, so with Eu[i], E1[i] the sums of g and g * wx over cell i's columns, the
   gradient w.r.t. R is dR[i] = Eu[i] - E1[i] + E1[i - 1]. buf: row_scratch */
static inline void NAME(row_bias_grad)(const scalar_t *t, int Th, int Tw, int y0, scalar_t w, const int32_t *cell,
                                       int xs, int bx, const int *plan, int longest, const scalar_t *g,
                                       const scalar_t *wx, int n, scalar_t *d, scalar_t *gy, scalar_t *gx,
                                       scalar_t *buf) {
    scalar_t *R = buf, *D = R + bx + 16;
    /* dR: whole 64-byte vectors (PERMUTE16 adds into them) */
    scalar_t *dR = (scalar_t *)(((uintptr_t)(D + bx + 16) + 63) & ~(uintptr_t)63);
    NAME(rows)(t, Th, Tw, y0, w, xs, bx, R, D);
    NAME(zero16)(R + bx);
    NAME(zero16)(D + bx);
    int padded = (bx + 31) & ~15;
    for (int i = 0; i < padded; i += 16) NAME(zero16)(dR + i);
    scalar_t sy = 0, sx = 0;
#if PERMUTE16
    (void)longest;
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 vy = _mm512_setzero_ps(), vx = _mm512_setzero_ps();
    for (int c = 0; c < n; c += 16) {
        int m = n - c < 16 ? n - c : 16, base = cell[c] - xs;
        if (plan[c] < 0) {  /* cells too far apart for one vector: per column */
            for (int i = c; i < c + m; i++) {
                int x = cell[i] - xs;
                scalar_t gu = g[i], g1 = g[i] * wx[i];
                dR[x] += gu - g1;
                dR[x + 1] += g1;
                sy += (gu - g1) * D[x] + g1 * D[x + 1];
                sx += gu * (R[x + 1] - R[x]);
            }
            continue;
        }
        __mmask16 k = (__mmask16)((1u << m) - 1);
        __m512 v = _mm512_maskz_loadu_ps(k, g + c), v1 = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, wx + c));
        __m512i L = _mm512_loadu_si512(plan + c);
        /* per cell base + l: the sums of g and g * wx (prefix sums at each cell's last column, differenced) */
        __m512 qu = _mm512_permutexvar_ps(L, NAME(scan16)(v)), q1 = _mm512_permutexvar_ps(L, NAME(scan16)(v1));
        __m512 eu = _mm512_sub_ps(qu, NAME(shift1)(qu)), e1 = _mm512_sub_ps(q1, NAME(shift1)(q1));
        __m512 dr = _mm512_add_ps(_mm512_sub_ps(eu, e1), NAME(shift1)(e1));  /* e1's lane 15 is 0 */
        vx = _mm512_fmadd_ps(eu, _mm512_sub_ps(_mm512_loadu_ps(R + base + 1), _mm512_loadu_ps(R + base)), vx);
        vy = _mm512_fmadd_ps(dr, _mm512_loadu_ps(D + base), vy);
        /* dR[base + l] += dr[l], as two aligned vectors: rotated by base % 16, split by lane */
        int off = base & 15;
        scalar_t *lo = dR + (base - off);
        __m512 rot = _mm512_permutexvar_ps(_mm512_sub_epi32(lanes, _mm512_set1_epi32(off)), dr);
        __mmask16 upper = (__mmask16)(0xffffu << off);
        _mm512_store_ps(lo, _mm512_mask_add_ps(_mm512_load_ps(lo), upper, _mm512_load_ps(lo), rot));
        _mm512_store_ps(lo + 16, _mm512_mask_add_ps(_mm512_load_ps(lo + 16), (__mmask16)~upper,
                                                    _mm512_load_ps(lo + 16), rot));
    }
    sy += _mm512_reduce_add_ps(vy);
    sx += _mm512_reduce_add_ps(vx);
#else
    /* Eu and E1 per cell, a column offset at a time over all cells */
    const int *seg = plan;
    scalar_t *Eu = dR + padded, *E1 = Eu + bx, *gw = E1 + bx;
#pragma omp simd
    for (int c = 0; c < n; c++) gw[c] = g[c] * wx[c];
    for (int i = 0; i < bx; i++) Eu[i] = E1[i] = 0;
    for (int k = 0; k < longest; k++)
#pragma omp simd
        for (int i = 0; i < bx; i++) {
            int c = seg[i] + k;
            if (c < seg[i + 1]) {
                Eu[i] += g[c];
                E1[i] += gw[c];
            }
        }
#pragma omp simd reduction(+:sy, sx)
    for (int i = 0; i < bx; i++) {
        dR[i] = Eu[i] - E1[i] + (i ? E1[i - 1] : 0);
        sy += dR[i] * D[i];
        sx += Eu[i] * (R[i + 1] - R[i]);
    }
#endif
    *gy += sy;
    *gx += sx;
    /* the table cells the band's two rows cover: x in [x0, x1) */
    int x0 = xs < 0 ? -xs : 0, x1 = Tw - xs < bx ? Tw - xs : bx;
    d += xs;
    if (y0 >= 0 && y0 < Th)
#pragma omp simd
        for (int x = x0; x < x1; x++) d[(int64_t)y0 * Tw + x] += dR[x] - dR[x] * w;
    if (y0 + 1 >= 0 && y0 + 1 < Th)
#pragma omp simd
        for (int x = x0; x < x1; x++) d[(int64_t)(y0 + 1) * Tw + x] += dR[x] * w;
}

/* One tile's logits S (n, Mg, Ns, A, W) hold q.k (minus the log-sum-exp in the backward pass).
   exp_mode 0 (forward): S += bias, and mx (n, Mg, A, W) = the max over the keys; then exp_shift.
   exp_mode 1 (backward): S = EXP(S + bias), the probabilities. */
void NAME(bias_forward)(const scalar_t *table, const int32_t *lo_y, const scalar_t *fy, const int32_t *lo_x,
                        const scalar_t *fx, scalar_t *S, scalar_t *mx, int G, int Mg, int Ns, int H, int W,
                        int Th, int Tw, int g0, int n, int a0, int A, int exp_mode, int nthreads) {
    int64_t queries = (int64_t)n * Mg * A * W;
    if (!exp_mode)
        for (int64_t i = 0; i < queries; i++) mx[i] = -INFINITY;
#pragma omp parallel num_threads(nthreads)
    {
        scalar_t *R = NULL, *local_max = NULL;
        int64_t capacity = 0;
        if (!exp_mode) {
            local_max = (scalar_t *)malloc(sizeof(scalar_t) * (size_t)queries);
            for (int64_t i = 0; i < queries; i++) local_max[i] = -INFINITY;
        }
#pragma omp for schedule(static) nowait
        for (int64_t gj = 0; gj < (int64_t)n * Ns; gj++) {
            int bgl = (int)(gj / Ns), j = (int)(gj % Ns), bg = g0 + bgl;
            const int32_t *lx = lo_x + ((int64_t)bg * Ns + j) * W;
            const scalar_t *wx = fx + ((int64_t)bg * Ns + j) * W;
            int bx = lx[W - 1] - lx[0] + 2;  /* lo_x is non-decreasing along W */
            if (NAME(row_scratch)(bx, W) > capacity) {
                capacity = NAME(row_scratch)(bx, W);
                R = (scalar_t *)realloc(R, sizeof(scalar_t) * (size_t)capacity);
            }
            for (int a = 0; a < A; a++) {
                int64_t yi = ((int64_t)bg * Ns + j) * H + a0 + a;
                for (int m = 0; m < Mg; m++) {
                    const scalar_t *t = table + (int64_t)((bg % G) * Mg + m) * Th * Tw;
                    scalar_t *o = S + ((((int64_t)bgl * Mg + m) * Ns + j) * A + a) * W;
                    NAME(add_row_bias)(t, Th, Tw, lo_y[yi], fy[yi], lx, wx, W, o, R);
                    /* separate loops: EXP and the max vectorize on their own */
                    if (exp_mode) {
#pragma omp simd
                        for (int b = 0; b < W; b++) o[b] = EXP(o[b]);
                    } else {
                        scalar_t *mq = local_max + (((int64_t)bgl * Mg + m) * A + a) * W;
#pragma omp simd
                        for (int b = 0; b < W; b++) mq[b] = o[b] > mq[b] ? o[b] : mq[b];
                    }
                }
            }
        }
        if (!exp_mode) {
#pragma omp critical
            for (int64_t i = 0; i < queries; i++) mx[i] = local_max[i] > mx[i] ? local_max[i] : mx[i];
            free(local_max);
        }
        free(R);
    }
}

/* S (blocks, Ns, cols) = EXP(S - mx (blocks, cols)) */
void NAME(exp_shift)(scalar_t *S, const scalar_t *mx, int blocks, int Ns, int cols, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t row = 0; row < (int64_t)blocks * Ns; row++) {
        scalar_t *s = S + row * cols;
        const scalar_t *m = mx + row / Ns * cols;
#pragma omp simd
        for (int c = 0; c < cols; c++) s[c] = EXP(s[c] - m[c]);
    }
}

/* dS holds dP - rowsum(dO * O) on entry and P (dP - rowsum(dO * O)) on exit. dtable (nthreads, M, Th,
   Tw): per-thread accumulators; dcoord (BG, Ns, 2) += gradients w.r.t. the keys' table coordinates
   (y, x); the caller scales them to positions. */
void NAME(bias_backward)(const scalar_t *table, const int32_t *lo_y, const scalar_t *fy, const int32_t *lo_x,
                         const scalar_t *fx, scalar_t *dS, const scalar_t *P, scalar_t *dtable, scalar_t *dcoord,
                         int G, int Mg, int Ns, int H, int W, int Th, int Tw, int g0, int n, int a0, int A,
                         int nthreads) {
    int64_t M = (int64_t)G * Mg;
#pragma omp parallel num_threads(nthreads)
    {
        scalar_t *buf = NULL;
        int *plan = NULL;
        int64_t capacity = 0;
        scalar_t *dt = dtable + (int64_t)omp_get_thread_num() * M * Th * Tw;
#pragma omp for schedule(static)
        for (int64_t gj = 0; gj < (int64_t)n * Ns; gj++) {
            int bgl = (int)(gj / Ns), j = (int)(gj % Ns), bg = g0 + bgl;
            const int32_t *lx = lo_x + ((int64_t)bg * Ns + j) * W;
            const scalar_t *wx = fx + ((int64_t)bg * Ns + j) * W;
            int xs = lx[0], bx = lx[W - 1] - xs + 2;
            if (bx > capacity) {
                capacity = bx;
                buf = (scalar_t *)realloc(buf, sizeof(scalar_t) * (size_t)NAME(row_scratch)(bx, W));
                plan = (int *)realloc(plan, sizeof(int) * (size_t)(bx + W + 16));
            }
            int longest = NAME(column_plan)(lx, W, xs, bx, plan);
            scalar_t gy = 0, gx = 0;
            for (int a = 0; a < A; a++) {
                int64_t yi = ((int64_t)bg * Ns + j) * H + a0 + a;
                int y0 = lo_y[yi];
                scalar_t w = fy[yi];
                for (int m = 0; m < Mg; m++) {
                    int64_t head = (int64_t)((bg % G) * Mg + m);
                    int64_t row = ((((int64_t)bgl * Mg + m) * Ns + j) * A + a) * W;
                    scalar_t *g = dS + row;
                    const scalar_t *p = P + row;
#pragma omp simd
                    for (int b = 0; b < W; b++) g[b] *= p[b];  /* dP - D -> dS, in place */
                    NAME(row_bias_grad)(table + head * Th * Tw, Th, Tw, y0, w, lx, xs, bx, plan, longest, g, wx, W,
                                        dt + head * Th * Tw, &gy, &gx, buf);
                }
            }
            dcoord[((int64_t)bg * Ns + j) * 2] += gy;
            dcoord[((int64_t)bg * Ns + j) * 2 + 1] += gx;
        }
        free(buf);
        free(plan);
    }
}

/* ---- the whole attention per (group, tile of T consecutive queries), GEMMs by the BLAS ---- */

/* Fortran BLAS ?gemm_ (column-major) */
typedef void (*NAME(blas_gemm))(const char *, const char *, const int *, const int *, const int *,
                                const scalar_t *, const scalar_t *, const int *, const scalar_t *, const int *,
                                const scalar_t *, scalar_t *, const int *);

/* row-major C (M x N, ldc) = op(A) op(B) + beta C; op(X) = X^T when tX (X is then stored K x M / N x K) */
static inline void NAME(mm)(NAME(blas_gemm) gemm, int ta, int tb, int M, int N, int K, const scalar_t *A,
                            int lda, const scalar_t *B, int ldb, scalar_t beta, scalar_t *C, int ldc) {
    const scalar_t one = 1;
    gemm(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

typedef struct {
    const scalar_t *table, *pos, *qy, *qx;  /* pos (BG, Ns, 2) normalised (y, x); qy (H), qx (W) */
    int G, Mg, Ns, H, W, Th, Tw;
} NAME(geometry);

/* A table coordinate as _axis_coords computes it (same operations, so the same corners):
   its floor, clamped as _native_coords does, and its fraction */
static inline int NAME(table_coord)(scalar_t qc, scalar_t pc, int size, scalar_t *frac) {
    scalar_t c = ((qc - pc) * (scalar_t)0.5 + 1) * ((scalar_t)(size - 1) / 2), lo = floor(c);
    *frac = c - lo;
    lo = lo < -2 * size - 2 ? -2 * size - 2 : (lo > 3 * size + 2 ? 3 * size + 2 : lo);
    return (int)lo;
}

/* A key at column position px against query columns [b0, b1): per column the table column of
   the first corner, cell (non-decreasing), and its weight wx */
static inline void NAME(key_columns)(const NAME(geometry) *geo, scalar_t px, int b0, int b1, int32_t *cell,
                                     scalar_t *wx) {
    for (int b = b0; b < b1; b++) cell[b - b0] = NAME(table_coord)(geo->qx[b], px, geo->Tw, wx + b - b0);
}

/* The columns of queries [p0, p0 + n) that need coordinates: [*lo, *hi), all W unless the
   queries lie in one row. The tile's row segments share them. */
static inline void NAME(tile_columns)(int W, int p0, int n, int *lo, int *hi) {
    int one_row = p0 / W == (p0 + n - 1) / W;
    *lo = one_row ? p0 % W : 0;
    *hi = one_row ? *lo + n : W;
}

/* The row segment of the tile's queries [p0, p0 + n) from tile column c0: query row *a,
   columns [*b0, *b1); the next segment starts at tile column c0 + *b1 - *b0 */
static inline void NAME(row_segment)(int W, int p0, int n, int c0, int *a, int *b0, int *b1) {
    *a = (p0 + c0) / W;
    *b0 = (p0 + c0) % W;
    *b1 = *b0 + (n - c0 < W - *b0 ? n - c0 : W - *b0);
}

/* g = p (g - delta): dP into the logits' gradient, over n queries of one key */
static inline void NAME(logit_grad)(scalar_t *g, const scalar_t *p, const scalar_t *delta, int n) {
#pragma omp simd
    for (int c = 0; c < n; c++) g[c] = p[c] * (g[c] - delta[c]);
}

/* Per-thread scratch of the bias (logits and bias_grad): the band is at most 5 * Tw + 8 */
static int64_t NAME(bias_scratch)(int W, int Tw) {
    int band = 5 * Tw + 8;
    return 2 * (int64_t)W + (band + W + 16) + NAME(row_scratch)(band, W);
}

/* Once a key's logits s[0 .. n) are complete (n queries, in a core's L1): the forward pass's
   maximum over the keys so far, mx (when given), or the backward pass's probabilities
   s = EXP(s - lse) */
static inline void NAME(logit_row)(scalar_t *s, int n, scalar_t *mx, const scalar_t *lse) {
    if (mx) {
#pragma omp simd
        for (int c = 0; c < n; c++) mx[c] = s[c] > mx[c] ? s[c] : mx[c];
    } else {
#pragma omp simd
        for (int c = 0; c < n; c++) s[c] = EXP(s[c] - lse[c]);
    }
}

/* S (Mg, Ns, n) = k^T q (+ bias when there is a table) for the Mg heads of group bg (heads
   bg * Mg ...), queries [p0, p0 + n), and then either mx (Mg, n) = its maximum over the keys
   (forward pass: mx given) or S = EXP(S - lse) (backward: lse, head m's at lse + m * HW).
   scratch: bias_scratch */
static void NAME(logits)(NAME(blas_gemm) gemm, const NAME(geometry) *geo, const scalar_t *q, const scalar_t *k,
                         int bg, int d, int p0, int n, scalar_t *S, scalar_t *mx, const scalar_t *lse,
                         scalar_t *scratch) {
    int Ns = geo->Ns, W = geo->W, HW = geo->H * W, Mg = geo->Mg, Th = geo->Th, Tw = geo->Tw;
    for (int m = 0; m < Mg; m++) {
        int64_t bm = (int64_t)bg * Mg + m;
        NAME(mm)(gemm, 1, 0, Ns, n, d, k + bm * d * Ns, Ns, q + bm * d * HW + p0, HW, 0, S + m * (int64_t)Ns * n, n);
    }
    if (mx)
        for (int64_t i = 0; i < (int64_t)Mg * n; i++) mx[i] = -INFINITY;
    if (!geo->table) {
        for (int m = 0; m < Mg; m++)
            for (int j = 0; j < Ns; j++)
                NAME(logit_row)(S + ((int64_t)m * Ns + j) * n, n, mx ? mx + (int64_t)m * n : NULL,
                                mx ? NULL : lse + (int64_t)m * HW);
        return;
    }
    int lo, hi;
    NAME(tile_columns)(W, p0, n, &lo, &hi);
    int32_t *cell = (int32_t *)scratch;
    scalar_t *wx = scratch + W, *R = wx + W;
    for (int j = 0; j < Ns; j++) {
        const scalar_t *p = geo->pos + ((int64_t)bg * Ns + j) * 2;
        NAME(key_columns)(geo, p[1], lo, hi, cell, wx);
        for (int c0 = 0, a, b0, b1; c0 < n; c0 += b1 - b0) {
            NAME(row_segment)(W, p0, n, c0, &a, &b0, &b1);
            scalar_t fy;
            int y0 = NAME(table_coord)(geo->qy[a], p[0], Th, &fy);
            for (int m = 0; m < Mg; m++) {
                const scalar_t *t = geo->table + (int64_t)((bg % geo->G) * Mg + m) * Th * Tw;
                scalar_t *s = S + ((int64_t)m * Ns + j) * n + c0;
                NAME(add_row_bias)(t, Th, Tw, y0, fy, cell + b0 - lo, wx + b0 - lo, b1 - b0, s, R);
                NAME(logit_row)(s, b1 - b0, mx ? mx + (int64_t)m * n + c0 : NULL, mx ? NULL : lse + (int64_t)m * HW + c0);
            }
        }
    }
}

/* dS (Mg, Ns, n) holds dP for the tile's queries [p0, p0 + n) on entry and the logits' gradient
   P (dP - delta) on exit (delta (Mg, n) = rowsum(dO * O)); from it the bias gradients: into the
   table (dt: this thread's copy) and the keys' table coordinates (dc: this thread's (BG, Ns, 2)).
   scratch: bias_scratch */
static void NAME(bias_grad)(const NAME(geometry) *geo, int bg, int p0, int n, scalar_t *dS, const scalar_t *P,
                            const scalar_t *delta, scalar_t *dt, scalar_t *dc, scalar_t *scratch) {
    int Ns = geo->Ns, W = geo->W, Mg = geo->Mg, Th = geo->Th, Tw = geo->Tw, lo, hi;
    NAME(tile_columns)(W, p0, n, &lo, &hi);
    int32_t *cell = (int32_t *)scratch;
    scalar_t *wx = scratch + W;
    int *plan = (int *)(wx + W);
    scalar_t *buf = wx + W + (5 * Tw + 8) + W + 16;
    for (int j = 0; j < Ns; j++) {
        const scalar_t *p = geo->pos + ((int64_t)bg * Ns + j) * 2;
        scalar_t *gyx = dc + ((int64_t)bg * Ns + j) * 2;
        NAME(key_columns)(geo, p[1], lo, hi, cell, wx);
        int planned_b0 = -1, planned_b1 = -1, longest = 0;
        for (int c0 = 0, a, b0, b1; c0 < n; c0 += b1 - b0) {
            NAME(row_segment)(W, p0, n, c0, &a, &b0, &b1);
            const int32_t *cs = cell + b0 - lo;
            int xs = cs[0], band = cs[b1 - b0 - 1] - xs + 2;
            if (b0 != planned_b0 || b1 != planned_b1) {  /* whole rows share one plan */
                longest = NAME(column_plan)(cs, b1 - b0, xs, band, plan);
                planned_b0 = b0, planned_b1 = b1;
            }
            scalar_t fy;
            int y0 = NAME(table_coord)(geo->qy[a], p[0], Th, &fy);
            for (int m = 0; m < Mg; m++) {
                int64_t head = (int64_t)((bg % geo->G) * Mg + m), row = ((int64_t)m * Ns + j) * n + c0;
                NAME(logit_grad)(dS + row, P + row, delta + (int64_t)m * n + c0, b1 - b0);
                NAME(row_bias_grad)(geo->table + head * Th * Tw, Th, Tw, y0, fy, cs, xs, band, plan, longest,
                                    dS + row, wx + b0 - lo, b1 - b0, dt + head * Th * Tw, gyx, gyx + 1, buf);
            }
        }
    }
}

/* Per-thread workspace of attention_backward before its gradient sums (attention_forward's is smaller) */
int64_t NAME(attention_tile_size)(int Mg, int Ns, int T, int W, int Tw) {
    return (int64_t)Mg * (2 * Ns + 1) * T + NAME(bias_scratch)(W, Tw);
}

/* out (BM, d, HW) = attention output, lse (BM, HW) its log-sum-exp. q (BM, d, HW); k, v (BM, d, Ns);
   pos, table, qy, qx as deformable_attention's (table may be NULL: no bias).
   work: nthreads * (Mg * (Ns + 1) * T + T + bias_scratch) */
void NAME(attention_forward)(void *gemm_fn, void *blas_threads_fn, const scalar_t *q, const scalar_t *k,
                             const scalar_t *v, const scalar_t *table, const scalar_t *pos, const scalar_t *qy,
                             const scalar_t *qx, scalar_t *out, scalar_t *lse, scalar_t *work,
                             int BM, int d, int G, int Mg, int Ns, int H, int W, int Th, int Tw, int T,
                             int nthreads) {
    NAME(blas_gemm) gemm = (NAME(blas_gemm))gemm_fn;
    NAME(geometry) geo = {table, pos, qy, qx, G, Mg, Ns, H, W, Th, Tw};
    int HW = H * W, tiles = (HW + T - 1) / T, BG = BM / Mg;
    int64_t per_thread = (int64_t)Mg * (Ns + 1) * T + T + NAME(bias_scratch)(W, Tw);
#pragma omp parallel num_threads(nthreads)
    {
        int previous = blas_threads_fn ? ((int (*)(int))blas_threads_fn)(1) : 0;
        scalar_t *S = work + (int64_t)omp_get_thread_num() * per_thread;
        scalar_t *mx_all = S + (int64_t)Mg * Ns * T, *l = mx_all + (int64_t)Mg * T, *scratch = l + T;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < (int64_t)BG * tiles; item++) {
            int bg = (int)(item / tiles), p0 = (int)(item % tiles) * T, n = HW - p0 < T ? HW - p0 : T;
            NAME(logits)(gemm, &geo, q, k, bg, d, p0, n, S, mx_all, NULL, scratch);
            for (int m = 0; m < Mg; m++) {
                int64_t bm = (int64_t)bg * Mg + m;
                scalar_t *Sm = S + (int64_t)m * Ns * n, *mx = mx_all + (int64_t)m * n;
                for (int c = 0; c < n; c++) l[c] = 0;
                for (int j = 0; j < Ns; j++) {
                    scalar_t *s = Sm + (int64_t)j * n;
#pragma omp simd
                    for (int c = 0; c < n; c++) {
                        s[c] = EXP(s[c] - mx[c]);
                        l[c] += s[c];
                    }
                }
                scalar_t *o = out + bm * d * HW + p0;
                NAME(mm)(gemm, 0, 0, d, n, Ns, v + bm * d * Ns, Ns, Sm, n, 0, o, HW);
                for (int c = 0; c < n; c++) {
                    lse[bm * HW + p0 + c] = LOG(l[c]) + mx[c];
                    l[c] = 1 / l[c];
                }
                for (int ch = 0; ch < d; ch++) {
                    scalar_t *oc = o + (int64_t)ch * HW;
#pragma omp simd
                    for (int c = 0; c < n; c++) oc[c] *= l[c];
                }
            }
        }
        if (blas_threads_fn) ((int (*)(int))blas_threads_fn)(previous);
    }
}

/* Gradients of attention_forward given dout (BM, d, HW), or (HW, BM, d) when dout_cl (a batch of one's
   channels-last gradient), out and lse: dq (BM, d, HW); dk, dv (BM, d, Ns);
   dtable (M, Th, Tw) and dcoord (BG, Ns, 2) (w.r.t. the keys' table coordinates) when table is given.
   work: nthreads * (attention_tile_size + 2 * BM * d * Ns + M * Th * Tw + 2 * BG * Ns) */
void NAME(attention_backward)(void *gemm_fn, void *blas_threads_fn, const scalar_t *q, const scalar_t *k,
                              const scalar_t *v, const scalar_t *table, const scalar_t *pos, const scalar_t *qy,
                              const scalar_t *qx, const scalar_t *out, const scalar_t *lse, const scalar_t *dout,
                              scalar_t *dq, scalar_t *dk, scalar_t *dv, scalar_t *dtable, scalar_t *dcoord,
                              scalar_t *work, int BM, int d, int G, int Mg, int Ns, int H, int W, int Th, int Tw,
                              int T, int dout_cl, int nthreads) {
    NAME(blas_gemm) gemm = (NAME(blas_gemm))gemm_fn;
    NAME(geometry) geo = {table, pos, qy, qx, G, Mg, Ns, H, W, Th, Tw};
    int HW = H * W, tiles = (HW + T - 1) / T, BG = BM / Mg, ldg = dout_cl ? BM * d : HW;
    int64_t kv_size = (int64_t)BM * d * Ns, table_size = table ? (int64_t)G * Mg * Th * Tw : 0;
    int64_t coord_size = table ? 2 * (int64_t)BG * Ns : 0;
    int64_t acc_size = 2 * kv_size + table_size + coord_size;
    int64_t tile_size = NAME(attention_tile_size)(Mg, Ns, T, W, Tw);
    int64_t per_thread = tile_size + acc_size;
    int team = 1;
#pragma omp parallel num_threads(nthreads)
    {
        int previous = blas_threads_fn ? ((int (*)(int))blas_threads_fn)(1) : 0;
#pragma omp single
        team = omp_get_num_threads();
        scalar_t *P = work + (int64_t)omp_get_thread_num() * per_thread;
        scalar_t *dS = P + (int64_t)Mg * Ns * T, *delta = dS + (int64_t)Mg * Ns * T, *scratch = delta + (int64_t)Mg * T;
        scalar_t *acc = P + tile_size;
        scalar_t *dk_acc = acc, *dv_acc = acc + kv_size, *dt = dv_acc + kv_size, *dc = dt + table_size;
        memset(acc, 0, sizeof(scalar_t) * (size_t)acc_size);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < (int64_t)BG * tiles; item++) {
            int bg = (int)(item / tiles), p0 = (int)(item % tiles) * T, n = HW - p0 < T ? HW - p0 : T;
            NAME(logits)(gemm, &geo, q, k, bg, d, p0, n, P, NULL, lse + (int64_t)bg * Mg * HW + p0, scratch);
            /* per head: dv += dO^T P and dP = dO v^T (into dS), then dS = P (dP - delta) */
            for (int m = 0; m < Mg; m++) {
                int64_t bm = (int64_t)bg * Mg + m;
                const scalar_t *ot = out + bm * d * HW + p0;
                const scalar_t *gt = dout + (dout_cl ? bm * d + (int64_t)p0 * ldg : bm * d * HW + p0);
                scalar_t *Pm = P + (int64_t)m * Ns * n, *dSm = dS + (int64_t)m * Ns * n, *dl = delta + (int64_t)m * n;
                /* delta = rowsum(dO * O) per query */
                for (int c = 0; c < n; c++) dl[c] = 0;
                if (dout_cl) {
                    for (int c = 0; c < n; c++)
                        for (int ch = 0; ch < d; ch++) dl[c] += gt[(int64_t)c * ldg + ch] * ot[(int64_t)ch * HW + c];
                } else {
                    for (int ch = 0; ch < d; ch++)
#pragma omp simd
                        for (int c = 0; c < n; c++) dl[c] += gt[(int64_t)ch * HW + c] * ot[(int64_t)ch * HW + c];
                }
                /* dO's tile (d x n) is stored transposed when dout_cl */
                NAME(mm)(gemm, dout_cl, 1, d, Ns, n, gt, ldg, Pm, n, 1, dv_acc + bm * d * Ns, Ns);
                NAME(mm)(gemm, 1, dout_cl, Ns, n, d, v + bm * d * Ns, Ns, gt, ldg, 0, dSm, n);
                if (!table)
                    for (int j = 0; j < Ns; j++) NAME(logit_grad)(dSm + (int64_t)j * n, Pm + (int64_t)j * n, dl, n);
            }
            /* with a table, dS per key and row while its bias gradient is taken */
            if (table) NAME(bias_grad)(&geo, bg, p0, n, dS, P, delta, dt, dc, scratch);
            for (int m = 0; m < Mg; m++) {
                int64_t bm = (int64_t)bg * Mg + m;
                scalar_t *dSm = dS + (int64_t)m * Ns * n;
                NAME(mm)(gemm, 0, 0, d, n, Ns, k + bm * d * Ns, Ns, dSm, n, 0, dq + bm * d * HW + p0, HW);
                NAME(mm)(gemm, 0, 1, d, Ns, n, q + bm * d * HW + p0, HW, dSm, n, 1, dk_acc + bm * d * Ns, Ns);
            }
        }
        if (blas_threads_fn) ((int (*)(int))blas_threads_fn)(previous);
        /* after the loop's barrier: every thread's sums are complete */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < acc_size; i++) {
            scalar_t s = 0;
            for (int t = 0; t < team; t++) s += work[(int64_t)t * per_thread + tile_size + i];
            if (i < kv_size) dk[i] = s;
            else if (i < 2 * kv_size) dv[i - kv_size] = s;
            else if (i < 2 * kv_size + table_size) dtable[i - 2 * kv_size] = s;
            else dcoord[i - 2 * kv_size - table_size] = s;
        }
    }
}
