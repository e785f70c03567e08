// Element types of the kernels' inputs and outputs besides float: bfloat16 and IEEE float16,
// both 16-bit storage, and the bf16 pair arithmetic of AVX512_BF16 (VDPBF16PS), on the
// instruction where the build has it and emulated bit for bit where it does not. Included
// INSIDE each kernel file's per-ISA anonymous namespace, after simd.h (tile_util.h), so every
// instruction set gets its own copy.
//
// The bf16 numerics, which the emulation reproduces exactly (checked on an AMD Zen 4 against
// the instruction for 2e6 random operands, and against its conversions for 5e7 random floats):
//   - float -> bf16 rounds to nearest even (VCVTNEPS2BF16): denormal inputs become a signed
//     zero, NaN stays a (quiet) NaN, values beyond the largest bf16 round to infinity;
//   - a pair step acc' = (acc + a1*b1) + a0*b0: the odd elements first, then the even ones,
//     each product exact (8-bit significands), each addition rounded to nearest even in fp32
//     (one FMA each), denormal inputs and results flushed to zero. The emulation gets the
//     flushing from MXCSR (FlushDenormals below, set for the whole bf16 kernel); the SSE4.2
//     build has no FMA, so a product below 2^-126 is flushed there before it is added (the
//     instruction keeps it): a difference below 2^-126 in absolute terms.
#include <cstring>
#include <type_traits>

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline uint32_t f32_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
inline float bits_f32(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Scalars

inline uint16_t bf16_round(float x) {  // VCVTNEPS2BF16's rounding, see above
  uint32_t b = f32_bits(x);
  if ((b & 0x7F800000u) == 0) return uint16_t((b >> 16) & 0x8000u);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((b >> 16) | 0x40u);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}

inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return bits_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    const float f = float(m) * (1.0f / 16777216.0f);  // subnormal: m * 2^-24, exact
    return sign ? -f : f;
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

inline uint16_t f16_round(float x) {  // round to nearest even, overflow to infinity
#if defined(__F16C__)
  return uint16_t(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  // F. Giesen's float_to_half_fast3_rtne.
  uint32_t u = f32_bits(x);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (127u + 16u) << 23) {
    o = u > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN, or infinity (also for >= 65520)
  } else if (u < 113u << 23) {  // a float16 subnormal or zero: let an fp32 add round it
    const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    o = f32_bits(bits_f32(u) + bits_f32(magic)) - magic;
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xFFFu + odd;
    o = u >> 13;
  }
  return uint16_t(o | (sign >> 16));
#endif
}

inline float to_f32(float x) { return x; }
inline float to_f32(bf16_t x) { return bits_f32(uint32_t(x.bits) << 16); }
inline float to_f32(f16_t x) { return f16_to_f32(x.bits); }
inline uint16_t to_bf16(float x) { return bf16_round(x); }
inline uint16_t to_bf16(bf16_t x) { return x.bits; }
inline uint16_t to_bf16(f16_t x) { return bf16_round(f16_to_f32(x.bits)); }

inline void store_elem(float* p, float x) { *p = x; }
inline void store_elem(bf16_t* p, float x) { p->bits = bf16_round(x); }
inline void store_elem(f16_t* p, float x) { p->bits = f16_round(x); }

// ---------------------------------------------------------------------------------------------
// Vectors: VL elements to float lanes; bf16 pairs (even element in the low half of a 32-bit
// lane, as VDPBF16PS reads them) held in float vectors as bit patterns.

inline vf bcast32(const void* p) {  // the 32 bits at p in every lane
  float x;
  std::memcpy(&x, p, 4);
  return simd::set1(x);
}

// Integer views of the float lanes, whose intrinsics differ only in their prefix P (_mm512,
// _mm256, _mm) and width W, as ATTN_SIMD_COMMON in simd.h.
#define ATTN_SIMD_INT(P, W)                                                  \
  using vi = __m##W##i;                                                      \
  inline vi as_int(vf x) { return P##_castps_si##W(x); }                     \
  inline vf as_float(vi x) { return P##_castsi##W##_ps(x); }                 \
  inline vi set1i(uint32_t x) { return P##_set1_epi32(int(x)); }             \
  inline vi iand(vi a, vi b) { return P##_and_si##W(a, b); }                 \
  inline vi ior(vi a, vi b) { return P##_or_si##W(a, b); }                   \
  inline vi iadd(vi a, vi b) { return P##_add_epi32(a, b); }                 \
  inline vi shl16(vi a) { return P##_slli_epi32(a, 16); }                    \
  inline vi shr16(vi a) { return P##_srli_epi32(a, 16); }
// flush_denormal(b): +-0 for lanes with a zero exponent. AVX-512 does it with a lane mask, the
// others with a compare.
#define ATTN_SIMD_FLUSH_CMP(P, W)                                                     \
  inline vi flush_denormal(vi b) {                                                    \
    const vi den = P##_cmpeq_epi32(iand(b, set1i(0x7F800000u)), P##_setzero_si##W()); \
    return P##_andnot_si##W(iand(den, set1i(0x7FFFFFFFu)), b);                        \
  }

#if defined(__AVX512F__)
ATTN_SIMD_INT(_mm512, 512)
inline vi flush_denormal(vi b) {  // see ATTN_SIMD_FLUSH_CMP
  const __mmask16 den = _mm512_testn_epi32_mask(b, set1i(0x7F800000u));
  return _mm512_mask_and_epi32(b, den, b, set1i(0x80000000u));
}
inline vi widen16(const uint16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store_low16(uint16_t* p, vi x) {  // the low 16 bits of each lane, packed
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(x));
}
inline vf load_f16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif defined(__AVX2__)
ATTN_SIMD_INT(_mm256, 256)
ATTN_SIMD_FLUSH_CMP(_mm256, 256)
inline vi widen16(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store_low16(uint16_t* p, vi x) {
  const __m256i t = _mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(t));
}
inline vf load_f16(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#else
ATTN_SIMD_INT(_mm, 128)
ATTN_SIMD_FLUSH_CMP(_mm, 128)
inline vi widen16(const uint16_t* p) {
  return _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline void store_low16(uint16_t* p, vi x) {
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(x, x));
}
inline vf load_f16(const f16_t* p) {  // no F16C in the baseline
  alignas(16) float t[VL];
  for (int i = 0; i < VL; ++i) t[i] = f16_to_f32(p[i].bits);
  return simd::load(t);
}
#endif
#undef ATTN_SIMD_INT
#undef ATTN_SIMD_FLUSH_CMP

inline vf load_f32(const float* p) { return simd::load(p); }
inline vf load_f32(const bf16_t* p) { return as_float(shl16(widen16(&p->bits))); }
inline vf load_f32(const f16_t* p) { return load_f16(p); }
// The low and the high bf16 of each lane as floats.
inline vf low_half(vf x) { return as_float(shl16(as_int(x))); }
inline vf high_half(vf x) { return as_float(iand(as_int(x), set1i(0xFFFF0000u))); }

// RNE-rounded lanes with their bf16 in the high half, as bf16_round for finite lanes (the
// kernels vectorise finite data only: probabilities, and inputs the service checked).
inline vi bf16_round_hi(vf x) {
  const vi b = flush_denormal(as_int(x));
  return iadd(b, iadd(iand(shr16(b), set1i(1u)), set1i(0x7FFFu)));
}

// Pairs (bf16(lo), bf16(hi)) of two float vectors, lane by lane.
inline vf pack_pairs(vf lo, vf hi) {
#if defined(__AVX512BF16__)
  // Both rounded into one vector (lo's in the low 256 bits), then interleaved so that lane l
  // holds lo[l] and hi[l].
  const __m512i t = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                       8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_castsi512_ps(_mm512_permutexvar_epi16(idx, t));
#else
  return as_float(ior(shr16(bf16_round_hi(lo)), iand(bf16_round_hi(hi), set1i(0xFFFF0000u))));
#endif
}

// p[0, VL) = bf16 of the lanes of x.
inline void store_bf16(uint16_t* p, vf x) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
#else
  store_low16(p, shr16(bf16_round_hi(x)));
#endif
}

// p[0, VL) = float16 of the lanes of x (round to nearest even).
inline void store_f16(f16_t* p, vf x) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  alignas(16) float t[VL];
  simd::store(t, x);
  for (int i = 0; i < VL; ++i) p[i].bits = f16_round(t[i]);
#endif
}

// p[0, VL) = the lanes of x as T (finite lanes: see bf16_round_hi).
inline void store_vec(float* p, vf x) { simd::store(p, x); }
inline void store_vec(bf16_t* p, vf x) { store_bf16(&p->bits, x); }
inline void store_vec(f16_t* p, vf x) { store_f16(p, x); }

// Lanes a[l] | b[l] << 16 of two rows of 16-bit values.
inline vf interleave16(const uint16_t* a, const uint16_t* b) {
  return as_float(ior(widen16(a), shl16(widen16(b))));
}

// ---------------------------------------------------------------------------------------------
// The pair step acc + a.b of VDPBF16PS; split() prepares an operand once for several steps.

#if defined(__AVX512BF16__)
struct PairDot {
  using Op = vf;
  static Op split(vf x) { return x; }
  static vf dot(vf acc, Op a, Op b) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
};
#else
struct PairDot {
  struct Op {
    vf odd, even;  // the high and the low bf16 of each lane, as floats
  };
  static Op split(vf x) { return Op{high_half(x), low_half(x)}; }
  static vf dot(vf acc, const Op& a, const Op& b) {
    return simd::fma(a.even, b.even, simd::fma(a.odd, b.odd, acc));
  }
};
#endif

// While alive, MXCSR flushes denormal inputs and results to zero (DAZ | FTZ), as VDPBF16PS
// does: set for the whole bf16 kernel, so that its instruction and emulated builds agree.
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned saved_;
};

// ---------------------------------------------------------------------------------------------
// Rows: converting copies for the kernels' tiles.

// dst[0, n) = src[0, n) as floats.
template <class T>
void row_to_f32(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, sizeof(float) * size_t(n));
  } else {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) simd::store(dst + i, load_f32(src + i));
    for (; i < n; ++i) dst[i] = to_f32(src[i]);
  }
}

// dst[0, npad) = bf16 of src[0, n), zero beyond n.
template <class T>
void row_to_bf16(const T* src, uint16_t* dst, int64_t n, int64_t npad) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, bf16_t>) {
    std::memcpy(dst, src, sizeof(uint16_t) * size_t(n));
    i = n;
  } else {
    for (; i + VL <= n; i += VL) store_bf16(dst + i, load_f32(src + i));
  }
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
  for (; i < npad; ++i) dst[i] = 0;
}

// dst[i] = (bf16(a[i]), bf16(b[i])) for i < n: a and b are rows of consecutive keys (b null:
// zero), dst the pair row the bf16 P.V micro-kernel broadcasts from.
template <class T>
void pair_rows(const T* a, const T* b, uint32_t* dst, int64_t n) {
  float* out = reinterpret_cast<float*>(dst);
  int64_t i = 0;
  if (b == nullptr) {
    for (; i < n; ++i) dst[i] = uint32_t(to_bf16(a[i]));
    return;
  }
#if defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, bf16_t>) {
    // 32 pairs from two 512-bit loads and two word permutes.
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                        8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (; i + 2 * VL <= n; i += 2 * VL) {
      const __m512i x = _mm512_loadu_si512(a + i), y = _mm512_loadu_si512(b + i);
      _mm512_storeu_si512(dst + i, _mm512_permutex2var_epi16(x, lo, y));
      _mm512_storeu_si512(dst + i + VL, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
#endif
  for (; i + VL <= n; i += VL) {
    if constexpr (std::is_same_v<T, bf16_t>)
      simd::store(out + i, interleave16(&a[i].bits, &b[i].bits));
    else
      simd::store(out + i, pack_pairs(load_f32(a + i), load_f32(b + i)));
  }
  for (; i < n; ++i) dst[i] = uint32_t(to_bf16(a[i])) | uint32_t(to_bf16(b[i])) << 16;
}
