// Sparse y = x W^T + b kernels for graphopt (plain extern "C", no torch headers: builds in ~2 s).
//
// Formats (W is N x K, x is B x K row-major, y is B x N row-major):
//   block Rx1 (R = 8 or 16): output rows in groups of R; per group the columns where any of its R rows is nonzero;
//                            vals[p*R + r] = W[g*R + r, col[p]] (rows past N are zero padding).
//   1x4:                     per output row, runs of 4 consecutive inputs starting at col[p]; vals[p*4 + j].
//   CSR:                     per output row its nonzero columns col[p] and values vals[p].
// Index arrays are int16 (K <= 32767, half the bytes) or int32. Batch 1 runs a GEMV; batch > 1 runs an SpMM over
// x transposed to K x BP (BP = batch padded to 8, done by the caller) so that one weight value meets a whole vector
// of batch entries. The same source is compiled once per ISA level (AVX-512, AVX2, generic); GCC vector extensions
// become zmm/ymm code under the flags of each build and gathers use intrinsics where the ISA has them.
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

static inline v8 ld8(const float* p) { return *(const v8u*)p; }
static inline v16 ld16(const float* p) { return *(const v16u*)p; }
static inline void st8(float* p, v8 v) { *(v8u*)p = v; }
static inline float hsum8(v8 v) { float s = 0; for (int i = 0; i < 8; ++i) s += v[i]; return s; }
static inline float hsum16(v16 v) { float s = 0; for (int i = 0; i < 16; ++i) s += v[i]; return s; }

template <int R> struct Vec;  // the vector type holding one R-row column of a block
template <> struct Vec<8> { typedef v8 type; typedef v8u unaligned; };
template <> struct Vec<16> { typedef v16 type; typedef v16u unaligned; };

#define PARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")

// ---------------------------------------------------------------- block Rx1
template <int R, typename I>
static void block_gemv(const float* x, const float* vals, const I* cols, const int32_t* ptr, const float* bias,
                       float* y, int64_t N, int threads) {
    const int64_t groups = (N + R - 1) / R;
    PARALLEL_FOR
    for (int64_t g = 0; g < groups; ++g) {
        typedef typename Vec<R>::type vr;
        typedef typename Vec<R>::unaligned vru;
        vr a0 = {}, a1 = {};
        int32_t p = ptr[g], end = ptr[g + 1];
        for (; p + 1 < end; p += 2) {  // two chains hide the FMA latency
            a0 += *(const vru*)(vals + (int64_t)p * R) * x[cols[p]];
            a1 += *(const vru*)(vals + (int64_t)(p + 1) * R) * x[cols[p + 1]];
        }
        if (p < end) a0 += *(const vru*)(vals + (int64_t)p * R) * x[cols[p]];
        a0 += a1;
        const int64_t r0 = g * R, rows = N - r0 < R ? N - r0 : R;
        for (int r = 0; r < rows; ++r) y[r0 + r] = a0[r] + (bias ? bias[r0 + r] : 0.f);
    }
}

// xT: K x BP, yT: N x BP (BP a multiple of 8). Per group: R rows x (V x 8) batch entries of accumulators; V is a
// template constant so a batch of 8 does not pay for a second, all-zero vector.
template <int R, int V, typename I>
static inline void block_spmm_tile(const float* xT, const float* vals, const I* cols, int32_t begin, int32_t end,
                                   const float* bias, float* yT, int64_t r0, int64_t rows, int64_t BP, int64_t b) {
    v8 acc[R][V];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = v8{};
    for (int32_t p = begin; p < end; ++p) {
        const float* xr = xT + (int64_t)cols[p] * BP + b;
        v8 xv[V];
        for (int v = 0; v < V; ++v) xv[v] = ld8(xr + 8 * v);
        const float* w = vals + (int64_t)p * R;
        for (int r = 0; r < R; ++r)
            for (int v = 0; v < V; ++v) acc[r][v] += w[r] * xv[v];
    }
    for (int r = 0; r < rows; ++r) {
        const float bv = bias ? bias[r0 + r] : 0.f;
        for (int v = 0; v < V; ++v) st8(yT + (r0 + r) * BP + b + 8 * v, acc[r][v] + bv);
    }
}

template <int R, typename I>
static void block_spmm(const float* xT, const float* vals, const I* cols, const int32_t* ptr, const float* bias,
                       float* yT, int64_t N, int64_t BP, int threads) {
    const int64_t groups = (N + R - 1) / R;
    PARALLEL_FOR
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t r0 = g * R, rows = N - r0 < R ? N - r0 : R;
        int64_t b = 0;
        const int32_t begin = ptr[g], end = ptr[g + 1];
        for (; b + 16 <= BP; b += 16) block_spmm_tile<R, 2, I>(xT, vals, cols, begin, end, bias, yT, r0, rows, BP, b);
        if (b < BP) block_spmm_tile<R, 1, I>(xT, vals, cols, begin, end, bias, yT, r0, rows, BP, b);
    }
}

// ---------------------------------------------------------------- 1x4
template <typename I>
static void b14_gemv(const float* x, const float* vals, const I* cols, const int32_t* ptr, const float* bias,
                     float* y, int64_t N, int threads) {
    PARALLEL_FOR
    for (int64_t n = 0; n < N; ++n) {
        int32_t p = ptr[n], end = ptr[n + 1];
        float s = 0.f;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (; p + 3 < end; p += 4) {  // four 4-wide runs fill one zmm
            __m512 xv = _mm512_castps128_ps512(_mm_loadu_ps(x + cols[p]));
            xv = _mm512_insertf32x4(xv, _mm_loadu_ps(x + cols[p + 1]), 1);
            xv = _mm512_insertf32x4(xv, _mm_loadu_ps(x + cols[p + 2]), 2);
            xv = _mm512_insertf32x4(xv, _mm_loadu_ps(x + cols[p + 3]), 3);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(vals + (int64_t)p * 4), xv, acc);
        }
        s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
        __m256 acc = _mm256_setzero_ps();
        for (; p + 1 < end; p += 2) {
            __m256 xv = _mm256_loadu2_m128(x + cols[p + 1], x + cols[p]);
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(vals + (int64_t)p * 4), xv, acc);
        }
        s = hsum8((v8)acc);
#endif
        for (; p < end; ++p)
            for (int j = 0; j < 4; ++j) s += vals[(int64_t)p * 4 + j] * x[cols[p] + j];
        y[n] = s + (bias ? bias[n] : 0.f);
    }
}

template <typename I>
static void b14_spmm(const float* xT, const float* vals, const I* cols, const int32_t* ptr, const float* bias,
                     float* yT, int64_t N, int64_t BP, int threads) {
    PARALLEL_FOR
    for (int64_t n = 0; n < N; ++n) {
        const float bv = bias ? bias[n] : 0.f;
        for (int64_t b = 0; b < BP; b += 8) {
            v8 a0 = {}, a1 = {};
            for (int32_t p = ptr[n]; p < ptr[n + 1]; ++p) {
                const float* xr = xT + (int64_t)cols[p] * BP + b;
                const float* w = vals + (int64_t)p * 4;
                a0 += w[0] * ld8(xr) + w[2] * ld8(xr + 2 * BP);
                a1 += w[1] * ld8(xr + BP) + w[3] * ld8(xr + 3 * BP);
            }
            st8(yT + n * BP + b, a0 + a1 + bv);
        }
    }
}

// ---------------------------------------------------------------- CSR
template <typename I>
static void csr_gemv(const float* x, const float* vals, const I* cols, const int32_t* ptr, const float* bias,
                     float* y, int64_t N, int threads) {
    PARALLEL_FOR
    for (int64_t n = 0; n < N; ++n) {
        int32_t p = ptr[n], end = ptr[n + 1];
        float s = 0.f;
#if defined(__AVX512F__)
        __m512 acc = _mm512_setzero_ps();
        for (; p + 15 < end; p += 16) {
            __m512i idx = sizeof(I) == 2 ? _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)(cols + p)))
                                         : _mm512_loadu_si512((const void*)(cols + p));
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(vals + p), _mm512_i32gather_ps(idx, x, 4), acc);
        }
        s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
        __m256 acc = _mm256_setzero_ps();
        for (; p + 7 < end; p += 8) {
            __m256i idx = sizeof(I) == 2 ? _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)(cols + p)))
                                         : _mm256_loadu_si256((const __m256i*)(cols + p));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(vals + p), _mm256_i32gather_ps(x, idx, 4), acc);
        }
        s = hsum8((v8)acc);
#endif
        for (; p < end; ++p) s += vals[p] * x[cols[p]];
        y[n] = s + (bias ? bias[n] : 0.f);
    }
}

template <int V, typename I>
static inline void csr_spmm_tile(const float* xT, const float* vals, const I* cols, int32_t begin, int32_t end,
                                 float bv, float* yrow, int64_t BP, int64_t b) {
    v8 acc[V];
    for (int v = 0; v < V; ++v) acc[v] = v8{};
    for (int32_t p = begin; p < end; ++p) {
        const float* xr = xT + (int64_t)cols[p] * BP + b;
        for (int v = 0; v < V; ++v) acc[v] += vals[p] * ld8(xr + 8 * v);
    }
    for (int v = 0; v < V; ++v) st8(yrow + b + 8 * v, acc[v] + bv);
}

template <typename I>
static void csr_spmm(const float* xT, const float* vals, const I* cols, const int32_t* ptr, const float* bias,
                     float* yT, int64_t N, int64_t BP, int threads) {
    PARALLEL_FOR
    for (int64_t n = 0; n < N; ++n) {
        const float bv = bias ? bias[n] : 0.f;
        int64_t b = 0;
        for (; b + 32 <= BP; b += 32) csr_spmm_tile<4, I>(xT, vals, cols, ptr[n], ptr[n + 1], bv, yT + n * BP, BP, b);
        for (; b + 8 <= BP; b += 8) csr_spmm_tile<1, I>(xT, vals, cols, ptr[n], ptr[n + 1], bv, yT + n * BP, BP, b);
    }
}

// ---------------------------------------------------------------- dynamic (activation) sparsity, batch 1
// wT: K x N (W transposed, dense). Skips every input k with x[k] == 0: the work is (nonzero inputs) x N.
static void act_sparse_gemv(const float* x, const float* wT, const float* bias, float* y, int64_t K, int64_t N,
                            int32_t* nz_scratch, int threads) {
    int64_t nnz = 0;
    for (int64_t k = 0; k < K; ++k)
        if (x[k] != 0.f) nz_scratch[nnz++] = (int32_t)k;
    const int64_t tiles = (N + 63) / 64;
    PARALLEL_FOR
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * 64;
        if (n0 + 64 <= N) {  // 64 outputs stay in four vector registers across all nonzero inputs
            v16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
            for (int64_t i = 0; i < nnz; ++i) {
                const float xv = x[nz_scratch[i]];
                const float* w = wT + (int64_t)nz_scratch[i] * N + n0;
                a0 += xv * ld16(w); a1 += xv * ld16(w + 16); a2 += xv * ld16(w + 32); a3 += xv * ld16(w + 48);
            }
            v16 acc[4] = {a0, a1, a2, a3};
            for (int j = 0; j < 64; ++j) y[n0 + j] = acc[j / 16][j % 16] + (bias ? bias[n0 + j] : 0.f);
        } else {
            for (int64_t n = n0; n < N; ++n) {
                float s = 0.f;
                for (int64_t i = 0; i < nnz; ++i) s += x[nz_scratch[i]] * wT[(int64_t)nz_scratch[i] * N + n];
                y[n] = s + (bias ? bias[n] : 0.f);
            }
        }
    }
}

// ---------------------------------------------------------------- C entry points
// fmt: 0 = 8x1, 1 = 16x1, 2 = 1x4, 3 = CSR. idx_bytes: 2 or 4. B == 1 -> GEMV on x/y; else SpMM on xT/yT (BP wide).
template <typename I>
static int dispatch(int fmt, const float* x, const float* vals, const I* cols, const int32_t* ptr,
                    const float* bias, float* y, int64_t N, int64_t BP, int threads) {
    const bool gemv = BP == 0;
    switch (fmt) {
        case 0: gemv ? block_gemv<8, I>(x, vals, cols, ptr, bias, y, N, threads)
                     : block_spmm<8, I>(x, vals, cols, ptr, bias, y, N, BP, threads); return 0;
        case 1: gemv ? block_gemv<16, I>(x, vals, cols, ptr, bias, y, N, threads)
                     : block_spmm<16, I>(x, vals, cols, ptr, bias, y, N, BP, threads); return 0;
        case 2: gemv ? b14_gemv<I>(x, vals, cols, ptr, bias, y, N, threads)
                     : b14_spmm<I>(x, vals, cols, ptr, bias, y, N, BP, threads); return 0;
        case 3: gemv ? csr_gemv<I>(x, vals, cols, ptr, bias, y, N, threads)
                     : csr_spmm<I>(x, vals, cols, ptr, bias, y, N, BP, threads); return 0;
    }
    return 1;
}

extern "C" {
// BP == 0: batch-1 GEMV (x: K, y: N). BP > 0: x is xT (K x BP), y is yT (N x BP), BP % 8 == 0. Returns 0 on success.
int graphopt_sparse_linear(int fmt, int idx_bytes, const float* x, const float* vals, const void* cols,
                           const int32_t* ptr, const float* bias, float* y, int64_t N, int64_t BP, int threads) {
    if (BP % 8) return 2;
    if (idx_bytes == 2) return dispatch<int16_t>(fmt, x, vals, (const int16_t*)cols, ptr, bias, y, N, BP, threads);
    if (idx_bytes == 4) return dispatch<int32_t>(fmt, x, vals, (const int32_t*)cols, ptr, bias, y, N, BP, threads);
    return 3;
}

int graphopt_act_sparse_gemv(const float* x, const float* wT, const float* bias, float* y, int64_t K, int64_t N,
                             int32_t* scratch, int threads) {
    act_sparse_gemv(x, wT, bias, y, K, N, scratch, threads);
    return 0;
}

// Which ISA this build was compiled for (2 = AVX-512, 1 = AVX2, 0 = generic): lets Python check what it loaded.
int graphopt_isa_level(void) {
#if defined(__AVX512F__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
}
