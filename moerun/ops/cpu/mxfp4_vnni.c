/* Decode-time MXFP4 matmul (n <= 4 x rows) with integer dot products, AVX-512 VNNI.

   The float decode (avx512.c) spends ~5 cycles per 32-element block on decoding nibbles; here a
   64-byte load holds 4 blocks, one byte shuffle per nibble half gives the weights as bytes, and
   vpdpbusd multiplies 64 byte pairs at once. The price is that x is quantized: per 32-element
   block x ~= s * q with q a 16-bit integer (|error| <= s/2 = absmax / 65024), carried as two
   signed bytes q = 256 * hi + lo. That is ~2^-16 of the block's largest value, far below the
   bf16 rounding the activations already carry, so the model uses it only in bf16 mode.
   Weights are exact: bytes hold 2 * E2M1 + 12 (0..24, unsigned as vpdpbusd wants); the + 12 is
   removed by starting each sum at -12 * sum(x bytes), and the 2 by halving x's scale. A scale
   byte s becomes the fp32 bits s << 23 = 2**(s - 127), exact for s in 1..255 (s = 0, 2**-127,
   reads as 0). Dims: n x rows, N outputs, K inputs (K % 32 == 0), C = K / 128 chunks. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

enum { QP = 4, QR = 4 };       /* weight rows x x rows per tile */
enum { CHUNK_BYTES = 448 };    /* prepared x per 128 elements: 4 byte planes, 2 sums, 1 scale */
enum { PREFETCH = 8192 };      /* weight bytes ahead of the read, per row (measured) */
enum { W_OFFSET = 12 };

int moerun_cpu_has_vnni(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
}

/* One x row -> per chunk: hi/lo bytes of even elements, of odd elements (byte 16L + j = element
   2j (+1) of block L: where the weight shuffles put them), the -12 * byte sums per dword lane
   (hi, lo), and x's scale / 2 per lane (lanes 4L..4L+3 belong to block L). Missing blocks of a
   last partial chunk are zero. */
static void prepare_row(const float *x, int64_t K, uint8_t *out) {
  const int64_t C = (K + 127) / 128;
  memset(out, 0, (size_t)C * CHUNK_BYTES);
  for (int64_t b = 0; b < K / 32; b++) {
    const float *xb = x + 32 * b;
    uint8_t *chunk = out + (b / 4) * CHUNK_BYTES;
    int8_t *planes = (int8_t *)chunk; /* hi even, hi odd, lo even, lo odd: 64 bytes each */
    int32_t *sums = (int32_t *)(chunk + 256);
    float *scale = (float *)(chunk + 384);
    const int L = (int)(b % 4);
    float m = 0.0f;
    for (int i = 0; i < 32; i++) m = fabsf(xb[i]) > m ? fabsf(xb[i]) : m;
    /* |q| <= 32512 = 127 * 256 keeps hi within a signed byte; NaN/inf give a NaN scale */
    const float s = isfinite(m) ? m / 32512.0f : NAN;
    for (int i = 0; i < 32; i++) {
      const int q = s > 0.0f ? (int)lrintf(xb[i] / s) : 0;
      const int hi = (q + 128) >> 8, lo = q - 256 * hi; /* lo in [-128, 127] */
      const int at = 16 * L + i / 2 + (i % 2) * 64;    /* plane of even or odd elements */
      planes[at] = (int8_t)hi;
      planes[128 + at] = (int8_t)lo;
      sums[4 * L + (i / 2) / 4] -= W_OFFSET * hi;
      sums[16 + 4 * L + (i / 2) / 4] -= W_OFFSET * lo;
    }
    for (int d = 0; d < 4; d++) scale[4 * L + d] = 0.5f * s;
  }
}

VNNI static inline __m512 weight_scales(const uint8_t *s, __mmask16 ok4) {
  /* byte L of the 4 scale bytes to byte 2 of each dword of 128-bit lane L, then << 7 */
  const __m512i spread = _mm512_set_epi32(
      0x80038080, 0x80038080, 0x80038080, 0x80038080, 0x80028080, 0x80028080, 0x80028080,
      0x80028080, 0x80018080, 0x80018080, 0x80018080, 0x80018080, 0x80008080, 0x80008080,
      0x80008080, 0x80008080);
  const __m512i v = _mm512_broadcastd_epi32(_mm_maskz_loadu_epi8(ok4, s));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_shuffle_epi8(v, spread), 7));
}

/* P and R are constants at every call site, so acc[][] lives in registers. */
VNNI static inline __attribute__((always_inline)) void tile(
    const int P, const int R, const uint8_t *xq, int64_t K, const uint8_t *w, int64_t ws,
    const uint8_t *s, int64_t ss, float *out) {
  const __m512i lut = _mm512_broadcast_i32x4(
      _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const int64_t C = (K + 127) / 128, G = K / 32;
  __m512 acc[QP][QR];
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) acc[p][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c++) {
    const int blocks = G - 4 * c < 4 ? (int)(G - 4 * c) : 4;
    const __mmask64 ok = blocks == 4 ? ~(__mmask64)0 : ((__mmask64)1 << (16 * blocks)) - 1;
    const __mmask16 ok4 = (__mmask16)((1u << blocks) - 1);
    for (int p = 0; p < P; p++) {
      const uint8_t *wc = w + p * ws + 64 * c;
      _mm_prefetch((const char *)(wc + PREFETCH), _MM_HINT_T0);
      const __m512i q = _mm512_maskz_loadu_epi8(ok, wc);
      const __m512i even = _mm512_shuffle_epi8(lut, _mm512_and_si512(q, nib));
      const __m512i odd = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(q, 4), nib));
      const __m512 ws4 = weight_scales(s + p * ss + 4 * c, ok4);
      for (int r = 0; r < R; r++) {
        const uint8_t *xc = xq + r * C * CHUNK_BYTES + c * CHUNK_BYTES;
        __m512i hi = _mm512_loadu_si512(xc + 256), lo = _mm512_loadu_si512(xc + 320);
        hi = _mm512_dpbusd_epi32(hi, even, _mm512_loadu_si512(xc));
        hi = _mm512_dpbusd_epi32(hi, odd, _mm512_loadu_si512(xc + 64));
        lo = _mm512_dpbusd_epi32(lo, even, _mm512_loadu_si512(xc + 128));
        lo = _mm512_dpbusd_epi32(lo, odd, _mm512_loadu_si512(xc + 192));
        /* |hi * 256 + lo| < 2**24: exact in int32 and in fp32 */
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo));
        const __m512 sc = _mm512_mul_ps(ws4, _mm512_loadu_ps((const float *)(xc + 384)));
        acc[p][r] = _mm512_fmadd_ps(dot, sc, acc[p][r]);
      }
    }
  }
  for (int p = 0; p < P; p++)
    for (int r = 0; r < R; r++) out[p * R + r] = _mm512_reduce_add_ps(acc[p][r]);
}

VNNI static void tile_any(int P, int R, const uint8_t *xq, int64_t K, const uint8_t *w,
                          int64_t ws, const uint8_t *s, int64_t ss, float *out) {
#define CASE(p, r) case p * 8 + r: tile(p, r, xq, K, w, ws, s, ss, out); break
  switch (P * 8 + R) {
    CASE(1, 1); CASE(1, 2); CASE(1, 3); CASE(1, 4); CASE(2, 1); CASE(2, 2); CASE(2, 3);
    CASE(2, 4); CASE(3, 1); CASE(3, 2); CASE(3, 3); CASE(3, 4); CASE(4, 1); CASE(4, 2);
    CASE(4, 3); default: CASE(4, 4);
  }
#undef CASE
}

/* Several products of one shape (one per used expert) in one parallel region: the row groups
   of all jobs are split into one contiguous run per thread, so each thread streams long runs of
   weights and nobody waits at a barrier between experts. Returns -1 if a job has n > 4 rows or
   memory is short. */
int moerun_mxfp4_jobs_vnni(const Mxfp4Job *jobs, int count, int64_t N, int64_t K, int nthreads) {
  const int64_t C = (K + 127) / 128, ws = K / 2, ss = K / 32, row_bytes = C * CHUNK_BYTES;
  int64_t rows = 0;
  for (int j = 0; j < count; j++) {
    if (jobs[j].n > QR) return -1;
    rows += jobs[j].n;
  }
  uint8_t *xq = malloc((size_t)(rows > 0 ? rows : 1) * row_bytes);
  int64_t *first = malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
  if (!xq || !first) return free(xq), free(first), -1;
  for (int j = 0, r = 0; j < count; r += (int)jobs[j].n, j++) {
    first[j] = r;
    for (int64_t i = 0; i < jobs[j].n; i++)
      prepare_row(jobs[j].x + i * K, K, xq + (r + i) * row_bytes);
  }
  const int64_t groups = (N + QP - 1) / QP;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t t = 0; t < count * groups; t++) {
    const Mxfp4Job *job = jobs + t / groups;
    const int64_t o = (t % groups) * QP, n = job->n;
    const int P = N - o < QP ? (int)(N - o) : QP;
    float out[QP * QR];
    if (n == 0) continue;
    tile_any(P, (int)n, xq + first[t / groups] * row_bytes, K, job->blocks + o * ws, ws,
             job->scales + o * ss, ss, out);
    for (int p = 0; p < P; p++)
      for (int64_t r = 0; r < n; r++)
        job->y[r * N + o + p] = out[p * n + r] + bias_at(job->bias, job->bias_kind, o + p);
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
