/* One bf16 SwiGLU expert for a few tokens on the CPU, reading each weight once at memory speed.

   y[t] = down @ (silu(g) * u),  [g; u] = gate_up @ x[t]     gate_up [2I, D], down [D, I], bf16

   Built at first use by daop/kernels/cpu_expert.py with the system C compiler and loaded through
   ctypes (which releases the GIL for the whole call). OpenMP is the same runtime torch loaded
   (libgomp.so.1 is already in the process), so there is one thread team, not two.

   Each thread takes a contiguous block of output rows and walks each row once, for every token,
   with float32 accumulation; activations stay in float32 between the two products (one rounding,
   at the output). Vector paths for AVX-512F and AVX2+FMA are chosen at run time; a plain C loop
   serves other CPUs. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DAOP_X86 1
#endif

#define MAX_TOKENS 8

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* out[t * ldo + r] = sum_k W[r, k] * x[t * K + k] for rows r in [r0, r1), tokens t < n */
static void rows_plain(const uint16_t *W, long K, long r0, long r1, const float *x, int n, float *out, long ldo) {
    for (long r = r0; r < r1; r++) {
        const uint16_t *w = W + r * K;
        for (int t = 0; t < n; t++) {
            float s = 0.f;
            const float *xt = x + t * K;
            for (long k = 0; k < K; k++) s += bf16_to_f32(w[k]) * xt[k];
            out[t * ldo + r] = s;
        }
    }
}

#ifdef DAOP_X86
#define ROWS_AVX512(N)                                                                                   \
    __attribute__((target("avx512f"))) static void rows_avx512_##N(const uint16_t *W, long K, long r0,  \
                                                                   long r1, const float *x, float *out, \
                                                                   long ldo) {                          \
        for (long r = r0; r < r1; r++) {                                                                 \
            const uint16_t *w = W + r * K;                                                               \
            __m512 a0[N], a1[N];                                                                         \
            for (int t = 0; t < N; t++) a0[t] = a1[t] = _mm512_setzero_ps();                             \
            long k = 0;                                                                                  \
            for (; k + 32 <= K; k += 32) {                                                               \
                __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(                                       \
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + k))), 16));           \
                __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(                                       \
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + k + 16))), 16));      \
                for (int t = 0; t < N; t++) {                                                            \
                    a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * K + k), a0[t]);                  \
                    a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * K + k + 16), a1[t]);             \
                }                                                                                        \
            }                                                                                            \
            for (int t = 0; t < N; t++) {                                                                \
                float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));                             \
                for (long j = k; j < K; j++) s += bf16_to_f32(w[j]) * x[t * K + j];                      \
                out[t * ldo + r] = s;                                                                    \
            }                                                                                            \
        }                                                                                                \
    }

#define ROWS_AVX2(N)                                                                                     \
    __attribute__((target("avx2,fma"))) static void rows_avx2_##N(const uint16_t *W, long K, long r0,    \
                                                                  long r1, const float *x, float *out,  \
                                                                  long ldo) {                           \
        for (long r = r0; r < r1; r++) {                                                                 \
            const uint16_t *w = W + r * K;                                                               \
            __m256 a0[N], a1[N];                                                                         \
            for (int t = 0; t < N; t++) a0[t] = a1[t] = _mm256_setzero_ps();                             \
            long k = 0;                                                                                  \
            for (; k + 16 <= K; k += 16) {                                                               \
                __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(                                       \
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + k))), 16));              \
                __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(                                       \
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + k + 8))), 16));          \
                for (int t = 0; t < N; t++) {                                                            \
                    a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * K + k), a0[t]);                  \
                    a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * K + k + 8), a1[t]);              \
                }                                                                                        \
            }                                                                                            \
            for (int t = 0; t < N; t++) {                                                                \
                __m256 v = _mm256_add_ps(a0[t], a1[t]);                                                  \
                __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));           \
                h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                                  \
                h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));                                              \
                float s = _mm_cvtss_f32(h);                                                              \
                for (long j = k; j < K; j++) s += bf16_to_f32(w[j]) * x[t * K + j];                      \
                out[t * ldo + r] = s;                                                                    \
            }                                                                                            \
        }                                                                                                \
    }

ROWS_AVX512(1) ROWS_AVX512(2) ROWS_AVX512(3) ROWS_AVX512(4)
ROWS_AVX512(5) ROWS_AVX512(6) ROWS_AVX512(7) ROWS_AVX512(8)
ROWS_AVX2(1) ROWS_AVX2(2) ROWS_AVX2(3) ROWS_AVX2(4)
ROWS_AVX2(5) ROWS_AVX2(6) ROWS_AVX2(7) ROWS_AVX2(8)

typedef void (*rows_fn)(const uint16_t *, long, long, long, const float *, float *, long);
static const rows_fn AVX512[MAX_TOKENS] = {rows_avx512_1, rows_avx512_2, rows_avx512_3, rows_avx512_4,
                                           rows_avx512_5, rows_avx512_6, rows_avx512_7, rows_avx512_8};
static const rows_fn AVX2[MAX_TOKENS] = {rows_avx2_1, rows_avx2_2, rows_avx2_3, rows_avx2_4,
                                         rows_avx2_5, rows_avx2_6, rows_avx2_7, rows_avx2_8};
#endif

/* 2: AVX-512F, 1: AVX2 with FMA, 0: plain C. */
int daop_cpu_isa(void) {
#ifdef DAOP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

static void rows(int isa, const uint16_t *W, long K, long r0, long r1, const float *x, int n, float *out, long ldo) {
#ifdef DAOP_X86
    if (isa == 2) { AVX512[n - 1](W, K, r0, r1, x, out, ldo); return; }
    if (isa == 1) { AVX2[n - 1](W, K, r0, r1, x, out, ldo); return; }
#endif
    rows_plain(W, K, r0, r1, x, n, out, ldo);
}

/* Rows [r0, r1) of `total` that thread `id` of `count` owns: equal shares, in blocks of 16 rows. */
static void share(long total, int id, int count, long *r0, long *r1) {
    long blocks = (total + 15) / 16;
    long b0 = blocks * id / count, b1 = blocks * (id + 1) / count;
    *r0 = b0 * 16 < total ? b0 * 16 : total;
    *r1 = b1 * 16 < total ? b1 * 16 : total;
}

/* x [n, D] bf16 -> y [n, D] bf16; scratch holds n * (D + 3I) floats. isa: daop_cpu_isa() or lower.
   Returns 0, or -1 when n is out of range. */
int daop_expert_bf16(const uint16_t *x, int n, const uint16_t *gate_up, const uint16_t *down, uint16_t *y,
                     long D, long I, int threads, int isa, float *scratch) {
    if (n < 1 || n > MAX_TOKENS) return -1;
    float *xf = scratch, *h = xf + n * D, *a = h + n * 2 * I, *yf = xf; /* yf reuses xf once it is read */
    for (long i = 0; i < n * D; i++) xf[i] = bf16_to_f32(x[i]);
#pragma omp parallel num_threads(threads)
    {
        int id = omp_get_thread_num(), count = omp_get_num_threads();
        long r0, r1;
        share(2 * I, id, count, &r0, &r1);
        rows(isa, gate_up, D, r0, r1, xf, n, h, 2 * I);
#pragma omp barrier
        share(I, id, count, &r0, &r1);
        for (int t = 0; t < n; t++)
            for (long i = r0; i < r1; i++) {
                float g = h[t * 2 * I + i], u = h[t * 2 * I + I + i];
                a[t * I + i] = g / (1.f + expf(-g)) * u;
            }
#pragma omp barrier
        share(D, id, count, &r0, &r1);
        rows(isa, down, I, r0, r1, a, n, yf, D);
#pragma omp barrier
        share(n * D, id, count, &r0, &r1);
        for (long i = r0; i < r1; i++) y[i] = f32_to_bf16(yf[i]);
    }
    return 0;
}
