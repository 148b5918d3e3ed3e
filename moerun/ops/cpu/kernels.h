/* Shared by kernels.c (portable C, AVX2, the drivers) and avx512.c (AVX-512 variant).
   Dims: n = x rows, N = output features, K = input features, G = K / 32 MXFP4 blocks per row. */
#ifndef MOERUN_KERNELS_H
#define MOERUN_KERNELS_H
#include <stdint.h>
#include <string.h>

enum { BIAS_NONE = 0, BIAS_F32 = 1, BIAS_BF16 = 2 };
enum { FMT_MXFP4 = 0, FMT_BF16 = 1 };

/* E8M0 byte -> 2**(s - 127), filled when the library loads (kernels.c) */
extern float moerun_scale_of[256];

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
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
   ws bytes; MXFP4 scales with row stride ss). Returns 0, or -1 when scratch memory is short. */
int moerun_linear_avx512(int fmt, const float *x, const uint8_t *w, int64_t ws, const uint8_t *s,
                         int64_t ss, const void *bias, int bias_kind, float *y, int64_t n,
                         int64_t N, int64_t K, int nthreads);
int moerun_cpu_has_avx512(void);

/* The public drivers (kernels.c); simd: 0 portable C, 1 AVX2+FMA, 2 AVX-512. */
int moerun_mxfp4_linear(const float *x, const uint8_t *blocks, const uint8_t *scales,
                        const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                        int64_t K, int nthreads, int simd);
/* n <= 4 rows with x quantized to 16 bits per block (mxfp4_vnni.c); -1 if n > 4 or no memory */
int moerun_mxfp4_linear_vnni(const float *x, const uint8_t *blocks, const uint8_t *scales,
                             const void *bias, int bias_kind, float *y, int64_t n, int64_t N,
                             int64_t K, int nthreads);
int moerun_cpu_has_vnni(void);
typedef struct { /* one y[n, N] = x[n, K] @ W.T + bias of a batch of products (n <= 4) */
  const float *x;
  int64_t n;
  const uint8_t *blocks, *scales;
  const void *bias;
  int bias_kind;
  float *y;
} Mxfp4Job;
int moerun_mxfp4_jobs_vnni(const Mxfp4Job *jobs, int count, int64_t N, int64_t K, int nthreads);
#endif
