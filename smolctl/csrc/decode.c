/* smolctl's native decode step for Llama models with block-quantized weights (see smolctl/native.py).

   One call runs T tokens through every layer and writes the last token's logits: the whole step in
   one OpenMP parallel region, the matrix rows split across the threads, so a token costs no Python
   and no per-op dispatch. Weights are kept as the GGUF file stores them, in blocks of 32 along a row:
     kind 4: w = q * d + m, q in 0..15, two per byte (see dot4 for their order), d and m fp16 per block;
     kind 8: w = q * d, q int8 (GGUF's Q8_0), d fp16 per block;
     kind 0: fp32 (d and m unused), for an embedding or the head's exact rows only.
   Activations are rounded to int8 per block of 32 before a product (as llama.cpp does), so the
   inner loop is an integer dot product: AVX512-VNNI / AVX-VNNI where the compiler targets it,
   AVX2's maddubs otherwise, plain C elsewhere. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SIMD 1
#endif

#define QK 32
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif

typedef struct {
    int32_t kind, rows, cols, pad;
    const void *q;     /* kind 4: rows x cols/2 bytes; kind 8: rows x cols int8; kind 0: rows x cols fp32 */
    const uint16_t *d; /* rows x cols/QK, fp16 (as GGUF stores them: they are a fifth of a Q4 block's bytes) */
    const uint16_t *m; /* rows x cols/QK, fp16 (kind 4) */
} Mat;

typedef struct {
    const float *attn_norm, *ffn_norm;
    Mat qkv, out, gate_up, down;   /* qkv rows: q heads, k heads, v heads */
} Layer;

typedef struct {
    int32_t n_layer, hidden, n_head, n_kv, head_dim, inter, vocab, max_len, max_t, pad;
    float eps, pad2;
    const Layer *layers;
    Mat embed, head;
    Mat exact;                     /* the head's rows in full precision (or as head, read with fp32 activations) */
    int32_t rescore, pad3;         /* how many of the highest logits are recomputed from `exact` */
    const float *norm;
    const float *rope;             /* max_len x head_dim/2 x (cos, sin): q and k rows are in pairs */
    float *k, *v;                  /* n_layer x n_kv x max_len x head_dim */
    float *x, *h, *att, *ff, *scores;  /* scratch for max_t tokens (each thread rounds activations on its own) */
} Model;

/* -- activations ------------------------------------------------------------------------------ */

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* Where block b of a row of nb blocks sits in the kind-4 order (see dot4): its chunk's first block
   and the chunk's size in blocks (chunks of 4, then one of 2 and one of 1 for the rest). */
static inline void chunk_of(int b, int nb, int *first, int *n) {
    int full = nb / 4 * 4, pair = nb - full >= 2;
    *first = b < full ? b / 4 * 4 : b < full + 2 && pair ? full : full + 2 * pair;
    *n = b < full ? 4 : b < full + 2 && pair ? 2 : 1;
}

/* x (n) -> int8 codes per block of QK: q = round(x / d), d = max|x| / 127; s = d * sum(q). With
   `halves`, a kind-4 matrix's order: in each chunk, the first 16 of every block, then the last 16. */
static void quantize(const float *x, int n, int halves, int8_t *q, float *d, float *s) {
    const int nb = n / QK;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float db = amax / 127.0f, inv = db > 0 ? 1.0f / db : 0.0f;
        int first = b, size = 1, sum = 0;
        if (halves) chunk_of(b, nb, &first, &size);
        int8_t *lo = q + first * QK + (b - first) * (QK / 2), *hi = lo + size * (QK / 2);
        for (int i = 0; i < QK; i++) {
            int v = (int)rintf(xb[i] * inv);  /* to nearest even: one instruction */
            if (i < QK / 2) lo[i] = (int8_t)v;
            else hi[i - QK / 2] = (int8_t)v;
            sum += v;
        }
        d[b] = db;
        s[b] = db * (float)sum;
    }
}

/* -- one row of a matrix times quantized activations ------------------------------------------

   A kind-4 row is GGUF's Q4 blocks' codes: 16 bytes a block, byte j holding weight j in its low
   nibble and weight 16 + j in its high one. Its activations are reordered to match (quantize's
   `halves`): in chunks of 4 blocks (then 2, then 1 for the rest), the first halves of the chunk's
   blocks, then their second halves. So a 512-bit load of codes is four blocks whose low nibbles
   line up with the next 64 activation bytes and whose high nibbles with the 64 after. */

#if defined(SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SIMD512 1
#endif

#ifdef SIMD
static inline __m256i dot_u8s8(__m256i u, __m256i s) {   /* 8 int32 sums of 4 products u8 * s8 */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));  /* |u*s| <= 2*128*127 */
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* acc + (the 8 partial sums of codes u times the block of activations at xq) * scale */
static inline __m256 add_block(__m256 acc, __m256i u, const int8_t *xq, float scale) {
    __m256i p = dot_u8s8(u, _mm256_loadu_si256((const __m256i *)xq));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc);
}
#endif

static inline float h2f(uint16_t h) {  /* fp16 -> fp32 */
#ifdef SIMD
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, f = h & 1023;
    union { uint32_t u; float f; } v;
    if (e == 31) v.u = sign | 0x7f800000 | f << 13;            /* inf, nan */
    else if (e) v.u = sign | (e + 112) << 23 | f << 13;         /* normal */
    else { v.f = f * 5.9604644775390625e-8f; v.u |= sign; }     /* subnormal: f * 2^-24 */
    return v.f;
#endif
}

static inline uint16_t f2h(float f) {  /* fp32 -> fp16, rounded to nearest even */
#ifdef SIMD
    return _cvtss_sh(f, 0);
#else
    union { float f; uint32_t u; } v = {f};
    uint32_t sign = (v.u >> 16) & 0x8000, m = v.u & 0x7fffff;
    int e = (int)((v.u >> 23) & 255) - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00 | (((v.u >> 23) & 255) == 255 && m ? 0x200 : 0));
    if (e <= 0) {  /* subnormal or zero */
        if (e < -10) return (uint16_t)sign;
        m |= 0x800000;
        int shift = 14 - e;
        uint32_t h = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        return (uint16_t)(sign | (h + (rest > half || (rest == half && (h & 1)))));
    }
    uint32_t h = sign | (uint32_t)e << 10 | m >> 13, rest = m & 0x1fff;
    return (uint16_t)(h + (rest > 0x1000 || (rest == 0x1000 && (h & 1))));  /* a carry rounds up the exponent */
#endif
}

/* s[b] = d[b] * xd[b] for a row's nb blocks; returns the sum of m[b] * xs[b] (the minimums' share) */
static float block_scales(const uint16_t *d, const uint16_t *m, const float *xd, const float *xs, int nb, float *s) {
    float mins = 0;
    int b = 0;
#ifdef SIMD
    __m256 acc = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8) {
        __m256 db = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b)));
        _mm256_storeu_ps(s + b, _mm256_mul_ps(db, _mm256_loadu_ps(xd + b)));
        if (m) acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + b))), _mm256_loadu_ps(xs + b), acc);
    }
    mins = hsum(acc);
#endif
    for (; b < nb; b++) {
        s[b] = h2f(d[b]) * xd[b];
        if (m) mins += h2f(m[b]) * xs[b];
    }
    return mins;
}

static float dot4(const Mat *w, int r, const int8_t *xq, const float *xd, const float *xs) {
    const int nb = w->cols / QK;
    const uint8_t *q = (const uint8_t *)w->q + (size_t)r * nb * (QK / 2);
    float s[nb + 4];
    float sum = block_scales(w->d + (size_t)r * nb, w->m + (size_t)r * nb, xd, xs, nb, s);
    int b = 0;
#ifdef SIMD512
    const __m512i low = _mm512_set1_epi8(15);
    const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  /* block of each lane */
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int k = 0; b + 4 <= nb; b += 4, k ^= 1) {
        __m512i raw = _mm512_loadu_si512(q + b * (QK / 2));
        __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(raw, low), _mm512_loadu_si512(xq + b * QK));
        p = _mm512_dpbusd_epi32(p, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low), _mm512_loadu_si512(xq + b * QK + 64));
        __m512 scale = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(s + b)));
        acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[k]);
    }
    sum += _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
#endif
#ifdef SIMD
    const __m256i low8 = _mm256_set1_epi8(15);
    const __m256i lanes2 = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
    __m256 acc8 = _mm256_setzero_ps();
    for (; b + 2 <= nb; ) {  /* a chunk of 4 as two pairs of blocks, or the chunk of 2 */
        int n = b + 4 <= nb ? 4 : 2;
        for (int k = 0; k < n; k += 2) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(q + (b + k) * (QK / 2)));
            const int8_t *x = xq + b * QK + k * (QK / 2);
            __m256i p = _mm256_add_epi32(dot_u8s8(_mm256_and_si256(raw, low8), _mm256_loadu_si256((const __m256i *)x)),
                                         dot_u8s8(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low8),
                                                  _mm256_loadu_si256((const __m256i *)(x + n * (QK / 2)))));
            __m256 scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + b + k)), lanes2);
            acc8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc8);
        }
        b += n;
    }
    if (b < nb) {  /* the last chunk of 1: activations in their own order */
        const __m128i low4 = _mm_set1_epi8(15);
        __m128i raw = _mm_loadu_si128((const __m128i *)(q + b * (QK / 2)));
        __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
        acc8 = add_block(acc8, u, xq + b * QK, s[b]);
    }
    return sum + hsum(acc8);
#else
    for (; b < nb; b++) {
        int first, n, isum = 0;
        chunk_of(b, nb, &first, &n);
        const int8_t *lo = xq + first * QK + (b - first) * (QK / 2), *hi = lo + n * (QK / 2);
        for (int j = 0; j < QK / 2; j++) isum += (q[b * (QK / 2) + j] & 15) * lo[j] + (q[b * (QK / 2) + j] >> 4) * hi[j];
        sum += s[b] * (float)isum;
    }
    return sum;
#endif
}

static float dot8(const Mat *w, int r, const int8_t *xq, const float *xd) {
    const int nb = w->cols / QK;
    const int8_t *q = (const int8_t *)w->q + (size_t)r * w->cols;
    float s[nb + 4], sum = 0;
    block_scales(w->d + (size_t)r * nb, NULL, xd, NULL, nb, s);
    int b = 0;
#ifdef SIMD512
    const __m512i lanes01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; b + 4 <= nb; b += 4) {
        __m512i w0 = _mm512_loadu_si512(q + b * QK), w1 = _mm512_loadu_si512(q + (b + 2) * QK);
        __m512i x0 = _mm512_loadu_si512(xq + b * QK), x1 = _mm512_loadu_si512(xq + (b + 2) * QK);
        x0 = _mm512_mask_sub_epi8(x0, _mm512_movepi8_mask(w0), _mm512_setzero_si512(), x0);  /* x * sign(w) */
        x1 = _mm512_mask_sub_epi8(x1, _mm512_movepi8_mask(w1), _mm512_setzero_si512(), x1);
        __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w0), x0);
        __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w1), x1);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_permutexvar_ps(lanes01, _mm512_castps128_ps512(_mm_loadu_ps(s + b))), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_permutexvar_ps(lanes01, _mm512_castps128_ps512(_mm_loadu_ps(s + b + 2))), acc1);
    }
    sum += _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
#ifdef SIMD
    __m256 acc = _mm256_setzero_ps();
    for (; b < nb; b++) {
        __m256i wq = _mm256_loadu_si256((const __m256i *)(q + b * QK));
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        __m256i p = dot_u8s8(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xv, wq));  /* |w| * (x * sign w) */
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s[b]), acc);
    }
    return sum + hsum(acc);
#else
    for (; b < nb; b++) {
        int isum = 0;
        for (int j = 0; j < QK; j++) isum += q[b * QK + j] * xq[b * QK + j];
        sum += s[b] * (float)isum;
    }
    return sum;
#endif
}

static float dotf(const float *a, const float *b, int n) {  /* fp32 dot product */
    float sum = 0;
    int i = 0;
#ifdef SIMD
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* A thread's own copy of T tokens' activations, rounded for a product (see quantize): token t's
   codes at q + t * width, its blocks' scales and sums at d, s + t * width / QK. */
typedef struct {
    int8_t *q;
    float *d, *s;
    int width;
} Act;

/* out[t * stride + r] (+)= row r . token t's activations, for T tokens; the rows shared among the
   threads (call from a parallel region: it ends with a barrier). Rows of kind 4 or 8. */
static void matmul(const Mat *w, int T, const Act *a, float *out, int stride, int add) {
    const int wb = a->width / QK;
    const size_t row_bytes = w->kind == 4 ? w->cols / 2 : w->cols;
    #pragma omp for schedule(static)
    for (int r = 0; r < w->rows; r++) {
#ifdef SIMD
        if (r + PREFETCH_ROWS < w->rows) {  /* a row is a few cache lines: ask for a later one's now */
            const char *ahead = (const char *)w->q + (r + PREFETCH_ROWS) * row_bytes;
            for (size_t at = 0; at < row_bytes; at += 64) _mm_prefetch(ahead + at, _MM_HINT_T0);
        }
#endif
        for (int t = 0; t < T; t++) {
            const int8_t *q = a->q + (size_t)t * a->width;
            const float *d = a->d + (size_t)t * wb, *s = a->s + (size_t)t * wb;
            float v = w->kind == 4 ? dot4(w, r, q, d, s) : dot8(w, r, q, d);
            float *o = out + (size_t)t * stride + r;
            *o = add ? *o + v : v;
        }
    }
}

/* Token t's n values x (rms-normed by `norm` first, unless it is NULL) rounded into a's slot t for a
   matrix of `kind`. Each thread rounds every token for itself: no barrier before the product. */
static void prepare(const Act *a, int t, const float *x, int n, const float *norm, float eps, int kind) {
    float normed[n];
    if (norm) {
        rmsnorm(x, norm, n, eps, normed);
        x = normed;
    }
    quantize(x, n, kind == 4, a->q + (size_t)t * a->width, a->d + (size_t)t * a->width / QK,
             a->s + (size_t)t * a->width / QK);
}

/* Row `r` of a matrix of any kind, as fp32 (an embedding lookup, the head's exact rows). */
static void embed_row(const Mat *e, int r, float *out) {
    const int nb = e->cols / QK;
    if (e->kind == 0) {
        memcpy(out, (const float *)e->q + (size_t)r * e->cols, sizeof(float) * e->cols);
        return;
    }
    for (int b = 0; b < nb; b++) {
        const float d = h2f(e->d[(size_t)r * nb + b]);
        float *o = out + b * QK;
        if (e->kind == 8) {
            const int8_t *q = (const int8_t *)e->q + (size_t)r * e->cols + b * QK;
            for (int j = 0; j < QK; j++) o[j] = q[j] * d;
        } else {
            const uint8_t *q = (const uint8_t *)e->q + (size_t)r * e->cols / 2 + b * (QK / 2);
            const float m = h2f(e->m[(size_t)r * nb + b]);
            for (int j = 0; j < QK / 2; j++) {
                o[j] = (q[j] & 15) * d + m;
                o[j + QK / 2] = (q[j] >> 4) * d + m;
            }
        }
    }
}

/* The `rescore` highest logits recomputed from fp32 activations h and the `exact` rows: the head
   rounds its activations to int8 like every product, which alone can swap two close logits. */
static void rescore(const Model *M, const float *h, float *logits) {
    int top[256], n = M->rescore < 256 ? M->rescore : 256, low = 0;
    n = n < M->vocab ? n : M->vocab;
    if (n <= 0) return;
    for (int i = 0; i < n; i++) top[i] = i;
    for (int i = 0; i < n; i++) if (logits[top[i]] < logits[top[low]]) low = i;
    for (int v = n; v < M->vocab; v++) {
        if (logits[v] <= logits[top[low]]) continue;
        top[low] = v;
        for (int i = 0; i < n; i++) if (logits[top[i]] < logits[top[low]]) low = i;
    }
    float row[M->hidden];
    for (int i = 0; i < n; i++) {
        embed_row(&M->exact, top[i], row);
        logits[top[i]] = dotf(row, h, M->hidden);
    }
}

/* The rows of `src` (any kind) rounded to 4 bits, GGUF's Q4_1 scheme: per block of 32, w = code *
   d + m with m its minimum, d its range / 15, both fp16 (codes from the rounded d and m). For the
   head: a quarter of a step's bytes as Q8_0, 40% less in 4 bits; `rescore` restores its top logits. */
void smolctl_requantize4(const Mat *src, uint8_t *q, uint16_t *d, uint16_t *m) {
    const int nb = src->cols / QK;
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < src->rows; r++) {
        float w[src->cols];
        embed_row(src, r, w);
        for (int b = 0; b < nb; b++) {
            const float *wb = w + b * QK;
            float lo = wb[0], hi = wb[0];
            #pragma omp simd reduction(min:lo) reduction(max:hi)
            for (int i = 1; i < QK; i++) {
                lo = wb[i] < lo ? wb[i] : lo;
                hi = wb[i] > hi ? wb[i] : hi;
            }
            size_t at = (size_t)r * nb + b;
            d[at] = f2h((hi - lo) / 15);
            m[at] = f2h(lo);
            float dh = h2f(d[at]), mh = h2f(m[at]), inv = dh > 0 ? 1 / dh : 0;
            uint8_t *out = q + at * (QK / 2);
            for (int j = 0; j < QK / 2; j++) {  /* w - m >= 0 (up to m's rounding): + 0.5 and truncation round it */
                int c0 = (int)((wb[j] - mh) * inv + 0.5f), c1 = (int)((wb[j + QK / 2] - mh) * inv + 0.5f);
                c0 = c0 < 0 ? 0 : c0 > 15 ? 15 : c0;
                c1 = c1 < 0 ? 0 : c1 > 15 ? 15 : c1;
                out[j] = (uint8_t)(c0 | c1 << 4);
            }
        }
    }
}

/* -- the step ---------------------------------------------------------------------------------- */

/* attention of one query of head `head` over the cached keys and values 0..end */
static void attend(const Model *M, int layer, const float *q, int head, int end, float *scores, float *out) {
    int hd = M->head_dim, kvh = head / (M->n_head / M->n_kv);
    const float *k = M->k + (((size_t)layer * M->n_kv + kvh) * M->max_len) * hd;
    const float *v = M->v + (((size_t)layer * M->n_kv + kvh) * M->max_len) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float top = -INFINITY;
    for (int s = 0; s < end; s++) {
        float a = dotf(q, k + (size_t)s * hd, hd) * scale;
        scores[s] = a;
        top = fmaxf(top, a);
    }
    float sum = 0;
    for (int s = 0; s < end; s++) sum += scores[s] = expf(scores[s] - top);
    for (int i = 0; i < hd; i++) out[i] = 0;
    for (int s = 0; s < end; s++) {
        float p = scores[s] / sum;
        for (int i = 0; i < hd; i++) out[i] += p * v[(size_t)s * hd + i];
    }
}

static void rope(const Model *M, float *x, int heads, int pos) {
    const float *cs = M->rope + (size_t)pos * M->head_dim;  /* head_dim/2 pairs of (cos, sin) */
    for (int h = 0; h < heads; h++) {
        float *p = x + h * M->head_dim;
        for (int i = 0; i < M->head_dim / 2; i++) {
            float a = p[2 * i], b = p[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
            p[2 * i] = a * c - b * s;
            p[2 * i + 1] = a * s + b * c;
        }
    }
}

/* Run tokens[0..T) at positions pos..pos+T through the model (T <= max_t, pos + T <= max_len) and
   write the last one's logits (vocab). Returns 0, -1 when the sizes are out of range, -2 when
   memory ran out. */
int smolctl_step(const Model *M, const int32_t *tokens, int T, int pos, float *logits) {
    if (T < 1 || T > M->max_t || pos < 0 || pos + T > M->max_len) return -1;
    const int H = M->hidden, hd = M->head_dim, nq = M->n_head * hd, nkv = M->n_kv * hd;
    const int qkv_rows = nq + 2 * nkv, I = M->inter;
    const int width = H > I ? (H > nq ? H : nq) : (I > nq ? I : nq);  /* widest activation */
    float *x = M->x, *h = M->h, *att = M->att, *ff = M->ff;
    int failed = 0;

    for (int t = 0; t < T; t++) embed_row(&M->embed, tokens[t], x + (size_t)t * H);

    #pragma omp parallel
    {
        /* this thread's rounded activations (the shared vectors are complete after each product's barrier) */
        int8_t *q = malloc((size_t)T * width);
        float *ds = malloc(sizeof(float) * 2 * (size_t)T * (width / QK));
        Act a = {q, ds, ds + (size_t)T * (width / QK), width};
        #pragma omp atomic
        failed += !q || !ds;
        #pragma omp barrier
        for (int l = 0; l < M->n_layer && !failed; l++) {
            const Layer *L = M->layers + l;
            for (int t = 0; t < T; t++) prepare(&a, t, x + (size_t)t * H, H, L->attn_norm, M->eps, L->qkv.kind);
            matmul(&L->qkv, T, &a, h, qkv_rows, 0);
            #pragma omp for schedule(static)
            for (int t = 0; t < T; t++) {
                float *row = h + (size_t)t * qkv_rows;
                rope(M, row, M->n_head + M->n_kv, pos + t);
                for (int g = 0; g < M->n_kv; g++) {
                    size_t at = (((size_t)l * M->n_kv + g) * M->max_len + pos + t) * hd;
                    memcpy(M->k + at, row + nq + g * hd, hd * sizeof(float));
                    memcpy(M->v + at, row + nq + nkv + g * hd, hd * sizeof(float));
                }
            }
            #pragma omp for schedule(static)
            for (int i = 0; i < T * M->n_head; i++) {
                int t = i / M->n_head, hh = i % M->n_head;
                attend(M, l, h + (size_t)t * qkv_rows + hh * hd, hh, pos + t + 1,
                       M->scores + (size_t)i * M->max_len, att + (size_t)t * nq + hh * hd);
            }
            for (int t = 0; t < T; t++) prepare(&a, t, att + (size_t)t * nq, nq, NULL, 0, L->out.kind);
            matmul(&L->out, T, &a, x, H, 1);
            for (int t = 0; t < T; t++) prepare(&a, t, x + (size_t)t * H, H, L->ffn_norm, M->eps, L->gate_up.kind);
            matmul(&L->gate_up, T, &a, ff, 2 * I, 0);
            for (int t = 0; t < T; t++) {
                float *g = ff + (size_t)t * 2 * I, *u = g + I, act[I];
                for (int i = 0; i < I; i++) act[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
                prepare(&a, t, act, I, NULL, 0, L->down.kind);
            }
            matmul(&L->down, T, &a, x, H, 1);
        }
        if (!failed) {
            prepare(&a, 0, x + (size_t)(T - 1) * H, H, M->norm, M->eps, M->head.kind);
            matmul(&M->head, 1, &a, logits, 0, 0);
        }
        free(q);
        free(ds);
    }
    if (failed) return -2;
    rmsnorm(x + (size_t)(T - 1) * H, M->norm, H, M->eps, h);  /* the head's input in fp32, for rescore */
    rescore(M, h, logits);
    return 0;
}
