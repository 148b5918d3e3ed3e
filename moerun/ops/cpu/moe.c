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

static const void *bias_of(const Mxfp4Stack *m, int64_t e, int64_t out) {
  return m->bias ? (const char *)m->bias + e * out * bias_size(m->bias_kind) : NULL;
}

static int expert(const Mxfp4Stack *m, int64_t e, const float *x, float *y, int64_t n,
                  int64_t out, int64_t in, int nthreads, int simd) {
  const uint8_t *blocks = m->blocks + e * out * (in / 2), *scales = m->scales + e * out * (in / 32);
  return moerun_mxfp4_linear(x, blocks, scales, bias_of(m, e, out), m->bias_kind, y, n, out, in,
                             nthreads, simd);
}

/* out[token] += gate * y for rows [0, n) of the grouped order, in that (expert) order */
static void accumulate(float *out, const float *y, const int64_t *rows, const float *gates,
                       int64_t n, int64_t A, int64_t D) {
  for (int64_t i = 0; i < n; i++) {
    float *o = out + (rows[i] / A) * D;
    const float g = gates[rows[i]];
    for (int64_t d = 0; d < D; d++) o[d] += y[i * D + d] * g;
  }
}

typedef struct {
  const float *x, *gates;
  int64_t A, E, D, I;
  Mxfp4Stack mlp1, mlp2;
  float limit, alpha, *out;
  int nthreads, simd;
} Layer;

/* Every expert has at most 4 rows (decode): all of mlp1, then all of mlp2, each as one batch
   of integer-dot jobs (mxfp4_vnni.c) instead of two parallel regions per expert. */
static int decode_batched(const Layer *L, const int64_t *start, const int64_t *rows,
                          int64_t count) {
  const int64_t D = L->D, I = L->I;
  const size_t c = (size_t)(count > 0 ? count : 1);
  float *xe = malloc(c * D * sizeof(float)), *h = malloc(c * 2 * I * sizeof(float));
  float *act = malloc(c * I * sizeof(float)), *ye = malloc(c * D * sizeof(float));
  Mxfp4Job *jobs = malloc((size_t)(L->E > 0 ? L->E : 1) * 2 * sizeof(Mxfp4Job));
  int rc = xe && h && act && ye && jobs ? 0 : -1, used = 0;
  for (int64_t i = 0; rc == 0 && i < count; i++)
    memcpy(xe + i * D, L->x + (rows[i] / L->A) * D, D * sizeof(float));
  for (int64_t e = 0; rc == 0 && e < L->E; e++) {
    const int64_t n = start[e + 1] - start[e], r = start[e];
    if (n == 0) continue;
    const Mxfp4Stack *m1 = &L->mlp1, *m2 = &L->mlp2;
    jobs[used] = (Mxfp4Job){xe + r * D, n, m1->blocks + e * 2 * I * (D / 2),
                            m1->scales + e * 2 * I * (D / 32), bias_of(m1, e, 2 * I),
                            m1->bias_kind, h + r * 2 * I};
    jobs[L->E + used++] = (Mxfp4Job){act + r * I, n, m2->blocks + e * D * (I / 2),
                                     m2->scales + e * D * (I / 32), bias_of(m2, e, D),
                                     m2->bias_kind, ye + r * D};
  }
  if (rc == 0) rc = moerun_mxfp4_jobs_vnni(jobs, used, 2 * I, D, L->nthreads);
  if (rc == 0) swiglu(h, act, count, I, L->limit, L->alpha, L->nthreads);
  if (rc == 0) rc = moerun_mxfp4_jobs_vnni(jobs + L->E, used, D, I, L->nthreads);
  if (rc == 0) accumulate(L->out, ye, rows, L->gates, count, L->A, D);
  free(xe), free(h), free(act), free(ye), free(jobs);
  return rc;
}

/* Expert by expert, buffers for the largest expert only (prefill: any number of rows). */
static int expert_loop(const Layer *L, const int64_t *start, const int64_t *rows, int64_t most) {
  const int64_t D = L->D, I = L->I;
  const size_t m = (size_t)(most > 0 ? most : 1);
  float *xe = malloc(m * D * sizeof(float)), *h = malloc(m * 2 * I * sizeof(float));
  float *act = malloc(m * I * sizeof(float)), *ye = malloc(m * D * sizeof(float));
  int rc = xe && h && act && ye ? 0 : -1;
  for (int64_t e = 0; rc == 0 && e < L->E; e++) {
    const int64_t n = start[e + 1] - start[e], *r = rows + start[e];
    if (n == 0) continue;
    for (int64_t i = 0; i < n; i++) memcpy(xe + i * D, L->x + (r[i] / L->A) * D, D * 4);
    rc = expert(&L->mlp1, e, xe, h, n, 2 * I, D, L->nthreads, L->simd);
    if (rc == 0) swiglu(h, act, n, I, L->limit, L->alpha, L->nthreads);
    if (rc == 0) rc = expert(&L->mlp2, e, act, ye, n, D, I, L->nthreads, L->simd);
    if (rc == 0) accumulate(L->out, ye, r, L->gates, n, L->A, D);
  }
  free(xe), free(h), free(act), free(ye);
  return rc;
}

/* Returns 0, -1 when memory is short, -2 for an expert id outside [0, E). quantize: when no
   expert has more than 4 rows, use the integer-dot kernel (x rounded to 16 bits per block;
   AVX-512 VNNI only; the caller checks). */
int moerun_moe(const float *x, const int64_t *ids, const float *gates, int64_t T, int64_t A,
               int64_t E, int64_t D, int64_t I, const uint8_t *blocks1, const uint8_t *scales1,
               const void *bias1, int bias1_kind, const uint8_t *blocks2, const uint8_t *scales2,
               const void *bias2, int bias2_kind, float limit, float alpha, float *out,
               int nthreads, int simd, int quantize) {
  const Layer L = {x, gates, A, E, D, I, {blocks1, scales1, bias1, bias1_kind},
                   {blocks2, scales2, bias2, bias2_kind}, limit, alpha, out, nthreads, simd};
  const int64_t count = T * A;
  int64_t *start = malloc((size_t)(E + 1) * sizeof(int64_t));
  int64_t *rows = malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
  int rc = start && rows ? group_by_expert(ids, count, E, start, rows) : -1;
  int64_t most = 0;
  for (int64_t e = 0; rc == 0 && e < E; e++)
    most = start[e + 1] - start[e] > most ? start[e + 1] - start[e] : most;
  for (int64_t i = 0; i < T * D; i++) out[i] = 0.0f;
  if (rc == 0)
    rc = quantize && most <= 4 ? decode_batched(&L, start, rows, count)
                               : expert_loop(&L, start, rows, most);
  free(start), free(rows);
  return rc;
}
