// Weight-only int4/int8 y = x W^T + b kernels behind graphopt::quant_linear (plain extern "C", no torch headers).
//
// W[n, k] = s[n, g] * (q[n, k] - z[n, g]) in the packed layout of kernels/quant_format.py: rows in tiles of 16,
// per tile a stream of 64-byte chunks. int8: chunk u holds q[16t + l, 4u + j] at byte 4l + j; int4: the low nibble
// of byte 4l + j is q[16t + l, 8u + j], the high nibble q[16t + l, 8u + 4 + j]. Seen as 16 int32 lanes, one lane is
// one output row, so every kernel here vectorizes over the 16 rows of a tile and never reduces horizontally.
// A "slab" is 16 rows x 4 inputs of u8 codes (an int8 chunk, or one nibble half of an int4 chunk): slab i of a
// block always meets activation bytes 4i..4i+3, for both widths.
//
// Two arithmetics, both exact up to float32 rounding against quant_ops.reference_quant_linear:
//   int8 compute (act_group A > 0): rows of x quantized per block of A inputs (quantize_rows), exact int32 dot
//     products per block (vpdpbusd on AVX-512 VNNI, vpmaddubsw + vpmaddwd on AVX2, plain C otherwise), the zero
//     point removed in integers (sum (q - z) x = sum q x - z sum x), then y += (s * xs[b]) * dot once per block.
//   float compute (A == 0): y = sum_g s * sum_k (q - z) x, codes widened to float per input (GCC vector types,
//     zmm under AVX-512, ymm pairs under AVX2).
// Batch rows are handled MB at a time (MB in 8/4/2/1): a weight slab is loaded and unpacked once for MB rows, so
// batch 16 is bound by the multiply-adds, not by unpacking; the tile's weights stay in L2 between row groups.
// Where the CPU and OS have AMX, int8 compute of batches runs on tiles instead (quant_amx.cpp).
#include <math.h>
#include <stdlib.h>

#include "quant_linear.h"

// ---------------------------------------------------------------- activation codes
// Per row and block of A inputs: xs = amax / 127, codes round(x * ((1 / amax) * 127)) in [-127, 127] (zero past K),
// and the sum of the codes (for the zero-point term). The float operations are those of
// quant_ops.quantize_activations exactly: torch evaluates 127.0 / amax as reciprocal(amax) * 127, and
// nearbyintf under the default rounding mode is torch.round's round-half-to-even, so the codes are identical.
static void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t A, int8_t* xq, float* xs,
                          int32_t* xsum) {
    const int64_t nb = Kp / A;
    for (int64_t r = 0; r < M; ++r) {
        const float* xr = x + r * K;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t lo = b * A, hi = lo + A < K ? lo + A : K;
            float amax = 0.f;
            bool nan = false;  // comparisons skip NaN: a block holding one gets the scale NaN, as torch's amax does
            int64_t k = lo;
            if (hi - lo >= 16) {  // a vector max (the scalar loop's dependency chain cost ~1 us per 4096 inputs)
                v16f m = {};
                v16i bad = {};
                for (; k + 16 <= hi; k += 16) {
                    v16f v = *(const v16fu*)(xr + k);
                    bad |= v != v;
                    v = v < 0 ? -v : v;
                    m = v > m ? v : m;
                }
                for (int l = 0; l < 16; ++l) amax = m[l] > amax ? m[l] : amax, nan |= bad[l] != 0;
            }
            for (; k < hi; ++k) amax = fabsf(xr[k]) > amax ? fabsf(xr[k]) : amax, nan |= xr[k] != xr[k];
            const float inv = amax > 0.f ? (1.0f / amax) * 127.0f : 0.0f;
            xs[r * nb + b] = nan ? NAN : amax / 127.0f;
            int32_t total = 0;
            int8_t* q = xq + r * Kp;
            for (k = lo; k < hi; ++k) {
                float c = nearbyintf(xr[k] * inv);
                c = c < -127.f ? -127.f : (c > 127.f ? 127.f : (c == c ? c : 0.f));
                q[k] = (int8_t)c;
                total += (int32_t)c;
            }
            for (; k < lo + A; ++k) q[k] = 0;
            xsum[r * nb + b] = total;
        }
    }
}

// ---------------------------------------------------------------- integer block dot products
// Each ISA struct provides block<BITS, MB>(w, S, xq, xstride, out): out[r] = sum over the block's S slabs (S even)
// of codes x activation bytes, per row lane; SHIFT is what its sums have subtracted from every code already.
#if defined(__AVX512VNNI__)
struct IsaInt {
    static const int MAX_MB = 8;
    template <int BITS> static constexpr int32_t shift() { return 0; }
    template <int BITS, int MB>
    INLINE void block(const uint8_t* w, int64_t S, const int8_t* xq, int64_t xs, v16i* out) {
        // two accumulators per row (four at MB 1): vpdpbusd's 4-5 cycle latency would otherwise cap one row
        // at ~13 B/cycle, below what DRAM delivers
        constexpr int NA = MB == 1 ? 4 : 2;
        __m512i a[MB][NA];
        for (int r = 0; r < MB; ++r)
            for (int j = 0; j < NA; ++j) a[r][j] = _mm512_setzero_si512();
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        // int8 GEMVs from DRAM ran ~5% faster at half the distance (the same time ahead as int4's 4 KiB or not,
        // measured, not derived)
        const int64_t pf = BITS == 8 ? kPrefetch / 2 : kPrefetch;
        int64_t i = 0;
        for (; i + 4 <= S; i += 4) {
            __m512i s0, s1, s2, s3;
            if (BITS == 4) {
                const __m512i c0 = _mm512_loadu_si512(w), c1 = _mm512_loadu_si512(w + 64);
                s0 = _mm512_and_si512(c0, m4), s1 = _mm512_and_si512(_mm512_srli_epi16(c0, 4), m4);
                s2 = _mm512_and_si512(c1, m4), s3 = _mm512_and_si512(_mm512_srli_epi16(c1, 4), m4);
                _mm_prefetch((const char*)w + pf, QHINT);
                _mm_prefetch((const char*)w + pf + 64, QHINT);
                w += 128;
            } else {
                s0 = _mm512_loadu_si512(w), s1 = _mm512_loadu_si512(w + 64);
                s2 = _mm512_loadu_si512(w + 128), s3 = _mm512_loadu_si512(w + 192);
                for (int l = 0; l < 4; ++l) _mm_prefetch((const char*)w + pf + 64 * l, QHINT);
                w += 256;
            }
            for (int r = 0; r < MB; ++r) {
                const int8_t* x = xq + r * xs + 4 * i;
                a[r][0] = _mm512_dpbusd_epi32(a[r][0], s0, _mm512_set1_epi32(load4(x)));
                a[r][1 % NA] = _mm512_dpbusd_epi32(a[r][1 % NA], s1, _mm512_set1_epi32(load4(x + 4)));
                a[r][2 % NA] = _mm512_dpbusd_epi32(a[r][2 % NA], s2, _mm512_set1_epi32(load4(x + 8)));
                a[r][3 % NA] = _mm512_dpbusd_epi32(a[r][3 % NA], s3, _mm512_set1_epi32(load4(x + 12)));
            }
        }
        for (; i < S; i += 2) {  // two slabs: one int4 chunk or two int8 chunks
            __m512i s0, s1;
            if (BITS == 4) {
                const __m512i c0 = _mm512_loadu_si512(w);
                s0 = _mm512_and_si512(c0, m4), s1 = _mm512_and_si512(_mm512_srli_epi16(c0, 4), m4);
                w += 64;
            } else {
                s0 = _mm512_loadu_si512(w), s1 = _mm512_loadu_si512(w + 64);
                w += 128;
            }
            for (int r = 0; r < MB; ++r) {
                const int8_t* x = xq + r * xs + 4 * i;
                a[r][0] = _mm512_dpbusd_epi32(a[r][0], s0, _mm512_set1_epi32(load4(x)));
                a[r][1] = _mm512_dpbusd_epi32(a[r][1], s1, _mm512_set1_epi32(load4(x + 4)));
            }
        }
        for (int r = 0; r < MB; ++r) {
            __m512i t = a[r][0];
            for (int j = 1; j < NA; ++j) t = _mm512_add_epi32(t, a[r][j]);
            out[r] = (v16i)t;
        }
    }
};
#elif defined(__AVX2__)
struct IsaInt {
    static const int MAX_MB = 4;
    // int8 codes go through vpmaddubsw as signed q - 128 (|.| as the unsigned operand, the sign moved onto x):
    // u8 x s8 pairs of full-range codes would saturate int16, |q - 128| <= 128 with |x| <= 127 cannot
    template <int BITS> static constexpr int32_t shift() { return BITS == 8 ? 128 : 0; }
    template <int BITS, int MB>
    INLINE void block(const uint8_t* w, int64_t S, const int8_t* xq, int64_t xs, v16i* out) {
        __m256i a[MB][2];
        for (int r = 0; r < MB; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
        const __m256i m4 = _mm256_set1_epi8(0x0F), x80 = _mm256_set1_epi8((char)0x80), one = _mm256_set1_epi16(1);
        for (int64_t i = 0; i < S; ++i) {
            __m256i u[2], sg[2];  // rows 0-7 and 8-15: unsigned operand, and the sign source for x (int8)
            const uint8_t* c = w + (BITS == 4 ? (i >> 1) : i) * 64;
            for (int h = 0; h < 2; ++h) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(c + 32 * h));
                if (BITS == 4) {
                    u[h] = _mm256_and_si256((i & 1) ? _mm256_srli_epi16(v, 4) : v, m4);
                } else {
                    sg[h] = _mm256_xor_si256(v, x80);
                    u[h] = _mm256_abs_epi8(sg[h]);
                }
            }
            if (BITS == 8 || (i & 1) == 0) _mm_prefetch((const char*)c + kPrefetch, QHINT);
            for (int r = 0; r < MB; ++r) {
                const __m256i x = _mm256_set1_epi32(load4(xq + r * xs + 4 * i));
                for (int h = 0; h < 2; ++h) {
                    const __m256i xv = BITS == 4 ? x : _mm256_sign_epi8(x, sg[h]);
                    a[r][h] = _mm256_add_epi32(a[r][h], _mm256_madd_epi16(_mm256_maddubs_epi16(u[h], xv), one));
                }
            }
        }
        for (int r = 0; r < MB; ++r) {
            union { v16i v; __m256i h[2]; } o;
            o.h[0] = a[r][0], o.h[1] = a[r][1];
            out[r] = o.v;
        }
    }
};
#else
struct IsaInt {
    static const int MAX_MB = 4;
    template <int BITS> static constexpr int32_t shift() { return 0; }
    template <int BITS, int MB>
    INLINE void block(const uint8_t* w, int64_t S, const int8_t* xq, int64_t xs, v16i* out) {
        int32_t acc[MB][16] = {};
        for (int64_t i = 0; i < S; ++i) {
            const uint8_t* c = w + (BITS == 4 ? (i >> 1) : i) * 64;
            const int sh = BITS == 4 ? 4 * (int)(i & 1) : 0, mask = BITS == 4 ? 0xF : 0xFF;
            for (int r = 0; r < MB; ++r) {
                const int8_t* x = xq + r * xs + 4 * i;
                for (int l = 0; l < 16; ++l) {
                    int32_t s = 0;
                    for (int j = 0; j < 4; ++j) s += ((c[4 * l + j] >> sh) & mask) * x[j];
                    acc[r][l] += s;
                }
            }
        }
        for (int r = 0; r < MB; ++r)
            for (int l = 0; l < 16; ++l) out[r][l] = acc[r][l];
    }
};
#endif

// ---------------------------------------------------------------- drivers
template <int BITS, bool ASYM, int MB>
static void int_rows(const Problem& p, int64_t t, int64_t r0) {
    const int64_t ck = BITS == 4 ? 8 : 4, nb = p.Kp / p.A, per_group = p.group / p.A, S = p.A / 4;
    const uint8_t* w = p.qw + t * (p.Kp / ck) * 64;
    const float* sc = p.sc + t * (p.Kp / p.group) * 16;
    const int8_t* xq = p.xq + r0 * p.Kp;
    const int32_t zshift = IsaInt::shift<BITS>();
    v16f acc[MB];
    for (int r = 0; r < MB; ++r) acc[r] = (v16f){};
    for (int64_t g = 0, b = 0; g < p.Kp / p.group; ++g) {
        const v16f s = *(const v16fu*)(sc + 16 * g);
        const v16i z = zero_points(p, t, g, BITS, ASYM, zshift);
        for (int64_t e = 0; e < per_group; ++e, ++b) {
            v16i d[MB];
            IsaInt::block<BITS, MB>(w + b * (p.A / ck) * 64, S, xq + b * p.A, p.Kp, d);
            for (int r = 0; r < MB; ++r) {
                const int64_t at = (r0 + r) * nb + b;
                const v16i exact = d[r] - z * p.xsum[at];  // sum (q - z) xq, exact in int32
                acc[r] = fmadd(__builtin_convertvector(exact, v16f), s * p.xs[at], acc[r]);
            }
        }
    }
    store_rows(p, t, r0, MB, acc);
}

template <int BITS, bool ASYM, int MB>
static void float_rows(const Problem& p, int64_t t, int64_t r0) {
    const int64_t ck = BITS == 4 ? 8 : 4, chunks = p.group / ck;
    const uint8_t* w = p.qw + t * (p.Kp / ck) * 64;
    const float* sc = p.sc + t * (p.Kp / p.group) * 16;
    const float* x = p.xf + r0 * p.xf_stride;
    v16f acc[MB];
    for (int r = 0; r < MB; ++r) acc[r] = (v16f){};
    for (int64_t g = 0; g < p.Kp / p.group; ++g) {
        const v16i z = zero_points(p, t, g, BITS, ASYM, 0);
        v16f ga[MB];
        for (int r = 0; r < MB; ++r) ga[r] = (v16f){};
        for (int64_t u = g * chunks; u < (g + 1) * chunks; ++u) {
            const v16u c = *(const v16uu*)(w + u * 64);
            __builtin_prefetch(w + u * 64 + kPrefetch, 0, 2);  // 2: into L2, as QHINT
            for (int j = 0; j < ck; ++j) {  // input ck*u + j sits at bit 8j (int8) / 8(j%4) + 4(j/4) (int4)
                const int sh = BITS == 8 ? 8 * j : 8 * (j & 3) + 4 * (j >> 2);
                const v16i q = (v16i)((c >> sh) & (BITS == 8 ? 0xFFu : 0xFu));
                const v16f wf = __builtin_convertvector(q - z, v16f);  // q - z exact before any rounding
                for (int r = 0; r < MB; ++r) ga[r] = fmadd(wf, (v16f){} + x[r * p.xf_stride + ck * u + j], ga[r]);
            }
        }
        const v16f s = *(const v16fu*)(sc + 16 * g);
        for (int r = 0; r < MB; ++r) acc[r] = fmadd(ga[r], s, acc[r]);
    }
    store_rows(p, t, r0, MB, acc);
}

template <int BITS, bool ASYM, bool INT, int MB>
INLINE void rows(const Problem& p, int64_t t, int64_t r0) {
    if (INT) int_rows<BITS, ASYM, MB>(p, t, r0);
    else float_rows<BITS, ASYM, MB>(p, t, r0);
}

// every output tile, batch rows MAX_MB at a time then 4 / 2 / 1 for the rest
template <int BITS, bool ASYM, bool INT>
static void run(const Problem& p, int threads) {
    constexpr int BIG = IsaInt::MAX_MB;
    const int64_t tiles = (p.N + 15) / 16;
    QPARALLEL_FOR
    for (int64_t t = 0; t < tiles; ++t) {
        int64_t r0 = 0;
        for (; r0 + BIG <= p.M; r0 += BIG) rows<BITS, ASYM, INT, BIG>(p, t, r0);
        if (BIG > 4 && p.M - r0 >= 4) rows<BITS, ASYM, INT, 4>(p, t, r0), r0 += 4;
        if (p.M - r0 >= 2) rows<BITS, ASYM, INT, 2>(p, t, r0), r0 += 2;
        if (p.M - r0 >= 1) rows<BITS, ASYM, INT, 1>(p, t, r0);
    }
}

// The batch from which int8 compute takes the AMX path where it exists (4096 x 4096, weights from DRAM): below 4
// rows the VNNI GEMV is still bound by the weight stream; with 32-input blocks AMX pays a tile store and epilogue
// per 32 inputs and only overtakes VNNI's single 8-row pass from 9 rows on.
static int64_t amx_min_rows(int64_t act_group) { return act_group == 32 ? 9 : 4; }

// Per-thread scratch that only grows: no allocation on the hot path of repeated same-shape calls.
static void* scratch(size_t bytes) {
    static thread_local void* buf = nullptr;
    static thread_local size_t cap = 0;
    if (bytes > cap) {
        free(buf);
        cap = (bytes + 4095) / 4096 * 4096;
        buf = aligned_alloc(64, cap);
        if (!buf) cap = 0;
    }
    return buf;
}

// The longest activation block whose int32 sums cannot overflow: 255 * 127 * kMaxBlock < 2^31.
static const int64_t kMaxBlock = 66304;

extern "C" {
// y (M x N, row-major) = x (M x K, row-major) W^T + bias for the packed W (see quant_format.py); zeros NULL for
// symmetric weights, bias may be NULL. act_group 0: float compute; otherwise int8 compute per block of act_group
// inputs (a multiple of 8 dividing group, at most kMaxBlock). Returns 0 on success, 1 bad bits, 2 bad act_group, 3 bad shapes,
// 4 out of memory.
int graphopt_quant_linear(int bits, const float* x, int64_t M, int64_t K, const uint8_t* qweight, const float* scales,
                          const uint8_t* zeros, const float* bias, float* y, int64_t N, int64_t Kp, int64_t group,
                          int64_t act_group, int threads) {
    if (bits != 4 && bits != 8) return 1;
    if (group <= 0 || Kp % group || Kp < K || Kp % 32 || M < 0 || N < 0) return 3;
    if (act_group < 0 || (act_group && (act_group % 8 || group % act_group || act_group > kMaxBlock))) return 2;
    Problem p = {M, K, N, Kp, group, act_group, qweight, scales, zeros, bias, y, 0, 0, 0, x, K};
    const bool asym = zeros != 0;
    if (act_group) {
        const int64_t nb = Kp / act_group;
        char* s = (char*)scratch(M * Kp + M * nb * 8);
        if (!s && M) return 4;
        quantize_rows(x, M, K, Kp, act_group, (int8_t*)s, (float*)(s + M * Kp), (int32_t*)(s + M * Kp + M * nb * 4));
        p.xq = (const int8_t*)s, p.xs = (const float*)(s + M * Kp), p.xsum = (const int32_t*)(s + M * Kp + M * nb * 4);
#if QUANT_HAVE_AMX
        if (M >= amx_min_rows(act_group) && act_group % 32 == 0 && quant_amx_ready()) {
            quant_amx_run(p, bits, asym, threads);
            return 0;
        }
#endif
        if (bits == 4) asym ? run<4, true, true>(p, threads) : run<4, false, true>(p, threads);
        else asym ? run<8, true, true>(p, threads) : run<8, false, true>(p, threads);
        return 0;
    }
    if (Kp != K) {  // float compute reads whole chunks: rows zero-padded to Kp
        float* s = (float*)scratch(M * Kp * 4);
        if (!s && M) return 4;
        for (int64_t r = 0; r < M; ++r) {
            memcpy(s + r * Kp, x + r * K, K * 4);
            memset(s + r * Kp + K, 0, (Kp - K) * 4);
        }
        p.xf = s, p.xf_stride = Kp;
    }
    if (bits == 4) asym ? run<4, true, false>(p, threads) : run<4, false, false>(p, threads);
    else asym ? run<8, true, false>(p, threads) : run<8, false, false>(p, threads);
    return 0;
}

// The int8 activation codes of quant_linear, for tests: xq (M x Kp), xs and xsum (M x Kp / act_group).
int graphopt_quantize_activations(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t act_group, int8_t* xq,
                                  float* xs, int32_t* xsum) {
    if (act_group <= 0 || Kp % act_group || Kp < K) return 2;
    quantize_rows(x, M, K, Kp, act_group, xq, xs, xsum);
    return 0;
}

// on 1 / 0: use AMX tiles for int8 compute at batch >= amx_min_rows when the CPU and OS allow it (the default) or
// not (tests run both paths); -1 only asks. Returns whether the AMX path is on now.
int graphopt_quant_use_amx(int on) {
#if QUANT_HAVE_AMX
    if (on >= 0) quant_amx_switch(on);
    return quant_amx_ready() ? 1 : 0;
#else
    (void)on;
    return 0;
#endif
}

// The integer dot-product path this build runs: 3 AVX-512 VNNI, 1 AVX2 (also under plain AVX-512), 0 generic C.
int graphopt_quant_isa_level(void) {
#if defined(__AVX512VNNI__)
    return 3;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
}
