// The projection GEMM of multihead(): Y = X . W^T + bias (see GemmArgs). Compiled once per
// instruction set like every file in kernels/, everything in a per-ISA namespace.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>

#include "entries.h"
#include "thread_pool.h"

namespace attn {
namespace ATTN_ISA_NS {
namespace {

#include "tile_util.h"

#if defined(__AVX512F__)
constexpr int GR = 12;  // micro-tile rows
constexpr int GC = 2;   // micro-tile width in vectors
#else
constexpr int GR = 6;
constexpr int GC = 2;
#endif

// W^T is packed once per call into panels of
// GW columns (k-major); the micro-kernel broadcasts X and streams the packed panel.

constexpr int GW = GC * VL;
constexpr int64_t KC = 256;      // k-block: a packed panel slice stays in L1
constexpr int64_t GMB = GR * 8;  // rows per work item
constexpr int64_t GNP = 4;       // panels per work item

template <int R>
void gemm_micro(const float* const* xr, const float* wp, int64_t kc, float* y, int64_t ldy,
                int ncols, const float* bias, bool first) {
  vf acc[R][GC];
  alignas(64) float tmp[R][GW];
  const bool full = ncols == GW;
  if (first) {
#pragma GCC unroll 4
    for (int c = 0; c < GC; ++c) {
      const vf bv = bias ? simd::load(bias + c * VL) : simd::zero();
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][c] = bv;
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float* src = y + r * ldy;
      if (!full) {
        for (int cc = 0; cc < GW; ++cc) tmp[r][cc] = cc < ncols ? y[r * ldy + cc] : 0.0f;
        src = tmp[r];
      }
#pragma GCC unroll 4
      for (int c = 0; c < GC; ++c) acc[r][c] = simd::load(src + c * VL);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    vf wv[GC];
#pragma GCC unroll 4
    for (int c = 0; c < GC; ++c) wv[c] = simd::load(wp + k * GW + c * VL);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vf xb = simd::set1(xr[r][k]);
#pragma GCC unroll 4
      for (int c = 0; c < GC; ++c) acc[r][c] = simd::fma(xb, wv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (full) {
#pragma GCC unroll 4
      for (int c = 0; c < GC; ++c) simd::store(y + r * ldy + c * VL, acc[r][c]);
    } else {
#pragma GCC unroll 4
      for (int c = 0; c < GC; ++c) simd::store(tmp[r] + c * VL, acc[r][c]);
      for (int cc = 0; cc < ncols; ++cc) y[r * ldy + cc] = tmp[r][cc];
    }
  }
}

using GemmFn = void (*)(const float* const*, const float*, int64_t, float*, int64_t, int,
                        const float*, bool);
template <size_t... I>
struct GemmTable {
  static constexpr GemmFn fns[] = {&gemm_micro<int(I) + 1>...};
};
template <size_t... I>
GemmTable<I...> make_gemm_table(std::index_sequence<I...>);
using GemmTables = decltype(make_gemm_table(std::make_index_sequence<GR>{}));

struct GemmCtx {
  const GemmArgs* g;
  float* wp;    // packed W^T: panel p, row k at wp[(p * K + k) * GW]
  float* bias;  // padded bias (n_panels * GW) or null
  int64_t n_panels, n_mb, n_nb;
};

void gemm_pack(void* p, int64_t panel) {
  const GemmCtx& c = *static_cast<const GemmCtx*>(p);
  const GemmArgs& g = *c.g;
  float* dst = c.wp + panel * g.K * GW;
  for (int col = 0; col < GW; ++col) {
    const int64_t n = panel * GW + col;
    if (n < g.N) {
      const float* src = g.w + n * g.sw_n;
      for (int64_t k = 0; k < g.K; ++k) dst[k * GW + col] = src[k * g.sw_k];
    } else {
      for (int64_t k = 0; k < g.K; ++k) dst[k * GW + col] = 0.0f;
    }
  }
}

void gemm_item(void* p, int64_t item) {
  const GemmCtx& c = *static_cast<const GemmCtx*>(p);
  const GemmArgs& g = *c.g;
  const int64_t mb = item / c.n_nb, nb = item % c.n_nb;
  const int64_t m0 = mb * GMB, m1 = min64(g.M, m0 + GMB);
  const int64_t p0 = nb * GNP, p1 = min64(c.n_panels, p0 + GNP);
  const float* xr[GR];
  for (int64_t k0 = 0; k0 == 0 || k0 < g.K; k0 += KC) {
    const int64_t kc = min64(KC, g.K - k0);
    for (int64_t pn = p0; pn < p1; ++pn) {
      const int ncols = int(min64(GW, g.N - pn * GW));
      const float* wp = c.wp + (pn * g.K + k0) * GW;
      const float* bias = c.bias ? c.bias + pn * GW : nullptr;
      for (int64_t m = m0; m < m1; m += GR) {
        const int R = int(min64(GR, m1 - m));
        for (int r = 0; r < R; ++r) {
          const int64_t row = m + r;
          xr[r] = g.x + (row / g.rows_per_batch) * g.sx_batch +
                  (row % g.rows_per_batch) * g.sx_row + k0;
        }
        float* y = g.y + m * g.ldy + pn * GW;
        if (R == GR)
          gemm_micro<GR>(xr, wp, kc, y, g.ldy, ncols, bias, k0 == 0);
        else
          GemmTables::fns[R - 1](xr, wp, kc, y, g.ldy, ncols, bias, k0 == 0);
      }
    }
  }
}

void gemm_impl(const GemmArgs& g) {
  if (g.M == 0 || g.N == 0) return;
  GemmCtx c{};
  c.g = &g;
  c.n_panels = (g.N + GW - 1) / GW;
  Buf<float> wp, bias;
  c.wp = wp.get(size_t(c.n_panels * (g.K > 0 ? g.K : 1) * GW));
  if (g.bias) {
    c.bias = bias.get(size_t(c.n_panels * GW));
    for (int64_t n = 0; n < c.n_panels * GW; ++n) c.bias[n] = n < g.N ? g.bias[n * g.sbias] : 0.f;
  }
  parallel_for(c.n_panels, g.num_threads, &gemm_pack, &c);
  c.n_mb = (g.M + GMB - 1) / GMB;
  c.n_nb = (c.n_panels + GNP - 1) / GNP;
  parallel_for(c.n_mb * c.n_nb, g.num_threads, &gemm_item, &c);
}

}  // namespace

void gemm(const GemmArgs& g) { gemm_impl(g); }

}  // namespace ATTN_ISA_NS
}  // namespace attn
