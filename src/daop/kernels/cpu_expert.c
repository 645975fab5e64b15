/* One bf16 SwiGLU expert for a few tokens on the CPU, reading each weight once at memory speed.

   y[t] = down @ (silu(g) * u),  [g; u] = gate_up @ x[t]     gate_up [2I, D], down [D, I], bf16

   Built at first use by daop/kernels/cpu_expert.py with the system C compiler and loaded through
   ctypes (which releases the GIL for the whole call). OpenMP is the same runtime torch loaded
   (libgomp.so.1 is already in the process), so there is one thread team, not two.

   Threads take chunks of 16 output rows from a shared counter (so row groups never depend on the
   thread count, and a delayed thread does not hold up the others) and walk each row once per group
   of tokens, with float32 accumulation. Values
   are rounded to bf16 where torch's (and the GPU's) bf16 products round them: the gate_up output,
   silu(gate), its product with up, and the output; so CPU experts stay as close to GPU experts as
   torch's own CPU products were. Vector paths for AVX-512F and AVX2+FMA are chosen at run time; a plain C loop
   serves other CPUs.

   With AMX (built with DAOP_AMX where the compiler knows the instructions, used where the CPU has
   them and Linux grants the tile state), a job of AMX_MIN_TOKENS-AMX_MAX_TOKENS tokens (a batch's or a
   prompt's share of an expert) runs as bf16 tile products instead: each 16-row slice of a weight is read once per 96
   tokens, and every (row, token) sum is float32 over k in order of 32-wide steps; the same roundings
   apply. DAOP_AMX_EMULATE builds the same path with the tile instructions written in C, so that its
   data layout can be tested on CPUs without AMX. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <omp.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DAOP_X86 1
#endif

#define MAX_TOKENS 8
/* The tile path's token range: on an H200 host (one bf16 Mixtral expert, 16 threads) it took 2.8-2.9 ms
   at 1-16 tokens, 3.2 / 4.5 / 8.3 ms at 32 / 64 / 128, against the vector path's 2.6 / 3.3 / 5.1 ms at
   1 / 4 / 8 and torch's 5.0-8.0 ms at 9-64 and 14.7 at 128; at 256 tokens, 53 ms against torch's 18.8,
   where each 16-row slice reads 16 token blocks from beyond the core's cache
   (scripts/cpu_kernel_sweep.py, benchmarks/results/h200-cpu-kernel-amx.jsonl). Sweeping every row
   chunk over one k segment before the next, with partial sums kept in memory between segments, was
   slower on the same kind of host (5.1-8.5 ms at 64 tokens, 31-39 at 128; the same file). */
#ifndef AMX_MAX_TOKENS
#define AMX_MAX_TOKENS 128
#endif
#ifndef AMX_MIN_TOKENS
#define AMX_MIN_TOKENS 4
#endif
#if defined(DAOP_AMX_EMULATE) && !defined(DAOP_AMX)
#define DAOP_AMX 1
#endif
#if defined(DAOP_AMX) && !defined(DAOP_AMX_EMULATE) && !defined(DAOP_X86)
#undef DAOP_AMX
#endif
#if defined(DAOP_AMX) && !defined(DAOP_AMX_EMULATE)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* Weight formats: bf16, or int8 codes (one scale per output row, applied by the caller). */
enum { FMT_BF16 = 0, FMT_INT8 = 1 };

/* out[t * ldo + r] = sum_k W[r, k] * x[t * K + k] for rows r in [r0, r1), tokens t < n; row r of W
   starts at W + r * ldw elements (ldw >= K: the first K columns of a wider matrix) */
static void rows_plain(int fmt, const void *W, long K, long ldw, long r0, long r1, const float *x, int n, float *out,
                       long ldo) {
    for (long r = r0; r < r1; r++) {
        for (int t = 0; t < n; t++) {
            float s = 0.f;
            const float *xt = x + t * K;
            if (fmt == FMT_INT8) {
                const int8_t *w = (const int8_t *)W + r * ldw;
                for (long k = 0; k < K; k++) s += (float)w[k] * xt[k];
            } else {
                const uint16_t *w = (const uint16_t *)W + r * ldw;
                for (long k = 0; k < K; k++) s += bf16_to_f32(w[k]) * xt[k];
            }
            out[t * ldo + r] = s;
        }
    }
}

#ifdef DAOP_X86
/* Rows are walked GROUP_ROWS at a time (as many weight streams in flight per core, each prefetched
   2 * PREFETCH bytes ahead; both chosen on an H200 host by scripts/cpu_kernel_sweep.py) for up to TOKENS_* tokens; every (row, token) sum is one float32 vector chain in k
   order, reduced the same way whether its row is walked in a group of four or alone. */
#ifndef PREFETCH
#define PREFETCH 1024 /* in bf16 elements: 2 KB ahead, for int8 weights too */
#endif
#ifndef GROUP_ROWS
#define GROUP_ROWS 4
#endif
#define TOKENS_AVX512 (16 / GROUP_ROWS < 4 ? 16 / GROUP_ROWS : 4) /* accumulators: GROUP_ROWS x tokens <= 16 */
#define TOKENS_AVX2 (8 / GROUP_ROWS < 2 ? 8 / GROUP_ROWS : 2)
#define LOAD512(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define LOAD256(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define LOAD512_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define LOAD256_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define I8_TO_F32(v) ((float)(v))

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

#define GROUP(NAME, TARGET, WT, CONV, VEC, LANES, LOAD, FMA, XLOAD, ZERO, HSUM, G, NT)                \
    __attribute__((target(TARGET))) static void NAME##_##NT(const void *Wv, long K, long ldw, long r,  \
                                                                  const float *x, float *out, long ldo) { \
        const WT *W = (const WT *)Wv, *w[G];                                                           \
        for (int i = 0; i < G; i++) w[i] = W + (r + i) * ldw;                                           \
        VEC a[G][NT];                                                                                  \
        for (int i = 0; i < G; i++)                                                                    \
            for (int t = 0; t < NT; t++) a[i][t] = ZERO();                                             \
        long k = 0;                                                                                    \
        for (; k + LANES <= K; k += LANES) {                                                           \
            VEC v[G];                                                                                  \
            for (int i = 0; i < G; i++) {                                                              \
                _mm_prefetch((const char *)(w[i] + k) + 2 * PREFETCH, _MM_HINT_T0);                    \
                v[i] = LOAD(w[i] + k);                                                                 \
            }                                                                                          \
            for (int t = 0; t < NT; t++) {                                                             \
                VEC xv = XLOAD(x + t * K + k);                                                         \
                for (int i = 0; i < G; i++) a[i][t] = FMA(v[i], xv, a[i][t]);                          \
            }                                                                                          \
        }                                                                                              \
        for (int i = 0; i < G; i++)                                                                    \
            for (int t = 0; t < NT; t++) {                                                             \
                float s = HSUM(a[i][t]);                                                               \
                for (long j = k; j < K; j++) s += CONV(w[i][j]) * x[t * K + j];                        \
                out[t * ldo + r + i] = s;                                                              \
            }                                                                                          \
    }

#define AVX512_GROUP(NAME, WT, CONV, LOAD, G, NT) GROUP(NAME, "avx512f", WT, CONV, __m512, 16, LOAD, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_setzero_ps, _mm512_reduce_add_ps, G, NT)
#define AVX2_GROUP(NAME, WT, CONV, LOAD, G, NT) GROUP(NAME, "avx2,fma", WT, CONV, __m256, 8, LOAD, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, hsum256, G, NT)
/* one set per weight format: bf16 (uint16_t) and int8 codes */
#define FORMAT_GROUPS(SUFFIX, WT, CONV, L512, L256)                                                           \
    AVX512_GROUP(avx512_g##SUFFIX, WT, CONV, L512, GROUP_ROWS, 1) AVX512_GROUP(avx512_g##SUFFIX, WT, CONV, L512, GROUP_ROWS, 2) \
    AVX512_GROUP(avx512_g##SUFFIX, WT, CONV, L512, GROUP_ROWS, 3) AVX512_GROUP(avx512_g##SUFFIX, WT, CONV, L512, GROUP_ROWS, 4) \
    AVX512_GROUP(avx512_1##SUFFIX, WT, CONV, L512, 1, 1) AVX512_GROUP(avx512_1##SUFFIX, WT, CONV, L512, 1, 2)                 \
    AVX512_GROUP(avx512_1##SUFFIX, WT, CONV, L512, 1, 3) AVX512_GROUP(avx512_1##SUFFIX, WT, CONV, L512, 1, 4)                 \
    AVX2_GROUP(avx2_g##SUFFIX, WT, CONV, L256, GROUP_ROWS, 1) AVX2_GROUP(avx2_g##SUFFIX, WT, CONV, L256, GROUP_ROWS, 2)       \
    AVX2_GROUP(avx2_1##SUFFIX, WT, CONV, L256, 1, 1) AVX2_GROUP(avx2_1##SUFFIX, WT, CONV, L256, 1, 2)
FORMAT_GROUPS(, uint16_t, bf16_to_f32, LOAD512, LOAD256)
FORMAT_GROUPS(_i8, int8_t, I8_TO_F32, LOAD512_I8, LOAD256_I8)

typedef void (*group_fn)(const void *, long, long, long, const float *, float *, long);
/* [format][group of GROUP_ROWS rows or one row][tokens - 1] */
static const group_fn AVX512_FNS[2][2][4] = {
    {{avx512_g_1, avx512_g_2, avx512_g_3, avx512_g_4}, {avx512_1_1, avx512_1_2, avx512_1_3, avx512_1_4}},
    {{avx512_g_i8_1, avx512_g_i8_2, avx512_g_i8_3, avx512_g_i8_4}, {avx512_1_i8_1, avx512_1_i8_2, avx512_1_i8_3, avx512_1_i8_4}}};
static const group_fn AVX2_FNS[2][2][4] = {
    {{avx2_g_1, avx2_g_2}, {avx2_1_1, avx2_1_2}},
    {{avx2_g_i8_1, avx2_g_i8_2}, {avx2_1_i8_1, avx2_1_i8_2}}};

static void rows_vector(const group_fn *group, const group_fn *one, int chunk, const void *W, long K, long ldw,
                        long r0, long r1, const float *x, int n, float *out, long ldo) {
    for (long r = r0; r < r1;) {
        int g = r + GROUP_ROWS <= r1 ? GROUP_ROWS : 1;
        for (int t0 = 0; t0 < n; t0 += chunk) {
            int nt = n - t0 < chunk ? n - t0 : chunk;
            (g == GROUP_ROWS ? group : one)[nt - 1](W, K, ldw, r, x + t0 * K, out + t0 * ldo, ldo);
        }
        r += g;
    }
}
#endif

/* The vector path this CPU has: 2 AVX-512F, 1 AVX2 with FMA, 0 plain C. */
static int vector_level(void) {
#ifdef DAOP_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

/* Whether AMX tile products can run: the CPU has AMX-TILE and AMX-BF16 and Linux grants this
   process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, once per process). Emulated: always. */
static int amx_usable(void) {
#if defined(DAOP_AMX_EMULATE)
    return 1;
#elif defined(DAOP_AMX) && defined(DAOP_X86)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1u) || !((d >> 24) & 1u)) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

static int VECTOR_LEVEL = -1;

/* 3: AMX for AMX_MIN_TOKENS or more tokens (the vector path below that), 2: AVX-512F, 1: AVX2 with FMA,
   0: plain C. */
int daop_cpu_isa(void) {
    VECTOR_LEVEL = vector_level();
    return amx_usable() ? 3 : VECTOR_LEVEL;
}

static void rows(int isa, int fmt, const void *W, long K, long ldw, long r0, long r1, const float *x, int n,
                 float *out, long ldo) {
#ifdef DAOP_X86
    if (isa >= 2) {
        rows_vector(AVX512_FNS[fmt][0], AVX512_FNS[fmt][1], TOKENS_AVX512, W, K, ldw, r0, r1, x, n, out, ldo);
        return;
    }
    if (isa == 1) {
        rows_vector(AVX2_FNS[fmt][0], AVX2_FNS[fmt][1], TOKENS_AVX2, W, K, ldw, r0, r1, x, n, out, ldo);
        return;
    }
#endif
    rows_plain(fmt, W, K, ldw, r0, r1, x, n, out, ldo);
}

/* Rows [r0, r1) of `total` that thread `id` of `count` owns: equal shares, in blocks of 16 rows. */
static void share(long total, int id, int count, long *r0, long *r1) {
    long blocks = (total + 15) / 16;
    long b0 = blocks * id / count, b1 = blocks * (id + 1) / count;
    *r0 = b0 * 16 < total ? b0 * 16 : total;
    *r1 = b1 * 16 < total ? b1 * 16 : total;
}

/* The rows of a product, taken CHUNK_ROWS at a time from a shared counter until none are left: a
   thread that the OS delays (the driving thread, a copy's interrupts) takes fewer chunks instead of
   holding up the whole team at the next barrier. Chunks start at multiples of 16 rows, so each row's
   sum runs in the same order whichever thread takes it. */
#ifndef CHUNK_ROWS
#define CHUNK_ROWS 16
#endif
static void take_rows(int isa, int fmt, const void *W, long K, long ldw, long total, long *next, const float *x,
                      int n, float *out, long ldo) {
    for (;;) {
        long r0 = __atomic_fetch_add(next, CHUNK_ROWS, __ATOMIC_RELAXED);
        if (r0 >= total) return;
        rows(isa, fmt, W, K, ldw, r0, r0 + CHUNK_ROWS < total ? r0 + CHUNK_ROWS : total, x, n, out, ldo);
    }
}

#ifdef DAOP_AMX
/* ---- AMX tile products: out[t * ldo + r] = sum_k W[r, k] * x[t, k] for 16 rows r at a time ----
   The weight is the A operand as stored (a tile is 16 rows x 32 k of bf16, loaded with the row stride
   ldw); the tokens are the B operand, packed once per product in AMX's pair layout: per block of 16
   tokens, xv[block][k / 2][token][k % 2] (zero past the last token). Each C tile sums 16 rows x 16
   tokens in float32. Tiles 0-5 are C tiles (AMX_PASS token blocks per walk over a row slice), 6 the
   weight's tile, 7 the tokens'. */
#define AMX_PASS 6
#ifndef AMX_PREFETCH
#define AMX_PREFETCH 512 /* elements ahead in each of the 16 weight rows */
#endif

#ifdef DAOP_AMX_EMULATE
static __thread float emu_c[6][16][16];
static __thread uint16_t emu_ab[8][16][32];
#define AMX_FN
static void emu_load(int t, const void *p, long stride) {
    for (int m = 0; m < 16; m++) memcpy(emu_ab[t][m], (const char *)p + m * stride, 64);
}
static void emu_dp(int c, int a, int b) { /* C[m][j] += sum_i A[m][2i + q] * B[i][2j + q], q = 0, 1 */
    for (int m = 0; m < 16; m++)
        for (int j = 0; j < 16; j++) {
            float s = emu_c[c][m][j];
            for (int i = 0; i < 16; i++)
                s += bf16_to_f32(emu_ab[a][m][2 * i]) * bf16_to_f32(emu_ab[b][i][2 * j]) +
                     bf16_to_f32(emu_ab[a][m][2 * i + 1]) * bf16_to_f32(emu_ab[b][i][2 * j + 1]);
            emu_c[c][m][j] = s;
        }
}
#define TILE_BEGIN() ((void)0)
#define TILE_END() ((void)0)
#define TILE_ZERO(t) memset(emu_c[t], 0, sizeof emu_c[t])
#define TILE_LOAD(t, p, stride) emu_load(t, p, stride)
#define TILE_DP(c, a, b) emu_dp(c, a, b)
#define TILE_STORE(t, p) memcpy(p, emu_c[t], sizeof emu_c[t])
#else
#define AMX_FN __attribute__((target("amx-tile,amx-bf16")))
typedef struct __attribute__((aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;
AMX_FN static void tile_begin(void) { /* every tile 16 rows x 64 bytes */
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
    _tile_loadconfig(&cfg);
}
#define TILE_BEGIN() tile_begin()
#define TILE_END() _tile_release()
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#define TILE_STORE(t, p) _tile_stored(t, p, 64)
#endif

/* Rows [r, r + 16) of W against token blocks [b0, b0 + nb) (nb <= AMX_PASS) of xv; K % 32 == 0. */
AMX_FN static void amx_block(const uint16_t *W, long K, long ldw, long r, const uint16_t *xv, int b0, int nb, int n,
                             float *out, long ldo) {
    const long block = K * 16; /* uint16s per token block of xv */
    const uint16_t *xb = xv + b0 * block;
#define AMX_ZERO(i) if (i < nb) TILE_ZERO(i);
    AMX_ZERO(0) AMX_ZERO(1) AMX_ZERO(2) AMX_ZERO(3) AMX_ZERO(4) AMX_ZERO(5)
    for (long k = 0; k < K; k += 32) {
#ifdef DAOP_X86
        if (k + AMX_PREFETCH < K)
            for (int i = 0; i < 16; i++) _mm_prefetch((const char *)(W + (r + i) * ldw + k + AMX_PREFETCH), _MM_HINT_T0);
#endif
        TILE_LOAD(6, W + r * ldw + k, ldw * 2);
#define AMX_STEP(i) if (i < nb) { TILE_LOAD(7, xb + i * block + k * 16, 64); TILE_DP(i, 6, 7); }
        AMX_STEP(0) AMX_STEP(1) AMX_STEP(2) AMX_STEP(3) AMX_STEP(4) AMX_STEP(5)
    }
    float c[16 * 16] __attribute__((aligned(64)));
#define AMX_OUT(i)                                                                           \
    if (i < nb) {                                                                             \
        TILE_STORE(i, c);                                                                     \
        for (int j = 0; j < 16 && (b0 + i) * 16 + j < n; j++)                                 \
            for (int m = 0; m < 16; m++) out[((b0 + i) * 16 + j) * ldo + r + m] = c[m * 16 + j]; \
    }
    AMX_OUT(0) AMX_OUT(1) AMX_OUT(2) AMX_OUT(3) AMX_OUT(4) AMX_OUT(5)
#undef AMX_ZERO
#undef AMX_STEP
#undef AMX_OUT
}

/* As take_rows, for the tile path: 16-row chunks (total % 16 == 0), every token block of each. */
static void amx_take_rows(const uint16_t *W, long K, long ldw, long total, long *next, const uint16_t *xv, int n,
                          float *out, long ldo) {
    int blocks = (n + 15) / 16;
    for (;;) {
        long r0 = __atomic_fetch_add(next, 16, __ATOMIC_RELAXED);
        if (r0 >= total) return;
        for (int b0 = 0; b0 < blocks; b0 += AMX_PASS)
            amx_block(W, K, ldw, r0, xv, b0, blocks - b0 < AMX_PASS ? blocks - b0 : AMX_PASS, n, out, ldo);
    }
}

/* The tile path of daop_expert_bf16 (same arguments; D % 32 == 0, K % 32 == 0). */
AMX_FN static void expert_amx(const uint16_t *x, int n, const uint16_t *gate_up, const uint16_t *down, uint16_t *y,
                              long D, long I, long K, int threads, float *scratch) {
    const int blocks = (n + 15) / 16;
    float *h = scratch, *yf = h + (long)n * 2 * K;
    uint16_t *xv = (uint16_t *)(yf + (long)n * D), *av = xv + (long)blocks * 16 * D;
    long next_gate = 0, next_up = 0, next_down = 0;
#pragma omp parallel num_threads(threads)
    {
        int id = omp_get_thread_num(), count = omp_get_num_threads();
        long r0, r1;
        share(D / 2, id, count, &r0, &r1); /* the tokens in pair layout, k pairs [r0, r1) */
        for (int b = 0; b < blocks; b++)
            for (long p = r0; p < r1; p++)
                for (int j = 0; j < 16; j++) {
                    int t = b * 16 + j;
                    uint16_t *dst = xv + ((b * (D / 2) + p) * 16 + j) * 2;
                    dst[0] = t < n ? x[t * D + 2 * p] : 0;
                    dst[1] = t < n ? x[t * D + 2 * p + 1] : 0;
                }
#pragma omp barrier
        TILE_BEGIN();
        amx_take_rows(gate_up, D, D, K, &next_gate, xv, n, h, 2 * K);
        amx_take_rows(gate_up + I * D, D, D, K, &next_up, xv, n, h + K, 2 * K);
#pragma omp barrier
        share(K, id, count, &r0, &r1); /* 16-row blocks: whole pairs */
        for (int t = 0; t < blocks * 16; t++)
            for (long i = r0; i < r1; i++) { /* rounded to bf16 where torch's bf16 products round */
                uint16_t v = 0;
                if (t < n) {
                    float g = round_bf16(h[t * 2 * K + i]), u = round_bf16(h[t * 2 * K + K + i]);
                    v = f32_to_bf16(round_bf16(g / (1.f + expf(-g))) * u);
                }
                av[(((t / 16) * (K / 2) + i / 2) * 16 + t % 16) * 2 + i % 2] = v;
            }
#pragma omp barrier
        amx_take_rows(down, K, I, D, &next_down, av, n, yf, D);
        TILE_END();
#pragma omp barrier
        share((long)n * D, id, count, &r0, &r1);
        for (long i = r0; i < r1; i++) y[i] = f32_to_bf16(yf[i]);
    }
}
#endif

/* Whether a job of n tokens over K intermediate rows takes the tile path. */
static int takes_amx(int isa, int n, long D, long K) {
#ifdef DAOP_AMX
    return isa >= 3 && n >= AMX_MIN_TOKENS && n <= AMX_MAX_TOKENS && D % 32 == 0 && K % 32 == 0;
#else
    (void)isa; (void)n; (void)D; (void)K;
    return 0;
#endif
}

/* The most tokens a job may have for this isa and shape (the vector paths take up to MAX_TOKENS). */
int daop_max_tokens(int isa, long D, long K) { return takes_amx(isa, AMX_MAX_TOKENS, D, K) ? AMX_MAX_TOKENS : MAX_TOKENS; }

/* The float32 scratch a job needs. */
long daop_scratch_floats(int isa, int n, long D, long K) {
    if (takes_amx(isa, n, D, K)) return (long)n * (2 * K + D) + 8L * ((n + 15) / 16) * (D + K);
    return (long)n * (D + 3 * K);
}

/* The vector paths' expert (1-MAX_TOKENS tokens) for either weight format: bf16 weights (scales
   NULL), or int8 codes with one bf16 scale per output row (gate_up_s [2I], down_s [D]), each product's
   float32 sum times its row's scale, rounded to bf16 where torch's int8 weight-only product rounds. */
static void expert_vector(int fmt, const uint16_t *x, int n, const void *gate_up, const uint16_t *gate_up_s,
                          const void *down, const uint16_t *down_s, uint16_t *y, long D, long I, long K, int threads,
                          int isa, float *scratch) {
    if (VECTOR_LEVEL < 0) VECTOR_LEVEL = vector_level();
    if (isa > VECTOR_LEVEL) isa = VECTOR_LEVEL;
    const void *up = (const char *)gate_up + I * D * (fmt == FMT_INT8 ? 1 : 2);
    float *xf = scratch, *h = xf + n * D, *a = h + n * 2 * K, *yf = xf; /* yf reuses xf once it is read */
    for (long i = 0; i < n * D; i++) xf[i] = bf16_to_f32(x[i]);
    long next_gate = 0, next_up = 0, next_down = 0; /* the next chunk of rows to take, shared by the team */
#pragma omp parallel num_threads(threads)
    {
        int id = omp_get_thread_num(), count = omp_get_num_threads();
        long r0, r1;
        take_rows(isa, fmt, gate_up, D, D, K, &next_gate, xf, n, h, 2 * K);
        take_rows(isa, fmt, up, D, D, K, &next_up, xf, n, h + K, 2 * K);
#pragma omp barrier
        share(K, id, count, &r0, &r1);
        for (int t = 0; t < n; t++)
            for (long i = r0; i < r1; i++) { /* rounded to bf16 where torch's bf16 products round */
                float g = h[t * 2 * K + i], u = h[t * 2 * K + K + i];
                if (gate_up_s) g *= bf16_to_f32(gate_up_s[i]), u *= bf16_to_f32(gate_up_s[I + i]);
                g = round_bf16(g), u = round_bf16(u);
                a[t * K + i] = round_bf16(round_bf16(g / (1.f + expf(-g))) * u);
            }
#pragma omp barrier
        take_rows(isa, fmt, down, K, I, D, &next_down, a, n, yf, D);
#pragma omp barrier
        share(n * D, id, count, &r0, &r1);
        for (long i = r0; i < r1; i++) y[i] = f32_to_bf16(down_s ? yf[i] * bf16_to_f32(down_s[i % D]) : yf[i]);
    }
}

/* x [n, D] bf16 -> y [n, D] bf16 over the first K of the expert's I intermediate rows (K = I: the whole
   expert; K < I: the CPU's part of an expert split with the GPU, which computes rows K..I and adds its
   output): gate rows [0, K) and up rows [I, I + K) of gate_up, columns [0, K) of down. scratch holds
   daop_scratch_floats(isa, n, D, K) floats. isa: daop_cpu_isa() or lower. Returns 0, or -1 when n or K
   is out of range (more than daop_max_tokens). */
int daop_expert_bf16(const uint16_t *x, int n, const uint16_t *gate_up, const uint16_t *down, uint16_t *y,
                     long D, long I, long K, int threads, int isa, float *scratch) {
    if (n < 1 || K < 1 || K > I) return -1;
#ifdef DAOP_AMX
    if (takes_amx(isa, n, D, K)) {
        expert_amx(x, n, gate_up, down, y, D, I, K, threads, scratch);
        return 0;
    }
#endif
    if (n > MAX_TOKENS) return -1;
    expert_vector(FMT_BF16, x, n, gate_up, NULL, down, NULL, y, D, I, K, threads, isa, scratch);
    return 0;
}

/* The whole int8 expert (codes gate_up [2I, D], down [D, I], bf16 scales gate_up_s [2I], down_s [D],
   w = code * scale) for x [n, D] bf16, 1-MAX_TOKENS tokens, on the vector paths (isa capped at 2).
   scratch holds daop_scratch_floats(2, n, D, I) floats. Returns 0, or -1 when n is out of range. */
int daop_expert_int8(const uint16_t *x, int n, const int8_t *gate_up, const uint16_t *gate_up_s, const int8_t *down,
                     const uint16_t *down_s, uint16_t *y, long D, long I, int threads, int isa, float *scratch) {
    if (n < 1 || n > MAX_TOKENS || I < 1) return -1;
    expert_vector(FMT_INT8, x, n, gate_up, gate_up_s, down, down_s, y, D, I, I, threads, isa > 2 ? 2 : isa, scratch);
    return 0;
}

/* A queue of expert jobs served by one thread of this library (its own OpenMP team), so the
   CPU channel never waits for Python's GIL: the driving thread submits jobs and, later, waits for a
   ticket, both without the GIL (ctypes releases it). Jobs run in submission order; each records
   when it started and ended (CLOCK_MONOTONIC seconds, the clock of Python's perf_counter). */
typedef struct {
    const uint16_t *x; int n; const uint16_t *gate_up, *down; uint16_t *y;
    long D, I, K; int threads, isa; float *scratch;
    int rc; double start, end;
    /* A gated job (gate not NULL) starts once (int32)(*gate - gate_value) >= 0: a flag in pinned host
       memory that a GPU stream writes once x (and *pick) are there, so the job needs no host thread
       between the GPU's routing and the CPU's start. It polls; past GATE_TIMEOUT_S it gives up (rc -2).
       A pick (pick not NULL) computes expert e = *pick, read once the gate is open, with the weights
       gate_ups[e], downs[e] (addresses; 0: the expert is served elsewhere, the job writes nothing and
       sets served 0); gate_up and down are then unused. rc -3: e outside [0, experts). */
    const uint32_t *gate; uint32_t gate_value;
    const int32_t *pick; const uint64_t *gate_ups, *downs; int experts, served;
    /* int8 (not a pick job): gate_up and down hold int8 codes, with these bf16 scales per output row
       (daop_expert_int8; K = I); NULL: bf16 weights */
    const uint16_t *gate_up_s, *down_s;
} daop_job;

#define GATE_TIMEOUT_S 60.0

#define QUEUE 256
static daop_job *queue[QUEUE];
static long submitted = 0, finished = 0;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER, done = PTHREAD_COND_INITIALIZER;
static int started = 0, registered = 0;
/* Where the serving thread also publishes `finished` (low 32 bits) after each job, for a GPU stream
   that waits on it (pinned host memory; daop_set_flag). The job's output is written before. */
static uint32_t *done_flag = NULL;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A forked child has no serving thread: it starts its own on its first submit. */
static void child_reset(void) {
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&work, NULL);
    pthread_cond_init(&done, NULL);
    submitted = finished = 0;
    started = 0;
    done_flag = NULL;
}

/* How long the serving thread polls for the next job before it sleeps (ns; 0: it sleeps at once).
   A sleeping thread must be woken by the submit (a futex wake, then the core leaving its idle
   state), which delays the job's start; polling keeps one core busy for up to this long after
   each job. Set with daop_set_spin_us. */
static long spin_ns = 0;

static inline void relax(void) {
#ifdef DAOP_X86
    _mm_pause();
#endif
}

/* Poll a gated job's flag until it opens (1) or GATE_TIMEOUT_S passes (0). */
static int gate_open(const daop_job *job) {
    double until = 0.0;
    for (long i = 0;; i++) {
        uint32_t v = __atomic_load_n(job->gate, __ATOMIC_ACQUIRE);
        if ((int32_t)(v - job->gate_value) >= 0) return 1;
        if ((i & 1023) == 0) {
            double t = now_s();
            if (until == 0.0) until = t + GATE_TIMEOUT_S;
            else if (t > until) return 0;
        }
        relax();
    }
}

static int run_job(daop_job *job) {
    int open = !job->gate || gate_open(job);
    job->start = now_s();
    if (!open) return -2;
    const uint16_t *gate_up = job->gate_up, *down = job->down;
    if (job->pick) {
        int32_t e = __atomic_load_n(job->pick, __ATOMIC_ACQUIRE);
        job->served = 0;
        if (e < 0 || e >= job->experts) return -3;
        if (!job->gate_ups[e] || !job->downs[e]) return 0;
        gate_up = (const uint16_t *)(uintptr_t)job->gate_ups[e];
        down = (const uint16_t *)(uintptr_t)job->downs[e];
        job->served = 1;
    }
    if (job->gate_up_s && !job->pick)
        return daop_expert_int8(job->x, job->n, (const int8_t *)(const void *)gate_up, job->gate_up_s,
                                (const int8_t *)(const void *)down, job->down_s, job->y, job->D, job->I, job->threads,
                                job->isa, job->scratch);
    return daop_expert_bf16(job->x, job->n, gate_up, down, job->y, job->D, job->I, job->K, job->threads, job->isa,
                            job->scratch);
}

static void *serve(void *arg) {
    (void)arg;
    for (;;) {
        long spin = __atomic_load_n(&spin_ns, __ATOMIC_RELAXED);
        if (spin > 0) {  /* `submitted` changes under `mu`; polled here, then read again under it */
            double until = now_s() + spin * 1e-9;
            while (__atomic_load_n(&submitted, __ATOMIC_ACQUIRE) == __atomic_load_n(&finished, __ATOMIC_RELAXED)
                   && now_s() < until)
                relax();
        }
        pthread_mutex_lock(&mu);
        while (finished == submitted) pthread_cond_wait(&work, &mu);
        daop_job *job = queue[finished % QUEUE];
        pthread_mutex_unlock(&mu);
        job->rc = run_job(job);
        job->end = now_s();
        pthread_mutex_lock(&mu);
        __atomic_store_n(&finished, finished + 1, __ATOMIC_RELEASE);
        if (done_flag) __atomic_store_n(done_flag, (uint32_t)finished, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&done);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

/* Queue `count` jobs (the caller keeps them and their buffers alive until they are done); returns
   the ticket of the last one, or -1 if the serving thread could not be started. */
long daop_submit(daop_job **jobs, int count) {
    pthread_mutex_lock(&mu);
    if (!started) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, serve, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) { pthread_mutex_unlock(&mu); return -1; }
        if (!registered) registered = (pthread_atfork(NULL, NULL, child_reset) == 0);
        started = 1;
    }
    for (int i = 0; i < count; i++) {
        while (submitted - finished >= QUEUE) pthread_cond_wait(&done, &mu);
        queue[submitted % QUEUE] = jobs[i];
        __atomic_store_n(&submitted, submitted + 1, __ATOMIC_RELEASE);
    }
    long ticket = submitted;
    pthread_cond_signal(&work);
    pthread_mutex_unlock(&mu);
    return ticket;
}

/* Block until the job with this ticket (and every earlier one) is done. */
void daop_wait(long ticket) {
    pthread_mutex_lock(&mu);
    while (finished < ticket) pthread_cond_wait(&done, &mu);
    pthread_mutex_unlock(&mu);
}

/* Publish the count of finished jobs at `flag` from now on (NULL: stop); returns that count now. */
long daop_set_flag(uint32_t *flag) {
    pthread_mutex_lock(&mu);
    done_flag = flag;
    if (flag) __atomic_store_n(flag, (uint32_t)finished, __ATOMIC_RELEASE);
    long f = finished;
    pthread_mutex_unlock(&mu);
    return f;
}

/* The serving thread's polling time before it sleeps, in microseconds (0: none; see spin_ns). */
void daop_set_spin_us(long us) {
    __atomic_store_n(&spin_ns, us > 0 ? us * 1000 : 0, __ATOMIC_RELAXED);
}

long daop_spin_us(void) { return __atomic_load_n(&spin_ns, __ATOMIC_RELAXED) / 1000; }

long daop_finished(void) {
    pthread_mutex_lock(&mu);
    long f = finished;
    pthread_mutex_unlock(&mu);
    return f;
}
