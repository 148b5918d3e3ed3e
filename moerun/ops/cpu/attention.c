/* Paged attention with sinks (spec §2.5) over a block-table K/V cache, fp32 math:
     out[n, h] = sum_j w_j v_j,  w = softmax([s_lo .. s_p, sink_h]) without the sink's entry,
     s_j = (q[n, h] . k_j) * sm_scale,
   over the keys j = lo..p of row n's sequence: p = the row's position, lo = p - window + 1 (at
   least 0) with a sliding window, else 0. Key j lies in physical block table[b][j / bs] at
   offset j % bs; the caller has written every key a row sees, and a visible key in a block
   marked -1 is an error (-2), never read.

   Batch invariance by construction: each (row, kv head) pair is computed by one thread alone,
   keys ascending in chunks of CHUNK counted from lo, with an online softmax per chunk whose
   running max starts at the sink (so exp(sink - max) starts at 1), so a row's result depends on
   its own query, position and keys, never on the other rows. The G query heads of a kv head
   share each loaded key. Two variants: AVX-512 (d % 16 == 0) and portable C.
   Dims: N rows, H = KV * G query heads, KV kv heads, d head dim, bs block size. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

enum { CHUNK = 64 }; /* keys per online-softmax step: their scores stay in L1 */

typedef struct { /* one call's operands */
  const float *q;
  const uint8_t *k, *v; /* caches [blocks, bs, KV, d] of fp32 or bf16 */
  int bf16;
  const int32_t *table, *seq, *pos;
  int64_t max_blocks;
  const float *sinks;
  float scale;
  int64_t window;
  float *out;
  int64_t H, KV, d, bs;
} Attn;

typedef struct { /* per thread: G running maxima and sums, G * d accumulators, G * CHUNK scores */
  float *m, *l, *acc, *s;
} Work;

/* First visible key of a query at position p */
static int64_t first_key(const Attn *A, int64_t p) {
  return A->window > 0 && p - A->window + 1 > 0 ? p - A->window + 1 : 0;
}

/* Byte offset of key position j of sequence b, kv head h, in either cache; -1 if not held */
static int64_t slot_of(const Attn *A, int64_t b, int64_t j, int64_t h) {
  const int32_t block = A->table[b * A->max_blocks + j / A->bs];
  if (block < 0) return -1;
  const int64_t esize = A->bf16 ? 2 : 4;
  return (((int64_t)block * A->bs + j % A->bs) * A->KV + h) * A->d * esize;
}

static inline float elem(const Attn *A, const uint8_t *p, int64_t i) {
  return A->bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* The chunk's slots, or -2 if a visible key is not held */
static int chunk_slots(const Attn *A, int64_t b, int64_t j0, int64_t nc, int64_t h,
                       int64_t *slot) {
  for (int64_t c = 0; c < nc; c++)
    if ((slot[c] = slot_of(A, b, j0 + c, h)) < 0) return -2;
  return 0;
}

/* out = acc / l for the G heads of kv head h */
static void write_out(const Attn *A, const Work *W, int64_t n, int64_t h) {
  const int64_t G = A->H / A->KV, d = A->d;
  float *o = A->out + (n * A->H + h * G) * d;
  for (int64_t g = 0; g < G; g++)
    for (int64_t i = 0; i < d; i++) o[g * d + i] = W->acc[g * d + i] / W->l[g];
}

static void start(const Attn *A, const Work *W, int64_t h) {
  const int64_t G = A->H / A->KV;
  for (int64_t g = 0; g < G; g++) W->m[g] = A->sinks[h * G + g], W->l[g] = 1.0f;
  memset(W->acc, 0, (size_t)(G * A->d) * sizeof(float));
}

/* ---- portable C ---------------------------------------------------------------------------- */

static int item_scalar(const Attn *A, const Work *W, int64_t n, int64_t h) {
  const int64_t G = A->H / A->KV, d = A->d, p = A->pos[n], b = A->seq[n];
  const float *q = A->q + (n * A->H + h * G) * d;
  int64_t slot[CHUNK];
  start(A, W, h);
  for (int64_t j0 = first_key(A, p); j0 <= p; j0 += CHUNK) {
    const int64_t nc = p + 1 - j0 < CHUNK ? p + 1 - j0 : CHUNK;
    if (chunk_slots(A, b, j0, nc, h, slot)) return -2;
    for (int64_t c = 0; c < nc; c++)
      for (int64_t g = 0; g < G; g++) {
        float t = 0.0f;
        for (int64_t i = 0; i < d; i++) t += q[g * d + i] * elem(A, A->k + slot[c], i);
        W->s[g * CHUNK + c] = t * A->scale;
      }
    for (int64_t g = 0; g < G; g++) {
      float *s = W->s + g * CHUNK, mx = W->m[g], sum = 0.0f;
      for (int64_t c = 0; c < nc; c++) mx = s[c] > mx ? s[c] : mx;
      const float alpha = expf(W->m[g] - mx);
      for (int64_t c = 0; c < nc; c++) sum += (s[c] = expf(s[c] - mx));
      W->m[g] = mx, W->l[g] = W->l[g] * alpha + sum;
      float *acc = W->acc + g * d;
      for (int64_t i = 0; i < d; i++) acc[i] *= alpha;
      for (int64_t c = 0; c < nc; c++)
        for (int64_t i = 0; i < d; i++) acc[i] += s[c] * elem(A, A->v + slot[c], i);
    }
  }
  write_out(A, W, n, h);
  return 0;
}

/* ---- AVX-512 ------------------------------------------------------------------------------- */
#if defined(__x86_64__)
#include <immintrin.h>
#define A512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define INLINE static inline __attribute__((always_inline))

/* e^x for x <= 0 (a score minus its running max): 2^k * poly(r), x = k ln2 + r, |r| <= ln2/2,
   poly the degree-6 Taylor series (relative error < 2e-7); scalef makes 2^k without overflow
   and flushes far-negative x to 0. max(-200, x) keeps x finite, and NaN (max returns it). */
A512 INLINE __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x); /* ln2 in two parts */
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 poly = _mm512_set1_ps(1.0f / 720);
  const float c[] = {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  for (int i = 0; i < 6; i++) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(poly, k);
}

/* 16 elements of a K or V row at i as fp32 */
A512 INLINE __m512 load16(int bf16, const uint8_t *row, int64_t i) {
  if (!bf16) return _mm512_loadu_ps((const float *)row + i);
  const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* scores s[g * CHUNK + c] of the chunk's nc keys: each key loaded once for the G heads */
A512 static void scores512(const Attn *A, const Work *W, const float *q, const int64_t *slot,
                           int64_t nc) {
  const int64_t G = A->H / A->KV, d = A->d;
  for (int64_t c = 0; c < nc; c++) {
    __m512 key[16]; /* d <= 256 */
    for (int64_t i = 0; i < d / 16; i++) key[i] = load16(A->bf16, A->k + slot[c], 16 * i);
    for (int64_t g = 0; g < G; g++) {
      __m512 t = _mm512_mul_ps(_mm512_loadu_ps(q + g * d), key[0]);
      for (int64_t i = 1; i < d / 16; i++)
        t = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * d + 16 * i), key[i], t);
      W->s[g * CHUNK + c] = _mm512_reduce_add_ps(t) * A->scale;
    }
  }
}

/* Head g's chunk: new running max, s <- e^(s - max), l and acc rescaled, acc += s . values */
A512 static void update512(const Attn *A, const Work *W, int64_t g, const int64_t *slot,
                           int64_t nc) {
  const int64_t d = A->d;
  float *s = W->s + g * CHUNK, *acc = W->acc + g * d;
  __m512 mx = _mm512_set1_ps(W->m[g]), sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < nc; c += 16) {
    const __mmask16 ok = nc - c >= 16 ? 0xFFFF : (__mmask16)((1u << (nc - c)) - 1);
    mx = _mm512_mask_max_ps(mx, ok, mx, _mm512_maskz_loadu_ps(ok, s + c));
  }
  const float m = _mm512_reduce_max_ps(mx);
  const float alpha = _mm512_cvtss_f32(exp_neg(_mm512_set1_ps(W->m[g] - m)));
  for (int64_t c = 0; c < nc; c += 16) {
    const __mmask16 ok = nc - c >= 16 ? 0xFFFF : (__mmask16)((1u << (nc - c)) - 1);
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(ok, s + c), _mm512_set1_ps(m)));
    _mm512_mask_storeu_ps(s + c, ok, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(ok, e));
  }
  W->m[g] = m, W->l[g] = W->l[g] * alpha + _mm512_reduce_add_ps(sum);
  for (int64_t i = 0; i < d; i += 16) {
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(acc + i), _mm512_set1_ps(alpha));
    for (int64_t c = 0; c < nc; c++)
      a = _mm512_fmadd_ps(_mm512_set1_ps(s[c]), load16(A->bf16, A->v + slot[c], i), a);
    _mm512_storeu_ps(acc + i, a);
  }
}

A512 static int item512(const Attn *A, const Work *W, int64_t n, int64_t h) {
  const int64_t G = A->H / A->KV, p = A->pos[n], b = A->seq[n];
  const float *q = A->q + (n * A->H + h * G) * A->d;
  int64_t slot[CHUNK];
  start(A, W, h);
  for (int64_t j0 = first_key(A, p); j0 <= p; j0 += CHUNK) {
    const int64_t nc = p + 1 - j0 < CHUNK ? p + 1 - j0 : CHUNK;
    if (chunk_slots(A, b, j0, nc, h, slot)) return -2;
    scores512(A, W, q, slot, nc);
    for (int64_t g = 0; g < G; g++) update512(A, W, g, slot, nc);
  }
  write_out(A, W, n, h);
  return 0;
}
#endif

/* ---- driver -------------------------------------------------------------------------------- */

static int item(const Attn *A, const Work *W, int64_t n, int64_t h, int wide) {
#if defined(__x86_64__)
  if (wide) return item512(A, W, n, h);
#endif
  (void)wide;
  return item_scalar(A, W, n, h);
}

/* Returns 0, -1 when memory is short, -2 when a visible key's block is -1. simd: 2 = AVX-512
   (used when d % 16 == 0 and d <= 256), else portable C. */
int moerun_paged_attention(const float *q, const void *k_cache, const void *v_cache, int bf16,
                           const int32_t *block_table, int64_t max_blocks,
                           const int32_t *seq_of_row, const int32_t *positions,
                           const float *sinks, float sm_scale, int64_t window, float *out,
                           int64_t N, int64_t H, int64_t KV, int64_t d, int64_t bs,
                           int nthreads, int simd) {
  const Attn A = {q, k_cache, v_cache, bf16, block_table, seq_of_row, positions, max_blocks,
                  sinks, sm_scale, window, out, H, KV, d, bs};
  const int64_t G = H / KV;
  const int wide = simd == 2 && d % 16 == 0 && d <= 256;
  int rc = 0;
#pragma omp parallel num_threads(nthreads)
  {
    Work W = {malloc((size_t)G * sizeof(float)), malloc((size_t)G * sizeof(float)),
              malloc((size_t)(G * d) * sizeof(float)), malloc((size_t)(G * CHUNK) * sizeof(float))};
    const int ok = W.m && W.l && W.acc && W.s;
    /* dynamic: a row's work grows with its position */
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < N * KV; t++) {
      const int err = ok ? item(&A, &W, t / KV, t % KV, wide) : -1;
      if (err) {
#pragma omp atomic write
        rc = err;
      }
    }
    free(W.m), free(W.l), free(W.acc), free(W.s);
  }
  return rc;
}
