// Argument checks and orchestration for attention() and multihead(). Every problem with the
// input is reported as std::invalid_argument whose message starts with the argument's name;
// nothing reaches the kernel unchecked.
#include "api.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace attn {
namespace {

// Positions and lengths must stay well below 2^31 so that window products cannot overflow.
constexpr int64_t kMaxLen = int64_t(1) << 31;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << '(';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ',';
  o << ')';
  return o.str();
}

const char* dtype_label(DType t) {
  switch (t) {
    case DType::f32:
      return "float32";
    case DType::i64:
      return "int64";
    case DType::b8:
      return "bool";
    default:
      return "?";
  }
}

void check_dtype(const ArrayRef& a, const std::string& name, DType want) {
  if (a.dtype != want)
    fail(name + ": expected dtype " + dtype_label(want) + ", got " + a.dtype_name);
}

void check_ndim(const ArrayRef& a, const std::string& name, int ndim, const char* dims) {
  if (a.ndim() != ndim)
    fail(name + ": expected " + std::to_string(ndim) + " dimension" + (ndim == 1 ? "" : "s") +
         " " + dims + ", got " + std::to_string(a.ndim()));
}

// Strides must be whole elements and the data aligned; with unit_last, the last axis must be
// contiguous (the kernels read rows with vector loads).
void check_layout(const ArrayRef& a, const std::string& name, int64_t itemsize, bool unit_last) {
  for (int64_t n : a.shape)
    if (n == 0) return;  // empty: never read, and numpy gives such arrays arbitrary strides
  if (reinterpret_cast<uintptr_t>(a.data) % uintptr_t(itemsize) != 0)
    fail(name + ": data is not aligned to its element size");
  for (int d = 0; d < a.ndim(); ++d)
    if (a.strides[d] % itemsize != 0)
      fail(name + ": strides must be multiples of the element size, got " + shape_str(a.strides));
  const int last = a.ndim() - 1;
  if (unit_last && last >= 0 && a.shape[last] > 1 && a.strides[last] != itemsize)
    fail(name + ": the last axis must be contiguous (stride " + std::to_string(itemsize) +
         " bytes), got stride " + std::to_string(a.strides[last]) + " bytes");
}

void check_float_tensor(const ArrayRef& a, const std::string& name, int ndim, const char* dims) {
  check_ndim(a, name, ndim, dims);
  check_dtype(a, name, DType::f32);
  check_layout(a, name, 4, true);
  for (int64_t s : a.shape)
    if (s >= kMaxLen) fail(name + ": dimension too large " + shape_str(a.shape));
}

// Element strides of a float32 array.
int64_t es(const ArrayRef& a, int d) { return a.strides[d] / 4; }

// Reads element i of a 1-D array of type T through its stride.
template <class T>
T at1(const ArrayRef& a, int64_t i) {
  return *reinterpret_cast<const T*>(static_cast<const char*>(a.data) + i * a.strides[0]);
}

void check_1d(const ArrayRef& a, const std::string& name, DType dt, int64_t len,
              const std::string& len_desc) {
  check_ndim(a, name, 1, len_desc.c_str());
  check_dtype(a, name, dt);
  check_layout(a, name, dt == DType::i64 ? 8 : 4, false);
  if (a.shape[0] != len)
    fail(name + ": expected shape " + len_desc + " = (" + std::to_string(len) + ",), got " +
         shape_str(a.shape));
}

// Checks the masking options against the attention shapes and fills them into the plan.
void plan_masking(AttentionPlan& p, const MaskOptions& o, double scale) {
  AttnArgs& a = p.args;
  if (!std::isfinite(scale)) fail("scale: must be finite, got " + std::to_string(scale));
  a.scale = float(scale);
  if (o.causal < 0 || o.causal > 2)
    fail("causal: expected 0 (none), 1 (top_left) or 2 (bottom_right), got " +
         std::to_string(o.causal));
  a.causal = o.causal;
  if (!(o.softcap >= 0.0) || !std::isfinite(o.softcap))
    fail("softcap: must be >= 0 and finite (0 = off), got " + std::to_string(o.softcap));
  a.softcap = float(o.softcap);
  // A cap float32 cannot invert (below its smallest normal) makes scores / softcap inf or NaN;
  // one that rounds to 0 would silently switch the cap off.
  if (o.softcap > 0.0 && !(a.softcap >= std::numeric_limits<float>::min())) {
    std::ostringstream got;
    got << o.softcap;
    fail("softcap: must be 0 (off) or at least 1.18e-38 (float32's smallest normal), got " +
         got.str());
  }
  if (o.window_left < -1)
    fail("window_left: must be >= 0, or -1 for unbounded, got " + std::to_string(o.window_left));
  if (o.window_right < -1)
    fail("window_right: must be >= 0, or -1 for unbounded, got " +
         std::to_string(o.window_right));
  if (o.dilation < 1) fail("dilation: must be >= 1, got " + std::to_string(o.dilation));
  a.window_left = o.window_left;
  a.window_right = o.window_right;
  a.dilation = o.dilation;

  const std::vector<int64_t> mshape{a.B, a.Hq, a.Lq, a.Lk};
  if (o.mask.given) {
    const ArrayRef& m = o.mask;
    if (m.ndim() != 4 || m.shape != mshape)
      fail("mask: shape must be (B, Hq, Lq, Lk) = " + shape_str(mshape) + ", got " +
           shape_str(m.shape));
    if (m.dtype == DType::b8) {
      check_layout(m, "mask", 1, false);
      a.bool_mask = static_cast<const uint8_t*>(m.data);
      for (int d = 0; d < 4; ++d) a.mask_strides[d] = m.strides[d];
    } else if (m.dtype == DType::f32) {
      check_layout(m, "mask", 4, false);
      a.float_mask = static_cast<const float*>(m.data);
      for (int d = 0; d < 4; ++d) a.mask_strides[d] = m.strides[d] / 4;
    } else {
      fail("mask: expected dtype bool or float32, got " + m.dtype_name);
    }
  }
  if (o.key_lengths.given) {
    check_1d(o.key_lengths, "key_lengths", DType::i64, a.B, "(B,)");
    p.key_lengths.resize(size_t(a.B));
    for (int64_t b = 0; b < a.B; ++b) {
      const int64_t n = at1<int64_t>(o.key_lengths, b);
      if (n < 0)
        fail("key_lengths: value " + std::to_string(n) + " at index " + std::to_string(b) +
             " is negative");
      if (n > a.Lk)
        fail("key_lengths: value " + std::to_string(n) + " at index " + std::to_string(b) +
             " exceeds Lk=" + std::to_string(a.Lk));
      p.key_lengths[size_t(b)] = n;
    }
    a.key_lengths = p.key_lengths.data();
  }
  if (o.global_tokens.given) {
    const ArrayRef& g = o.global_tokens;
    check_ndim(g, "global_tokens", 1, "(n,)");
    check_dtype(g, "global_tokens", DType::i64);
    check_layout(g, "global_tokens", 8, false);
    p.global_tokens.resize(size_t(g.shape[0]));
    for (int64_t i = 0; i < g.shape[0]; ++i) {
      const int64_t pos = at1<int64_t>(g, i);
      if (pos < 0 || pos >= a.Lk)
        fail("global_tokens: position " + std::to_string(pos) + " outside [0, " +
             std::to_string(a.Lk) + ")");
      if (i > 0 && pos <= p.global_tokens[size_t(i - 1)])
        fail("global_tokens: must be sorted and unique (position " + std::to_string(pos) +
             " at index " + std::to_string(i) + " follows " +
             std::to_string(p.global_tokens[size_t(i - 1)]) + ")");
      p.global_tokens[size_t(i)] = pos;
    }
    a.global_tokens = p.global_tokens.data();
    a.n_global = int64_t(p.global_tokens.size());
  }
  if (o.alibi_slopes.given) {
    check_1d(o.alibi_slopes, "alibi_slopes", DType::f32, a.Hq, "(Hq,)");
    p.alibi.resize(size_t(a.Hq));
    for (int64_t h = 0; h < a.Hq; ++h) {
      const float s = at1<float>(o.alibi_slopes, h);
      if (!std::isfinite(s))
        fail("alibi_slopes: value at index " + std::to_string(h) + " is not finite");
      p.alibi[size_t(h)] = s;
    }
    a.alibi = p.alibi.data();
  }
}

void set_threads(AttnArgs& a, int num_threads) {
  if (num_threads < 0) fail("num_threads: must be >= 0 (0 = default), got " +
                            std::to_string(num_threads));
  a.num_threads = num_threads > 0 ? num_threads : default_num_threads();
}

void finish_shapes(AttentionPlan& p, bool return_weights) {
  const AttnArgs& a = p.args;
  p.return_weights = return_weights;
  p.out_shape = {a.B, a.Hq, a.Lq, a.Dv};
  p.lse_shape = {a.B, a.Hq, a.Lq};
  if (return_weights) p.weights_shape = {a.B, a.Hq, a.Lq, a.Lk};
}

}  // namespace

AttentionPlan plan_attention(const ArrayRef& q, const ArrayRef& k, const ArrayRef& v,
                             double scale, const MaskOptions& opts, bool return_weights,
                             int num_threads) {
  check_float_tensor(q, "q", 4, "(B, Hq, Lq, D)");
  check_float_tensor(k, "k", 4, "(B, Hkv, Lk, D)");
  check_float_tensor(v, "v", 4, "(B, Hkv, Lk, Dv)");
  if (k.shape[0] != q.shape[0])
    fail("k: batch size " + std::to_string(k.shape[0]) + " differs from q's " +
         std::to_string(q.shape[0]));
  if (v.shape[0] != q.shape[0])
    fail("v: batch size " + std::to_string(v.shape[0]) + " differs from q's " +
         std::to_string(q.shape[0]));
  if (v.shape[1] != k.shape[1])
    fail("k and v: number of heads differs (" + std::to_string(k.shape[1]) + " vs " +
         std::to_string(v.shape[1]) + ")");
  if (v.shape[2] != k.shape[2])
    fail("k and v: sequence length differs (" + std::to_string(k.shape[2]) + " vs " +
         std::to_string(v.shape[2]) + ")");
  if (q.shape[3] != k.shape[3])
    fail("q and k: head dim differs (" + std::to_string(q.shape[3]) + " vs " +
         std::to_string(k.shape[3]) + ")");
  if (q.shape[3] == 0) fail("q: head dim D must be > 0");
  const int64_t Hq = q.shape[1], Hkv = k.shape[1];
  if (Hkv == 0 && Hq > 0) fail("k: has 0 heads but q has " + std::to_string(Hq));
  if (Hkv > 0 && Hq % Hkv != 0)
    fail("q and k: " + std::to_string(Hq) + " query heads are not a multiple of " +
         std::to_string(Hkv) + " kv heads");

  AttentionPlan p;
  AttnArgs& a = p.args;
  a.B = q.shape[0];
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Lq = q.shape[2];
  a.Lk = k.shape[2];
  a.D = q.shape[3];
  a.Dv = v.shape[3];
  a.q = static_cast<const float*>(q.data);
  a.k = static_cast<const float*>(k.data);
  a.v = static_cast<const float*>(v.data);
  for (int d = 0; d < 3; ++d) {
    a.sq[d] = es(q, d);
    a.sk[d] = es(k, d);
    a.sv[d] = es(v, d);
  }
  plan_masking(p, opts, scale);
  set_threads(a, num_threads);
  finish_shapes(p, return_weights);
  return p;
}

void run_attention(AttentionPlan& p, float* out, float* lse, float* weights) {
  AttnArgs& a = p.args;
  a.out = out;
  a.so[0] = a.Hq * a.Lq * a.Dv;
  a.so[1] = a.Lq * a.Dv;
  a.so[2] = a.Dv;
  a.lse = lse;
  a.weights = p.return_weights ? weights : nullptr;
  kernels().attention(a);
}

MultiheadPlan plan_multihead(const MultiheadInputs& in, double scale, const MaskOptions& opts,
                             bool return_weights, int num_threads) {
  check_float_tensor(in.query, "query", 3, "(B, Lq, E)");
  check_float_tensor(in.key, "key", 3, "(B, Lk, kdim)");
  check_float_tensor(in.value, "value", 3, "(B, Lk, vdim)");
  MultiheadPlan p;
  p.in = in;
  p.B = in.query.shape[0];
  p.Lq = in.query.shape[1];
  p.E = in.query.shape[2];
  p.Lk = in.key.shape[1];
  p.kdim = in.key.shape[2];
  p.vdim = in.value.shape[2];
  if (in.key.shape[0] != p.B)
    fail("key: batch size " + std::to_string(in.key.shape[0]) + " differs from query's " +
         std::to_string(p.B));
  if (in.value.shape[0] != p.B)
    fail("value: batch size " + std::to_string(in.value.shape[0]) + " differs from query's " +
         std::to_string(p.B));
  if (in.value.shape[1] != p.Lk)
    fail("value: sequence length " + std::to_string(in.value.shape[1]) + " differs from key's " +
         std::to_string(p.Lk));
  if (p.E == 0) fail("query: embed dim E must be > 0");
  const int64_t H = in.num_heads, Hkv = in.num_kv_heads;
  if (H < 1) fail("num_heads: must be >= 1, got " + std::to_string(H));
  if (Hkv < 1) fail("num_kv_heads: must be >= 1, got " + std::to_string(Hkv));
  if (p.E % H != 0)
    fail("num_heads: embed dim " + std::to_string(p.E) + " is not divisible by " +
         std::to_string(H) + " heads");
  if (H % Hkv != 0)
    fail("num_heads: " + std::to_string(H) + " query heads are not a multiple of " +
         std::to_string(Hkv) + " kv heads");
  p.head_dim = p.E / H;
  const int64_t kv_out = Hkv * p.head_dim;

  auto check_weight = [](const ArrayRef& w, const char* name, int64_t rows, int64_t cols,
                         const char* desc) {
    check_ndim(w, name, 2, desc);
    check_dtype(w, name, DType::f32);
    check_layout(w, name, 4, false);
    if (w.shape[0] != rows || w.shape[1] != cols)
      fail(std::string(name) + ": expected shape " + desc + " = " + shape_str({rows, cols}) +
           ", got " + shape_str(w.shape));
  };
  check_weight(in.q_weight, "q_weight", p.E, p.E, "(E, E)");
  check_weight(in.k_weight, "k_weight", kv_out, p.kdim, "(num_kv_heads * head_dim, kdim)");
  check_weight(in.v_weight, "v_weight", kv_out, p.vdim, "(num_kv_heads * head_dim, vdim)");
  check_weight(in.out_weight, "out_weight", p.E, p.E, "(E, E)");
  auto check_bias = [](const ArrayRef& b, const char* name, int64_t n, const char* desc) {
    if (b.given) check_1d(b, name, DType::f32, n, desc);
  };
  check_bias(in.q_bias, "q_bias", p.E, "(E,)");
  check_bias(in.k_bias, "k_bias", kv_out, "(num_kv_heads * head_dim,)");
  check_bias(in.v_bias, "v_bias", kv_out, "(num_kv_heads * head_dim,)");
  check_bias(in.out_bias, "out_bias", p.E, "(E,)");
  // run_multihead allocates the projected q/k/v and the concatenated heads: refuse sizes whose
  // element counts overflow int64 (zero-stride views can claim them) instead of wrapping.
  auto check_scratch = [](const char* name, int64_t b, int64_t l, int64_t e) {
    int64_t bl = 0, n = 0;
    if (__builtin_mul_overflow(b, l, &bl) || __builtin_mul_overflow(bl, e, &n) ||
        n > (int64_t(1) << 60) / int64_t(sizeof(float)))
      fail(std::string(name) + ": projected size " + shape_str({b, l, e}) + " is too large");
  };
  check_scratch("query", p.B, p.Lq, p.E);
  check_scratch("key", p.B, p.Lk, kv_out);

  AttnArgs& a = p.attn.args;
  a.B = p.B;
  a.Hq = H;
  a.Hkv = Hkv;
  a.Lq = p.Lq;
  a.Lk = p.Lk;
  a.D = p.head_dim;
  a.Dv = p.head_dim;
  plan_masking(p.attn, opts, scale);
  set_threads(a, num_threads);
  finish_shapes(p.attn, return_weights);
  p.out_shape = {p.B, p.Lq, p.E};
  return p;
}

namespace {

GemmArgs linear(const ArrayRef& x, const ArrayRef& w, const ArrayRef& bias, float* y,
                int num_threads) {
  GemmArgs g{};
  g.M = x.shape[0] * x.shape[1];
  g.N = w.shape[0];
  g.K = w.shape[1];
  g.x = static_cast<const float*>(x.data);
  g.rows_per_batch = x.shape[1] > 0 ? x.shape[1] : 1;
  g.sx_batch = es(x, 0);
  g.sx_row = es(x, 1);
  g.w = static_cast<const float*>(w.data);
  g.sw_n = es(w, 0);
  g.sw_k = es(w, 1);
  if (bias.given) {
    g.bias = static_cast<const float*>(bias.data);
    g.sbias = es(bias, 0);
  }
  g.y = y;
  g.ldy = g.N;
  g.num_threads = num_threads;
  return g;
}

}  // namespace

void run_multihead(MultiheadPlan& p, float* out, float* lse, float* weights) {
  const KernelTable& kt = kernels();
  const int nt = p.attn.args.num_threads;
  const int64_t E = p.E, hd = p.head_dim, kv_out = p.attn.args.Hkv * hd;
  std::unique_ptr<float[]> qb(new float[size_t(p.B * p.Lq * E)]);
  std::unique_ptr<float[]> kb(new float[size_t(p.B * p.Lk * kv_out)]);
  std::unique_ptr<float[]> vb(new float[size_t(p.B * p.Lk * kv_out)]);
  std::unique_ptr<float[]> cb(new float[size_t(p.B * p.Lq * E)]);
  kt.gemm(linear(p.in.query, p.in.q_weight, p.in.q_bias, qb.get(), nt));
  kt.gemm(linear(p.in.key, p.in.k_weight, p.in.k_bias, kb.get(), nt));
  kt.gemm(linear(p.in.value, p.in.v_weight, p.in.v_bias, vb.get(), nt));

  // Heads are column blocks of the projections: view them in place through strides, and
  // write each head's output straight into its columns of the concatenation.
  AttnArgs& a = p.attn.args;
  a.q = qb.get();
  a.sq[0] = p.Lq * E;
  a.sq[1] = hd;
  a.sq[2] = E;
  a.k = kb.get();
  a.v = vb.get();
  a.sk[0] = a.sv[0] = p.Lk * kv_out;
  a.sk[1] = a.sv[1] = hd;
  a.sk[2] = a.sv[2] = kv_out;
  a.out = cb.get();
  a.so[0] = p.Lq * E;
  a.so[1] = hd;
  a.so[2] = E;
  a.lse = lse;
  a.weights = p.attn.return_weights ? weights : nullptr;
  kt.attention(a);

  ArrayRef concat;
  concat.given = true;
  concat.data = cb.get();
  concat.dtype = DType::f32;
  concat.shape = {1, p.B * p.Lq, E};
  concat.strides = {p.B * p.Lq * E * 4, E * 4, 4};
  kt.gemm(linear(concat, p.in.out_weight, p.in.out_bias, out, nt));
}

}  // namespace attn
