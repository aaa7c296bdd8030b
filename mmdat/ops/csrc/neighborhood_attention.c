/* NA2D (2D neighborhood attention with relative position bias) forward and backward on CPU.
   Queries are processed a row at a time in blocks of one 64-byte vector of consecutive
   columns (16 float32 lanes); q, k and v are read channel-major, qkv_t (B, 3, heads, d, H, W)
   as a matmul writes it, so that for a window offset (a, r) the keys of a block's queries are
   one shifted vector load of a key row: the logits, the weighted sums and their gradients are
   vector FMAs over channels without gathers or horizontal sums. Blocks whose lanes' windows
   are clamped at the map's sides (or that run past it) read zero-padded copies of their key
   rows and mask the offsets outside each lane's window. out (B, H, W, heads, d) is
   position-major for the projection after it; lse (B, heads, H, W); rpb (heads, 2k-1, 2k-1).
   The backward recomputes the logits from lse. */
#include "common.h"

#define NA_RC 8  /* offsets per register block */
#define NA_CC 8  /* channels per register block */
#define NA_VB ((int)(64 / sizeof(scalar_t)))  /* lanes per block: one vector */

/* A block of lanes x0 .. x0 + VB - 1 of a row: each lane's window starts at offset lo (key
   column - query column); returns whether the block is interior (all lanes in the map, all
   windows unclamped); sets the block's offset range [rlo, rlo + R). */
static int NAME(na_block)(int x0, int W, int K, int *lo, int *rlo, int *R) {
    int mn = 1 << 30, mx = -(1 << 30), interior = 1;
    for (int l = 0; l < NA_VB; l++) {
        int x = x0 + l;
        if (x >= W) { lo[l] = 1 << 29; interior = 0; continue; }
        lo[l] = clamp_int(x - K / 2, 0, W - K) - x;
        mn = lo[l] < mn ? lo[l] : mn;
        mx = lo[l] > mx ? lo[l] : mx;
        interior &= lo[l] == -(K / 2);
    }
    *rlo = mn;
    *R = mx + K - mn;
    return interior;
}

/* K rows x d channels of a key plane (channel stride HW, row stride W) around a block, as
   columns x0 + rlo + t, t < Lw, zero outside the map: [a][c][t]. */
static void NAME(na_window_copy)(const scalar_t *plane, int64_t HW, int W, int sy, int K, int d, int col0, int Lw,
                                 scalar_t *dst) {
    for (int a = 0; a < K; a++)
        for (int c = 0; c < d; c++) {
            const scalar_t *src = plane + c * HW + (int64_t)(sy + a) * W;
            scalar_t *o = dst + ((int64_t)a * d + c) * Lw;
            for (int t = 0; t < Lw; t++) {
                int col = col0 + t;
                o[t] = col >= 0 && col < W ? src[col] : (scalar_t)0;
            }
        }
}

/* Adds a block's window accumulator [a][c][t] back into the plane, inside the map only. */
static void NAME(na_window_add)(scalar_t *plane, int64_t HW, int W, int sy, int K, int d, int col0, int Lw,
                                const scalar_t *src) {
    for (int a = 0; a < K; a++)
        for (int c = 0; c < d; c++) {
            scalar_t *o = plane + c * HW + (int64_t)(sy + a) * W;
            const scalar_t *s = src + ((int64_t)a * d + c) * Lw;
            for (int t = 0; t < Lw; t++) {
                int col = col0 + t;
                if (col >= 0 && col < W) o[col] += s[t];
            }
        }
}

/* A block's lanes of a channel-major plane (d x VB, zero past the map) */
static void NAME(na_lanes)(const scalar_t *plane, int64_t HW, int64_t at, int n, int d, scalar_t mul, scalar_t *dst) {
    for (int c = 0; c < d; c++) {
        const scalar_t *src = plane + c * HW + at;
        if (n == NA_VB) {
            *(NAME(vec) *)(dst + c * NA_VB) = *(const NAME(uvec) *)src * mul;
        } else {
            for (int l = 0; l < NA_VB; l++) dst[c * NA_VB + l] = l < n ? src[l] * mul : (scalar_t)0;
        }
    }
}

/* s[a][r] (vectors) = init[a][r] + sum_c xb[c] * key[a][c][r + lane] for r < Rp (a multiple
   of NA_RC); key (a, c, t) at kb[a * rs + c * cs + t]. */
static void NAME(na_dots)(const scalar_t *xb, const scalar_t *kb, int64_t cs, int64_t rs, int K, int Rp, int d,
                          const scalar_t *init, scalar_t *s) {
    for (int a = 0; a < K; a++)
        for (int r0 = 0; r0 < Rp; r0 += NA_RC) {
            NAME(vec) acc[NA_RC];
            for (int i = 0; i < NA_RC; i++) acc[i] = (NAME(vec)){0} + (init ? init[a * Rp + r0 + i] : (scalar_t)0);
            const scalar_t *kr = kb + a * rs + r0;
            for (int c = 0; c < d; c++, kr += cs) {
                NAME(vec) x = *(const NAME(vec) *)(xb + c * NA_VB);
#pragma GCC unroll 8
                for (int i = 0; i < NA_RC; i++) acc[i] += x * *(const NAME(uvec) *)(kr + i);
            }
            for (int i = 0; i < NA_RC; i++) *(NAME(vec) *)(s + ((int64_t)a * Rp + r0 + i) * NA_VB) = acc[i];
        }
}

/* o[c] (vectors) = sum over a, r < R of w[a][r] * val[a][c][r + lane] */
static void NAME(na_weighted)(const scalar_t *w, const scalar_t *vb, int64_t cs, int64_t rs, int K, int R, int Rp,
                              int d, scalar_t *o) {
    int c0 = 0;
    for (; c0 + NA_CC <= d; c0 += NA_CC) {
        NAME(vec) acc[NA_CC];
        for (int i = 0; i < NA_CC; i++) acc[i] = (NAME(vec)){0};
        for (int a = 0; a < K; a++)
            for (int r = 0; r < R; r++) {
                NAME(vec) p = *(const NAME(vec) *)(w + ((int64_t)a * Rp + r) * NA_VB);
                const scalar_t *vr = vb + a * rs + c0 * cs + r;
#pragma GCC unroll 8
                for (int i = 0; i < NA_CC; i++) acc[i] += p * *(const NAME(uvec) *)(vr + i * cs);
            }
        for (int i = 0; i < NA_CC; i++) *(NAME(vec) *)(o + (c0 + i) * NA_VB) = acc[i];
    }
    for (; c0 < d; c0++) {
        NAME(vec) acc = {0};
        for (int a = 0; a < K; a++)
            for (int r = 0; r < R; r++)
                acc += *(const NAME(vec) *)(w + ((int64_t)a * Rp + r) * NA_VB)
                       * *(const NAME(uvec) *)(vb + a * rs + c0 * cs + r);
        *(NAME(vec) *)(o + c0 * NA_VB) = acc;
    }
}

/* val[a][c][r + lane] += w[a][r] * xb[c] for r < R. Offsets outermost: the unaligned
   read-modify-writes of offsets r and r + 1 overlap, and a load that overlaps a store still
   in flight cannot take its data from it; K * d other stores in between let it retire. */
static void NAME(na_scatter)(const scalar_t *w, const scalar_t *xb, scalar_t *vb, int64_t cs, int64_t rs, int K,
                             int R, int Rp, int d) {
    for (int r = 0; r < R; r++)
        for (int a = 0; a < K; a++) {
            NAME(vec) p = *(const NAME(vec) *)(w + ((int64_t)a * Rp + r) * NA_VB);
            scalar_t *vr = vb + a * rs + r;
            for (int c = 0; c < d; c++, vr += cs)
                *(NAME(uvec) *)vr = *(NAME(uvec) *)vr + p * *(const NAME(vec) *)(xb + c * NA_VB);
        }
}

/* Per block: bias init[a][r] (0 past the table), the 0/1 masks of each offset's lanes
   (mask[r], only for blocks that are not interior). */
static void NAME(na_bias)(const scalar_t *bt, int K, int sy, int y, int rlo, int Rp, scalar_t *init) {
    int S = 2 * K - 1;
    for (int a = 0; a < K; a++)
        for (int r = 0; r < Rp; r++) {
            int tx = rlo + r + K - 1;
            init[a * Rp + r] = tx >= 0 && tx < S ? bt[(sy + a - y + K - 1) * S + tx] : (scalar_t)0;
        }
}
static void NAME(na_masks)(const int *lo, int K, int rlo, int R, scalar_t *mask) {
    for (int r = 0; r < R; r++)
        for (int l = 0; l < NA_VB; l++) {
            int t = rlo + r;
            mask[r * NA_VB + l] = lo[l] <= t && t < lo[l] + K ? (scalar_t)1 : (scalar_t)0;
        }
}

/* Row-softmax over a block's logits s[a][r < R]: s becomes exp(s - shift) (masked); shift
   is the max (forward) or given (lse, backward); returns the max in mx and the sum in sum. */
static void NAME(na_exp)(scalar_t *s, const scalar_t *mask, int K, int R, int Rp, const scalar_t *shift,
                         scalar_t *mx, scalar_t *sum) {
    NAME(vec) m;
    if (shift) {
        m = *(const NAME(vec) *)shift;
    } else {
        m = (NAME(vec)){0} - (scalar_t)1e30;
        for (int a = 0; a < K; a++)
            for (int r = 0; r < R; r++) {
                NAME(vec) v = *(NAME(vec) *)(s + ((int64_t)a * Rp + r) * NA_VB);
                if (mask) v -= (1 - *(const NAME(vec) *)(mask + r * NA_VB)) * (scalar_t)1e30;
                for (int l = 0; l < NA_VB; l++) m[l] = v[l] > m[l] ? v[l] : m[l];
            }
        *(NAME(vec) *)mx = m;
    }
    NAME(vec) total = {0};
    for (int a = 0; a < K; a++)
        for (int r = 0; r < R; r++) {
            scalar_t *v = s + ((int64_t)a * Rp + r) * NA_VB;
            NAME(vec) mk;
            if (mask) {  /* masked logits become the shift: exp stays finite, then times 0 */
                mk = *(const NAME(vec) *)(mask + r * NA_VB);
                *(NAME(vec) *)v = *(NAME(vec) *)v * mk + m * (1 - mk);
            }
#pragma omp simd
            for (int l = 0; l < NA_VB; l++) v[l] = EXP(v[l] - m[l]);
            if (mask) *(NAME(vec) *)v *= mk;
            total += *(NAME(vec) *)v;
        }
    if (sum) *(NAME(vec) *)sum = total;
}

/* A block of lanes as the kernels read it: its offset range, whether it is interior, and
   where its keys and values are (in place, or the zero-padded window copies) */
typedef struct {
    int rlo, R, Rp, n, interior;
    int64_t off, cs, rs;  /* in-place offset of key (0, 0, 0); channel and row strides */
    const scalar_t *kb, *vb;
} NAME(na_blk);

/* Sets up the block at (y, x0) of one head's planes and computes its logits s (scale q.k +
   bias, before the softmax): q lanes in qb, window copies in kw / vw and masks in mask
   when the block is not interior. Inlined: as a call it cost the backward 4%. */
static inline __attribute__((always_inline)) NAME(na_blk)
NAME(na_block_logits)(const scalar_t *qp, const scalar_t *kp, const scalar_t *vp, const scalar_t *bt, int64_t HW,
                      int W, int H, int y, int x0, int K, int d, scalar_t scale, int Lw, int *lo, scalar_t *kw,
                      scalar_t *vw, scalar_t *mask, scalar_t *qb, scalar_t *init, scalar_t *s) {
    NAME(na_blk) bk;
    int sy = clamp_int(y - K / 2, 0, H - K);
    bk.n = W - x0 < NA_VB ? W - x0 : NA_VB;
    bk.interior = NAME(na_block)(x0, W, K, lo, &bk.rlo, &bk.R);
    bk.Rp = (bk.R + NA_RC - 1) / NA_RC * NA_RC;
    bk.off = (int64_t)sy * W + x0 + bk.rlo, bk.cs = HW, bk.rs = W;
    bk.kb = kp + bk.off, bk.vb = vp + bk.off;
    if (!bk.interior) {
        NAME(na_window_copy)(kp, HW, W, sy, K, d, x0 + bk.rlo, Lw, kw);
        NAME(na_window_copy)(vp, HW, W, sy, K, d, x0 + bk.rlo, Lw, vw);
        NAME(na_masks)(lo, K, bk.rlo, bk.R, mask);
        bk.kb = kw, bk.vb = vw, bk.cs = Lw, bk.rs = (int64_t)d * Lw;
    }
    NAME(na_lanes)(qp, HW, (int64_t)y * W + x0, bk.n, d, scale, qb);
    NAME(na_bias)(bt, K, sy, y, bk.rlo, bk.Rp, init);
    NAME(na_dots)(qb, bk.kb, bk.cs, bk.rs, K, bk.Rp, d, init, s);
    return bk;
}

#define NA_BUFFERS \
    int S = 2 * K - 1, Rmax = (S + NA_RC - 1) / NA_RC * NA_RC, Lw = Rmax + NA_VB; \
    int64_t HW = (int64_t)H * W, plane = (int64_t)d * HW; \
    size_t win = ((size_t)K * d * Lw + NA_VB - 1) / NA_VB * NA_VB, blk = (size_t)K * Rmax * NA_VB; \
    size_t total = 4 * win + 2 * blk + (size_t)(3 * d + Rmax + 4) * NA_VB + (size_t)K * Rmax; \
    scalar_t *mem = (scalar_t *)aligned_alloc(64, (sizeof(scalar_t) * total + 63) / 64 * 64); \
    scalar_t *kw = mem, *vw = kw + win, *dkw = vw + win, *dvw = dkw + win, *s = dvw + win, *ds = s + blk; \
    scalar_t *qb = ds + blk, *gb = qb + d * NA_VB, *ob = gb + d * NA_VB; \
    scalar_t *mask = ob + d * NA_VB, *mx = mask + Rmax * NA_VB, *sm = mx + NA_VB, *lb = sm + NA_VB, *Db = lb + NA_VB; \
    scalar_t *init = Db + NA_VB; \
    int lo[64];

void NAME(na_forward)(const scalar_t *qkv, const scalar_t *rpb, scalar_t *out, scalar_t *lse, scalar_t *scale_,
                      int B, int heads, int H, int W, int d, int K, int nthreads) {
    int C = heads * d;
    scalar_t scale = *scale_;
#pragma omp parallel num_threads(nthreads)
    {
        NA_BUFFERS
#pragma omp for schedule(static)
        for (int64_t row = 0; row < (int64_t)B * heads * H; row++) {
            int b = (int)(row / ((int64_t)heads * H)), h = (int)(row / H % heads), y = (int)(row % H);
            const scalar_t *qp = qkv + ((int64_t)b * 3 * heads + h) * plane, *kp = qp + heads * plane;
            const scalar_t *vp = kp + heads * plane, *bt = rpb + (int64_t)h * S * S;
            for (int x0 = 0; x0 < W; x0 += NA_VB) {
                NAME(na_blk) bk = NAME(na_block_logits)(qp, kp, vp, bt, HW, W, H, y, x0, K, d, scale, Lw, lo, kw, vw,
                                                        mask, qb, init, s);
                NAME(na_exp)(s, bk.interior ? NULL : mask, K, bk.R, bk.Rp, NULL, mx, sm);
                NAME(na_weighted)(s, bk.vb, bk.cs, bk.rs, K, bk.R, bk.Rp, d, ob);
                for (int l = 0; l < bk.n; l++) {
                    scalar_t inv = 1 / sm[l];
                    scalar_t *o = out + (((int64_t)b * H + y) * W + x0 + l) * C + h * d;
                    for (int c = 0; c < d; c++) o[c] = ob[c * NA_VB + l] * inv;
                    lse[(((int64_t)b * heads + h) * H + y) * W + x0 + l] = mx[l] + LOG(sm[l]);
                }
            }
        }
        free(mem);
    }
}

/* dqkv (B, 3, heads, d, H, W): the k and v parts must be zero; drpb (nthreads, heads, 2k-1,
   2k-1) zeros, one accumulator per thread. Blocks of 2k-2 rows: the keys of blocks two
   apart are disjoint, so blocks of one parity run in parallel without races on dk and dv. */
void NAME(na_backward)(const scalar_t *qkv, const scalar_t *rpb, const scalar_t *out, const scalar_t *lse,
                       const scalar_t *dout, scalar_t *dqkv, scalar_t *drpb, scalar_t *scale_,
                       int B, int heads, int H, int W, int d, int K, int nthreads) {
    int C = heads * d, rows = 2 * K - 2 > 1 ? 2 * K - 2 : 1;
    int blocks = (H + rows - 1) / rows;
    scalar_t scale = *scale_;
#pragma omp parallel num_threads(nthreads)
    {
        NA_BUFFERS
        scalar_t *dt = drpb + (int64_t)omp_get_thread_num() * heads * S * S;
        for (int parity = 0; parity < 2; parity++) {
            int nb = (blocks - parity + 1) / 2;
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < (int64_t)B * heads * nb; item++) {
                int bh = (int)(item / nb), blk = 2 * (int)(item % nb) + parity, b = bh / heads, h = bh % heads;
                int64_t head = ((int64_t)b * 3 * heads + h) * plane;
                const scalar_t *qp = qkv + head, *kp = qp + heads * plane, *vp = kp + heads * plane;
                scalar_t *dqp = dqkv + head, *dkp = dqp + heads * plane, *dvp = dkp + heads * plane;
                const scalar_t *bt = rpb + (int64_t)h * S * S;
                scalar_t *dbt = dt + (int64_t)h * S * S;
                int y1 = (blk + 1) * rows < H ? (blk + 1) * rows : H;
                for (int y = blk * rows; y < y1; y++) {
                    int sy = clamp_int(y - K / 2, 0, H - K);
                    for (int x0 = 0; x0 < W; x0 += NA_VB) {
                        NAME(na_blk) bk = NAME(na_block_logits)(qp, kp, vp, bt, HW, W, H, y, x0, K, d, scale, Lw, lo,
                                                                kw, vw, mask, qb, init, s);
                        int rlo = bk.rlo, R = bk.R, Rp = bk.Rp, n = bk.n;
                        const scalar_t *kb = bk.kb;
                        scalar_t *dkb = dkp + bk.off, *dvb = dvp + bk.off;
                        if (!bk.interior) {
                            memset(dkw, 0, sizeof(scalar_t) * 2 * win);  /* dkw, dvw */
                            dkb = dkw, dvb = dvw;
                        }
                        if (n < NA_VB) memset(gb, 0, sizeof(scalar_t) * (size_t)d * NA_VB);
                        for (int l = 0; l < NA_VB; l++) {  /* dO lanes, D = rowsum(dO * O), lse */
                            scalar_t D = 0;
                            if (l < n) {
                                int64_t at = (((int64_t)b * H + y) * W + x0 + l) * C + h * d;
                                const scalar_t *g = dout + at, *o = out + at;
#pragma omp simd reduction(+:D)
                                for (int c = 0; c < d; c++) D += g[c] * o[c];
                                for (int c = 0; c < d; c++) gb[c * NA_VB + l] = g[c];
                            }
                            Db[l] = D;
                            lb[l] = l < n ? lse[(((int64_t)b * heads + h) * H + y) * W + x0 + l] : (scalar_t)0;
                        }
                        int64_t cs = bk.cs, rs = bk.rs;
                        NAME(na_exp)(s, bk.interior ? NULL : mask, K, R, Rp, lb, NULL, NULL);  /* P */
                        NAME(na_dots)(gb, bk.vb, cs, rs, K, Rp, d, NULL, ds);  /* dP = dO V^T */
                        NAME(vec) Dv = *(NAME(vec) *)Db;
                        for (int a = 0; a < K; a++)
                            for (int r = 0; r < R; r++) {
                                int64_t i = ((int64_t)a * Rp + r) * NA_VB;
                                NAME(vec) g = *(NAME(vec) *)(s + i) * (*(NAME(vec) *)(ds + i) - Dv);
                                *(NAME(vec) *)(ds + i) = g;  /* dS, w.r.t. the logits */
                                scalar_t sum = 0;
                                for (int l = 0; l < NA_VB; l++) sum += g[l];
                                dbt[(sy + a - y + K - 1) * S + rlo + r + K - 1] += sum;
                            }
                        NAME(na_weighted)(ds, kb, cs, rs, K, R, Rp, d, ob);  /* dQ / scale */
                        for (int c = 0; c < d; c++) {
                            scalar_t *dq = dqp + c * HW + (int64_t)y * W + x0;
                            for (int l = 0; l < n; l++) dq[l] = ob[c * NA_VB + l] * scale;
                        }
                        NAME(na_scatter)(ds, qb, dkb, cs, rs, K, R, Rp, d);  /* dK += dS^T (scale Q) */
                        NAME(na_scatter)(s, gb, dvb, cs, rs, K, R, Rp, d);  /* dV += P^T dO */
                        if (!bk.interior) {
                            NAME(na_window_add)(dkp, HW, W, sy, K, d, x0 + rlo, Lw, dkw);
                            NAME(na_window_add)(dvp, HW, W, sy, K, d, x0 + rlo, Lw, dvw);
                        }
                    }
                }
            }
        }
        free(mem);
    }
}
