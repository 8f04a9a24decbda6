// AMX path of graphopt::quant_linear's int8 compute, for batches (quant_linear.cpp decides when it runs).
//
// Why: with AVX-512 VNNI every 64 multiply-adds cost one vpdpbusd, so batch 16 of a 4096 x 4096 layer is bound
// by ~4M of them (~1.9 ms here) while its weights stream in ~1.1 ms; one AMX tdpbsud does 16 x 16 x 64.
// The packed layout needs no repacking for it: 16 consecutive int8 chunks of a tile (1 KiB, 64 inputs) are exactly
// an AMX B tile (row i = 16 outputs x 4 inputs of input quad i, unsigned bytes), so int8 weights load straight
// from the stream; int4 chunks are split into their low/high nibble slabs first (2 stores per chunk). The A tile
// is up to 16 batch rows x 32/64 signed activation codes (the per-block codes of quantize_rows); the C tile's
// 16 x 16 int32 sums of one activation block go to memory and through the same exact integer epilogue as the
// VNNI path: y += (s * xs[b]) * (sum q x - z * sum x).
#include "quant_linear.h"
#if QUANT_HAVE_AMX
#include <atomic>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {
struct TileConfig {  // the 64-byte LDTILECFG operand, palette 1
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// AMX-TILE and AMX-INT8 in CPUID.(7,0):EDX, and Linux's permission for the tile data state (kernel >= 5.16)
bool detect() {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
    const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

std::atomic<int> g_on{1};
}  // namespace

bool quant_amx_ready() {
    static const bool ok = detect();
    return ok && g_on.load(std::memory_order_relaxed);
}

int quant_amx_switch(int on) { return g_on.exchange(on ? 1 : 0); }

#define AMX_FN __attribute__((target("amx-tile,amx-int8")))

// tmm0-3: C accumulators (a pair per block parity: steps of one block alternate within the pair, so a long block
// is two independent chains; the next block fills the other pair while this one is stored), tmm4-5: A, tmm6-7: B
// (double-buffered: a load never waits for the multiply still reading the other buffer)
AMX_FN static void configure(int rows, int step) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 4; ++i) c.rows[i] = rows, c.colsb[i] = 64;
    for (int i = 4; i < 6; ++i) c.rows[i] = rows, c.colsb[i] = step;
    for (int i = 6; i < 8; ++i) c.rows[i] = step / 4, c.colsb[i] = 64;
    _tile_loadconfig(&c);
}

// tile numbers are immediates: these switches pick them
AMX_FN INLINE void load_ab(int j, const int8_t* a, int64_t lda, const uint8_t* b) {
    if (j) {
        _tile_loadd(5, a, lda);
        _tile_loadd(7, b, 64);
    } else {
        _tile_loadd(4, a, lda);
        _tile_loadd(6, b, 64);
    }
}

AMX_FN INLINE void dot(int c, int j) {
    switch (c * 2 + j) {
        case 0: _tile_dpbsud(0, 4, 6); break;
        case 1: _tile_dpbsud(0, 5, 7); break;
        case 2: _tile_dpbsud(1, 4, 6); break;
        case 3: _tile_dpbsud(1, 5, 7); break;
        case 4: _tile_dpbsud(2, 4, 6); break;
        case 5: _tile_dpbsud(2, 5, 7); break;
        case 6: _tile_dpbsud(3, 4, 6); break;
        default: _tile_dpbsud(3, 5, 7); break;
    }
}

// store the C pair of parity `par` to c (c[1] only when the block had more than one step), and zero it for reuse
AMX_FN INLINE void drain(int par, bool two, int32_t (*c)[256]) {
    if (par) {
        _tile_stored(2, c[0], 64);
        _tile_zero(2);
        if (two) {
            _tile_stored(3, c[1], 64);
            _tile_zero(3);
        }
    } else {
        _tile_stored(0, c[0], 64);
        _tile_zero(0);
        if (two) {
            _tile_stored(1, c[1], 64);
            _tile_zero(1);
        }
    }
}

// int4 chunks [0, n) as B-tile rows: chunk u gives row 2u (low nibbles: inputs 8u..8u+3) and 2u + 1 (high nibbles)
INLINE void unpack4(const uint8_t* w, int n, uint8_t* out) {
    const __m512i m = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < n; ++i) {
        const __m512i c = _mm512_loadu_si512(w + 64 * i);
        _mm512_store_si512(out + 128 * i, _mm512_and_si512(c, m));
        _mm512_store_si512(out + 128 * i + 64, _mm512_and_si512(_mm512_srli_epi16(c, 4), m));
    }
}

// y += (s * xs[b]) * (sum q x - z * sum x) for block b of rows r0.. from its stored int32 sums
template <int BITS, bool ASYM>
INLINE void epilogue(const Problem& p, int64_t t, int64_t r0, int rows, int64_t b, bool two, int32_t (*c)[256],
                     v16f* acc) {
    const int64_t g = b * p.A / p.group, nb = p.Kp / p.A;
    const v16f s = *(const v16fu*)(p.sc + (t * (p.Kp / p.group) + g) * 16);
    const v16i z = zero_points(p, t, g, BITS, ASYM, 0);
    for (int r = 0; r < rows; ++r) {
        const int64_t at = (r0 + r) * nb + b;
        v16i d = *(const v16i*)(c[0] + 16 * r);
        if (two) d += *(const v16i*)(c[1] + 16 * r);
        const v16i exact = d - z * p.xsum[at];  // sum (q - z) xq, exact in int32
        acc[r] = fmadd(__builtin_convertvector(exact, v16f), s * p.xs[at], acc[r]);
    }
}

template <int BITS, bool ASYM>
AMX_FN static void amx_rows(const Problem& p, int64_t t, int64_t r0, int rows, int step) {
    const int64_t ck = BITS == 4 ? 8 : 4, nb = p.Kp / p.A, steps = p.A / step;
    const bool two = steps > 1;
    const uint8_t* w = p.qw + t * (p.Kp / ck) * 64;
    const int8_t* xq = p.xq + r0 * p.Kp;
    alignas(64) int32_t c[2][256];
    alignas(64) uint8_t wb[2][1024];
    v16f acc[16];
    for (int r = 0; r < rows; ++r) acc[r] = (v16f){};
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    int j = 0;
    for (int64_t b = 0; b < nb; ++b) {
        for (int64_t i = 0; i < steps; ++i, j ^= 1) {
            const int64_t k0 = b * p.A + i * step;
            const uint8_t* src = w + k0 / ck * 64;
            // every line of the next steps into L2, like the GEMV (at batch 16, T1 beat T0 by ~8%, NTA lost 40%)
            for (int l = 0; l < step / ck; ++l) _mm_prefetch((const char*)src + kPrefetch + 64 * l, QHINT);
            if (BITS == 8) {
                load_ab(j, xq + k0, p.Kp, src);  // the int8 chunks are B-tile rows as stored
            } else {
                unpack4(src, step / 8, wb[j]);
                load_ab(j, xq + k0, p.Kp, wb[j]);
            }
            dot(2 * (b & 1) + (i & 1), j);
        }
        if (b > 0) {  // block b - 1 finishes while block b's multiplies run
            drain((b - 1) & 1, two, c);
            epilogue<BITS, ASYM>(p, t, r0, rows, b - 1, two, c, acc);
        }
    }
    drain((nb - 1) & 1, two, c);
    epilogue<BITS, ASYM>(p, t, r0, rows, nb - 1, two, c, acc);
    store_rows(p, t, r0, rows, acc);
}

// one thread's share of the tiles; the tile configuration is per thread, set when the row count changes
AMX_FN static void amx_tiles(const Problem& p, int bits, bool asym, int step) {
    const int64_t tiles = (p.N + 15) / 16;
    int configured = 0;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        for (int64_t r0 = 0; r0 < p.M; r0 += 16) {
            const int rows = p.M - r0 < 16 ? (int)(p.M - r0) : 16;
            if (rows != configured) configure(rows, step), configured = rows;
            if (bits == 4) asym ? amx_rows<4, true>(p, t, r0, rows, step) : amx_rows<4, false>(p, t, r0, rows, step);
            else asym ? amx_rows<8, true>(p, t, r0, rows, step) : amx_rows<8, false>(p, t, r0, rows, step);
        }
    }
    if (configured) _tile_release();
}

void quant_amx_run(const Problem& p, int bits, bool asym, int threads) {
    const int step = p.A % 64 == 0 ? 64 : 32;  // inputs per tdpbsud: a block's sums must not mix two blocks
#pragma omp parallel num_threads(threads) if (threads > 1)
    amx_tiles(p, bits, asym, step);
}
#endif
