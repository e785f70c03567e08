// What every file in kernels/ starts from: the SIMD layer and small helpers. Included INSIDE
// each file's per-ISA anonymous namespace (after <immintrin.h>, <cmath>, <cstdint> and
// <cstdlib>), so every ISA gets its own copy and no inline function is shared across
// instruction sets.
#include "simd.h"

using simd::VL;
using simd::vf;

constexpr float NEG_INF = -INFINITY;
constexpr float LOG2E = 1.44269504088896341f;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Grow-only, 64-byte aligned buffer (kept per thread between calls).
template <class T>
struct Buf {
  T* p = nullptr;
  size_t cap = 0;
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  T* get(size_t n) {
    if (n > cap) {
      std::free(p);
      p = nullptr;
      cap = 0;
      size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
      p = static_cast<T*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
      if (!p) throw std::bad_alloc();
      cap = n;
    }
    return p;
  }
};
