/* RMSNorm (spec §2.2) of each row: y = (x * (1 / sqrt(mean(x^2) + eps))) * scale, fp32 math,
   y rounded once to x's dtype (fp32 or bf16): moerun.ops.dense.rms_norm's arithmetic, its sum of
   squares in 16 interleaved partial sums added in a fixed tree, the same order for every row
   whatever the batch. One call instead of the reference's seven torch ops (~100 us a row at
   decode on this 2-core host; the norm is called twice a layer). */
#include <stdlib.h>

#include "kernels.h"

enum { NORM_LANES = 16, NORM_PARALLEL_ROWS = 32 };

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float load(const void *x, int bf16, int64_t i) {
  return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static void norm_row(const void *x, int bf16, const float *scale, float eps, void *y, int64_t D) {
  float acc[NORM_LANES] = {0};
  for (int64_t k = 0; k < D; k++) {
    const float t = load(x, bf16, k);
    acc[k % NORM_LANES] += t * t;
  }
  for (int w = NORM_LANES / 2; w > 0; w /= 2) /* 16 -> 8 -> 4 -> 2 -> 1, fixed pairs */
    for (int i = 0; i < w; i++) acc[i] += acc[i + w];
  const float inv = 1.0f / sqrtf(acc[0] / (float)D + eps);
  for (int64_t k = 0; k < D; k++) {
    const float v = (load(x, bf16, k) * inv) * scale[k];
    if (bf16)
      ((uint16_t *)y)[k] = f32_to_bf16(v);
    else
      ((float *)y)[k] = v;
  }
}

/* x, y: [n, D], both fp32 (bf16 = 0) or both bf16; scale [D] fp32 */
void moerun_rms_norm(const void *x, int bf16, const float *scale, float eps, void *y, int64_t n,
                     int64_t D, int nthreads) {
  const int64_t row = D * (bf16 ? 2 : 4);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n >= NORM_PARALLEL_ROWS)
  for (int64_t r = 0; r < n; r++)
    norm_row((const char *)x + r * row, bf16, scale, eps, (char *)y + r * row, D);
}
