/* MXFP4 matmul with integer dot products, AVX-512 VNNI: the decode kernel of bf16 activations.

   The float decode (avx512.c) spends ~5 cycles per 32-element block on decoding nibbles; here a
   64-byte load holds 4 blocks, one byte shuffle per nibble half gives the weights as bytes, and
   vpdpbusd multiplies 64 byte pairs at once. The price is that x is quantized: per 32-element
   block x ~= s * q with q a 16-bit integer (|error| <= s/2 = absmax / 65024, quantize_block in
   kernels.h), carried as two signed bytes q = 256 * hi + lo. That is ~2^-16 of the block's
   largest value, far below the bf16 rounding the activations already carry, so the model uses
   it only in bf16 mode. Weights are exact: bytes hold 2 * E2M1 + 12 (0..24, unsigned as
   vpdpbusd wants); the + 12 is removed by starting each sum at -12 * sum(x bytes), and the 2 by
   halving x's scale. A scale byte s becomes the fp32 bits s << 23 = 2**(s - 127) (s = 0 reads
   as 0).

   Each output (weight row o, x row r) is, in this order and nothing else:
     acc = 0; for each block b: acc = fma(dot_b * ws_b, xs_b, acc);  y = acc + bias
   dot_b = the block's exact integer sum of (2 * E2M1) * q, ws_b = its weight scale (exact
   product: dot_b < 2**24), xs_b = x's scale / 2. No other row takes part, so the result is
   batch invariant, and mxfp4_q16.c reproduces it bit for bit with fp32 FMAs (exact on these
   integers) where many rows make that faster. A tile holds 16 weight rows, one per fp32 lane:
   per 4-block chunk each row's dword lanes (4 per block) are summed across, 4 rows at a time,
   then transposed so that lane p of vector L holds row p's block L.
   Dims: n x rows, N outputs, K inputs (K % 32 == 0), C = K / 128 chunks, G = K / 32 blocks. */
#include <stdlib.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))

enum { QP = 16, QR = 4 };      /* weight rows per tile (one per lane) x x rows */
enum { CHUNK_BYTES = 384 };    /* prepared x per 128 elements: 4 byte planes, 2 sums */
enum { W_OFFSET = 12 };

int moerun_cpu_has_vnni(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
}

/* Bytes of one prepared x row: the chunks, then x's scale / 2 per block (4 floats a chunk) */
static int64_t row_bytes(int64_t K) { return (K + 127) / 128 * (CHUNK_BYTES + 16); }

/* One x row -> per chunk: hi/lo bytes of even elements, of odd elements (byte 16L + j = element
   2j (+1) of block L: where the weight shuffles put them) and the -12 * byte sums per dword lane
   (hi, lo); after the chunks, the blocks' scales / 2. Missing blocks of a last partial chunk are
   zero. */
static void prepare_row(const float *x, int64_t K, uint8_t *out) {
  const int64_t C = (K + 127) / 128;
  float *xs = (float *)(out + C * CHUNK_BYTES);
  memset(out, 0, (size_t)row_bytes(K));
  for (int64_t b = 0; b < K / 32; b++) {
    uint8_t *chunk = out + (b / 4) * CHUNK_BYTES;
    int8_t *planes = (int8_t *)chunk; /* hi even, hi odd, lo even, lo odd: 64 bytes each */
    int32_t *sums = (int32_t *)(chunk + 256);
    const int L = (int)(b % 4);
    int32_t q[32];
    xs[b] = 0.5f * quantize_block(x + 32 * b, q);
    for (int i = 0; i < 32; i++) {
      const int hi = (q[i] + 128) >> 8, lo = q[i] - 256 * hi; /* lo in [-128, 127] */
      const int at = 16 * L + i / 2 + (i % 2) * 64;          /* plane of even or odd elements */
      planes[at] = (int8_t)hi;
      planes[128 + at] = (int8_t)lo;
      sums[4 * L + (i / 2) / 4] -= W_OFFSET * hi;
      sums[16 + 4 * L + (i / 2) / 4] -= W_OFFSET * lo;
    }
  }
}

/* Lane 4L + j = the sum of v[j]'s 4 lanes in 128-bit lane L (a 4 x 4 transpose-add per lane) */
VNNI INLINE __m512i across4(const __m512i v[4]) {
  const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]),
                                       _mm512_unpackhi_epi32(v[0], v[1]));
  const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]),
                                       _mm512_unpackhi_epi32(v[2], v[3]));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
}

/* t[L] lane 4q + j = u[q] lane 4L + j: 128-bit lane L of each u[q] into vector L */
VNNI INLINE void transpose128(const __m512i u[4], __m512i t[4]) {
  const __m512i a = _mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i b = _mm512_shuffle_i32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i c = _mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2));
  const __m512i d = _mm512_shuffle_i32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2));
  t[0] = _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  t[1] = _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  t[2] = _mm512_shuffle_i32x4(c, d, _MM_SHUFFLE(2, 0, 2, 0));
  t[3] = _mm512_shuffle_i32x4(c, d, _MM_SHUFFLE(3, 1, 3, 1));
}

/* Lane p = the scale bytes of row p's blocks 4c..4c+blocks-1, one per byte */
VNNI INLINE __m512i chunk_scales(const uint8_t *s, int64_t ss, int P, int64_t c, int blocks) {
  const __mmask16 rows = (__mmask16)((1u << P) - 1);
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                          12, 13, 14, 15),
                                        _mm512_set1_epi32((int)ss));
  if (blocks == 4)
    return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, at, s + 4 * c, 1);
  uint32_t bytes[QP] = {0}; /* a partial last chunk: a dword would read past the last row */
  for (int p = 0; p < P; p++)
    for (int L = 0; L < blocks; L++) bytes[p] |= (uint32_t)s[p * ss + 4 * c + L] << (8 * L);
  return _mm512_loadu_si512(bytes);
}

/* The 4 blocks of chunk c of one weight row as bytes 2 * E2M1 + 12: even and odd elements.
   `ahead` = the same bytes of the next tile's rows, fetched now: 16 rows read side by side are
   16 streams, too many for the hardware prefetchers (measured 1.6x slower without). */
VNNI INLINE void chunk_weights(const uint8_t *wc, __mmask64 ok, int64_t ahead, __m512i *even,
                               __m512i *odd) {
  const __m512i lut = _mm512_broadcast_i32x4(
      _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i nib = _mm512_set1_epi8(0x0F);
  _mm_prefetch((const char *)(wc + ahead), _MM_HINT_T0);
  const __m512i q = _mm512_maskz_loadu_epi8(ok, wc);
  *even = _mm512_shuffle_epi8(lut, _mm512_and_si512(q, nib));
  *odd = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(q, 4), nib));
}

/* The exact integer dot of those weights with a prepared x chunk, per dword lane (4 a block) */
VNNI INLINE __m512i chunk_dot(__m512i even, __m512i odd, const uint8_t *xc) {
  __m512i hi = _mm512_loadu_si512(xc + 256), lo = _mm512_loadu_si512(xc + 320);
  hi = _mm512_dpbusd_epi32(hi, even, _mm512_loadu_si512(xc));
  hi = _mm512_dpbusd_epi32(hi, odd, _mm512_loadu_si512(xc + 64));
  lo = _mm512_dpbusd_epi32(lo, even, _mm512_loadu_si512(xc + 128));
  lo = _mm512_dpbusd_epi32(lo, odd, _mm512_loadu_si512(xc + 192));
  return _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo); /* |hi * 256 + lo| < 2**24 */
}

/* out[r * QP + p] = y of weight rows p < P (one per lane) and R prepared x rows (stride rb); R
   is a constant at every call site, and each row group's weights are decoded once for the R
   rows. */
VNNI INLINE void tile(const int R, int P, const uint8_t *xq, int64_t rb, int64_t K,
                      const uint8_t *w, int64_t ws, const uint8_t *s, int64_t ss, float *out) {
  const int64_t C = (K + 127) / 128, G = K / 32;
  __m512 acc[QR];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c++) {
    const int blocks = G - 4 * c < 4 ? (int)(G - 4 * c) : 4;
    const __mmask64 ok = blocks == 4 ? ~(__mmask64)0 : ((__mmask64)1 << (16 * blocks)) - 1;
    __m512i u[QR][4], t[4];
    for (int g = 0; g < 4; g++) { /* rows 4g..4g+3 */
      __m512i even[4], odd[4], v[QR][4];
      for (int j = 0; j < 4; j++) {
        even[j] = odd[j] = _mm512_setzero_si512();
        if (4 * g + j < P)
          chunk_weights(w + (4 * g + j) * ws + 64 * c, ok, QP * ws, &even[j], &odd[j]);
      }
      for (int r = 0; r < R; r++) {
        for (int j = 0; j < 4; j++)
          v[r][j] = chunk_dot(even[j], odd[j], xq + r * rb + c * CHUNK_BYTES);
        u[r][g] = across4(v[r]);
      }
    }
    const __m512i sc = chunk_scales(s, ss, P, c, blocks);
    for (int r = 0; r < R; r++) {
      const float *xs = (const float *)(xq + r * rb + C * CHUNK_BYTES);
      transpose128(u[r], t);
      for (int L = 0; L < blocks; L++) {
        const __m512i byte = _mm512_and_si512(_mm512_srli_epi32(sc, 8 * L), _mm512_set1_epi32(255));
        const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(t[L]),
                                         _mm512_castsi512_ps(_mm512_slli_epi32(byte, 23)));
        acc[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(xs[4 * c + L]), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(out + r * QP, acc[r]);
}

VNNI static void tile_any(int R, int P, const uint8_t *xq, int64_t rb, int64_t K,
                          const uint8_t *w, int64_t ws, const uint8_t *s, int64_t ss,
                          float *out) {
  switch (R) {
    case 1: tile(1, P, xq, rb, K, w, ws, s, ss, out); break;
    case 2: tile(2, P, xq, rb, K, w, ws, s, ss, out); break;
    case 3: tile(3, P, xq, rb, K, w, ws, s, ss, out); break;
    default: tile(4, P, xq, rb, K, w, ws, s, ss, out);
  }
}

/* Several products of one shape (one per used expert) in one parallel region: the weight row
   groups of all jobs are split into one contiguous run per thread, so each thread streams long
   runs of weights and nobody waits at a barrier between experts; a group's 16 weight rows stay
   in L1 while the job's x rows pass. Returns -1 if memory is short. */
int moerun_mxfp4_jobs_vnni(const Mxfp4Job *jobs, int count, int64_t N, int64_t K, int nthreads) {
  const int64_t ws = K / 2, ss = K / 32, rb = row_bytes(K);
  int64_t rows = 0;
  for (int j = 0; j < count; j++) rows += jobs[j].n;
  uint8_t *xq = malloc((size_t)(rows > 0 ? rows : 1) * rb);
  int64_t *first = malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
  if (!xq || !first) return free(xq), free(first), -1;
  for (int64_t j = 0, r = 0; j < count; r += jobs[j].n, j++) {
    first[j] = r;
    for (int64_t i = 0; i < jobs[j].n; i++) prepare_row(jobs[j].x + i * K, K, xq + (r + i) * rb);
  }
  const int64_t groups = (N + QP - 1) / QP;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < count * groups; t++) {
    const Mxfp4Job *job = jobs + t / groups;
    const int64_t o = (t % groups) * QP;
    const int P = N - o < QP ? (int)(N - o) : QP;
    for (int64_t r0 = 0; r0 < job->n; r0 += QR) {
      const int R = job->n - r0 < QR ? (int)(job->n - r0) : QR;
      float out[QR * QP];
      tile_any(R, P, xq + (first[t / groups] + r0) * rb, rb, K, job->blocks + o * ws, ws,
               job->scales + o * ss, ss, out);
      for (int r = 0; r < R; r++)
        for (int p = 0; p < P; p++)
          job->y[(r0 + r) * N + o + p] =
              out[r * QP + p] + bias_at(job->bias, job->bias_kind, o + p);
    }
  }
  free(xq), free(first);
  return 0;
}

int moerun_mxfp4_linear_vnni(const float *x, const uint8_t *blocks, const uint8_t *scales,
                             const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                             int64_t K, int nthreads) {
  const Mxfp4Job job = {x, n, blocks, scales, bias, bias_kind, y};
  return moerun_mxfp4_jobs_vnni(&job, 1, N, K, nthreads);
}

#else /* not x86-64: never called, since moerun_cpu_has_vnni() says no */
int moerun_cpu_has_vnni(void) { return 0; }
int moerun_mxfp4_jobs_vnni(const Mxfp4Job *jobs, int count, int64_t N, int64_t K, int nthreads) {
  (void)jobs, (void)count, (void)N, (void)K, (void)nthreads;
  return -1;
}
int moerun_mxfp4_linear_vnni(const float *x, const uint8_t *blocks, const uint8_t *scales,
                             const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                             int64_t K, int nthreads) {
  (void)x, (void)blocks, (void)scales, (void)bias, (void)bias_kind, (void)y, (void)n, (void)N;
  (void)K, (void)nthreads;
  return -1;
}
#endif
