/* Shared by kernels.c (portable C, AVX2, the drivers), avx512.c + avx512_tiles.c (AVX-512
   variant), mxfp4_vnni.c + mxfp4_q16.c (quantized x), moe.c and attention.c.
   Dims: n = x rows, N = output features, K = input features, G = K / 32 MXFP4 blocks per row. */
#ifndef MOERUN_KERNELS_H
#define MOERUN_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { BIAS_NONE = 0, BIAS_F32 = 1, BIAS_BF16 = 2 };
enum { FMT_MXFP4 = 0, FMT_BF16 = 1, FMT_F32 = 2 };
/* What the AVX-512 dense path may assume of x (moerun_bf16_linear's xmode): any fp32 values;
   bf16 values (bf16 activations), products then run with denormals flushed (FTZ, DAZ), as
   vdpbf16ps computes them; the same and the many-row path may use vdpbf16ps (AVX512-BF16). */
enum { XMODE_F32 = 0, XMODE_BF16 = 1, XMODE_BF16_DOT = 2 };
/* x rows up to which quantized-x products take the integer-dot kernel (mxfp4_vnni.c); beyond,
   its float twin (mxfp4_q16.c), faster there, gives the same bits */
enum { QUANTIZE_MAX_ROWS = 4 };

/* E8M0 byte -> 2**(s - 127), filled when the library loads (kernels.c) */
extern float moerun_scale_of[256];

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__x86_64__)
#include <immintrin.h>
/* Quantized x (the integer-dot kernel, mxfp4_vnni.c, and its float twin, mxfp4_q16.c, both
   quantize here): a 32-element block as s * q, q = round(x / s) to nearest even, integers with
   |q| <= 32512 = 127 * 256 (two signed bytes), s = absmax / 32512; s is NaN for an inf absmax
   (q = 0) and 0 for a zero block (q = 0); NaN elements are left out of the absmax. Returns s. */
__attribute__((target("avx512f,avx512dq"))) static inline float quantize_block(const float *x,
                                                                             int32_t *q) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  __m512 m = _mm512_setzero_ps(); /* max(|x|, m) keeps m where |x| is NaN */
  m = _mm512_max_ps(_mm512_abs_ps(a), m), m = _mm512_max_ps(_mm512_abs_ps(b), m);
  const float mx = _mm512_reduce_max_ps(m);
  const float s = isfinite(mx) ? mx / 32512.0f : NAN;
  if (!(s > 0.0f)) {
    memset(q, 0, 32 * sizeof(int32_t));
    return s;
  }
  const __m512 sv = _mm512_set1_ps(s);
  _mm512_storeu_si512(q, _mm512_cvtps_epi32(_mm512_div_ps(a, sv)));
  _mm512_storeu_si512(q + 16, _mm512_cvtps_epi32(_mm512_div_ps(b, sv)));
  return s;
}
#endif

/* E8M0 byte as the fp32 bits s << 23: 2**(s - 127) for s in 1..254, 0 for s = 0 (the quantized
   kernels' weight scale; moerun_scale_of[0] is 2**-127 instead) */
static inline float e8m0_bits(uint8_t s) {
  const uint32_t u = (uint32_t)s << 23;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline float bias_at(const void *bias, int kind, int64_t o) {
  if (kind == BIAS_F32) return ((const float *)bias)[o];
  if (kind == BIAS_BF16) return bf16_to_f32(((const uint16_t *)bias)[o]);
  return 0.0f;
}

/* The AVX-512 variant (avx512.c): y = x @ W.T + bias, W in format fmt read in place (row stride
   ws bytes; MXFP4 scales with row stride ss), x as xmode says. Returns 0, or -1 when scratch
   memory is short. Like every kernel here, each output row is computed in an order that does
   not depend on n. */
int moerun_linear_avx512(int fmt, int xmode, const float *x, const uint8_t *w, int64_t ws,
                         const uint8_t *s, int64_t ss, const void *bias, int bias_kind, float *y,
                         int64_t n, int64_t N, int64_t K, int nthreads);
int moerun_cpu_has_avx512(void);
/* AVX512-BF16 present and its vdpbf16ps equal, bit for bit, to the FMA chain avx512.h defines
   (checked once on this CPU; avx512_bf16.c) */
int moerun_cpu_has_bf16dot(void);

/* int8.c: 8-bit weights with one scale per row and their row sums; x quantized per row */
int moerun_int8_linear(const float *x, const int8_t *w, const float *scale, const int32_t *sums,
                       const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                       int64_t K, int nthreads, int vnni);

/* norm.c: RMSNorm of each row, x and y both fp32 or both bf16 */
void moerun_rms_norm(const void *x, int bf16, const float *scale, float eps, void *y, int64_t n,
                     int64_t D, int nthreads);

/* The public drivers (kernels.c); simd: 0 portable C, 1 AVX2+FMA, 2 AVX-512. */
int moerun_mxfp4_linear(const float *x, const uint8_t *blocks, const uint8_t *scales,
                        const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                        int64_t K, int nthreads, int simd);
int moerun_f32_linear(const float *x, const float *weight, const void *bias, int bias_kind,
                      float *y, int64_t n, int64_t N, int64_t K, int nthreads, int simd);
/* x quantized to 16 bits per block (mxfp4_vnni.c): integer dot products for at most
   QUANTIZE_MAX_ROWS rows, the same bits from fp32 FMAs beyond (mxfp4_q16.c); -1 if no memory */
int moerun_mxfp4_linear_q16(const float *x, const uint8_t *blocks, const uint8_t *scales,
                            const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                            int64_t K, int nthreads);
int moerun_mxfp4_linear_vnni(const float *x, const uint8_t *blocks, const uint8_t *scales,
                             const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                             int64_t K, int nthreads);
int moerun_cpu_has_vnni(void);
typedef struct { /* one y[n, N] = x[n, K] @ W.T + bias of a batch of products */
  const float *x;
  int64_t n;
  const uint8_t *blocks, *scales;
  const void *bias;
  int bias_kind;
  float *y;
} Mxfp4Job;
int moerun_mxfp4_jobs_vnni(const Mxfp4Job *jobs, int count, int64_t N, int64_t K, int nthreads);
#endif
