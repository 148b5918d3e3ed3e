/* The integer-dot kernel's results (mxfp4_vnni.c) for many x rows, from fp32 FMAs, bit for bit.

   mxfp4_vnni.c defines each output as: acc = 0; for each block b: acc = fma(dot_b * ws_b, xs_b,
   acc), with dot_b the block's exact integer sum of (2 * E2M1 code) * q over its 32 elements.
   Here W enters as w' = (2 * E2M1) * ws_b (exact) and x as the integers q (exact in fp32), so
   every product and partial sum of a block is ws_b times an integer below 2**24: exact in fp32,
   in any order, equal to dot_b * ws_b. The block sums then meet xs_b and acc in the same fma.
   (Exact for scale bytes up to ~230; real checkpoints stay near 127.)
   Why: VNNI does 32 products per instruction but needs extra integer work per block and decodes
   W again for every 4 rows, so for many rows this kernel is faster (measured 1.5x; it takes
   0.85-1.0x the time of the float kernel of avx512_tiles.c on gpt-oss shapes).
   Layout: lanes are 32 output rows (2 vectors); x's q values are broadcast, RT rows per tile:
   24 accumulators (12 block sums, 12 running outputs). W is decoded per slice of SB blocks into
   a per-thread scratch [block][element][32 outputs] that stays in L1 while every x row passes;
   x is packed per tile as [element][RT rows], so that a tile reads one stream.
   Dims: n x rows, N outputs, K inputs (K % 32 == 0), G = K / 32 blocks. */
#include <stdlib.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define Q16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

enum { MO = 32, RT = 6 }; /* output rows per group (2 vectors) x x rows per tile */
enum { SB = 8 };          /* blocks per slice: 8 * 32 * 32 floats = 32 KB of decoded W */

/* x row r as q (floats) and its blocks' scales / 2, packed per tile of RT rows: xq[tile][k][r],
   xs[tile][b][r]; rows n.. of the last tile are zero */
Q16 static void quantize_row(const float *x, int64_t n, int64_t r, int64_t K, float *xq,
                             float *xs) {
  const int64_t G = K / 32;
  float *tq = xq + (r / RT) * RT * K + r % RT, *ts = xs + (r / RT) * RT * G + r % RT;
  for (int64_t b = 0; b < G; b++) {
    int32_t q[32] = {0};
    ts[b * RT] = r < n ? 0.5f * quantize_block(x + r * K + 32 * b, q) : 0.0f;
    for (int i = 0; i < 32; i++) tq[(32 * b + i) * RT] = (float)q[i];
  }
}

/* Blocks [b0, b0 + nb) of weight rows [0, P) as wt[block][element][output]: lane p of a vector
   is row p. Row p's dword d of a block (gathered for 16 rows at once) holds elements
   8d .. 8d + 7 in its nibbles; vpermps reads the low 4 bits of each index lane. */
Q16 static void decode_slice(const uint8_t *w, int64_t ws, const uint8_t *s, int64_t ss, int P,
                             int64_t b0, int nb, float *wt) {
  const __m512 c2 = _mm512_setr_ps(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m512i row = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int h = 0; h < MO / 16; h++) {
    const int rows = P - 16 * h < 0 ? 0 : P - 16 * h < 16 ? P - 16 * h : 16;
    const __mmask16 live = (__mmask16)((1u << rows) - 1);
    const __m512i at = _mm512_mullo_epi32(row, _mm512_set1_epi32((int)ws));
    for (int b = 0; b < nb; b++) {
      float scale[16] = {0};
      for (int p = 0; p < rows; p++) scale[p] = e8m0_bits(s[(16 * h + p) * ss + b0 + b]);
      const __m512 sc = _mm512_loadu_ps(scale);
      const uint8_t *base = w + 16 * h * ws + 16 * (b0 + b);
      float *dst = wt + (int64_t)b * 32 * MO + 16 * h;
      for (int d = 0; d < 4; d++) {
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at,
                                                      base + 4 * d, 1);
        for (int k = 0; k < 8; k++) {
          const __m512 e = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * k), c2);
          _mm512_storeu_ps(dst + (8 * d + k) * MO, _mm512_mul_ps(e, sc));
        }
      }
    }
  }
}

/* acc[r * MO + ...] (in memory) for a tile's RT x rows (packed q xq, scales xs, at the slice's
   first block) over the slice's nb blocks: per block, exact sums from zero, then one fma with
   x's scale. */
Q16 static void tile(const float *wt, int nb, const float *xq, const float *xs, float *acc_mem) {
  __m512 acc[RT][2];
#pragma GCC unroll 6
  for (int r = 0; r < RT; r++)
#pragma GCC unroll 2
    for (int c = 0; c < 2; c++) acc[r][c] = _mm512_loadu_ps(acc_mem + r * MO + 16 * c);
  for (int b = 0; b < nb; b++) {
    __m512 dot[RT][2];
#pragma GCC unroll 6
    for (int r = 0; r < RT; r++) dot[r][0] = dot[r][1] = _mm512_setzero_ps();
    for (int i = 0; i < 32; i++) {
      const __m512 w0 = _mm512_loadu_ps(wt + (b * 32 + i) * MO);
      const __m512 w1 = _mm512_loadu_ps(wt + (b * 32 + i) * MO + 16);
#pragma GCC unroll 6
      for (int r = 0; r < RT; r++) {
        const __m512 xv = _mm512_set1_ps(xq[(32 * b + i) * RT + r]);
        dot[r][0] = _mm512_fmadd_ps(w0, xv, dot[r][0]);
        dot[r][1] = _mm512_fmadd_ps(w1, xv, dot[r][1]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < RT; r++) {
      const __m512 scale = _mm512_set1_ps(xs[b * RT + r]);
      acc[r][0] = _mm512_fmadd_ps(dot[r][0], scale, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(dot[r][1], scale, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < RT; r++)
#pragma GCC unroll 2
    for (int c = 0; c < 2; c++) _mm512_storeu_ps(acc_mem + r * MO + 16 * c, acc[r][c]);
}

typedef struct { /* one call's operands */
  const uint8_t *w, *s;
  const void *bias;
  int bias_kind;
  float *y;
  int64_t n, N, K;
} Q16Call;

/* Output rows [o, o + P): every x row, slice by slice, then y = acc + bias */
Q16 static void group(const Q16Call *Q, const float *xq, const float *xs, int64_t rows, int64_t o,
                      float *wt, float *acc) {
  const int64_t K = Q->K, G = K / 32, ws = K / 2;
  const int P = Q->N - o < MO ? (int)(Q->N - o) : MO;
  memset(acc, 0, (size_t)(rows * MO) * sizeof(float));
  for (int64_t b0 = 0; b0 < G; b0 += SB) {
    const int nb = G - b0 < SB ? (int)(G - b0) : SB;
    decode_slice(Q->w + o * ws, ws, Q->s + o * G, G, P, b0, nb, wt);
    for (int64_t r = 0; r < rows; r += RT)
      tile(wt, nb, xq + r * K + 32 * b0 * RT, xs + r * G + b0 * RT, acc + r * MO);
  }
  for (int64_t r = 0; r < Q->n; r++)
    for (int p = 0; p < P; p++)
      Q->y[r * Q->N + o + p] = acc[r * MO + p] + bias_at(Q->bias, Q->bias_kind, o + p);
}

/* Threads split the output groups (dynamic: cores may be shared). Returns -1 if memory is
   short. */
static int q16_linear(const Q16Call *Q, const float *x, int nthreads) {
  const int64_t rows = (Q->n + RT - 1) / RT * RT, G = Q->K / 32;
  float *xq = malloc((size_t)(rows * Q->K + rows * G + 1) * sizeof(float));
  int failed = 0;
  if (!xq) return -1;
#pragma omp parallel num_threads(nthreads)
  {
    float *wt = malloc((size_t)SB * 32 * MO * sizeof(float));
    float *acc = malloc((size_t)rows * MO * sizeof(float));
    if (!wt || !acc) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) quantize_row(x, Q->n, r, Q->K, xq, xq + rows * Q->K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < (Q->N + MO - 1) / MO; t++)
      if (wt && acc) group(Q, xq, xq + rows * Q->K, rows, t * MO, wt, acc);
    free(wt), free(acc);
  }
  free(xq);
  return failed ? -1 : 0;
}

int moerun_mxfp4_linear_q16(const float *x, const uint8_t *blocks, const uint8_t *scales,
                            const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                            int64_t K, int nthreads) {
  if (n <= QUANTIZE_MAX_ROWS)
    return moerun_mxfp4_linear_vnni(x, blocks, scales, bias, bias_kind, y, n, N, K, nthreads);
  const Q16Call Q = {blocks, scales, bias, bias_kind, y, n, N, K};
  return q16_linear(&Q, x, nthreads);
}

#else /* not x86-64: never called, since moerun_cpu_has_vnni() says no */
int moerun_mxfp4_linear_q16(const float *x, const uint8_t *blocks, const uint8_t *scales,
                            const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                            int64_t K, int nthreads) {
  (void)x, (void)blocks, (void)scales, (void)bias, (void)bias_kind, (void)y, (void)n, (void)N;
  (void)K, (void)nthreads;
  return -1;
}
#endif
