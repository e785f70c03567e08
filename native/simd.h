// Thin SIMD layer for the kernel TU: the same names map to SSE4.2, AVX2+FMA or AVX-512
// depending on the flags this TU is compiled with. Included only by kernel.cpp, inside its
// per-ISA namespace (after <immintrin.h> and <cstdint>), so that no inline function here is
// shared between the ISA builds of that TU.
#pragma once

namespace simd {

#if defined(__AVX512F__)
constexpr int VL = 16;
using vf = __m512;
using vm = __mmask16;
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
// max/min return the second operand when either is NaN (like maxps), so put the value that
// should propagate NaN second.
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf abs(vf a) { return _mm512_abs_ps(a); }
inline vf round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vm lt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline vm eq(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline vf select(vm m, vf if_true, vf if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
inline vf copysign(vf mag, vf sgn) {
  const __m512i sign = _mm512_set1_epi32(int32_t(0x80000000u));
  return _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_andnot_si512(sign, _mm512_castps_si512(mag)),
      _mm512_and_si512(sign, _mm512_castps_si512(sgn))));
}
// 2^n for integral-valued n in [-127, 127] (n = -127 gives +0).
inline vf pow2i(vf n) {
  __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}

#elif defined(__AVX2__)
constexpr int VL = 8;
using vf = __m256;
using vm = __m256;
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf zero() { return _mm256_setzero_ps(); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf abs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline vf round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vm lt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline vm eq(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
inline vf select(vm m, vf if_true, vf if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
inline vf copysign(vf mag, vf sgn) {
  const vf sign = _mm256_set1_ps(-0.0f);
  return _mm256_or_ps(_mm256_andnot_ps(sign, mag), _mm256_and_ps(sign, sgn));
}
inline vf pow2i(vf n) {
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}

#elif defined(__SSE4_1__)
constexpr int VL = 4;
using vf = __m128;
using vm = __m128;
inline vf load(const float* p) { return _mm_loadu_ps(p); }
inline void store(float* p, vf x) { _mm_storeu_ps(p, x); }
inline vf set1(float x) { return _mm_set1_ps(x); }
inline vf zero() { return _mm_setzero_ps(); }
inline vf add(vf a, vf b) { return _mm_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm_div_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
inline vf fnma(vf a, vf b, vf c) { return _mm_sub_ps(c, _mm_mul_ps(a, b)); }
inline vf max(vf a, vf b) { return _mm_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm_min_ps(a, b); }
inline vf abs(vf a) { return _mm_andnot_ps(_mm_set1_ps(-0.0f), a); }
inline vf round(vf a) { return _mm_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vm lt(vf a, vf b) { return _mm_cmplt_ps(a, b); }
inline vm eq(vf a, vf b) { return _mm_cmpeq_ps(a, b); }
inline vf select(vm m, vf if_true, vf if_false) { return _mm_blendv_ps(if_false, if_true, m); }
inline vf copysign(vf mag, vf sgn) {
  const vf sign = _mm_set1_ps(-0.0f);
  return _mm_or_ps(_mm_andnot_ps(sign, mag), _mm_and_ps(sign, sgn));
}
inline vf pow2i(vf n) {
  __m128i e = _mm_add_epi32(_mm_cvtps_epi32(n), _mm_set1_epi32(127));
  return _mm_castsi128_ps(_mm_slli_epi32(e, 23));
}
#else
#error "kernel.cpp needs at least SSE4.1 (build it with -msse4.2 or higher)"
#endif

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
// (relative error 2e-7 in float32). x <= -126.5 (and -inf) gives exactly 0; NaN propagates.
// Callers pass x <= 0 (differences from a running maximum); inputs are clamped above at 127.
inline vf exp2(vf x) {
  vf xc = min(set1(127.0f), max(set1(-127.0f), x));
  vf n = round(xc);
  vf f = sub(xc, n);
  vf p = set1(1.326472731307149e-3f);
  p = fma(p, f, set1(9.671512991189957e-3f));
  p = fma(p, f, set1(5.550733581185341e-2f));
  p = fma(p, f, set1(2.4022242426872253e-1f));
  p = fma(p, f, set1(6.931470036506653e-1f));
  p = fma(p, f, set1(1.0f));
  return mul(p, pow2i(n));
}

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
