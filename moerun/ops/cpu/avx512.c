/* AVX-512 variant of y[n, N] = x[n, K] @ W[N, K]^T + bias, W in MXFP4, bf16 or fp32 read in place.

   Both paths sum each output in the order avx512.h defines, so a row's result is the same bits
   whatever n is (batch invariance):
   - few x rows (decode, n <= REG_ROWS), here: W decoded in registers, read exactly once.
   - many x rows (prefill): avx512_tiles.c. */
#include "avx512.h"

#if defined(__x86_64__)
enum { REG_ROWS = 4, RP = 4 };  /* up to 4 x rows times 4 weight rows per tile */
/* weight bytes prefetched ahead of the read, per W row (measured on gpt-oss shapes) */
enum { PREFETCH_MXFP4 = 4096, PREFETCH_BF16 = 2048, PREFETCH_F32 = 4096 };

int moerun_cpu_has_avx512(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

/* A finite bf16 from a xorshift state: every exponent, denormals and zero included */
static uint16_t random_bf16(uint32_t *state) {
  uint32_t r = *state;
  r ^= r << 13, r ^= r >> 17, r ^= r << 5;
  *state = r;
  return (uint16_t)((r & 0x807Fu) | ((r >> 8) % 255) << 7);
}

/* vdpbf16ps against avx512.h's chain, fma(odd, fma(even, acc)) with denormals flushed, on
   64k random lanes: the tiles use it only where the two agree to the bit (avx512_tiles.c). */
BF16DOT static int bf16dot_matches_fma(void) {
  const unsigned csr = flush_enter(XMODE_BF16);
  uint32_t state = 2463534242u;
  int same = 1;
  for (int it = 0; it < 4096 && same; it++) {
    uint16_t a[32], b[32];
    float acc[16], got[16];
    for (int i = 0; i < 32; i++) a[i] = random_bf16(&state), b[i] = random_bf16(&state);
    for (int l = 0; l < 16; l++) acc[l] = bf16_to_f32(random_bf16(&state));
    const __m512i va = _mm512_loadu_si512(a), vb = _mm512_loadu_si512(b);
    _mm512_storeu_ps(got, _mm512_dpbf16_ps(_mm512_loadu_ps(acc), (__m512bh)va, (__m512bh)vb));
    for (int l = 0; l < 16; l++) { /* the high half (2l + 1) first */
      __m128 e = _mm_fmadd_ss(_mm_set_ss(bf16_to_f32(a[2 * l + 1])),
                              _mm_set_ss(bf16_to_f32(b[2 * l + 1])), _mm_set_ss(acc[l]));
      e = _mm_fmadd_ss(_mm_set_ss(bf16_to_f32(a[2 * l])), _mm_set_ss(bf16_to_f32(b[2 * l])), e);
      const float want = _mm_cvtss_f32(e);
      same &= memcmp(&want, &got[l], sizeof want) == 0 || (want != want && got[l] != got[l]);
    }
  }
  flush_leave(csr);
  return same;
}

int moerun_cpu_has_bf16dot(void) {
  static int known = -1; /* the answer never changes; a racing first call computes it twice */
  if (known < 0) {
    __builtin_cpu_init();
    known = moerun_cpu_has_avx512() && __builtin_cpu_supports("avx512bf16") &&
            bf16dot_matches_fma();
  }
  return known;
}

A512 INLINE void prefetch_chunk(const int fmt, const uint8_t *row, int64_t k) {
  if (fmt == FMT_MXFP4) {
    _mm_prefetch((const char *)(row + k / 2 + PREFETCH_MXFP4), _MM_HINT_T0);
  } else if (fmt == FMT_BF16) {
    _mm_prefetch((const char *)(row + 2 * k + PREFETCH_BF16), _MM_HINT_T0);
  } else { /* a chunk spans two cache lines */
    _mm_prefetch((const char *)(row + 4 * k + PREFETCH_F32), _MM_HINT_T0);
    _mm_prefetch((const char *)(row + 4 * k + PREFETCH_F32 + 64), _MM_HINT_T0);
  }
}

/* x rows in chunk lane order (the tail stays in order) */
A512 static void permute_x(int fmt, const float *x, float *xp, int64_t n, int64_t K) {
  const int64_t K32 = K & ~(int64_t)31;
  for (int64_t r = 0; r < n; r++) {
    for (int64_t k = 0; k < K32; k += 32) {
      __m512 lo, hi;
      x_chunk(fmt, x + r * K + k, &lo, &hi);
      _mm512_storeu_ps(xp + r * K + k, lo);
      _mm512_storeu_ps(xp + r * K + k + 16, hi);
    }
    memcpy(xp + r * K + K32, x + r * K + K32, (size_t)(K - K32) * sizeof(float));
  }
}

/* out[p * R + r] (no bias) for RP weight rows and R x rows; fmt and R are constants at every
   call site, so acc[][] lives in registers. */
A512 INLINE void regs_tile(const int fmt, const int R, const float *xp, int64_t K,
                           const uint8_t *w, int64_t ws, const uint8_t *s, int64_t ss,
                           float *out) {
  const int64_t K32 = K & ~(int64_t)31;
  __m512 acc[RP][REG_ROWS];
  for (int p = 0; p < RP; p++)
    for (int r = 0; r < R; r++) acc[p][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K32; k += 32) {
    __m512 lo[RP], hi[RP];
    for (int p = 0; p < RP; p++) {
      prefetch_chunk(fmt, w + p * ws, k);
      load_chunk(fmt, w + p * ws, fmt == FMT_MXFP4 ? s + p * ss : NULL, k, &lo[p], &hi[p]);
    }
    for (int r = 0; r < R; r++) {
      const __m512 xl = _mm512_loadu_ps(xp + r * K + k), xh = _mm512_loadu_ps(xp + r * K + k + 16);
      for (int p = 0; p < RP; p++)
        acc[p][r] = _mm512_fmadd_ps(hi[p], xh, _mm512_fmadd_ps(lo[p], xl, acc[p][r]));
    }
  }
  const int64_t wsize = fmt == FMT_BF16 ? 2 : 4; /* bytes per element of the dense formats */
  for (int p = 0; p < RP; p++)
    for (int r = 0; r < R; r++)
      out[p * R + r] =
          add_tail(lane_sum(acc[p][r]), xp + r * K + K32, fmt, w + p * ws + K32 * wsize, K - K32);
}

#define REGS_CASES(f) \
  switch (R) { CASE(f, 1); CASE(f, 2); CASE(f, 3); default: CASE(f, 4); }

A512 static void regs_any(int fmt, int R, const float *xp, int64_t K, const uint8_t *w, int64_t ws,
                          const uint8_t *s, int64_t ss, float *out) {
#define CASE(f, r) case r: regs_tile(f, r, xp, K, w, ws, s, ss, out); break
  if (fmt == FMT_MXFP4) REGS_CASES(FMT_MXFP4)
  else if (fmt == FMT_BF16) REGS_CASES(FMT_BF16)
  else REGS_CASES(FMT_F32)
#undef CASE
}

/* Tiles of RP weight rows; the last one ends at N (overlapping its neighbour, whose rows it
   leaves alone), so that one tile shape serves every N >= RP. */
static int run_regs(int fmt, int xmode, const float *x, const uint8_t *w, int64_t ws,
                    const uint8_t *s, int64_t ss, const void *bias, int bias_kind, float *y,
                    int64_t n, int64_t N, int64_t K, int nthreads) {
  float *xp = alloc_floats(n * K);
  if (!xp) return -1;
  permute_x(fmt, x, xp, n, K);
  const int64_t groups = (N + RP - 1) / RP;
#pragma omp parallel num_threads(nthreads)
  {
    const unsigned csr = flush_enter(xmode);
    /* static: each thread streams one contiguous half of W (measured: 214 vs 230 ms per 20b
       decode step with dynamic chunks, whose jumps restart the hardware prefetchers) */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < groups; t++) {
      const int64_t o = t * RP < N - RP ? t * RP : N - RP, first = t * RP - o;
      float out[RP * REG_ROWS];
      regs_any(fmt, (int)n, xp, K, w + o * ws, ws, s ? s + o * ss : NULL, ss, out);
      for (int64_t p = first; p < RP; p++)
        for (int r = 0; r < n; r++)
          y[r * N + o + p] = out[p * n + r] + bias_at(bias, bias_kind, o + p);
    }
    flush_leave(csr);
  }
  free(xp);
  return 0;
}

/* Fewer than RP weight rows: the register path on a copy padded with zero rows. */
static int run_regs_padded(int fmt, int xmode, const float *x, const uint8_t *w, int64_t ws,
                           const uint8_t *s, int64_t ss, const void *bias, int bias_kind,
                           float *y, int64_t n, int64_t N, int64_t K) {
  uint8_t *pad = calloc(1, (size_t)(RP * (ws + ss)));
  float *yp = malloc((size_t)(n * RP) * sizeof(float));
  int rc = pad && yp ? 0 : -1;
  if (rc == 0) {
    memcpy(pad, w, (size_t)(N * ws));
    if (s) memcpy(pad + RP * ws, s, (size_t)(N * ss));
    rc = run_regs(fmt, xmode, x, pad, ws, s ? pad + RP * ws : NULL, ss, NULL, BIAS_NONE, yp, n,
                  RP, K, 1);
  }
  const unsigned csr = flush_enter(xmode); /* the bias add rounds as in the other paths */
  for (int64_t r = 0; rc == 0 && r < n; r++)
    for (int64_t p = 0; p < N; p++) y[r * N + p] = yp[r * RP + p] + bias_at(bias, bias_kind, p);
  flush_leave(csr);
  free(pad), free(yp);
  return rc;
}

int moerun_linear_avx512(int fmt, int xmode, const float *x, const uint8_t *w, int64_t ws,
                         const uint8_t *s, int64_t ss, const void *bias, int bias_kind, float *y,
                         int64_t n, int64_t N, int64_t K, int nthreads) {
  if (n <= REG_ROWS && N < RP)
    return run_regs_padded(fmt, xmode, x, w, ws, s, ss, bias, bias_kind, y, n, N, K);
  if (n <= REG_ROWS)
    return run_regs(fmt, xmode, x, w, ws, s, ss, bias, bias_kind, y, n, N, K, nthreads);
  return moerun_avx512_tiles(fmt, xmode, x, w, ws, s, ss, bias, bias_kind, y, n, N, K, nthreads);
}

#else /* not x86-64: never called, since moerun_cpu_has_avx512() says no */
int moerun_cpu_has_avx512(void) { return 0; }
int moerun_cpu_has_bf16dot(void) { return 0; }
int moerun_linear_avx512(int fmt, int xmode, const float *x, const uint8_t *w, int64_t ws,
                         const uint8_t *s, int64_t ss, const void *bias, int bias_kind, float *y,
                         int64_t n, int64_t N, int64_t K, int nthreads) {
  (void)fmt, (void)xmode, (void)x, (void)w, (void)ws, (void)s, (void)ss, (void)bias;
  (void)bias_kind;
  (void)y, (void)n, (void)N, (void)K, (void)nthreads;
  return -1;
}
#endif
