/* One MoE layer's experts on the CPU (spec §2.6), in one call from Python instead of a dozen
   torch ops per expert: group the T*A (token, slot) assignments by expert, and per used expert
   gather its rows, mlp1 (+ bias), clamped SwiGLU, mlp2 (+ bias), then add gate * result to the
   token's fp32 sum in expert order, as the Python path's index_add_ does. fp32 throughout.
   Dims: T tokens, A experts per token, E experts, D hidden, I expert intermediate. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

/* mlp1's output row 2i is gate i and row 2i+1 linear i (interleaved, as in the checkpoint) */
static void swiglu(const float *h, float *act, int64_t n, int64_t I, float limit, float alpha,
                   int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < n; r++)
    for (int64_t i = 0; i < I; i++) {
      float g = h[r * 2 * I + 2 * i], l = h[r * 2 * I + 2 * i + 1];
      g = g > limit ? limit : g; /* the gate is clamped from above only; NaN passes as in torch */
      l = l > limit ? limit : l < -limit ? -limit : l;
      act[r * I + i] = g * (1.0f / (1.0f + expf(-alpha * g))) * (l + 1.0f);
    }
}

static size_t bias_size(int kind) { return kind == BIAS_F32 ? 4 : kind == BIAS_BF16 ? 2 : 0; }

/* rows[start[e] .. start[e+1]) = the assignments t*A + a routed to expert e, increasing. */
static int group_by_expert(const int64_t *ids, int64_t count, int64_t E, int64_t *start,
                           int64_t *rows) {
  for (int64_t e = 0; e <= E; e++) start[e] = 0;
  for (int64_t r = 0; r < count; r++) {
    if (ids[r] < 0 || ids[r] >= E) return -2;
    start[ids[r] + 1]++;
  }
  for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
  int64_t *next = malloc((size_t)(E > 0 ? E : 1) * sizeof(int64_t));
  if (!next) return -1;
  for (int64_t e = 0; e < E; e++) next[e] = start[e];
  for (int64_t r = 0; r < count; r++) rows[next[ids[r]]++] = r;
  free(next);
  return 0;
}

typedef struct {
  const uint8_t *blocks, *scales;
  const void *bias;
  int bias_kind;
} Mxfp4Stack; /* [E, out, in/32, 16] blocks, [E, out, in/32] scales, [E, out] bias */

static int expert(const Mxfp4Stack *m, int64_t e, const float *x, float *y, int64_t n,
                  int64_t out, int64_t in, int nthreads, int simd) {
  const uint8_t *blocks = m->blocks + e * out * (in / 2), *scales = m->scales + e * out * (in / 32);
  const char *bias = m->bias ? (const char *)m->bias + e * out * bias_size(m->bias_kind) : NULL;
  return moerun_mxfp4_linear(x, blocks, scales, bias, m->bias_kind, y, n, out, in, nthreads, simd);
}

/* Returns 0, -1 when memory is short, -2 for an expert id outside [0, E). */
int moerun_moe(const float *x, const int64_t *ids, const float *gates, int64_t T, int64_t A,
               int64_t E, int64_t D, int64_t I, const uint8_t *blocks1, const uint8_t *scales1,
               const void *bias1, int bias1_kind, const uint8_t *blocks2, const uint8_t *scales2,
               const void *bias2, int bias2_kind, float limit, float alpha, float *out,
               int nthreads, int simd) {
  const Mxfp4Stack mlp1 = {blocks1, scales1, bias1, bias1_kind};
  const Mxfp4Stack mlp2 = {blocks2, scales2, bias2, bias2_kind};
  const int64_t count = T * A;
  int64_t *start = malloc((size_t)(E + 1) * sizeof(int64_t));
  int64_t *rows = malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
  int rc = start && rows ? group_by_expert(ids, count, E, start, rows) : -1;
  int64_t most = 0;
  for (int64_t e = 0; rc == 0 && e < E; e++)
    most = start[e + 1] - start[e] > most ? start[e + 1] - start[e] : most;
  const size_t m = (size_t)(most > 0 ? most : 1);
  float *xe = malloc(m * D * sizeof(float)), *h = malloc(m * 2 * I * sizeof(float));
  float *act = malloc(m * I * sizeof(float)), *ye = malloc(m * D * sizeof(float));
  if (rc == 0 && !(xe && h && act && ye)) rc = -1;
  for (int64_t i = 0; i < T * D; i++) out[i] = 0.0f;
  for (int64_t e = 0; rc == 0 && e < E; e++) {
    const int64_t n = start[e + 1] - start[e], *r = rows + start[e];
    if (n == 0) continue;
    for (int64_t i = 0; i < n; i++) memcpy(xe + i * D, x + (r[i] / A) * D, D * sizeof(float));
    rc = expert(&mlp1, e, xe, h, n, 2 * I, D, nthreads, simd);
    if (rc) break;
    swiglu(h, act, n, I, limit, alpha, nthreads);
    rc = expert(&mlp2, e, act, ye, n, D, I, nthreads, simd);
    for (int64_t i = 0; rc == 0 && i < n; i++) {
      float *o = out + (r[i] / A) * D;
      const float g = gates[r[i]];
      for (int64_t d = 0; d < D; d++) o[d] += ye[i * D + d] * g;
    }
  }
  free(start), free(rows), free(xe), free(h), free(act), free(ye);
  return rc;
}
