// Shared by quant_linear.cpp (activation codes, AVX-512 VNNI / AVX2 / generic kernels, the entry points) and
// quant_amx.cpp (the AMX tile path for batches): vector types, the problem description, the float epilogue.
#pragma once
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef float v16fu __attribute__((vector_size(64), aligned(4)));
typedef uint32_t v16uu __attribute__((vector_size(64), aligned(4)));
typedef uint8_t v16b __attribute__((vector_size(16), aligned(1)));

#define QPARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1)")
#define INLINE static inline __attribute__((always_inline))
// Software prefetch of the weight stream, this many bytes ahead into L2: measured on 4096 x 4096 GEMVs from DRAM,
// hardware prefetch alone left ~10% of the bandwidth unused, L1 (T0) hints or shorter distances gained less.
// -DQPF=... / -DQHINT=... override them for tuning.
#ifndef QPF
#define QPF 4096
#endif
#ifndef QHINT
#define QHINT _MM_HINT_T1
#endif
static const int64_t kPrefetch = QPF;

// a * b + c in one rounding where the ISA has FMA (-std=c++17 turns GCC's implicit contraction off)
INLINE v16f fmadd(v16f a, v16f b, v16f c) {
#if defined(__AVX512F__)
    return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
    union H { v16f v; __m256 h[2]; } x{a}, y{b}, z{c}, r;
    r.h[0] = _mm256_fmadd_ps(x.h[0], y.h[0], z.h[0]);
    r.h[1] = _mm256_fmadd_ps(x.h[1], y.h[1], z.h[1]);
    return r.v;
#else
    return a * b + c;
#endif
}

INLINE int32_t load4(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }

// ---------------------------------------------------------------- one call's operands
struct Problem {
    int64_t M, K, N, Kp, group, A;                 // A: act_group (0 = float compute)
    const uint8_t* qw; const float* sc; const uint8_t* zp; const float* bias; float* y;
    const int8_t* xq; const float* xs; const int32_t* xsum;  // int8 compute: codes (M x Kp), per block scale, sum
    const float* xf; int64_t xf_stride;                        // float compute: x rows, >= Kp valid (zero padded)
};

INLINE v16i zero_points(const Problem& p, int64_t t, int64_t g, int bits, bool asym, int32_t shift) {
    if (!asym) return (v16i){} + ((1 << (bits - 1)) - shift);
    return __builtin_convertvector(*(const v16b*)(p.zp + (t * (p.Kp / p.group) + g) * 16), v16i) - shift;
}

// y rows r0..r0+rows-1 of tile t (+ bias), only the lanes that are real output rows
INLINE void store_rows(const Problem& p, int64_t t, int64_t r0, int rows, const v16f* acc) {
    const int64_t n0 = t * 16, valid = p.N - n0 < 16 ? p.N - n0 : 16;
    v16f bv = {};
    if (p.bias) for (int l = 0; l < valid; ++l) bv[l] = p.bias[n0 + l];
    for (int r = 0; r < rows; ++r) {
        float* yr = p.y + (r0 + r) * p.N + n0;
        const v16f o = acc[r] + bv;
        if (valid == 16) *(v16fu*)yr = o;
        else for (int l = 0; l < valid; ++l) yr[l] = o[l];
    }
}

// AMX (quant_amx.cpp; only in AVX-512 VNNI builds with a compiler that knows AMX): whether the CPU and the OS
// allow it and it is switched on, and the int8-compute GEMM over all tiles for act_group % 32 == 0.
#if defined(__AVX512VNNI__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define QUANT_HAVE_AMX 1
bool quant_amx_ready();
int quant_amx_switch(int on);
void quant_amx_run(const Problem& p, int bits, bool asym, int threads);
#else
#define QUANT_HAVE_AMX 0
#endif
