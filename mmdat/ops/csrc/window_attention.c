/* (Shifted-)window attention forward and backward on CPU, one window (and head) per task, read
   and written where the Linear layers around it keep their tokens: qkv (B, H, W, 3, heads, d),
   out (B, H, W, heads, d). Padding and the shift are index arithmetic: a key at a padded
   position is the projection of zeros, i.e. the qkv bias; queries at padded positions are
   never computed (they are cropped). table: (heads, (2w-1)^2); lse: (B, heads, H, W). */
#include "common.h"
/* The window (wy, wx) of the rolled, padded map: each of its w*w slots' position in the
   input (-1: padding) and shift-region label; returns whether labels differ (a mask). */
static int NAME(window)(int wy, int wx, int H, int W, int Hp, int Wp, int w, int s, int64_t *at, int *label) {
    int masked = 0;
    for (int a = 0; a < w; a++) {
        int ry = wy * w + a, y = (ry + s) % Hp;
        int ly = s == 0 ? 0 : (ry < Hp - w ? 0 : (ry < Hp - s ? 1 : 2));
        for (int c = 0; c < w; c++) {
            int rx = wx * w + c, x = (rx + s) % Wp;
            int lx = s == 0 ? 0 : (rx < Wp - w ? 0 : (rx < Wp - s ? 1 : 2));
            at[a * w + c] = (y < H && x < W) ? (int64_t)y * W + x : -1;
            label[a * w + c] = 3 * ly + lx;
            masked |= label[a * w + c] != label[0];
        }
    }
    return masked;
}

/* The table entry (of one head's S x S) of the displacement between window slots i and j */
static inline int NAME(rel_index)(int i, int j, int w) {
    return (i / w - j / w + w - 1) * (2 * w - 1) + (i % w - j % w + w - 1);
}

/* The bias of every (query, key) slot pair of a window, per head: (heads, N, N). */
static scalar_t *NAME(bias_matrices)(const scalar_t *table, int heads, int w) {
    int N = w * w, S = 2 * w - 1;
    scalar_t *bm = (scalar_t *)malloc(sizeof(scalar_t) * (size_t)heads * N * N);
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++)
                bm[((int64_t)h * N + i) * N + j] = table[(int64_t)h * S * S + NAME(rel_index)(i, j, w)];
    return bm;
}

/* Gathers the window's rows: Q (N x d, scaled; zero at padded queries), K and V (N x d), Kt
   and Vt (d x N); padded keys are the bias. Then Sm = Q K^T + bias (+ the shift mask). */
static void NAME(window_logits)(const scalar_t *base, const scalar_t *bias, const scalar_t *bm, const int64_t *at,
                                const int *label, int masked, scalar_t *Q, scalar_t *K, scalar_t *Kt, scalar_t *V,
                                scalar_t *Vt, scalar_t *Sm, scalar_t scale, int ts, int C, int h, int N, int d) {
    for (int j = 0; j < N; j++) {
        const scalar_t *src = at[j] >= 0 ? base + at[j] * ts : bias + h * d;
        for (int c = 0; c < d; c++) {
            Q[j * d + c] = at[j] >= 0 ? src[c] * scale : (scalar_t)0;
            K[j * d + c] = Kt[c * N + j] = src[C + c];
            V[j * d + c] = src[2 * C + c];
            if (Vt) Vt[c * N + j] = src[2 * C + c];
        }
    }
    memcpy(Sm, bm, sizeof(scalar_t) * (size_t)N * N);
    if (masked)
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++) Sm[i * N + j] -= label[i] != label[j] ? (scalar_t)100 : (scalar_t)0;
    NAME(gemm)(N, N, d, Q, d, 1, Kt, N, Sm, N, 1);
}

#define WINDOW_BUFFERS \
    int64_t *at = (int64_t *)malloc(sizeof(int64_t) * N); \
    int *label = (int *)malloc(sizeof(int) * N); \
    scalar_t *buf = (scalar_t *)malloc(sizeof(scalar_t) * ((size_t)9 * N * d + (size_t)2 * N * N + N)); \
    scalar_t *Q = buf, *K = Q + N * d, *Kt = K + N * d, *V = Kt + N * d, *Vt = V + N * d, *dO = Vt + N * d; \
    scalar_t *dQ = dO + N * d, *dK = dQ + N * d, *dV = dK + N * d, *Sm = dV + N * d, *dP = Sm + N * N; \
    scalar_t *rowsum = dP + N * N;

void NAME(wa_forward)(const scalar_t *qkv, const scalar_t *bias, const scalar_t *table, scalar_t *out, scalar_t *lse,
                      scalar_t *scale_, int B, int heads, int H, int W, int d, int w, int s, int nthreads) {
    int C = heads * d, ts = 3 * C, N = w * w;
    int nwy = (H + w - 1) / w, nwx = (W + w - 1) / w, Hp = nwy * w, Wp = nwx * w;
    scalar_t scale = *scale_;
    scalar_t *bm = NAME(bias_matrices)(table, heads, w);
#pragma omp parallel num_threads(nthreads)
    {
        WINDOW_BUFFERS
#pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)B * nwy * nwx; item++) {
            int win = (int)(item % (nwy * nwx)), b = (int)(item / (nwy * nwx));
            int masked = NAME(window)(win / nwx, win % nwx, H, W, Hp, Wp, w, s, at, label);
            for (int h = 0; h < heads; h++) {
                NAME(window_logits)(qkv + (int64_t)b * H * W * ts + h * d, bias, bm + (int64_t)h * N * N, at, label,
                                    masked, Q, K, Kt, V, NULL, Sm, scale, ts, C, h, N, d);
                for (int i = 0; i < N; i++) {
                    scalar_t *row = Sm + i * N, mx = -INFINITY, sum = 0;
                    if (at[i] < 0) {  /* a padded query: its row must only stay finite */
                        memset(row, 0, sizeof(scalar_t) * (size_t)N);
                        continue;
                    }
#pragma omp simd reduction(max:mx)
                    for (int j = 0; j < N; j++) mx = row[j] > mx ? row[j] : mx;
#pragma omp simd reduction(+:sum)
                    for (int j = 0; j < N; j++) {
                        row[j] = EXP(row[j] - mx);
                        sum += row[j];
                    }
                    rowsum[i] = 1 / sum;
                    lse[((int64_t)b * heads + h) * H * W + at[i]] = mx + LOG(sum);
                }
                NAME(gemm)(N, d, N, Sm, N, 1, V, d, dO, d, 0);  /* unnormalised P V */
                for (int i = 0; i < N; i++) {
                    if (at[i] < 0) continue;
                    scalar_t *o = out + ((int64_t)b * H * W + at[i]) * C + h * d;
                    for (int c = 0; c < d; c++) o[c] = dO[i * d + c] * rowsum[i];
                }
            }
        }
        free(at); free(label); free(buf);
    }
    free(bm);
}

/* dqkv: written where queries are (each position's q, k, v slots, once: a window owns its
   positions); dbias (nthreads, 3C) and dtable (nthreads, heads, (2w-1)^2): zeros, one
   accumulator per thread. */
void NAME(wa_backward)(const scalar_t *qkv, const scalar_t *bias, const scalar_t *table, const scalar_t *out,
                       const scalar_t *lse, const scalar_t *dout, scalar_t *dqkv, scalar_t *dbias, scalar_t *dtable,
                       scalar_t *scale_, int B, int heads, int H, int W, int d, int w, int s, int nthreads) {
    int C = heads * d, ts = 3 * C, N = w * w, S = 2 * w - 1;
    int nwy = (H + w - 1) / w, nwx = (W + w - 1) / w, Hp = nwy * w, Wp = nwx * w;
    scalar_t scale = *scale_;
    scalar_t *bm = NAME(bias_matrices)(table, heads, w);
#pragma omp parallel num_threads(nthreads)
    {
        WINDOW_BUFFERS
        int tid = omp_get_thread_num();
        scalar_t *db = dbias + (int64_t)tid * ts, *dt = dtable + (int64_t)tid * heads * S * S;
        /* the bias gradient per (query, key) slot pair and head, folded into the table at the end */
        scalar_t *dbm = (scalar_t *)calloc((size_t)heads * N * N, sizeof(scalar_t));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)B * nwy * nwx; item++) {
            int win = (int)(item % (nwy * nwx)), b = (int)(item / (nwy * nwx));
            int masked = NAME(window)(win / nwx, win % nwx, H, W, Hp, Wp, w, s, at, label);
            for (int h = 0; h < heads; h++) {
                int64_t boff = (int64_t)b * H * W * ts + h * d;
                NAME(window_logits)(qkv + boff, bias, bm + (int64_t)h * N * N, at, label, masked, Q, K, Kt, V, Vt, Sm,
                                    scale, ts, C, h, N, d);
                for (int i = 0; i < N; i++) {  /* dO rows; rowsum holds D = rowsum(dO * O) */
                    scalar_t D = 0;
                    if (at[i] >= 0) {
                        int64_t o = ((int64_t)b * H * W + at[i]) * C + h * d;
                        for (int c = 0; c < d; c++) {
                            dO[i * d + c] = dout[o + c];
                            D += dout[o + c] * out[o + c];
                        }
                    } else {
                        memset(dO + i * d, 0, sizeof(scalar_t) * (size_t)d);
                    }
                    rowsum[i] = D;
                }
                NAME(gemm)(N, N, d, dO, d, 1, Vt, N, dP, N, 0);  /* dP = dO V^T */
                scalar_t *dbh = dbm + (int64_t)h * N * N;
                for (int i = 0; i < N; i++) {
                    scalar_t *row = Sm + i * N, *g = dP + i * N, *dbr = dbh + i * N;
                    if (at[i] < 0) {  /* no gradient reaches padded queries */
                        memset(row, 0, sizeof(scalar_t) * (size_t)N);
                        memset(g, 0, sizeof(scalar_t) * (size_t)N);
                        continue;
                    }
                    scalar_t l = lse[((int64_t)b * heads + h) * H * W + at[i]], D = rowsum[i];
#pragma omp simd
                    for (int j = 0; j < N; j++) {
                        row[j] = EXP(row[j] - l);  /* P */
                        g[j] = row[j] * (g[j] - D);  /* dS, w.r.t. the scaled logits */
                        dbr[j] += g[j];
                    }
                }
                NAME(gemm)(N, d, N, dP, N, 1, K, d, dQ, d, 0);  /* dQ = dS K */
                NAME(gemm)(N, d, N, dP, 1, N, Q, d, dK, d, 0);  /* dK = dS^T Q */
                NAME(gemm)(N, d, N, Sm, 1, N, dO, d, dV, d, 0);  /* dV = P^T dO */
                for (int j = 0; j < N; j++) {
                    if (at[j] >= 0) {
                        scalar_t *dst = dqkv + boff + at[j] * ts;
                        for (int c = 0; c < d; c++) {
                            dst[c] = dQ[j * d + c] * scale;
                            dst[C + c] = dK[j * d + c];
                            dst[2 * C + c] = dV[j * d + c];
                        }
                    } else {
                        for (int c = 0; c < d; c++) {
                            db[C + h * d + c] += dK[j * d + c];
                            db[2 * C + h * d + c] += dV[j * d + c];
                        }
                    }
                }
            }
        }
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < N; i++)
                for (int j = 0; j < N; j++)
                    dt[(int64_t)h * S * S + NAME(rel_index)(i, j, w)] += dbm[((int64_t)h * N + i) * N + j];
        free(dbm);
        free(at); free(label); free(buf);
    }
    free(bm);
}
