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

/* Expert e's slice of a stack as one product y[n, out] = x[n, in] @ W_e.T + bias_e. */
static Mxfp4Job job_of(const Mxfp4Stack *m, int64_t e, int64_t out, int64_t in, const float *x,
                       int64_t n, float *y) {
  const void *bias = m->bias ? (const char *)m->bias + e * out * bias_size(m->bias_kind) : NULL;
  return (Mxfp4Job){x, n, m->blocks + e * out * (in / 2), m->scales + e * out * (in / 32), bias,
                    m->bias_kind, y};
}

/* quantize: x rounded to 16 bits per block (AVX-512 VNNI, the caller checked), else fp32 */
static int expert(const Mxfp4Stack *m, int64_t e, const float *x, float *y, int64_t n,
                  int64_t out, int64_t in, int nthreads, int simd, int quantize) {
  const Mxfp4Job j = job_of(m, e, out, in, x, n, y);
  if (quantize)
    return moerun_mxfp4_linear_q16(x, j.blocks, j.scales, j.bias, j.bias_kind, y, n, out, in,
                                   nthreads);
  return moerun_mxfp4_linear(j.x, j.blocks, j.scales, j.bias, j.bias_kind, j.y, n, out, in,
                             nthreads, simd);
}

/* Activations of up to `rows` grouped rows: gathered x, mlp1 out, SwiGLU out, mlp2 out. */
typedef struct {
  float *x, *h, *act, *y;
} Scratch;

static int scratch_alloc(Scratch *s, int64_t rows, int64_t D, int64_t I) {
  const size_t r = (size_t)(rows > 0 ? rows : 1);
  s->x = malloc(r * D * sizeof(float)), s->h = malloc(r * 2 * I * sizeof(float));
  s->act = malloc(r * I * sizeof(float)), s->y = malloc(r * D * sizeof(float));
  return s->x && s->h && s->act && s->y ? 0 : -1;
}

static void scratch_free(Scratch *s) { free(s->x), free(s->h), free(s->act), free(s->y); }

/* dst row i = x row of the token that assignment rows[i] belongs to */
static void gather(float *dst, const float *x, const int64_t *rows, int64_t n, int64_t A,
                   int64_t D) {
  for (int64_t i = 0; i < n; i++) memcpy(dst + i * D, x + (rows[i] / A) * D, D * sizeof(float));
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
  int nthreads, simd, quantize;
} Layer;

/* Quantized, every expert with at most 4 rows (decode): all of mlp1, then all of mlp2, each as
   one batch of integer-dot jobs (mxfp4_vnni.c) instead of two parallel regions per expert. */
static int decode_batched(const Layer *L, const int64_t *start, const int64_t *rows,
                          int64_t count) {
  const int64_t D = L->D, I = L->I;
  Scratch s;
  Mxfp4Job *jobs = malloc((size_t)(L->E > 0 ? L->E : 1) * 2 * sizeof(Mxfp4Job));
  int rc = scratch_alloc(&s, count, D, I) == 0 && jobs ? 0 : -1, used = 0;
  if (rc == 0) gather(s.x, L->x, rows, count, L->A, D);
  for (int64_t e = 0; rc == 0 && e < L->E; e++) {
    const int64_t n = start[e + 1] - start[e], r = start[e];
    if (n == 0) continue;
    jobs[used] = job_of(&L->mlp1, e, 2 * I, D, s.x + r * D, n, s.h + r * 2 * I);
    jobs[L->E + used++] = job_of(&L->mlp2, e, D, I, s.act + r * I, n, s.y + r * D);
  }
  if (rc == 0) rc = moerun_mxfp4_jobs_vnni(jobs, used, 2 * I, D, L->nthreads);
  if (rc == 0) swiglu(s.h, s.act, count, I, L->limit, L->alpha, L->nthreads);
  if (rc == 0) rc = moerun_mxfp4_jobs_vnni(jobs + L->E, used, D, I, L->nthreads);
  if (rc == 0) accumulate(L->out, s.y, rows, L->gates, count, L->A, D);
  scratch_free(&s), free(jobs);
  return rc;
}

/* Expert by expert, buffers for the largest expert only (prefill: any number of rows). */
static int expert_loop(const Layer *L, const int64_t *start, const int64_t *rows, int64_t most) {
  const int64_t D = L->D, I = L->I;
  Scratch s;
  int rc = scratch_alloc(&s, most, D, I);
  for (int64_t e = 0; rc == 0 && e < L->E; e++) {
    const int64_t n = start[e + 1] - start[e], *r = rows + start[e];
    if (n == 0) continue;
    gather(s.x, L->x, r, n, L->A, D);
    rc = expert(&L->mlp1, e, s.x, s.h, n, 2 * I, D, L->nthreads, L->simd, L->quantize);
    if (rc == 0) swiglu(s.h, s.act, n, I, L->limit, L->alpha, L->nthreads);
    if (rc == 0) rc = expert(&L->mlp2, e, s.act, s.y, n, D, I, L->nthreads, L->simd, L->quantize);
    if (rc == 0) accumulate(L->out, s.y, r, L->gates, n, L->A, D);
  }
  scratch_free(&s);
  return rc;
}

/* Returns 0, -1 when memory is short, -2 for an expert id outside [0, E). quantize: x rounded
   to 16 bits per block for the integer-dot kernel and its float twin (AVX-512 VNNI only; the
   caller checks). Batch invariance: a token's result depends only on its own row (every kernel
   sums each row alone, in one order whatever the row count) and its experts are added in expert
   order, so it never depends on how many tokens share its experts. */
int moerun_moe(const float *x, const int64_t *ids, const float *gates, int64_t T, int64_t A,
               int64_t E, int64_t D, int64_t I, const uint8_t *blocks1, const uint8_t *scales1,
               const void *bias1, int bias1_kind, const uint8_t *blocks2, const uint8_t *scales2,
               const void *bias2, int bias2_kind, float limit, float alpha, float *out,
               int nthreads, int simd, int quantize) {
  const Layer L = {x, gates, A, E, D, I, {blocks1, scales1, bias1, bias1_kind},
                   {blocks2, scales2, bias2, bias2_kind}, limit, alpha, out, nthreads, simd,
                   quantize};
  const int64_t count = T * A;
  int64_t *start = malloc((size_t)(E + 1) * sizeof(int64_t));
  int64_t *rows = malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
  int rc = start && rows ? group_by_expert(ids, count, E, start, rows) : -1;
  int64_t most = 0;
  for (int64_t e = 0; rc == 0 && e < E; e++)
    most = start[e + 1] - start[e] > most ? start[e + 1] - start[e] : most;
  for (int64_t i = 0; i < T * D; i++) out[i] = 0.0f;
  if (rc == 0)
    rc = quantize && most <= QUANTIZE_MAX_ROWS ? decode_batched(&L, start, rows, count)
                                               : expert_loop(&L, start, rows, most);
  free(start), free(rows);
  return rc;
}
