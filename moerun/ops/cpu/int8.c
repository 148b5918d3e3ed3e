/* 8-bit dense weights: y = x @ (s * Q).T + bias, Q int8 [N, K] with one fp32 scale s per row
   (per output channel), read in place; integer dot products, AVX-512 VNNI where the CPU has it.

   x is quantized per row: x ~= t * q, q = round(x / t) to nearest even, |q| <= 32512, t = the
   row's absmax / 32512 (quantize_row; t NaN for an inf absmax), carried as two bytes q = 256 * hi
   + lo, both shifted by + 128 to the unsigned bytes vpdpbusd wants (hi + 128 in 1..255, lo + 128
   in 0..255). With Q's row sums S (computed at load), the exact integer dot of a weight row and
   an x row is
     dot = 256 * (H - 128 * S) + (L - 128 * S),  H = sum (hi + 128) * Q,  L = sum (lo + 128) * Q
   (|H|, |L| <= 255 * 127 * K: int32 for K < 66,000) and the output is
     y = (float)((double)dot * (double)(s * t)) + bias     (s * t rounded to fp32 first).
   Integer sums are exact in any order, so the portable C path (int32 lanes the compiler
   vectorizes), the VNNI path and any batch give the same bits: batch invariant by construction.
   Dims: n x rows, N outputs, K inputs; xb = K rounded up to 64 (zero padding adds nothing). */
#include <stdlib.h>

#include "kernels.h"

enum { I8_XROWS = 64 }; /* x rows kept hot while the weight rows pass */
enum { I8_P = 4, I8_R = 2 }; /* weight rows x x rows per tile */
enum { I8_PREFETCH = 512 }; /* weight bytes prefetched ahead of the read, per W row */

static int64_t padded(int64_t K) { return (K + 63) / 64 * 64; }

/* One x row -> its scale, and hi / lo bytes (+ 128) in planes of xb bytes each; padding 0. */
static float quantize_row(const float *x, int64_t K, uint8_t *hi, uint8_t *lo, int64_t xb) {
  float mx = 0.0f;
  int nan = 0;
  for (int64_t k = 0; k < K; k++) {
    mx = fabsf(x[k]) > mx ? fabsf(x[k]) : mx;
    nan |= x[k] != x[k];
  }
  memset(hi, 0, (size_t)xb), memset(lo, 0, (size_t)xb);
  const float t = isfinite(mx) && !nan ? mx / 32512.0f : NAN;
  if (!(t > 0.0f)) { /* a zero row (every dot is 0) or a NaN / inf one (y NaN through t) */
    memset(hi, 128, (size_t)K), memset(lo, 128, (size_t)K);
    return t;
  }
  for (int64_t k = 0; k < K; k++) {
    const int q = (int)nearbyintf(x[k] / t);
    const int h = (q + 128) >> 8, l = q - 256 * h; /* l in [-128, 127], h in [-127, 127] */
    hi[k] = (uint8_t)(h + 128), lo[k] = (uint8_t)(l + 128);
  }
  return t;
}

static float finish(int64_t h, int64_t l, int32_t sum, float s, float t) {
  const int64_t dot = 256 * (h - 128 * (int64_t)sum) + (l - 128 * (int64_t)sum);
  return (float)((double)dot * (double)(s * t));
}

/* Portable: one (weight row, x row) pair, int32 lanes over K */
static void pair_scalar(const int8_t *w, const uint8_t *hi, const uint8_t *lo, int64_t K,
                        int64_t *h, int64_t *l) {
  int32_t a = 0, b = 0;
  for (int64_t k = 0; k < K; k++) a += (int32_t)hi[k] * w[k], b += (int32_t)lo[k] * w[k];
  *h = a, *l = b;
}

typedef void (*i8_tile_fn)(int P, int R, const int8_t *w, int64_t K, const uint8_t *xq,
                           int64_t xb, int64_t *h, int64_t *l);

static void tile_scalar(int P, int R, const int8_t *w, int64_t K, const uint8_t *xq, int64_t xb,
                        int64_t *h, int64_t *l) {
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++)
      pair_scalar(w + p * K, xq + 2 * r * xb, xq + (2 * r + 1) * xb, K, h + p * I8_R + r,
                  l + p * I8_R + r);
}

#if defined(__x86_64__)
#include <immintrin.h>
#define VNNI8 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define INLINE8 static inline __attribute__((always_inline))

/* P weight rows x R x rows, 64 K-elements per step: one weight load feeds 2R dpbusd */
VNNI8 INLINE8 void tile_vnni(const int P, const int R, const int8_t *w, int64_t K,
                             const uint8_t *xq, int64_t xb, int64_t *h, int64_t *l) {
  __m512i ah[I8_P][I8_R], al[I8_P][I8_R];
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) ah[p][r] = al[p][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 m = K - k >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (K - k)) - 1;
    __m512i xh[I8_R], xl[I8_R];
    for (int r = 0; r < R; r++) {
      xh[r] = _mm512_loadu_si512(xq + 2 * r * xb + k);
      xl[r] = _mm512_loadu_si512(xq + (2 * r + 1) * xb + k);
    }
    for (int p = 0; p < P; p++) {
      _mm_prefetch((const char *)(w + p * K + k + I8_PREFETCH), _MM_HINT_T0);
      const __m512i wv = _mm512_maskz_loadu_epi8(m, w + p * K + k);
      for (int r = 0; r < R; r++) {
        ah[p][r] = _mm512_dpbusd_epi32(ah[p][r], xh[r], wv);
        al[p][r] = _mm512_dpbusd_epi32(al[p][r], xl[r], wv);
      }
    }
  }
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) {
      h[p * I8_R + r] = _mm512_reduce_add_epi32(ah[p][r]);
      l[p * I8_R + r] = _mm512_reduce_add_epi32(al[p][r]);
    }
}

VNNI8 static void tile_vnni_any(int P, int R, const int8_t *w, int64_t K, const uint8_t *xq,
                                int64_t xb, int64_t *h, int64_t *l) {
  if (R == 2 && P == 4) return tile_vnni(4, 2, w, K, xq, xb, h, l);
  if (R == 1 && P == 4) return tile_vnni(4, 1, w, K, xq, xb, h, l);
  for (int p = 0; p < P; p++) /* a last partial group */
    if (R == 2)
      tile_vnni(1, 2, w + p * K, K, xq, xb, h + p * I8_R, l + p * I8_R);
    else
      tile_vnni(1, 1, w + p * K, K, xq, xb, h + p * I8_R, l + p * I8_R);
}
#endif

/* Returns 0, or -1 when the quantized copy of x cannot be allocated. vnni: use the VNNI tiles
   (the caller checked moerun_cpu_has_vnni). */
int moerun_int8_linear(const float *x, const int8_t *w, const float *scale, const int32_t *sums,
                       const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                       int64_t K, int nthreads, int vnni) {
  const int64_t xb = padded(K);
  uint8_t *xq = malloc((size_t)(n > 0 ? n : 1) * 2 * xb);
  float *t = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
  if (!xq || !t) return free(xq), free(t), -1;
  for (int64_t r = 0; r < n; r++)
    t[r] = quantize_row(x + r * K, K, xq + 2 * r * xb, xq + (2 * r + 1) * xb, xb);
  i8_tile_fn f = tile_scalar;
#if defined(__x86_64__)
  if (vnni) f = tile_vnni_any;
#else
  (void)vnni;
#endif
  const int64_t groups = (N + I8_P - 1) / I8_P;
#pragma omp parallel num_threads(nthreads)
  for (int64_t r0 = 0; r0 < n; r0 += I8_XROWS) {
    const int64_t r1 = r0 + I8_XROWS < n ? r0 + I8_XROWS : n;
    /* static: each thread streams one contiguous part of W (dynamic chunks' jumps restart the
       hardware prefetchers); every group costs the same */
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
      const int64_t o = g * I8_P;
      const int P = N - o < I8_P ? (int)(N - o) : I8_P;
      for (int64_t r = r0; r < r1; r += I8_R) {
        const int R = r1 - r < I8_R ? (int)(r1 - r) : I8_R;
        int64_t h[I8_P * I8_R], l[I8_P * I8_R];
        f(P, R, w + o * K, K, xq + 2 * r * xb, xb, h, l);
        for (int p = 0; p < P; p++)
          for (int i = 0; i < R; i++)
            y[(r + i) * N + o + p] =
                finish(h[p * I8_R + i], l[p * I8_R + i], sums[o + p], scale[o + p], t[r + i]) +
                bias_at(bias, bias_kind, o + p);
      }
    }
  }
  free(xq), free(t);
  return 0;
}
