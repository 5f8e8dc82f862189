/*
 * Fused NVFP4 quantization for the CPU: one pass per block of 16 weights, computing the same float32
 * operations, in the same order, as the reference codec (nvfp4.py, itself ModelOpt's NVFP4QTensor), so
 * the bytes are identical. No Python objects cross this boundary: callers pass raw pointers through
 * ctypes, which releases the GIL, and split rows between threads.
 *
 * Build: compiled by setup.py as an optional extension; without a C compiler the package falls back to
 * the torch reference codec. Must be compiled without -ffast-math: IEEE division and NaN rules matter.
 */
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { SRC_BF16 = 0, SRC_F16 = 1, SRC_F32 = 2 };

static inline float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

static float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return bits_to_float(sign);
        float v = (float)man * 5.9604644775390625e-08f; /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

/* The 127 finite non-negative float8_e4m3fn values, by bit pattern (code c = exponent c >> 3, mantissa c & 7:
 * man * 2^-9 for exponent 0, else (1 + man/8) * 2^(exp - 7)), then NaN. A constant table fixed at compile time
 * (generated once from that formula; test_codec compares it with torch's float8_e4m3fn through nvfp4_e4m3_table):
 * threads read it with no initialisation to race on (a flag-guarded lazy fill was a data race). Hex literals are exact. */
static const float e4m3_value[128] = {
    0.0f, 0x1p-9f, 0x1p-8f, 0x1.8p-8f, 0x1p-7f, 0x1.4p-7f, 0x1.8p-7f, 0x1.cp-7f,
    0x1p-6f, 0x1.2p-6f, 0x1.4p-6f, 0x1.6p-6f, 0x1.8p-6f, 0x1.ap-6f, 0x1.cp-6f, 0x1.ep-6f,
    0x1p-5f, 0x1.2p-5f, 0x1.4p-5f, 0x1.6p-5f, 0x1.8p-5f, 0x1.ap-5f, 0x1.cp-5f, 0x1.ep-5f,
    0x1p-4f, 0x1.2p-4f, 0x1.4p-4f, 0x1.6p-4f, 0x1.8p-4f, 0x1.ap-4f, 0x1.cp-4f, 0x1.ep-4f,
    0x1p-3f, 0x1.2p-3f, 0x1.4p-3f, 0x1.6p-3f, 0x1.8p-3f, 0x1.ap-3f, 0x1.cp-3f, 0x1.ep-3f,
    0x1p-2f, 0x1.2p-2f, 0x1.4p-2f, 0x1.6p-2f, 0x1.8p-2f, 0x1.ap-2f, 0x1.cp-2f, 0x1.ep-2f,
    0x1p-1f, 0x1.2p-1f, 0x1.4p-1f, 0x1.6p-1f, 0x1.8p-1f, 0x1.ap-1f, 0x1.cp-1f, 0x1.ep-1f,
    0x1p+0f, 0x1.2p+0f, 0x1.4p+0f, 0x1.6p+0f, 0x1.8p+0f, 0x1.ap+0f, 0x1.cp+0f, 0x1.ep+0f,
    0x1p+1f, 0x1.2p+1f, 0x1.4p+1f, 0x1.6p+1f, 0x1.8p+1f, 0x1.ap+1f, 0x1.cp+1f, 0x1.ep+1f,
    0x1p+2f, 0x1.2p+2f, 0x1.4p+2f, 0x1.6p+2f, 0x1.8p+2f, 0x1.ap+2f, 0x1.cp+2f, 0x1.ep+2f,
    0x1p+3f, 0x1.2p+3f, 0x1.4p+3f, 0x1.6p+3f, 0x1.8p+3f, 0x1.ap+3f, 0x1.cp+3f, 0x1.ep+3f,
    0x1p+4f, 0x1.2p+4f, 0x1.4p+4f, 0x1.6p+4f, 0x1.8p+4f, 0x1.ap+4f, 0x1.cp+4f, 0x1.ep+4f,
    0x1p+5f, 0x1.2p+5f, 0x1.4p+5f, 0x1.6p+5f, 0x1.8p+5f, 0x1.ap+5f, 0x1.cp+5f, 0x1.ep+5f,
    0x1p+6f, 0x1.2p+6f, 0x1.4p+6f, 0x1.6p+6f, 0x1.8p+6f, 0x1.ap+6f, 0x1.cp+6f, 0x1.ep+6f,
    0x1p+7f, 0x1.2p+7f, 0x1.4p+7f, 0x1.6p+7f, 0x1.8p+7f, 0x1.ap+7f, 0x1.cp+7f, 0x1.ep+7f,
    0x1p+8f, 0x1.2p+8f, 0x1.4p+8f, 0x1.6p+8f, 0x1.8p+8f, 0x1.ap+8f, 0x1.cp+8f,
    NAN,
};

/* float32 in [2^-9, 448] (or NaN) -> e4m3fn bits, round to nearest, ties to even: the same result as
 * torch's float -> float8_e4m3fn cast of a value already clamped to that range. */
static inline uint8_t to_e4m3(float x) {
    if (x != x) return 0x7F;
    uint32_t bits = float_to_bits(x);
    int exp = (int)(bits >> 23) - 127;
    if (exp < -6) { /* subnormal e4m3: k * 2^-9, k = RNE(x * 2^9) in [1, 8]; the scaling is exact */
        return (uint8_t)(int)rintf(x * 512.0f); /* k == 8 is code 8, the smallest normal, 2^-6 */
    }
    uint32_t man = bits & 0x7FFFFF, top = man >> 20, rest = man & 0xFFFFF;
    top += (rest > 0x80000u) | ((rest == 0x80000u) & top);
    uint32_t code = ((uint32_t)(exp + 7) << 3) + top; /* a mantissa carry moves into the exponent */
    return (uint8_t)(code > 126 ? 126 : code);
}

/* Rows are processed in stages over small per-row buffers, each a simple loop the compiler turns into
 * vector instructions (true IEEE divisions included); only the block-scale rounding is scalar, once per
 * 16 weights. */
#define MAX_COLS_CHUNK 4096

/* Each 16-value block's round-to-nearest E4M3 scale (its amax over 6 * weight_scale_2, zero as 1.0, clamped to
 * E4M3's range) and the divisor scale * weight_scale_2 that encodes it; n is a multiple of 16. */
static inline __attribute__((always_inline)) void rtn_block_scales(const float *x, int64_t n, float weight_scale_2,
                                                                   float six_ws2, uint8_t *scales, float *divisor) {
    uint32_t absbits[MAX_COLS_CHUNK];
    for (int64_t j = 0; j < n; j++) absbits[j] = float_to_bits(x[j]) & 0x7FFFFFFFu;
    for (int64_t b = 0; b < n / 16; b++) {
        /* For non-NaN floats the order of |x| is the order of its bits; NaN bits sort above infinity. */
        uint32_t m = 0;
        for (int i = 0; i < 16; i++) m = absbits[b * 16 + i] > m ? absbits[b * 16 + i] : m;
        float amax = m > 0x7F800000u ? NAN : bits_to_float(m);
        float s = amax / six_ws2;
        if (s == 0.0f) s = 1.0f;
        if (s == s) s = s < 0.001953125f ? 0.001953125f : (s > 448.0f ? 448.0f : s);
        const uint8_t s8 = to_e4m3(s); /* a local: a store through uint8_t * may alias anything */
        scales[b] = s8;
        divisor[b] = e4m3_value[s8] * weight_scale_2;
    }
}

/* The nearest E2M1 code (sign in bit 3) of each q, ties to even; NaN saturates to 7. */
static inline __attribute__((always_inline)) void e2m1_codes(const float *q, int64_t n, int32_t *code) {
    for (int64_t j = 0; j < n; j++) {
        const float v = q[j], a = fabsf(v);
        int32_t c = (int32_t)(a > 0.25f) + (int32_t)(a >= 0.75f) + (int32_t)(a > 1.25f) + (int32_t)(a >= 1.75f)
                    + (int32_t)(a > 2.5f) + (int32_t)(a >= 3.5f) + (int32_t)(a > 5.0f);
        c |= -(int32_t)(v != v) & 7; /* NaN compares false everywhere above, then saturates to 7 */
        code[j] = c | ((int32_t)(v < 0.0f) << 3);
    }
}

/* Row chunk [off, off + n) of the source, as float32. */
static inline __attribute__((always_inline)) void load_chunk(const void *src, int src_type, int64_t off, int64_t n,
                                                             float *x) {
    if (src_type == SRC_BF16) {
        const uint16_t *p = (const uint16_t *)src + off;
        for (int64_t j = 0; j < n; j++) x[j] = bf16_to_float(p[j]);
    } else if (src_type == SRC_F16) {
        const uint16_t *p = (const uint16_t *)src + off;
        for (int64_t j = 0; j < n; j++) x[j] = f16_to_float(p[j]);
    } else {
        memcpy(x, (const float *)src + off, (size_t)n * sizeof(float));
    }
}

static inline __attribute__((always_inline)) void quantize_span(const float *x, int64_t n, float weight_scale_2, float six_ws2, uint8_t *packed,
                          uint8_t *scales) {
    /* n is a multiple of 16 and at most MAX_COLS_CHUNK */
    float divisor[MAX_COLS_CHUNK / 16];
    int32_t code[MAX_COLS_CHUNK];
    rtn_block_scales(x, n, weight_scale_2, six_ws2, scales, divisor);
    float q[MAX_COLS_CHUNK];
    for (int64_t j = 0; j < n; j++) q[j] = x[j] / divisor[j >> 4];
    e2m1_codes(q, n, code);
    for (int64_t j = 0; j < n / 2; j++) packed[j] = (uint8_t)(code[2 * j] | (code[2 * j + 1] << 4));
}

/* Quantize rows [0, rows) of a row-major [rows, cols] tensor; cols % 16 == 0. On x86-64 the function is
 * compiled twice, for AVX2 and for the baseline, and the loader picks what the CPU has. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void nvfp4_quantize_rows(const void *src, int src_type, int64_t rows, int64_t cols, float weight_scale_2,
                         uint8_t *packed, uint8_t *scales) {
    const float six_ws2 = 6.0f * weight_scale_2;
    float x[MAX_COLS_CHUNK];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c0 = 0; c0 < cols; c0 += MAX_COLS_CHUNK) {
            const int64_t n = cols - c0 < MAX_COLS_CHUNK ? cols - c0 : MAX_COLS_CHUNK;
            const int64_t off = r * cols + c0;
            load_chunk(src, src_type, off, n, x);
            quantize_span(x, n, weight_scale_2, six_ws2, packed + off / 2, scales + off / 16);
        }
    }
}

/* --algorithm mse (codec/mse.py, the reference): each block's scale chosen among rtn's E4M3 code and its
 * neighbours (the candidates in mse.candidate_offsets's order: rtn first, then -1, +1, -2, +2, ...), by the
 * smallest squared error of E2M1 * (scale * weight_scale_2) against the source, its 16 terms added pairwise in
 * the reference's order; a candidate replaces the best only with a strictly smaller error (NaN never does).
 * Multiplies and adds stay separate operations: ISO C mode (-std=c11) does not contract them into FMAs, and
 * setup.py says -ffp-contract=off as well. */
static inline __attribute__((always_inline)) void encode_span(const float *x, int64_t n, const float *divisor,
                                                              int32_t *code, float *err) {
    /* Simple loops, as quantize_span's, which the compiler vectorizes (a table lookup by code would not be). */
    /* The divisor spread to every element first: an indexed load divisor[j >> 4] keeps a loop scalar. */
    float q[MAX_COLS_CHUNK], sq[MAX_COLS_CHUNK], dv[MAX_COLS_CHUNK];
    for (int64_t b = 0; b < n / 16; b++)
        for (int i = 0; i < 16; i++) dv[b * 16 + i] = divisor[b];
    for (int64_t j = 0; j < n; j++) q[j] = x[j] / dv[j];
    e2m1_codes(q, n, code);
    for (int64_t j = 0; j < n; j++) {
        /* The E2M1 value of the code: magnitude 0.5 m + 0.5 max(m - 4, 0) + max(m - 6, 0) for m = 0..7 gives 0,
         * 0.5, 1, 1.5, 2, 3, 4, 6, the sign a multiply by +-1; every step is exact: the reference's table value. */
        const int32_t c = code[j], m = c & 7;
        int32_t above4 = m - 4, above6 = m - 6;
        above4 &= ~(above4 >> 31); /* max(., 0) in integers: fmaxf would keep the loop scalar */
        above6 &= ~(above6 >> 31);
        const float mag = 0.5f * (float)m + 0.5f * (float)above4 + (float)above6;
        const float recon = (mag * (1.0f - 2.0f * (float)(c >> 3))) * dv[j];
        const float d = x[j] - recon;
        sq[j] = d * d;
    }
    for (int64_t b = 0; b < n / 16; b++) {
        const float *s = sq + b * 16;
        float p8[8], p4[4];
        for (int i = 0; i < 8; i++) p8[i] = s[2 * i] + s[2 * i + 1];
        for (int i = 0; i < 4; i++) p4[i] = p8[2 * i] + p8[2 * i + 1];
        err[b] = (p4[0] + p4[1]) + (p4[2] + p4[3]);
    }
}

static inline __attribute__((always_inline)) void mse_span(const float *x, int64_t n, float weight_scale_2, float six_ws2,
                                                           int below, int above, uint8_t *packed, uint8_t *scales) {
    int32_t best_code[MAX_COLS_CHUNK], code[MAX_COLS_CHUNK];
    float divisor[MAX_COLS_CHUNK / 16], best_err[MAX_COLS_CHUNK / 16], err[MAX_COLS_CHUNK / 16];
    uint8_t rtn8[MAX_COLS_CHUNK / 16], cand8[MAX_COLS_CHUNK / 16];
    const int64_t nb = n / 16;
    rtn_block_scales(x, n, weight_scale_2, six_ws2, rtn8, divisor);
    memcpy(scales, rtn8, (size_t)nb);
    encode_span(x, n, divisor, best_code, best_err);
    const int reach = below > above ? below : above;
    for (int d = 1; d <= reach; d++) {
        for (int side = 0; side < 2; side++) {
            if ((side == 0 && d > below) || (side == 1 && d > above)) continue;
            const int offset = side == 0 ? -d : d;
            for (int64_t b = 0; b < nb; b++) {
                int c = (int)rtn8[b] + offset;
                c = c < 1 ? 1 : (c > 0x7E ? 0x7E : c);
                cand8[b] = (uint8_t)c;
                divisor[b] = e4m3_value[c] * weight_scale_2;
            }
            encode_span(x, n, divisor, code, err);
            for (int64_t b = 0; b < nb; b++) {
                const int c = (int)rtn8[b] + offset;
                if (rtn8[b] == 0x7F || c < 1 || c > 0x7E || !(err[b] < best_err[b])) continue;
                best_err[b] = err[b];
                scales[b] = cand8[b];
                memcpy(best_code + b * 16, code + b * 16, 16 * sizeof(int32_t));
            }
        }
    }
    for (int64_t j = 0; j < n / 2; j++) packed[j] = (uint8_t)(best_code[2 * j] | (best_code[2 * j + 1] << 4));
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void nvfp4_mse_rows(const void *src, int src_type, int64_t rows, int64_t cols, float weight_scale_2, int below,
                    int above, uint8_t *packed, uint8_t *scales) {
    const float six_ws2 = 6.0f * weight_scale_2;
    float x[MAX_COLS_CHUNK];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c0 = 0; c0 < cols; c0 += MAX_COLS_CHUNK) {
            const int64_t n = cols - c0 < MAX_COLS_CHUNK ? cols - c0 : MAX_COLS_CHUNK;
            const int64_t off = r * cols + c0;
            load_chunk(src, src_type, off, n, x);
            mse_span(x, n, weight_scale_2, six_ws2, below, above, packed + off / 2, scales + off / 16);
        }
    }
}

/* max(|max|, |min|) of n values as float32; NaN if any value is NaN. For every IEEE format the order of
 * |x| over non-NaN values is the unsigned order of its bits with the sign cleared, and NaN patterns sort
 * above infinity, so one integer max (a vector instruction) replaces two float reductions. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
float nvfp4_amax(const void *src, int src_type, int64_t n) {
    if (src_type == SRC_F32) {
        const uint32_t *p = (const uint32_t *)src;
        uint32_t m = 0;
        for (int64_t i = 0; i < n; i++) { uint32_t v = p[i] & 0x7FFFFFFFu; m = v > m ? v : m; }
        return m > 0x7F800000u ? NAN : bits_to_float(m);
    }
    const uint16_t *p = (const uint16_t *)src;
    uint16_t m = 0;
    for (int64_t i = 0; i < n; i++) { uint16_t v = p[i] & 0x7FFFu; m = v > m ? v : m; }
    if (src_type == SRC_BF16) return m > 0x7F80u ? NAN : bf16_to_float(m);
    return m > 0x7C00u ? NAN : f16_to_float(m);
}

/* The table above, for the tests to compare with torch's own float8_e4m3fn values. */
void nvfp4_e4m3_table(float *out) { memcpy(out, e4m3_value, sizeof e4m3_value); }

/* An importable module, so packaging treats this as an ordinary extension; the functions above are
 * reached through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nvfp4_cpu", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__nvfp4_cpu(void) { return PyModule_Create(&module); }
