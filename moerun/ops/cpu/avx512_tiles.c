/* The AVX-512 variant's path for many x rows (prefill), in the summation order of avx512.h.

   A thread decodes MR weight rows to fp32 (a scratch of MR * K floats, never a whole matrix);
   4 x 4 register tiles (weight rows x x rows) run over K in slices of KC elements that stay in
   L1, their accumulators parked in a per-thread buffer between slices: 32 FMAs per 16 loads, so
   the FMA units, not the caches, set the pace (measured within 2% of the previous broadcast
   kernel, whose sums ran down K in x-row lanes). Both operands are packed, as BLAS packs
   panels, so that a tile reads two contiguous streams. */
#include "avx512.h"

#if defined(__x86_64__)
enum { MR = 12, TP = 4, TR = 4 }; /* 12 decoded weight rows; 4 x 4 tiles */
enum { KC = 512 };              /* K per slice: 12 weight rows + 4 x rows = 32 KB of L1 */
enum { XT_ROWS = 96 };          /* x rows per panel; their accumulators take 72 KB of L2 */

/* Both operands of the tiles are packed (as BLAS packs panels), so that a tile reads two
   contiguous streams: weight rows in groups of TP, x rows in groups of TR, each group as its
   chunks in order, each chunk as the group's rows' lanes (lo, hi) one row after the other.
   The K % 32 tails stay in element order beside them: x's in x itself, W's in wtail. */
static inline int64_t packed_at(int64_t row, int group, int64_t K32) {
  return (row / group) * group * K32 + (row % group) * 32;
}

/* x row r into its packed place (rows n.. of the last tile become zero) */
A512 static void pack_row(int fmt, const float *x, float *xp, int64_t n, int64_t r, int64_t K) {
  const int64_t K32 = K & ~(int64_t)31;
  float *dst = xp + packed_at(r, TR, K32);
  for (int64_t k = 0; k < K32; k += 32, dst += TR * 32) {
    __m512 lo = _mm512_setzero_ps(), hi = lo;
    if (r < n) x_chunk(fmt, x + r * K + k, &lo, &hi);
    _mm512_storeu_ps(dst, lo);
    _mm512_storeu_ps(dst + 16, hi);
  }
}

/* Weight row into its packed place (stride between chunks TP * 32 floats) and its tail. */
A512 INLINE void decode_row(const int fmt, const uint8_t *row, const uint8_t *sp, int64_t K,
                            float *dst, float *tail) {
  const int64_t K32 = K & ~(int64_t)31;
  for (int64_t k = 0; k < K32; k += 32, dst += TP * 32) {
    __m512 lo, hi;
    load_chunk(fmt, row, sp, k, &lo, &hi);
    _mm512_storeu_ps(dst, lo);
    _mm512_storeu_ps(dst + 16, hi);
  }
  for (int64_t k = K32; k < K; k++) tail[k - K32] = weight_at(fmt, row, k);
}

/* Weight rows [0, P) decoded and packed into wbuf (MR rows), tails into wtail; rows P..MR-1
   become zero. */
A512 static void decode_rows(int fmt, int P, const uint8_t *w, int64_t ws, const uint8_t *s,
                             int64_t ss, int64_t K, float *wbuf, float *wtail) {
  const int64_t K32 = K & ~(int64_t)31, tail = K - K32;
  for (int p = 0; p < P; p++) {
    float *dst = wbuf + packed_at(p, TP, K32), *t = wtail + p * tail;
    if (fmt == FMT_MXFP4) decode_row(FMT_MXFP4, w + p * ws, s + p * ss, K, dst, t);
    else if (fmt == FMT_BF16) decode_row(FMT_BF16, w + p * ws, NULL, K, dst, t);
    else decode_row(FMT_F32, w + p * ws, NULL, K, dst, t);
  }
  for (int p = P; p < MR; p++) {
    float *dst = wbuf + packed_at(p, TP, K32);
    for (int64_t k = 0; k < K32; k += 32, dst += TP * 32) memset(dst, 0, 32 * sizeof(float));
  }
}

/* A tile's accumulators in and out of registers: unrolled, or GCC keeps acc[][] in memory
   around the loop (measured 15% slower) */
A512 INLINE void load_acc(__m512 acc[TP][TR], const float *acc_mem) {
#pragma GCC unroll 4
  for (int p = 0; p < TP; p++)
#pragma GCC unroll 4
    for (int r = 0; r < TR; r++) acc[p][r] = _mm512_loadu_ps(acc_mem + 16 * (p * TR + r));
}

A512 INLINE void store_acc(__m512 acc[TP][TR], float *acc_mem) {
#pragma GCC unroll 4
  for (int p = 0; p < TP; p++)
#pragma GCC unroll 4
    for (int r = 0; r < TR; r++) _mm512_storeu_ps(acc_mem + 16 * (p * TR + r), acc[p][r]);
}

/* acc[p * TR + r] (16 floats each, in memory) += `steps` chunks of a packed weight group wg and
   a packed x group xg, in the chunk order. */
A512 static void tile(const float *wg, const float *xg, int64_t steps, float *acc_mem) {
  __m512 acc[TP][TR];
  load_acc(acc, acc_mem);
  for (int64_t i = 0; i < steps; i++, wg += TP * 32, xg += TR * 32) {
    for (int h = 0; h < 32; h += 16) { /* the lo lanes of every (p, r), then the hi lanes */
      __m512 wv[TP];
      for (int p = 0; p < TP; p++) wv[p] = _mm512_loadu_ps(wg + 32 * p + h);
      for (int r = 0; r < TR; r++) {
        const __m512 xv = _mm512_loadu_ps(xg + 32 * r + h);
        for (int p = 0; p < TP; p++) acc[p][r] = _mm512_fmadd_ps(wv[p], xv, acc[p][r]);
      }
    }
  }
  store_acc(acc, acc_mem);
}

/* bf16 x and W for vdpbf16ps (XMODE_BF16_DOT on a CPU where moerun_cpu_has_bf16dot): the same
   packing with 32 bf16 a chunk row instead of 32 floats (half the bytes, half the instructions).
   Dword l holds lane l's even element in its high half and the odd one in its low half, since
   vdpbf16ps adds the high product first: lane l = fma(odd, fma(even, acc)), avx512.h's order,
   products exact (bf16 x bf16), denormals flushed as every path does for bf16 x. */
A512 static void pack_row_bf16(const float *x, uint16_t *xp, int64_t n, int64_t r, int64_t K) {
  const int64_t K32 = K & ~(int64_t)31;
  const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
  uint16_t *dst = xp + packed_at(r, TR, K32);
  for (int64_t k = 0; k < K32; k += 32, dst += TR * 32) {
    __m512 lo = _mm512_setzero_ps(), hi = lo; /* x's bf16 values: their fp32 top halves */
    if (r < n) x_chunk(FMT_BF16, x + r * K + k, &lo, &hi);
    _mm512_storeu_si512(dst, _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(lo), top),
                                             _mm512_srli_epi32(_mm512_castps_si512(hi), 16)));
  }
}

/* decode_rows for bf16 weights packed for vdpbf16ps: each dword's two halves swapped */
A512 static void decode_rows_bf16(int P, const uint8_t *w, int64_t ws, int64_t K, uint16_t *wbuf,
                                  float *wtail) {
  const int64_t K32 = K & ~(int64_t)31, tail = K - K32;
  for (int p = 0; p < MR; p++) {
    uint16_t *dst = wbuf + packed_at(p, TP, K32);
    const uint8_t *row = w + p * ws;
    for (int64_t k = 0; k < K32; k += 32, dst += TP * 32)
      _mm512_storeu_si512(dst, p < P ? _mm512_rol_epi32(_mm512_loadu_si512(row + 2 * k), 16)
                                     : _mm512_setzero_si512());
    for (int64_t k = K32; p < P && k < K; k++)
      wtail[p * tail + k - K32] = weight_at(FMT_BF16, row, k);
  }
}

/* tile() with one vdpbf16ps per (p, r) and chunk */
BF16DOT static void tile_bf16(const uint16_t *wg, const uint16_t *xg, int64_t steps,
                              float *acc_mem) {
  __m512 acc[TP][TR];
  load_acc(acc, acc_mem);
  for (int64_t i = 0; i < steps; i++, wg += TP * 32, xg += TR * 32) {
    __m512i wv[TP];
#pragma GCC unroll 4
    for (int p = 0; p < TP; p++) wv[p] = _mm512_loadu_si512(wg + 32 * p);
#pragma GCC unroll 4
    for (int r = 0; r < TR; r++) {
      const __m512i xv = _mm512_loadu_si512(xg + 32 * r);
#pragma GCC unroll 4
      for (int p = 0; p < TP; p++)
        acc[p][r] = _mm512_dpbf16_ps(acc[p][r], (__m512bh)wv[p], (__m512bh)xv);
    }
  }
  store_acc(acc, acc_mem);
}

/* Accumulator of x row i (from the panel's first) and weight row p: tiles in (row group,
   weight group) order, 16 floats per (p, r) within a tile. */
static inline float *acc_at(float *acc, int64_t i, int p) {
  return acc + 16 * ((i / TR) * MR * TR + (p / TP) * TP * TR + (p % TP) * TR + i % TR);
}

/* The MR packed weight rows times packed x rows [r0, r1) (multiples of TR), all chunks: slices
   of KC elements outermost, so a slice of the weight rows stays in L1 while the x rows pass. */
A512 static void panel(int dot, const void *wbuf, const void *xp, int64_t r0, int64_t r1,
                       int64_t K, float *acc) {
  const int64_t K32 = K & ~(int64_t)31;
  memset(acc, 0, (size_t)((r1 - r0) * MR * 16) * sizeof(float));
  for (int64_t k0 = 0; k0 < K32; k0 += KC) {
    const int64_t steps = ((K32 - k0 < KC ? K32 : k0 + KC) - k0) / 32;
    for (int64_t r = r0; r < r1; r += TR)
      for (int p = 0; p < MR; p += TP) {
        const int64_t wi = packed_at(p, TP, K32) + k0 * TP, xi = packed_at(r, TR, K32) + k0 * TR;
        if (dot)
          tile_bf16((const uint16_t *)wbuf + wi, (const uint16_t *)xp + xi, steps,
                    acc_at(acc, r - r0, p));
        else
          tile((const float *)wbuf + wi, (const float *)xp + xi, steps, acc_at(acc, r - r0, p));
      }
  }
}

typedef struct { /* one call's operands, as moerun_linear_avx512 received them */
  int fmt, xmode;
  const float *x;
  const uint8_t *w, *s;
  int64_t ws, ss;
  const void *bias;
  int bias_kind;
  float *y;
  int64_t n, N, K;
} Linear;

/* Output rows [o, o + P) for x rows [r0, min(r1, n)) from the panel's accumulators, a tile's
   16 lane sums at a time: lane 4 r + p holds (x row r, weight row p) of the tile. */
A512 static void store_panel(const Linear *L, const float *wtail, float *acc, int64_t o, int P,
                             int64_t r0, int64_t r1) {
  const int64_t K = L->K, tail = K & 31, end = r1 < L->n ? r1 : L->n;
  for (int pg = 0; pg < P; pg += TP) {
    const int ps = P - pg < TP ? P - pg : TP;
    float b[TP] = {0};
    for (int p = 0; p < ps; p++) b[p] = bias_at(L->bias, L->bias_kind, o + pg + p);
    const __m512 bias4 = _mm512_broadcast_f32x4(_mm_loadu_ps(b));
    for (int64_t rg = r0; rg < end; rg += TR) {
      float sums[TP * TR];
      const __m512 v = lane_sums16(acc_at(acc, rg - r0, pg));
      _mm512_storeu_ps(sums, tail ? v : _mm512_add_ps(v, bias4)); /* no tail: t + bias */
      for (int64_t r = rg; r < rg + TR && r < end; r++) {
        float *yr = L->y + r * L->N + o + pg, *sr = sums + 4 * (r - rg);
        if (!tail) {
          memcpy(yr, sr, (size_t)ps * sizeof(float));
          continue;
        }
        for (int p = 0; p < ps; p++)
          yr[p] = add_tail(sr[p], L->x + r * K + K - tail, FMT_F32,
                           (const uint8_t *)(wtail + (pg + p) * tail), tail) +
                  bias_at(L->bias, L->bias_kind, o + pg + p);
      }
    }
  }
}

/* x is packed once, padded to whole tiles, and taken XT_ROWS rows (a panel) at a time, so that
   each decoded group of MR weight rows serves a panel. Threads split the (panel, weight group)
   pairs, dynamically (cores may be shared): a few weight rows (a router) still keep both busy. */
static int run_tiles(const Linear *L, int nthreads) {
  const int64_t K = L->K, rows = (L->n + TR - 1) / TR * TR, groups = (L->N + MR - 1) / MR;
  const int64_t panels = (rows + XT_ROWS - 1) / XT_ROWS;
  const int dot = L->fmt == FMT_BF16 && L->xmode == XMODE_BF16_DOT && moerun_cpu_has_bf16dot();
  float *xp = alloc_floats(rows * (K & ~(int64_t)31)); /* bf16 packing uses half */
  int failed = 0;
  if (!xp) return -1;
#pragma omp parallel num_threads(nthreads)
  {
    const unsigned csr = flush_enter(L->xmode);
    float *wbuf = alloc_floats(MR * K), *wtail = wbuf + MR * (K & ~(int64_t)31);
    float *acc = alloc_floats(XT_ROWS * MR * 16);
    if (!wbuf || !acc) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
      if (dot) pack_row_bf16(L->x, (uint16_t *)xp, L->n, r, K);
      else pack_row(L->fmt, L->x, xp, L->n, r, K);
#pragma omp for schedule(dynamic, 2)
    for (int64_t t = 0; t < panels * groups; t++) {
      if (!wbuf || !acc) continue;
      const int64_t r0 = t / groups * XT_ROWS, r1 = rows - r0 < XT_ROWS ? rows : r0 + XT_ROWS;
      const int64_t o = t % groups * MR;
      const int P = L->N - o < MR ? (int)(L->N - o) : MR;
      if (dot)
        decode_rows_bf16(P, L->w + o * L->ws, L->ws, K, (uint16_t *)wbuf, wtail);
      else
        decode_rows(L->fmt, P, L->w + o * L->ws, L->ws, L->s ? L->s + o * L->ss : NULL, L->ss, K,
                    wbuf, wtail);
      panel(dot, wbuf, xp, r0, r1, K, acc);
      store_panel(L, wtail, acc, o, P, r0, r1);
    }
    free(wbuf), free(acc);
    flush_leave(csr);
  }
  free(xp);
  return failed ? -1 : 0;
}

int moerun_avx512_tiles(int fmt, int xmode, const float *x, const uint8_t *w, int64_t ws,
                        const uint8_t *s, int64_t ss, const void *bias, int bias_kind, float *y,
                        int64_t n, int64_t N, int64_t K, int nthreads) {
  const Linear L = {fmt, xmode, x, w, s, ws, ss, bias, bias_kind, y, n, N, K};
  return run_tiles(&L, nthreads);
}
#endif
