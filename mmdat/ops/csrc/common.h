/* Shared by every mmdat CPU kernel source. A source is written once over scalar_t and compiled
   twice by mmdat/ops/build.py: with -DFLOAT32=1 (scalar_t float, kernels named f_f32 through
   NAME(f)) and with -DFLOAT32=0 (double, f_f64); both objects are linked into one library.
   Helpers are static: only NAME()d kernels are exported.

   EXP, LOG, ERF: the exponential (exp_f32 below for float), libm's logarithm and the error
   function (erf_f32 for float) of scalar_t; ERF_GIVEN_EXP(x, e) is erf(x) given e = exp(-x * x)
   (float reuses e). NAME(gemm): a small register-blocked matrix product. */
#ifndef MMDAT_COMMON_H
#define MMDAT_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define NAME(f) CAT(f, SUFFIX)

static inline int clamp_int(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

/* exp in float32 that compilers vectorize (libm's expf is a call per element): Cephes'
   range reduction and polynomial, about 1 ulp; inputs are clamped to [-87.3, 88.3], so
   the far tail of a softmax is 1e-38 instead of a denormal. */
static inline float exp_f32(float x) {
    x = x > 88.37626f ? 88.37626f : (x < -87.33654f ? -87.33654f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2^n */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* erf in float32 that compilers vectorize: Abramowitz & Stegun 7.1.26 (absolute error below
   1.5e-7), the formula of PyTorch's own vectorized erf. The _given_exp forms take
   e = exp(-x * x), which GELU's gradient needs as well. */
static inline float erf_given_exp_f32(float x, float e) {
    float ax = fabsf(x), t = 1.0f / (1.0f + 0.3275911f * ax);
    float p = 1.061405429f;
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    float r = 1.0f - p * t * e;
    return x < 0 ? -r : r;
}
static inline float erf_f32(float x) { return erf_given_exp_f32(x, exp_f32(-x * x)); }
static inline double erf_given_exp_f64(double x, double e) { (void)e; return erf(x); }

#ifndef FLOAT32
#error "compile mmdat kernels with -DFLOAT32=1 (float) or -DFLOAT32=0 (double)"
#endif
#if FLOAT32
#define scalar_t float
#define SUFFIX f32
#define EXP exp_f32
#define LOG logf
#define ERF erf_f32
#define ERF_GIVEN_EXP erf_given_exp_f32
#else
#define scalar_t double
#define SUFFIX f64
#define EXP exp
#define LOG log
#define ERF erf
#define ERF_GIVEN_EXP erf_given_exp_f64
#endif

/* One 64-byte vector of scalar_t (GCC's vector type: one zmm register with AVX-512, two or
   four narrower ones elsewhere), aligned and unaligned. */
typedef scalar_t NAME(vec) __attribute__((vector_size(64)));
typedef scalar_t NAME(uvec) __attribute__((vector_size(64), aligned(sizeof(scalar_t))));

/* C (M x N, row stride ldc) = A B, or += with accumulate, for the small products inside
   attention windows (tens of rows and columns), where calling a BLAS per window costs more
   than the arithmetic. Blocks of 4 rows x one vector of columns stay in registers over the
   whole inner dimension. A's element (r, k) is A[r * ars + k * aks] (A^T costs nothing);
   B is K x N with row stride ldb. */
static void NAME(gemm)(int M, int N, int K, const scalar_t *A, int64_t ars, int64_t aks, const scalar_t *B,
                       int64_t ldb, scalar_t *C, int64_t ldc, int accumulate) {
    enum { VB = 64 / (int)sizeof(scalar_t), RB = 4 };
    int i = 0;
    for (; i + RB <= M; i += RB) {
        int j = 0;
        for (; j + VB <= N; j += VB) {
            NAME(vec) acc[RB];
            for (int r = 0; r < RB; r++)
                acc[r] = accumulate ? (NAME(vec))*(const NAME(uvec) *)(C + (i + r) * ldc + j) : (NAME(vec)){0};
            const scalar_t *a = A + i * ars;
            for (int k = 0; k < K; k++, a += aks) {
                NAME(vec) b = *(const NAME(uvec) *)(B + k * ldb + j);
#pragma GCC unroll 4
                for (int r = 0; r < RB; r++) acc[r] += a[r * ars] * b;
            }
            for (int r = 0; r < RB; r++) *(NAME(uvec) *)(C + (i + r) * ldc + j) = acc[r];
        }
        for (; j < N; j++)
            for (int r = i; r < i + RB; r++) {
                scalar_t s = accumulate ? C[r * ldc + j] : 0;
                for (int k = 0; k < K; k++) s += A[r * ars + k * aks] * B[k * ldb + j];
                C[r * ldc + j] = s;
            }
    }
    for (; i < M; i++)
        for (int j = 0; j < N; j++) {
            scalar_t s = accumulate ? C[i * ldc + j] : 0;
            for (int k = 0; k < K; k++) s += A[i * ars + k * aks] * B[k * ldb + j];
            C[i * ldc + j] = s;
        }
}

#endif /* MMDAT_COMMON_H */
