/* The AVX-512 variant's summation order, shared by its two paths: avx512.c (few x rows, W
   decoded in registers) and avx512_tiles.c (many rows, tiled).

   Batch invariance: each output is summed in one fixed order whatever n is and whichever path
   runs, so a row of y never depends on the other rows of the call. Per (weight row, x row):
     acc (16 lanes) = 0; for each 32-element chunk: acc = fma(w_hi, x_hi, fma(w_lo, x_lo, acc))
     y = ((lane_sum(acc), a fixed tree) + the K % 32 tail in order) + bias
   Lane l of a chunk holds elements 2l (lo) and 2l + 1 (hi) for MXFP4 and bf16, the order in
   which the packed formats decode without shuffles (x is permuted to match once per call), and
   elements l and 16 + l for fp32. MXFP4 weights enter as E2M1 * scale, exact in fp32.
   For bf16 x and weights (XMODE_BF16*) each product is exact and every path runs with
   denormals flushed (FTZ, DAZ), because AVX512-BF16's vdpbf16ps computes exactly that chain:
   per lane, high bf16 first, one rounded FMA each (avx512_tiles.c packs the even element
   high). moerun_cpu_has_bf16dot() checks it on the CPU before the tiles use it.
   Every function carries the target attribute and runs only after moerun_cpu_has_avx512(). */
#ifndef MOERUN_AVX512_H
#define MOERUN_AVX512_H
#include <stdlib.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define A512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define BF16DOT __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,avx512bf16")))
#define INLINE static inline __attribute__((always_inline))

/* x of bf16 values (XMODE_BF16*): this thread flushes denormals (MXCSR FTZ and DAZ) until
   flush_leave, so that its FMAs round as vdpbf16ps does; returns the MXCSR to restore. */
static inline unsigned flush_enter(int xmode) {
  const unsigned csr = _mm_getcsr();
  if (xmode != XMODE_F32) _mm_setcsr(csr | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
  return csr;
}
static inline void flush_leave(unsigned csr) { _mm_setcsr(csr); }

/* Elements k..k+31 of one weight row (MXFP4 scales sp) as the lanes lo, hi; fmt is a constant
   at every call site. MXFP4: the 16 E2M1 values times the block's scale (exact) form the lookup
   table, so decoding costs one multiply; vpermps reads only the low 4 bits of each index lane,
   so the low nibbles (even elements) need no mask. */
A512 INLINE void load_chunk(const int fmt, const uint8_t *row, const uint8_t *sp, int64_t k,
                            __m512 *lo, __m512 *hi) {
  if (fmt == FMT_MXFP4) {
    const __m512 lut = _mm512_mul_ps(
        _mm512_setr_ps(0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -.5f, -1, -1.5f, -2, -3, -4, -6),
        _mm512_set1_ps(moerun_scale_of[sp[k / 32]]));
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k / 2)));
    *lo = _mm512_permutexvar_ps(q, lut);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut);
  } else if (fmt == FMT_BF16) {
    /* 32 bf16 in 16 dwords: the low half shifted up and the high half masked are fp32 */
    const __m512i v = _mm512_loadu_si512((const void *)(row + 2 * k));
    *lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
  } else {
    *lo = _mm512_loadu_ps((const float *)row + k);
    *hi = _mm512_loadu_ps((const float *)row + k + 16);
  }
}

/* Weight element k (bf16 or fp32; MXFP4 rows have no K % 32 tail) */
INLINE float weight_at(int fmt, const uint8_t *row, int64_t k) {
  return fmt == FMT_BF16 ? bf16_to_f32(((const uint16_t *)row)[k]) : ((const float *)row)[k];
}

/* The lanes' sum in a fixed tree: lane i + lane i + 8, then i + i + 4, i + i + 2, i + i + 1
   (lane_sums16 below computes the same tree for 16 vectors at once). */
A512 INLINE float lane_sum(__m512 v) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

/* lane_sum of 16 vectors v[j] at once, the same tree by shuffles across vectors: lane
   4 * (j % 4) + j / 4 of the result holds vector j's sum. */
A512 INLINE __m512 lane_sums16(const float *v) {
  __m512 c[8], e[4], f[2];
  for (int j = 0; j < 8; j++) { /* halves: [A lanes i + i+8 | B lanes i + i+8] */
    const __m512 a = _mm512_loadu_ps(v + 32 * j), b = _mm512_loadu_ps(v + 32 * j + 16);
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int j = 0; j < 4; j++) /* quarters: 4 vectors' i + i+4, one per 128-bit lane */
    e[j] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int j = 0; j < 2; j++) /* i + i+2 within 128-bit lanes */
    f[j] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * j], e[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(e[2 * j], e[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(f[0], f[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* t plus the tail elements past the last chunk, one product at a time (-ffp-contract=off
   keeps each product rounded, as in every path); the callers add the bias after. */
INLINE float add_tail(float t, const float *x_tail, int fmt, const uint8_t *w_tail, int64_t tail) {
  for (int64_t k = 0; k < tail; k++) t += x_tail[k] * weight_at(fmt, w_tail, k);
  return t;
}

/* x's elements k..k+31 as the chunk's lanes: even then odd elements for the packed formats,
   in order for fp32. */
A512 INLINE void x_chunk(int fmt, const float *x, __m512 *lo, __m512 *hi) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  if (fmt == FMT_F32) {
    *lo = a, *hi = b;
    return;
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  *lo = _mm512_permutex2var_ps(a, even, b);
  *hi = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
}

/* 64-byte aligned, at least one line, so that NULL always means failure */
static inline float *alloc_floats(int64_t count) {
  const size_t bytes = ((size_t)(count > 0 ? count : 1) * sizeof(float) + 63) & ~(size_t)63;
  return aligned_alloc(64, bytes);
}

/* The tiled path for many x rows (avx512_tiles.c); returns 0, or -1 when memory is short */
int moerun_avx512_tiles(int fmt, int xmode, const float *x, const uint8_t *w, int64_t ws,
                        const uint8_t *s, int64_t ss, const void *bias, int bias_kind, float *y,
                        int64_t n, int64_t N, int64_t K, int nthreads);
#endif
#endif
