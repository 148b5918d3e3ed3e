/* y[n, N] = x[n, K] @ W[N, K]^T + bias with W read in place, as MXFP4, bf16 or fp32; fp32
   accumulation.

   One library holds three variants: the AVX2+FMA functions here and the AVX-512 ones (avx512.c)
   carry target attributes and run only when the CPU reports those features (moerun_cpu_has_*),
   so the cached binary never depends on the build machine; the portable C runs everywhere else.
   Within a variant every output is summed in one order that depends neither on n nor on the
   tile shape that computes it (each (weight row, x row) pair has its own accumulators), so a row
   of y is the same bits alone or in a batch. Dims: n = x rows, N = output features,
   K = input features, G = K / 32 MXFP4 blocks per weight row. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

enum { SIMD_NONE = 0, SIMD_AVX2 = 1, SIMD_AVX512 = 2 };  /* the `simd` argument of the drivers */
/* A tile is P weight rows x R x rows with 8 accumulator registers: each x vector loaded feeds P
   FMAs and each decoded weight vector R. MXFP4 favours tall tiles (decoding costs ~10 uops per
   block), bf16 wide ones (x stays in registers); measured on gpt-oss shapes. */
enum { MX_P = 2, MX_R = 4, BF_P = 4, BF_R = 2, TILE_OUT = 8 };
enum { XROWS = 64 };      /* x rows streamed per pass over W: 64 rows * K=2880 floats fit in L2 */
enum { ROW_CHUNK = 8 };   /* tiles a thread takes at a time (dynamic: cores may be shared) */
/* Weight bytes prefetched ahead of the read: the hardware prefetcher alone left a decode-time
   (n = 1) MXFP4 matmul 1.6x slower on weights coming from DRAM than on weights already in L3. */
enum { PREFETCH_MXFP4 = 4096, PREFETCH_BF16 = 2048 };

/* E2M1 code -> value, and E8M0 byte -> 2**(s - 127); products are exact (2 significant bits
   times a power of two; 0.5 * 2**-127 is still an fp32 subnormal, not zero). */
static const float FP4[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -.5f, -1, -1.5f, -2, -3, -4, -6};
float moerun_scale_of[256];

__attribute__((constructor)) static void init_tables(void) {
  for (int s = 0; s < 256; s++) moerun_scale_of[s] = ldexpf(1.0f, s - 127);
}

/* out[p * R + r] = x_r . W_p for P weight rows (byte stride ws; scales stride ss) and R x rows
   (stride K). The same signature serves both formats and both variants. */
typedef void (*tile_fn)(int P, int R, const float *x, int64_t K, const uint8_t *w, int64_t ws,
                        const uint8_t *s, int64_t ss, float *out);

/* ---- portable C ---------------------------------------------------------------------------- */

static void mxfp4_tile_scalar(int P, int R, const float *x, int64_t K, const uint8_t *w,
                              int64_t ws, const uint8_t *s, int64_t ss, float *out) {
  for (int p = 0; p < P; p++) {
    const uint8_t *b = w + p * ws, *sp = s + p * ss;
    for (int r = 0; r < R; r++) out[p * R + r] = 0.0f;
    for (int64_t g = 0; g < K / 32; g++) {
      float v[32];  /* one block decoded once for all R rows */
      for (int j = 0; j < 16; j++) {  /* element 2j is the low nibble of byte j */
        v[2 * j] = FP4[b[16 * g + j] & 15] * moerun_scale_of[sp[g]];
        v[2 * j + 1] = FP4[b[16 * g + j] >> 4] * moerun_scale_of[sp[g]];
      }
      for (int r = 0; r < R; r++) {
        const float *xg = x + r * K + 32 * g;
        float part = 0.0f;  /* per-block partial sums keep the summation depth near 32 + G */
        for (int i = 0; i < 32; i++) part += v[i] * xg[i];
        out[p * R + r] += part;
      }
    }
  }
}

static inline float dense_at(int fmt, const uint8_t *row, int64_t k) {
  return fmt == FMT_BF16 ? bf16_to_f32(((const uint16_t *)row)[k]) : ((const float *)row)[k];
}

/* bf16 or fp32 weights (fmt): 8 interleaved sums, depth K/8, and the compiler may vectorize */
static inline void dense_tile_scalar(int fmt, int P, int R, const float *x, int64_t K,
                                     const uint8_t *w, int64_t ws, float *out) {
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) {
      const uint8_t *wp = w + p * ws;
      const float *xr = x + r * K;
      float acc[8] = {0};
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; j++) acc[j] += xr[k + j] * dense_at(fmt, wp, k + j);
      for (; k < K; k++) acc[0] += xr[k] * dense_at(fmt, wp, k);
      out[p * R + r] =
          ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
}

static void bf16_tile_scalar(int P, int R, const float *x, int64_t K, const uint8_t *w,
                             int64_t ws, const uint8_t *s, int64_t ss, float *out) {
  (void)s, (void)ss;
  dense_tile_scalar(FMT_BF16, P, R, x, K, w, ws, out);
}

static void f32_tile_scalar(int P, int R, const float *x, int64_t K, const uint8_t *w,
                            int64_t ws, const uint8_t *s, int64_t ss, float *out) {
  (void)s, (void)ss;
  dense_tile_scalar(FMT_F32, P, R, x, K, w, ws, out);
}

/* ---- AVX2 + FMA ---------------------------------------------------------------------------- */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

/* The SIMD kernels read x permuted per block (once per call, cheap next to W) into the order in
   which the weights decode without cross-lane shuffles. MXFP4, per 32 elements: vector f (0..3)
   holds elements 16*(f/2) + 2*(f%2) + {0, 4, 8, 12} in lanes 0..3 and those + 1 in lanes 4..7. */
static void permute_mxfp4(const float *x, float *xp, int64_t count) {
  for (int64_t i = 0; i < count; i += 32)
    for (int f = 0; f < 4; f++)
      for (int d = 0; d < 4; d++) {
        const int64_t e = i + 16 * (f >> 1) + 2 * (f & 1) + 4 * d;
        xp[i + 8 * f + d] = x[e];
        xp[i + 8 * f + 4 + d] = x[e + 1];
      }
}

/* bf16, per 16 elements: the 8 even ones then the 8 odd ones; the K % 16 tail stays in order. */
static void permute_bf16(const float *x, float *xp, int64_t n, int64_t K) {
  const int64_t K16 = K & ~(int64_t)15;
  for (int64_t r = 0; r < n; r++) {
    const float *xr = x + r * K;
    float *pr = xp + r * K;
    for (int64_t k = 0; k < K16; k += 16)
      for (int d = 0; d < 8; d++) {
        pr[k + d] = xr[k + 2 * d];
        pr[k + 8 + d] = xr[k + 2 * d + 1];
      }
    for (int64_t k = K16; k < K; k++) pr[k] = xr[k];
  }
}

AVX2 INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* 16 packed bytes -> the block's 32 E2M1 values as fp32 (permute_mxfp4 order). Every E2M1 value
   is exact in bf16, whose two bytes come from two 16-entry lookups; a bf16 in the top half of a
   dword is an fp32, so there is no int->float conversion and only 4 shuffle-port uops. */
AVX2 INLINE void decode_mxfp4(const uint8_t *b, __m256 w[4]) {
  /* bf16 of E2M1 code c: high byte (sign, exponent) and low byte (exponent bit, mantissa) */
  const __m256i hi_lut = _mm256_broadcastsi128_si256(_mm_setr_epi8(
      0x00, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, -0x80, -0x41, -0x41, -0x41, -0x40, -0x40,
      -0x40, -0x40));  /* 0x80, 0xBF, 0xC0 as signed chars */
  const __m256i lo_lut = _mm256_broadcastsi128_si256(_mm_setr_epi8(
      0, 0, -0x80, -0x40, 0, 0x40, -0x80, -0x40, 0, 0, -0x80, -0x40, 0, 0x40, -0x80, -0x40));
  const __m256i top = _mm256_set1_epi32((int)0xFFFF0000u);
  const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b));
  /* low lane: low nibbles (even elements); high lane: high nibbles (odd elements) */
  const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(q, shift), _mm256_set1_epi8(0x0F));
  const __m256i hi = _mm256_shuffle_epi8(hi_lut, idx), lo = _mm256_shuffle_epi8(lo_lut, idx);
  const __m256i w01 = _mm256_unpacklo_epi8(lo, hi), w23 = _mm256_unpackhi_epi8(lo, hi);
  w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(w01, 16));
  w[1] = _mm256_castsi256_ps(_mm256_and_si256(w01, top));
  w[2] = _mm256_castsi256_ps(_mm256_slli_epi32(w23, 16));
  w[3] = _mm256_castsi256_ps(_mm256_and_si256(w23, top));
}

/* P and R are compile-time constants at every call site, so acc[][] lives in registers. */
AVX2 INLINE void mxfp4_tile_avx2(const int P, const int R, const float *xp, int64_t K,
                                 const uint8_t *w, int64_t ws, const uint8_t *s, int64_t ss,
                                 float *out) {
  __m256 acc[MX_P][MX_R];
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) acc[p][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / 32; g++) {
    __m256 v[MX_P][4], sc[MX_P];
    for (int p = 0; p < P; p++) {
      _mm_prefetch((const char *)(w + p * ws + 16 * g + PREFETCH_MXFP4), _MM_HINT_T0);
      decode_mxfp4(w + p * ws + 16 * g, v[p]);
      sc[p] = _mm256_broadcast_ss(&moerun_scale_of[s[p * ss + g]]);
    }
    const float *xg = xp + 32 * g;
    /* weights scaled first (exact), whatever R: one x row alone sums like one in a tile */
    for (int p = 0; p < P; p++)
      for (int i = 0; i < 4; i++) v[p][i] = _mm256_mul_ps(v[p][i], sc[p]);
    for (int r = 0; r < R; r++)
      for (int i = 0; i < 4; i++) {
        const __m256 xv = _mm256_loadu_ps(xg + r * K + 8 * i);
        for (int p = 0; p < P; p++) acc[p][r] = _mm256_fmadd_ps(v[p][i], xv, acc[p][r]);
      }
  }
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) out[p * R + r] = hsum(acc[p][r]);
}

/* bf16 or fp32 weights (fmt, a constant at every call site), per 16 elements: lanes lo, hi
   = even, odd elements for bf16 (x permuted to match), elements 0..7, 8..15 for fp32; one
   chain acc = fma(hi, x_hi, fma(lo, x_lo, acc)) per output, whatever R. */
AVX2 INLINE void dense_tile_avx2(const int fmt, const int P, const int R, const float *xp,
                                 int64_t K, const uint8_t *w, int64_t ws, float *out) {
  const __m256i top = _mm256_set1_epi32((int)0xFFFF0000u);
  const int64_t K16 = K & ~(int64_t)15;
  __m256 acc[BF_P][BF_R];
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) acc[p][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    __m256 xl[BF_R], xh[BF_R];
    for (int r = 0; r < R; r++) {
      xl[r] = _mm256_loadu_ps(xp + r * K + k);
      xh[r] = _mm256_loadu_ps(xp + r * K + k + 8);
    }
    for (int p = 0; p < P; p++) {
      __m256 lo, hi;
      if (fmt == FMT_BF16) {
        /* 16 bf16 in 8 dwords: the low half shifted up and the high half masked are fp32 */
        _mm_prefetch((const char *)(w + p * ws + 2 * k + PREFETCH_BF16), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(w + p * ws + 2 * k));
        lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        hi = _mm256_castsi256_ps(_mm256_and_si256(v, top));
      } else {
        _mm_prefetch((const char *)(w + p * ws + 4 * k + 2 * PREFETCH_BF16), _MM_HINT_T0);
        lo = _mm256_loadu_ps((const float *)(w + p * ws) + k);
        hi = _mm256_loadu_ps((const float *)(w + p * ws) + k + 8);
      }
      for (int r = 0; r < R; r++)
        acc[p][r] = _mm256_fmadd_ps(hi, xh[r], _mm256_fmadd_ps(lo, xl[r], acc[p][r]));
    }
  }
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) {
      float t = hsum(acc[p][r]);
      for (int64_t k = K16; k < K; k++) t += xp[r * K + k] * dense_at(fmt, w + p * ws, k);
      out[p * R + r] = t;
    }
}

/* Instantiate every tile shape the driver asks for: P <= MX_P (BF_P), R <= MX_R (BF_R). */
AVX2 static void mxfp4_tile_simd(int P, int R, const float *x, int64_t K, const uint8_t *w,
                                 int64_t ws, const uint8_t *s, int64_t ss, float *out) {
#define MX(p, r) case p * 8 + r: mxfp4_tile_avx2(p, r, x, K, w, ws, s, ss, out); break
  switch (P * 8 + R) { MX(1, 1); MX(1, 2); MX(1, 3); MX(1, 4); MX(2, 1); MX(2, 2); MX(2, 3);
                       default: mxfp4_tile_avx2(2, 4, x, K, w, ws, s, ss, out); }
}

#define DENSE_CASES(f)                                                                     \
  switch (P * 8 + R) { DN(f, 1, 1); DN(f, 1, 2); DN(f, 2, 1); DN(f, 2, 2); DN(f, 3, 1);      \
                       DN(f, 3, 2); DN(f, 4, 1); default: DN(f, 4, 2); }
#define DN(f, p, r) case p * 8 + r: dense_tile_avx2(f, p, r, x, K, w, ws, out); break

AVX2 static void bf16_tile_simd(int P, int R, const float *x, int64_t K, const uint8_t *w,
                                int64_t ws, const uint8_t *s, int64_t ss, float *out) {
  (void)s, (void)ss;
  DENSE_CASES(FMT_BF16)
}

AVX2 static void f32_tile_simd(int P, int R, const float *x, int64_t K, const uint8_t *w,
                               int64_t ws, const uint8_t *s, int64_t ss, float *out) {
  (void)s, (void)ss;
  DENSE_CASES(FMT_F32)
}
#endif

/* ---- drivers ------------------------------------------------------------------------------- */

int moerun_cpu_has_avx2(void) {
#ifdef HAVE_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return 0;
#endif
}

/* Threads split the weight rows; x is streamed XROWS rows at a time so that it stays in cache
   while every weight row passes by; a tile's weight rows stay in L1 across its x rows. */
static void run_tiles(tile_fn f, int pmax, int rmax, const float *x, const uint8_t *w, int64_t ws,
                      const uint8_t *s, int64_t ss, const void *bias, int bias_kind, float *y,
                      int64_t n, int64_t N, int64_t K, int nthreads) {
  const int64_t groups = (N + pmax - 1) / pmax;
#pragma omp parallel num_threads(nthreads)
  for (int64_t r0 = 0; r0 < n; r0 += XROWS) {
    const int64_t r1 = r0 + XROWS < n ? r0 + XROWS : n;
#pragma omp for schedule(dynamic, ROW_CHUNK)
    for (int64_t t = 0; t < groups; t++) {
      const int64_t o = t * pmax;
      const int P = N - o < pmax ? (int)(N - o) : pmax;
      for (int64_t r = r0; r < r1; r += rmax) {
        const int R = r1 - r < rmax ? (int)(r1 - r) : rmax;
        float out[TILE_OUT];
        f(P, R, x + r * K, K, w + o * ws, ws, s ? s + o * ss : NULL, ss, out);
        for (int p = 0; p < P; p++)
          for (int i = 0; i < R; i++)
            y[(r + i) * N + o + p] = out[p * R + i] + bias_at(bias, bias_kind, o + p);
      }
    }
  }
}

/* The permuted copy of x (never of W); at least 1 byte so that NULL always means failure. */
static float *alloc_x(int64_t count) {
  return malloc((size_t)(count > 0 ? count : 1) * sizeof(float));
}

/* Both entry points return 0, or -1 when the permuted copy of x cannot be allocated. */
int moerun_mxfp4_linear(const float *x, const uint8_t *blocks, const uint8_t *scales,
                        const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                        int64_t K, int nthreads, int simd) {
  tile_fn f = mxfp4_tile_scalar;
  float *xp = NULL;
  if (simd == SIMD_AVX512)
    return moerun_linear_avx512(FMT_MXFP4, XMODE_F32, x, blocks, K / 2, scales, K / 32, bias,
                                bias_kind, y, n, N, K, nthreads);
#ifdef HAVE_X86
  if (simd) {
    if (!(xp = alloc_x(n * K))) return -1;
    permute_mxfp4(x, xp, n * K);
    x = xp;
    f = mxfp4_tile_simd;
  }
#endif
  run_tiles(f, MX_P, MX_R, x, blocks, K / 2, scales, K / 32, bias, bias_kind, y, n, N, K, nthreads);
  free(xp);
  return 0;
}

/* xmode: what x holds (XMODE_*, kernels.h); only the AVX-512 variant uses it */
int moerun_bf16_linear(const float *x, const uint16_t *weight, const void *bias, int bias_kind,
                       float *y, int64_t n, int64_t N, int64_t K, int nthreads, int simd,
                       int xmode) {
  tile_fn f = bf16_tile_scalar;
  float *xp = NULL;
  if (simd == SIMD_AVX512)
    return moerun_linear_avx512(FMT_BF16, xmode, x, (const uint8_t *)weight, 2 * K, NULL, 0, bias,
                                bias_kind, y, n, N, K, nthreads);
#ifdef HAVE_X86
  if (simd) {
    if (!(xp = alloc_x(n * K))) return -1;
    permute_bf16(x, xp, n, K);
    x = xp;
    f = bf16_tile_simd;
  }
#endif
  run_tiles(f, BF_P, BF_R, x, (const uint8_t *)weight, 2 * K, NULL, 0, bias, bias_kind, y, n, N,
            K, nthreads);
  free(xp);
  return 0;
}

int moerun_f32_linear(const float *x, const float *weight, const void *bias, int bias_kind,
                      float *y, int64_t n, int64_t N, int64_t K, int nthreads, int simd) {
  tile_fn f = f32_tile_scalar;
  if (simd == SIMD_AVX512)
    return moerun_linear_avx512(FMT_F32, XMODE_F32, x, (const uint8_t *)weight, 4 * K, NULL, 0,
                                bias, bias_kind, y, n, N, K, nthreads);
#ifdef HAVE_X86
  if (simd) f = f32_tile_simd; /* fp32 lanes take x in its own order: no copy */
#endif
  run_tiles(f, BF_P, BF_R, x, (const uint8_t *)weight, 4 * K, NULL, 0, bias, bias_kind, y, n, N,
            K, nthreads);
  return 0;
}
