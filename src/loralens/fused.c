/* One pass over a rank-major LoRA factor: its Gram X X^T and, optionally, its projection P X^T.
 *
 * X_b is an (r x K) block of rows of length K (U^T or V^T of one LoRA layer), P an (h x K)
 * matrix (GL-net's Phi or Psi). Every output is a dot product of a row of X with a row of
 * [X; P], so both come from the same read of X: BLAS needs two passes and packs the skinny
 * operands, about 2x the memory traffic at r = 4 (benchmarks/skinny_gemm.py).
 *
 * Written with GCC/Clang vector extensions (no intrinsics), so it builds on any target those
 * compilers know; loralens compiles it with -O3 -march=native on first use.
 */
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
#define LOAD8(p) (*(const v8u *)(p))

/* out[j * ld + m] += lanes of sum_k x_j[k] a_m[k] over k < n (a multiple of 8), for JB rows of
 * x and MB rows of a. JB * MB independent accumulators keep the FMA units busy; the empty asm
 * pins each loaded vector in a register, so it is loaded once and used MB (or JB) times. */
#define MICRO(JB, MB)                                                                          \
    static void micro_##JB##_##MB(const float *const *x, const float *const *a, int64_t n,    \
                                  v8 *out, int64_t ld)                                        \
    {                                                                                          \
        v8 acc[JB][MB];                                                                        \
        const float *xp[JB], *ap[MB];                                                          \
        for (int j = 0; j < JB; j++) xp[j] = x[j];                                             \
        for (int m = 0; m < MB; m++) ap[m] = a[m];                                             \
        for (int j = 0; j < JB; j++)                                                           \
            for (int m = 0; m < MB; m++) acc[j][m] = (v8){0};                                  \
        for (int64_t k = 0; k < n; k += 8) {                                                   \
            v8 av[MB];                                                                         \
            for (int m = 0; m < MB; m++) {                                                     \
                av[m] = LOAD8(ap[m] + k);                                                      \
                __asm__("" : "+x"(av[m]));                                                     \
            }                                                                                  \
            for (int j = 0; j < JB; j++) {                                                     \
                v8 xv = LOAD8(xp[j] + k);                                                      \
                __asm__("" : "+x"(xv));                                                        \
                for (int m = 0; m < MB; m++) acc[j][m] += xv * av[m];                          \
            }                                                                                  \
        }                                                                                      \
        for (int j = 0; j < JB; j++)                                                           \
            for (int m = 0; m < MB; m++) out[j * ld + m] += acc[j][m];                         \
    }

MICRO(4, 3) MICRO(4, 2) MICRO(4, 1)
MICRO(2, 3) MICRO(2, 2) MICRO(2, 1)
MICRO(1, 3) MICRO(1, 2) MICRO(1, 1)

typedef void (*micro_fn)(const float *const *, const float *const *, int64_t, v8 *, int64_t);
static const micro_fn MICROS[3][3] = {
    {micro_1_1, micro_1_2, micro_1_3},
    {micro_2_1, micro_2_2, micro_2_3},
    {micro_4_1, micro_4_2, micro_4_3},
};

/* Columns per pass: a tile's rows (2 KiB each) stay in L1 while the next tiles reread them. */
#define CHUNK 512

/* One block of work: for b < B, gram[b] (r x r, float64, at gram + b * gram_sb, row stride
 * gram_ld) = X_b X_b^T and, when p is not NULL, proj[b] (h x r, float32, contiguous) = P X_b^T,
 * with X_b the r rows of length K at x + b * sb (row stride K) and P (h x K) contiguous.
 * Lanes accumulate in float32 (like BLAS), the final sums in float64. Every field is 8 bytes,
 * so callers fill an int64 array of 11 columns. */
typedef struct {
    const float *x;
    int64_t B, r, K, sb;
    const float *p;
    int64_t h;
    double *gram;
    int64_t gram_sb, gram_ld;
    float *proj;
} loralens_job;

static void run_job(const loralens_job *job)
{
    const int64_t r = job->r, K = job->K, h = job->p ? job->h : 0;
    const int64_t na = r + h, n8 = K / 8 * 8;
    v8 out[r * na];
    const float *xr[r], *ar[na];
    for (int64_t b = 0; b < job->B; b++) {
        const float *xb = job->x + b * job->sb;
        memset(out, 0, sizeof out);
        for (int64_t k0 = 0; k0 < n8; k0 += CHUNK) {
            const int64_t n = n8 - k0 < CHUNK ? n8 - k0 : CHUNK;
            for (int64_t j = 0; j < r; j++) xr[j] = ar[j] = xb + j * K + k0;
            for (int64_t m = r; m < na; m++) ar[m] = job->p + (m - r) * K + k0;
            for (int64_t j = 0; j < r;) {
                const int64_t jb = r - j >= 4 ? 4 : r - j >= 2 ? 2 : 1;
                for (int64_t m = 0; m < na;) {
                    const int64_t mb = na - m >= 3 ? 3 : na - m;
                    MICROS[jb == 4 ? 2 : jb - 1][mb - 1](xr + j, ar + m, n, out + j * na + m, na);
                    m += mb;
                }
                j += jb;
            }
        }
        double *gram = job->gram + b * job->gram_sb;
        float *proj = job->proj + b * h * r;
        for (int64_t j = 0; j < r; j++)
            for (int64_t m = 0; m < na; m++) {
                const float *am = m < r ? xb + m * K : job->p + (m - r) * K;
                double s = 0;
                for (int l = 0; l < 8; l++) s += out[j * na + m][l];
                for (int64_t k = n8; k < K; k++) s += (double)xb[j * K + k] * am[k];
                if (m < r)
                    gram[j * job->gram_ld + m] = s;
                else
                    proj[(m - r) * r + j] = (float)s;
            }
    }
}

void loralens_gram_project(const loralens_job *jobs, int64_t n)
{
    for (int64_t i = 0; i < n; i++) run_job(jobs + i);
}
