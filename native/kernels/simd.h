// Thin SIMD layer for the kernels: the same names map to SSE4.2, AVX2+FMA or AVX-512
// depending on the flags the including TU is compiled with. Included only by the files in
// kernels/, inside their per-ISA anonymous namespace (after <immintrin.h> and <cstdint>), so
// that no inline function here is shared between the ISA builds.
#pragma once

namespace simd {

// The operations whose intrinsics differ only in their prefix P (_mm512, _mm256, _mm) and
// integer-vector width W. max/min return the second operand when either is NaN (like maxps),
// so put the value that should propagate NaN second. pow2i(n) is 2^n for integral-valued n in
// [-127, 127] (n = -127 gives +0): n + 127 written into the exponent bits.
#define ATTN_SIMD_COMMON(P, W)                                                            \
  inline vf load(const float* p) { return P##_loadu_ps(p); }                              \
  inline void store(float* p, vf x) { P##_storeu_ps(p, x); }                              \
  inline vf set1(float x) { return P##_set1_ps(x); }                                      \
  inline vf zero() { return P##_setzero_ps(); }                                           \
  inline vf add(vf a, vf b) { return P##_add_ps(a, b); }                                  \
  inline vf sub(vf a, vf b) { return P##_sub_ps(a, b); }                                  \
  inline vf mul(vf a, vf b) { return P##_mul_ps(a, b); }                                  \
  inline vf div(vf a, vf b) { return P##_div_ps(a, b); }                                  \
  inline vf max(vf a, vf b) { return P##_max_ps(a, b); }                                  \
  inline vf min(vf a, vf b) { return P##_min_ps(a, b); }                                  \
  inline vf bit_and(vf a, vf b) { return P##_and_ps(a, b); }                              \
  inline vf bit_or(vf a, vf b) { return P##_or_ps(a, b); }                                \
  inline vf bit_andnot(vf a, vf b) { return P##_andnot_ps(a, b); } /* ~a & b */          \
  inline vf pow2i(vf n) {                                                                 \
    return P##_castsi##W##_ps(                                                            \
        P##_slli_epi32(P##_add_epi32(P##_cvtps_epi32(n), P##_set1_epi32(127)), 23));      \
  }

#if defined(__AVX512F__)
constexpr int VL = 16;
using vf = __m512;
using vm = __mmask16;
ATTN_SIMD_COMMON(_mm512, 512)  // and/or/andnot_ps are AVX512DQ, which this build requires
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
inline vf round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vm lt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline vm eq(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline vf select(vm m, vf if_true, vf if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }

#elif defined(__AVX2__)
constexpr int VL = 8;
using vf = __m256;
using vm = __m256;
ATTN_SIMD_COMMON(_mm256, 256)
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vf round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vm lt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline vm eq(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
inline vf select(vm m, vf if_true, vf if_false) { return _mm256_blendv_ps(if_false, if_true, m); }

#elif defined(__SSE4_1__)
constexpr int VL = 4;
using vf = __m128;
using vm = __m128;
ATTN_SIMD_COMMON(_mm, 128)
// No FMA in the baseline: a separate multiply and add (the portable path's numerics).
inline vf fma(vf a, vf b, vf c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
inline vf fnma(vf a, vf b, vf c) { return _mm_sub_ps(c, _mm_mul_ps(a, b)); }
inline vf round(vf a) { return _mm_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vm lt(vf a, vf b) { return _mm_cmplt_ps(a, b); }
inline vm eq(vf a, vf b) { return _mm_cmpeq_ps(a, b); }
inline vf select(vm m, vf if_true, vf if_false) { return _mm_blendv_ps(if_false, if_true, m); }
#else
#error "the kernels need at least SSE4.1 (build them with -msse4.2 or higher)"
#endif
#undef ATTN_SIMD_COMMON

// In-register transpose of a VL x VL tile: r[i] holds row i before, column i after.
#if defined(__AVX512F__)
inline void transpose(vf* r) {
  vf t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#elif defined(__AVX2__)
inline void transpose(vf* r) {
  vf t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
#else
inline void transpose(vf* r) { _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]); }
#endif

inline vf abs(vf a) { return bit_andnot(set1(-0.0f), a); }
inline vf copysign(vf mag, vf sgn) {
  const vf sign = set1(-0.0f);
  return bit_or(bit_andnot(sign, mag), bit_and(sign, sgn));
}

// exp(x) for float lanes (Cephes polynomial, ~1-2 ulp). x <= -87.7 (and -inf) gives exactly 0;
// NaN propagates. Inputs are clamped above at 88 (callers only pass x <= 0).
inline vf exp(vf x) {
  vf xc = min(set1(88.0f), max(set1(-88.0f), x));
  vf n = round(mul(xc, set1(1.44269504088896341f)));
  vf r = fnma(n, set1(0.693359375f), xc);
  r = fnma(n, set1(-2.12194440e-4f), r);
  vf y = set1(1.9875691500e-4f);
  y = fma(y, r, set1(1.3981999507e-3f));
  y = fma(y, r, set1(8.3334519073e-3f));
  y = fma(y, r, set1(4.1665795894e-2f));
  y = fma(y, r, set1(1.6666665459e-1f));
  y = fma(y, r, set1(5.0000001201e-1f));
  y = fma(y, mul(r, r), add(r, set1(1.0f)));
  return mul(y, pow2i(n));
}

// 2^x for float lanes: x = n + f with |f| <= 1/2, 2^f by a degree-5 minimax polynomial
// (relative error 2e-7 in float32). NaN propagates; -inf gives exactly 0. Callers pass x <= 0
// (differences from a running maximum). With AVX-512 the result is 2^f scaled by vscalefps,
// so that x in (-150, -126) gives the subnormal 2^x (0 under FTZ), and x <= -150 gives 0;
// elsewhere by the exponent bits, so x <= -126.5 gives 0.
inline vf exp2_poly(vf f) {
  vf p = set1(1.326472731307149e-3f);
  p = fma(p, f, set1(9.671512991189957e-3f));
  p = fma(p, f, set1(5.550733581185341e-2f));
  p = fma(p, f, set1(2.4022242426872253e-1f));
  p = fma(p, f, set1(6.931470036506653e-1f));
  return fma(p, f, set1(1.0f));
}
#if defined(__AVX512F__)
inline vf exp2(vf x) {
  const vf xc = max(set1(-150.0f), x);  // NaN stays (max returns its second operand)
  const vf n = round(xc);
  return _mm512_scalef_ps(exp2_poly(sub(xc, n)), n);
}
#else
inline vf exp2(vf x) {
  vf xc = min(set1(127.0f), max(set1(-127.0f), x));
  vf n = round(xc);
  return mul(exp2_poly(sub(xc, n)), pow2i(n));
}
#endif

// tanh(x): odd polynomial for |x| < 0.0625 (avoids cancellation), (1 - e)/(1 + e) with
// e = exp(-2|x|) elsewhere.
inline vf tanh(vf x) {
  vf ax = abs(x);
  vf e = exp(mul(ax, set1(-2.0f)));
  vf big = div(sub(set1(1.0f), e), add(set1(1.0f), e));
  vf x2 = mul(x, x);
  vf p = fma(x2, set1(-17.0f / 315.0f), set1(2.0f / 15.0f));
  p = fma(p, x2, set1(-1.0f / 3.0f));
  vf small = fma(mul(p, x2), ax, ax);
  return copysign(select(lt(ax, set1(0.0625f)), small, big), x);
}

}  // namespace simd
