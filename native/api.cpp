// Argument checks and orchestration for attention() and multihead(). Every problem with the
// input is reported as std::invalid_argument whose message starts with the argument's name;
// nothing reaches the kernel unchecked.
#include "api.h"

#include <cmath>
#include <cstdint>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace attn {
namespace {

std::string str(int64_t v) { return std::to_string(v); }

// Checks everything beyond the tensors against the attention shapes (already in p.args) and
// fills it into the plan: masking, score modifiers, weights, threads.
void plan_options(AttentionPlan& p, const CallOptions& o, double scale) {
  AttnArgs& a = p.args;
  if (!std::isfinite(scale)) fail("scale: must be finite, got " + std::to_string(scale));
  a.scale = float(scale);
  if (!(o.softcap >= 0.0) || !std::isfinite(o.softcap))
    fail("softcap: must be >= 0 and finite (0 = off), got " + std::to_string(o.softcap));
  a.softcap = float(o.softcap);
  p.masking = Masking(o.masking, a.B, a.Hq, a.Lq, a.Lk);
  a.float_mask = p.masking.float_mask();
  for (int d = 0; d < 4; ++d) a.float_mask_strides[d] = p.masking.float_mask_strides()[d];
  if (o.alibi_slopes.given) {
    if (o.masking.memory_segment != 0)
      fail("alibi_slopes: cannot be combined with memory (a compressed slot has no position to "
           "measure a distance from)");
    check_1d(o.alibi_slopes, "alibi_slopes", DType::f32, a.Hq, "(Hq,)");
    p.alibi.resize(size_t(a.Hq));
    for (int64_t h = 0; h < a.Hq; ++h) {
      const float s = read_f32(o.alibi_slopes, h);
      if (!std::isfinite(s)) fail("alibi_slopes: value at index " + str(h) + " is not finite");
      p.alibi[size_t(h)] = s;
    }
    a.alibi = p.alibi.data();
  }
  // Weights: of every row (return_weights), or of the rows asked for, which win.
  p.weights = o.return_weights || o.weights_rows.given;
  a.n_weight_rows = a.Lq;
  if (o.weights_rows.given) {
    check_1d(o.weights_rows, "weights_rows", DType::i64, -1, "(n,)");
    if (o.weights_rows.shape[0] > a.Lq)  // distinct rows of [0, Lq): checked before reading
      fail("weights_rows: " + str(o.weights_rows.shape[0]) + " rows asked for, but Lq=" +
           str(a.Lq));
    const std::vector<int64_t> rows = read_ints(o.weights_rows);
    p.weight_index.assign(size_t(a.Lq), -1);
    for (size_t w = 0; w < rows.size(); ++w) {
      const int64_t i = rows[w];
      if (i < 0 || i >= a.Lq)
        fail("weights_rows: row " + str(i) + " at index " + str(int64_t(w)) + " is outside [0, " +
             str(a.Lq) + ")");
      if (p.weight_index[size_t(i)] >= 0)
        fail("weights_rows: row " + str(i) + " appears twice (at indices " +
             str(p.weight_index[size_t(i)]) + " and " + str(int64_t(w)) + ")");
      p.weight_index[size_t(i)] = int64_t(w);
    }
    a.n_weight_rows = int64_t(rows.size());
  }
  if (o.num_threads < 0)
    fail("num_threads: must be >= 0 (0 = default), got " + std::to_string(o.num_threads));
  a.num_threads = o.num_threads > 0 ? o.num_threads : default_num_threads();
  p.out_shape = {a.B, a.Hq, a.Lq, a.Dv};
  p.lse_shape = {a.B, a.Hq, a.Lq};
  if (p.weights) p.weights_shape = {a.B, a.Hq, a.n_weight_rows, a.Lk};
}

}  // namespace

AttentionPlan plan_attention(const ArrayRef& q, const ArrayRef& k, const ArrayRef& v,
                             double scale, const CallOptions& opts) {
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
  plan_options(p, opts, scale);
  return p;
}

void run_kernel(AttentionPlan& p) {
  AttnArgs& a = p.args;
  a.weight_index = p.weight_index.empty() ? nullptr : p.weight_index.data();
  const MaskRule rule = p.masking.rule();
  const PlanStorage storage = build_plan(rule, kAttentionTiles, a.B, a.Hq, a.Lq);
  const MaskPlan plan = storage.view();
  a.rule = &rule;
  a.plan = &plan;
  kernels().attention(a);
  a.rule = nullptr;
  a.plan = nullptr;
}

void run_attention(AttentionPlan& p, float* out, float* lse, float* weights) {
  AttnArgs& a = p.args;
  a.out = out;
  a.so[0] = a.Hq * a.Lq * a.Dv;
  a.so[1] = a.Lq * a.Dv;
  a.so[2] = a.Dv;
  a.lse = lse;
  a.weights = p.weights ? weights : nullptr;
  run_kernel(p);
}

MultiheadPlan plan_multihead(const MultiheadInputs& in, double scale, const CallOptions& opts) {
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
  plan_options(p.attn, opts, scale);
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
  a.weights = p.attn.weights ? weights : nullptr;
  run_kernel(p.attn);

  ArrayRef concat;
  concat.given = true;
  concat.data = cb.get();
  concat.dtype = DType::f32;
  concat.shape = {1, p.B * p.Lq, E};
  concat.strides = {p.B * p.Lq * E * 4, E * 4, 4};
  kt.gemm(linear(concat, p.in.out_weight, p.in.out_bias, out, nt));
}

}  // namespace attn
