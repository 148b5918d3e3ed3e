/* AVX-512 variant of y[n, N] = x[n, K] @ W[N, K]^T + bias, W in MXFP4 or bf16 read in place.

   Two paths, both exact products with fp32 accumulation:
   - few x rows (decode, n <= REG_ROWS): each 32-element block of W is decoded in registers and
     used at once for every x row; memory-bound, so it reads W exactly once.
   - many x rows (prefill): each thread decodes MR weight rows to fp32 (a scratch of MR * K floats,
     never a whole matrix) and multiplies them with a transposed panel of up to XT_ROWS x rows:
     12 weight values broadcast against 32 x rows per step keeps 24 accumulators busy with only
     14 loads, so the FMA units, not the caches, set the pace.
   Every function carries the target attribute and runs only after moerun_cpu_has_avx512(). */
#include <stdlib.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define A512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define INLINE static inline __attribute__((always_inline))

enum { REG_ROWS = 4, RP = 4 };  /* register path: up to 4 x rows times 4 weight rows per tile */
enum { MR = 12, NR = 32 };      /* scratch path micro-tile: 12 weight rows x 32 x rows */
enum { XT_ROWS = 96 };          /* x rows per transposed panel: 96 * K=2880 floats stay in L2 */
enum { PREFETCH_MXFP4 = 4096, PREFETCH_BF16 = 2048 }; /* bytes ahead of the read, per W row */

int moerun_cpu_has_avx512(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

A512 INLINE __m512 fp4_lut(void) {
  return _mm512_setr_ps(0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -.5f, -1, -1.5f, -2, -3, -4, -6);
}

/* 16 packed bytes -> the block's even elements (low nibbles) and odd elements (high nibbles).
   vpermps reads only the low 4 bits of each index lane, so the low nibble needs no mask. */
A512 INLINE void decode_block(const uint8_t *b, __m512 lut, __m512 *even, __m512 *odd) {
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
  *even = _mm512_permutexvar_ps(q, lut);
  *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut);
}

/* ---- register path ------------------------------------------------------------------------- */

/* x per 32 elements: the 16 even ones, then the 16 odd ones (the order blocks decode in);
   the K % 32 tail stays in order. */
static void permute_even_odd(const float *x, float *xp, int64_t n, int64_t K) {
  const int64_t K32 = K & ~(int64_t)31;
  for (int64_t r = 0; r < n; r++) {
    const float *xr = x + r * K;
    float *pr = xp + r * K;
    for (int64_t k = 0; k < K32; k += 32)
      for (int d = 0; d < 16; d++) {
        pr[k + d] = xr[k + 2 * d];
        pr[k + 16 + d] = xr[k + 2 * d + 1];
      }
    for (int64_t k = K32; k < K; k++) pr[k] = xr[k];
  }
}

/* P and R are constants at every call site, so acc[][] lives in registers. */
A512 INLINE void mx_regs(const int P, const int R, const float *xp, int64_t K, const uint8_t *w,
                         int64_t ws, const uint8_t *s, int64_t ss, float *out) {
  const __m512 lut = fp4_lut();
  __m512 acc[RP][REG_ROWS];
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) acc[p][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / 32; g++) {
    __m512 e[RP], o[RP], sc[RP];
    for (int p = 0; p < P; p++) {
      _mm_prefetch((const char *)(w + p * ws + 16 * g + PREFETCH_MXFP4), _MM_HINT_T0);
      decode_block(w + p * ws + 16 * g, lut, &e[p], &o[p]);
      sc[p] = _mm512_set1_ps(moerun_scale_of[s[p * ss + g]]);
    }
    const float *xg = xp + 32 * g;
    if (R == 1) { /* one x row: scale the block's partial sum, 1 multiply instead of 2 */
      const __m512 xe = _mm512_loadu_ps(xg), xo = _mm512_loadu_ps(xg + 16);
      for (int p = 0; p < P; p++) {
        const __m512 part = _mm512_fmadd_ps(o[p], xo, _mm512_mul_ps(e[p], xe));
        acc[p][0] = _mm512_fmadd_ps(part, sc[p], acc[p][0]);
      }
      continue;
    }
    for (int p = 0; p < P; p++) {
      e[p] = _mm512_mul_ps(e[p], sc[p]);
      o[p] = _mm512_mul_ps(o[p], sc[p]);
    }
    for (int r = 0; r < R; r++) {
      const __m512 xe = _mm512_loadu_ps(xg + r * K), xo = _mm512_loadu_ps(xg + r * K + 16);
      for (int p = 0; p < P; p++)
        acc[p][r] = _mm512_fmadd_ps(o[p], xo, _mm512_fmadd_ps(e[p], xe, acc[p][r]));
    }
  }
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) out[p * R + r] = _mm512_reduce_add_ps(acc[p][r]);
}

A512 INLINE void bf_regs(const int P, const int R, const float *xp, int64_t K, const uint8_t *w,
                         int64_t ws, float *out) {
  const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
  const int64_t K32 = K & ~(int64_t)31;
  const int odd = R == 1; /* one x row: even and odd lanes get separate chains (FMA latency) */
  __m512 acc[RP][REG_ROWS][2];
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) acc[p][r][0] = acc[p][r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K32; k += 32) {
    __m512 xe[REG_ROWS], xo[REG_ROWS];
    for (int r = 0; r < R; r++) {
      xe[r] = _mm512_loadu_ps(xp + r * K + k);
      xo[r] = _mm512_loadu_ps(xp + r * K + k + 16);
    }
    for (int p = 0; p < P; p++) {
      /* 32 bf16 in 16 dwords: the low half shifted up and the high half masked are fp32 */
      _mm_prefetch((const char *)(w + p * ws + 2 * k + PREFETCH_BF16), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512((const void *)(w + p * ws + 2 * k));
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, top));
      for (int r = 0; r < R; r++) {
        acc[p][r][0] = _mm512_fmadd_ps(we, xe[r], acc[p][r][0]);
        acc[p][r][odd] = _mm512_fmadd_ps(wo, xo[r], acc[p][r][odd]);
      }
    }
  }
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) {
      const uint16_t *wp = (const uint16_t *)(w + p * ws);
      float t = _mm512_reduce_add_ps(_mm512_add_ps(acc[p][r][0], acc[p][r][1]));
      for (int64_t k = K32; k < K; k++) t += xp[r * K + k] * bf16_to_f32(wp[k]);
      out[p * R + r] = t;
    }
}

A512 static void tile_regs(int fmt, int P, int R, const float *xp, int64_t K, const uint8_t *w,
                           int64_t ws, const uint8_t *s, int64_t ss, float *out) {
#define CASE(p, r)                                           \
  case p * 8 + r:                                            \
    if (fmt == FMT_MXFP4) mx_regs(p, r, xp, K, w, ws, s, ss, out); \
    else bf_regs(p, r, xp, K, w, ws, out);                   \
    break
  switch (P * 8 + R) {
    CASE(1, 1); CASE(1, 2); CASE(1, 3); CASE(1, 4); CASE(2, 1); CASE(2, 2); CASE(2, 3);
    CASE(2, 4); CASE(3, 1); CASE(3, 2); CASE(3, 3); CASE(3, 4); CASE(4, 1); CASE(4, 2);
    CASE(4, 3); default: CASE(4, 4);
  }
#undef CASE
}

static int run_regs(int fmt, const float *x, const uint8_t *w, int64_t ws, const uint8_t *s,
                    int64_t ss, const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                    int64_t K, int nthreads) {
  float *xp = malloc((size_t)(n * K > 0 ? n * K : 1) * sizeof(float));
  if (!xp) return -1;
  permute_even_odd(x, xp, n, K);
  const int64_t groups = (N + RP - 1) / RP;
  /* static: each thread streams one contiguous half of W (measured: 214 vs 230 ms per 20b
     decode step with dynamic chunks, whose jumps restart the hardware prefetchers) */
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < groups; t++) {
    const int64_t o = t * RP;
    const int P = N - o < RP ? (int)(N - o) : RP;
    float out[RP * REG_ROWS];
    tile_regs(fmt, P, (int)n, xp, K, w + o * ws, ws, s ? s + o * ss : NULL, ss, out);
    for (int p = 0; p < P; p++)
      for (int r = 0; r < n; r++) y[r * N + o + p] = out[p * n + r] + bias_at(bias, bias_kind, o + p);
  }
  free(xp);
  return 0;
}

/* ---- scratch path -------------------------------------------------------------------------- */

/* Weight rows [0, P) to fp32 in natural order, wbuf[p * K + k]; rows P..MR-1 become zero. */
A512 static void decode_rows(int fmt, int P, const uint8_t *w, int64_t ws, const uint8_t *s,
                             int64_t ss, int64_t K, float *wbuf) {
  const __m512 lut = fp4_lut();
  /* interleave even lanes e and odd lanes o back into element order: e0 o0 e1 o1 ... */
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int p = 0; p < P; p++) {
    const uint8_t *row = w + p * ws;
    float *dst = wbuf + p * K;
    if (fmt == FMT_MXFP4) {
      for (int64_t g = 0; g < K / 32; g++) {
        __m512 e, o;
        decode_block(row + 16 * g, lut, &e, &o);
        const __m512 sc = _mm512_set1_ps(moerun_scale_of[s[p * ss + g]]);
        e = _mm512_mul_ps(e, sc), o = _mm512_mul_ps(o, sc);
        _mm512_storeu_ps(dst + 32 * g, _mm512_permutex2var_ps(e, lo, o));
        _mm512_storeu_ps(dst + 32 * g + 16, _mm512_permutex2var_ps(e, hi, o));
      }
      continue;
    }
    const uint16_t *h = (const uint16_t *)row;
    const int64_t K16 = K & ~(int64_t)15;
    for (int64_t k = 0; k < K16; k += 16) {
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(h + k)));
      _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
    for (int64_t k = K16; k < K; k++) dst[k] = bf16_to_f32(h[k]);
  }
  for (int p = P; p < MR; p++) memset(wbuf + p * K, 0, (size_t)K * sizeof(float));
}

/* tmp[m * NR + j] = sum_k wbuf[m * K + k] * xt[k * ld + j] for m < MR, j < 16 * C. */
A512 INLINE void micro(const int C, const float *wbuf, int64_t K, const float *xt, int64_t ld,
                       float *tmp) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    const __m512 x0 = _mm512_loadu_ps(xt + k * ld);
    const __m512 x1 = C == 2 ? _mm512_loadu_ps(xt + k * ld + 16) : x0;
    for (int m = 0; m < MR; m++) {
      const __m512 b = _mm512_set1_ps(wbuf[m * K + k]);
      acc[m][0] = _mm512_fmadd_ps(b, x0, acc[m][0]);
      if (C == 2) acc[m][1] = _mm512_fmadd_ps(b, x1, acc[m][1]);
    }
  }
  for (int m = 0; m < MR; m++)
    for (int c = 0; c < C; c++) _mm512_storeu_ps(tmp + m * NR + 16 * c, acc[m][c]);
}

A512 static void micro_any(int C, const float *wbuf, int64_t K, const float *xt, int64_t ld,
                           float *tmp) {
  if (C == 2) micro(2, wbuf, K, xt, ld, tmp);
  else micro(1, wbuf, K, xt, ld, tmp);
}

/* x rows [r0, r0 + rows) transposed: xt[k * ld + j] = x[(r0 + j) * K + k], zero past rows. */
static void transpose_panel(const float *x, int64_t r0, int64_t rows, int64_t ld, int64_t K,
                            float *xt) {
#pragma omp for schedule(static)
  for (int64_t k = 0; k < K; k++)
    for (int64_t j = 0; j < ld; j++) xt[k * ld + j] = j < rows ? x[(r0 + j) * K + k] : 0.0f;
}

static int run_scratch(int fmt, const float *x, const uint8_t *w, int64_t ws, const uint8_t *s,
                       int64_t ss, const void *bias, int bias_kind, float *y, int64_t n,
                       int64_t N, int64_t K, int nthreads) {
  float *xt = malloc((size_t)K * XT_ROWS * sizeof(float));
  if (!xt) return -1;
  const int64_t groups = (N + MR - 1) / MR;
  int failed = 0;
#pragma omp parallel num_threads(nthreads)
  {
    float *wbuf = malloc((size_t)MR * K * sizeof(float));
    float tmp[MR * NR];
    if (!wbuf) {
#pragma omp atomic write
      failed = 1;
    }
    for (int64_t r0 = 0; r0 < n; r0 += XT_ROWS) {
      const int64_t rows = n - r0 < XT_ROWS ? n - r0 : XT_ROWS, ld = (rows + 15) & ~(int64_t)15;
      transpose_panel(x, r0, rows, ld, K, xt); /* ends with a barrier */
#pragma omp for schedule(dynamic, 2)
      for (int64_t t = 0; t < groups; t++) {
        if (!wbuf) continue;
        const int64_t o = t * MR;
        const int P = N - o < MR ? (int)(N - o) : MR;
        decode_rows(fmt, P, w + o * ws, ws, s ? s + o * ss : NULL, ss, K, wbuf);
        for (int64_t c0 = 0; c0 < rows; c0 += NR) {
          const int64_t cols = rows - c0 < NR ? rows - c0 : NR;
          micro_any(cols > 16 ? 2 : 1, wbuf, K, xt + c0, ld, tmp);
          for (int p = 0; p < P; p++) {
            const float b = bias_at(bias, bias_kind, o + p);
            for (int64_t j = 0; j < cols; j++) y[(r0 + c0 + j) * N + o + p] = tmp[p * NR + j] + b;
          }
        }
      }
    }
    free(wbuf);
  }
  free(xt);
  return failed ? -1 : 0;
}

int moerun_linear_avx512(int fmt, const float *x, const uint8_t *w, int64_t ws, const uint8_t *s,
                         int64_t ss, const void *bias, int bias_kind, float *y, int64_t n,
                         int64_t N, int64_t K, int nthreads) {
  if (n <= REG_ROWS) return run_regs(fmt, x, w, ws, s, ss, bias, bias_kind, y, n, N, K, nthreads);
  return run_scratch(fmt, x, w, ws, s, ss, bias, bias_kind, y, n, N, K, nthreads);
}

#else /* not x86-64: never called, since moerun_cpu_has_avx512() says no */
int moerun_cpu_has_avx512(void) { return 0; }
int moerun_linear_avx512(int fmt, const float *x, const uint8_t *w, int64_t ws, const uint8_t *s,
                         int64_t ss, const void *bias, int bias_kind, float *y, int64_t n,
                         int64_t N, int64_t K, int nthreads) {
  (void)fmt, (void)x, (void)w, (void)ws, (void)s, (void)ss, (void)bias, (void)bias_kind;
  (void)y, (void)n, (void)N, (void)K, (void)nthreads;
  return -1;
}
#endif
