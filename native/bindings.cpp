// Python bindings of service._native: numpy arrays in, numpy arrays out. Arrays are read in
// place (no copies, any strides the checks accept); the GIL is released while computing.
// std::invalid_argument from the checks surfaces as ValueError; attn::Cancelled (a CancelFlag
// set by another thread while the call runs) as _native.Cancelled.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "api.h"
#include "maps_api.h"

namespace py = pybind11;

namespace {

// Set from any Python thread to stop a running call. The call keeps a reference to it (it is
// an argument), so the atomic outlives the native work.
struct CancelFlag {
  std::atomic<int> value{0};
};

const std::atomic<int>* flag_ptr(const std::optional<CancelFlag*>& cancel) {
  return cancel && *cancel != nullptr ? &(*cancel)->value : nullptr;
}

attn::ArrayRef to_ref(const py::object& obj, const char* name, bool optional) {
  attn::ArrayRef r;
  if (obj.is_none()) {
    if (optional) return r;
    throw std::invalid_argument(std::string(name) + ": expected a numpy array, got None");
  }
  if (!py::isinstance<py::array>(obj))
    throw std::invalid_argument(std::string(name) + ": expected a numpy array, got " +
                                std::string(py::str(py::type::of(obj).attr("__name__"))));
  const auto a = py::reinterpret_borrow<py::array>(obj);
  r.given = true;
  r.data = a.data();
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    r.shape.push_back(int64_t(a.shape(d)));
    r.strides.push_back(int64_t(a.strides(d)));
  }
  const py::dtype dt = a.dtype();
  const char kind = dt.kind();
  const char order = dt.byteorder();
  const bool native = order == '=' || order == '|' || order == '<';  // x86-64 only
  r.dtype_name = std::string(py::str(dt));
  if (native && kind == 'f' && dt.itemsize() == 4)
    r.dtype = attn::DType::f32;
  else if (native && kind == 'f' && dt.itemsize() == 2)
    r.dtype = attn::DType::f16;
  else if (dt.itemsize() == 2 && r.dtype_name == "bfloat16")  // ml_dtypes' bfloat16
    r.dtype = attn::DType::bf16;
  else if (native && (kind == 'i' || kind == 'u') && dt.itemsize() == 2)
    r.dtype = attn::DType::u16;
  else if (native && kind == 'i' && dt.itemsize() == 8)
    r.dtype = attn::DType::i64;
  else if (native && kind == 'i' && dt.itemsize() == 4)
    r.dtype = attn::DType::i32;
  else if (kind == 'b' && dt.itemsize() == 1)
    r.dtype = attn::DType::b8;
  return r;
}

// Keyword options of every entry point, in the signatures' order (after the tensors): the
// masking ones, and with them the score ones.
#define ATTN_MASK_PARAMS                                                                     \
  int causal, const py::object &mask, const py::object &key_lengths, int64_t window_left,   \
      int64_t window_right, int64_t dilation, const py::object &global_tokens,              \
      const py::object &block_layout, int64_t block_q, int64_t block_k,                     \
      const py::object &cu_seqlens, const py::object &cu_seqlens_q,                         \
      const py::object &cu_seqlens_k, int64_t key_begin, int64_t key_end,                    \
      int64_t memory_segment, int64_t memory_length, int64_t memory_compressed,              \
      int64_t memory_rate
#define ATTN_MASK_VALUES                                                                     \
  causal, mask, key_lengths, window_left, window_right, dilation, global_tokens,            \
      block_layout, block_q, block_k, cu_seqlens, cu_seqlens_q, cu_seqlens_k, key_begin,    \
      key_end, memory_segment, memory_length, memory_compressed, memory_rate
#define ATTN_OPTION_PARAMS \
  double scale, const py::object &alibi_slopes, double softcap, ATTN_MASK_PARAMS
#define ATTN_OPTION_VALUES scale, alibi_slopes, softcap, ATTN_MASK_VALUES

// The keyword arguments matching ATTN_MASK_PARAMS and ATTN_OPTION_PARAMS, for m.def.
auto mask_args() {
  return std::make_tuple(
      py::arg("causal") = 0, py::arg("mask") = py::none(), py::arg("key_lengths") = py::none(),
      py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("dilation") = 1,
      py::arg("global_tokens") = py::none(), py::arg("block_layout") = py::none(),
      py::arg("block_q") = 0, py::arg("block_k") = 0, py::arg("cu_seqlens") = py::none(),
      py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(),
      py::arg("key_begin") = 0, py::arg("key_end") = -1, py::arg("memory_segment") = 0,
      py::arg("memory_length") = 0, py::arg("memory_compressed") = 0,
      py::arg("memory_rate") = 1);
}
auto option_args() {
  return std::tuple_cat(std::make_tuple(py::arg("scale"), py::arg("alibi_slopes") = py::none(),
                                        py::arg("softcap") = 0.0),
                        mask_args());
}

// m.def(name, f, <head...>, <options...>, <tail...>).
template <class F, class Head, class Options, class Tail>
void def_with(py::module_& m, const char* name, F f, Head head, Options options, Tail tail) {
  std::apply(
      [&](auto&&... h) {
        std::apply(
            [&](auto&&... o) {
              std::apply([&](auto&&... t) { m.def(name, f, h..., o..., t...); }, tail);
            },
            options);
      },
      head);
}

attn::MaskOptions mask_options(ATTN_MASK_PARAMS) {
  attn::MaskOptions o;
  o.causal = causal;
  o.mask = to_ref(mask, "mask", true);
  o.key_lengths = to_ref(key_lengths, "key_lengths", true);
  o.window_left = window_left;
  o.window_right = window_right;
  o.dilation = dilation;
  o.global_tokens = to_ref(global_tokens, "global_tokens", true);
  o.block_layout = to_ref(block_layout, "block_layout", true);
  o.block_q = block_q;
  o.block_k = block_k;
  // flash-attn's names: cu_seqlens for self-attention, or the pair for cross-attention.
  if (!cu_seqlens.is_none()) {
    if (!cu_seqlens_q.is_none() || !cu_seqlens_k.is_none())
      throw std::invalid_argument(
          "cu_seqlens: give cu_seqlens, or cu_seqlens_q and cu_seqlens_k, not both");
    o.cu_seqlens_q = o.cu_seqlens_k = to_ref(cu_seqlens, "cu_seqlens", true);
    o.cu_seqlens_shared = true;
  } else {
    o.cu_seqlens_q = to_ref(cu_seqlens_q, "cu_seqlens_q", true);
    o.cu_seqlens_k = to_ref(cu_seqlens_k, "cu_seqlens_k", true);
  }
  o.key_begin = key_begin;
  o.key_end = key_end;
  o.memory_segment = memory_segment;
  o.memory_length = memory_length;
  o.memory_compressed = memory_compressed;
  o.memory_rate = memory_rate;
  return o;
}

attn::CallOptions call_options(ATTN_OPTION_PARAMS) {
  attn::CallOptions c;
  (void)scale;  // passed to the plan on its own
  c.masking = mask_options(ATTN_MASK_VALUES);
  c.alibi_slopes = to_ref(alibi_slopes, "alibi_slopes", true);
  c.softcap = softcap;
  return c;
}

template <class T>
py::array_t<T> empty(const std::vector<int64_t>& shape) {
  return py::array_t<T>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
}

// An empty output array of element type t: float32, float16, or bfloat16 bits as uint16.
py::array empty_of(attn::ElemType t, const std::vector<int64_t>& shape) {
  switch (t) {
    case attn::ElemType::bf16:
      return empty<uint16_t>(shape);
    case attn::ElemType::f16:
      return py::array(py::dtype("float16"), std::vector<py::ssize_t>(shape.begin(), shape.end()));
    default:
      return empty<float>(shape);
  }
}

// The outputs of attention() and multihead(): out, lse and, when asked for, the weights.
struct Outputs {
  py::array out;
  py::array_t<float> lse;
  py::object weights = py::none();
  float* weights_data = nullptr;

  Outputs(const std::vector<int64_t>& out_shape, const std::vector<int64_t>& lse_shape,
          bool with_weights, const std::vector<int64_t>& weights_shape,
          attn::ElemType out_type = attn::ElemType::f32)
      : out(empty_of(out_type, out_shape)), lse(empty<float>(lse_shape)) {
    if (with_weights) {
      auto w = empty<float>(weights_shape);
      weights_data = w.mutable_data();
      weights = std::move(w);
    }
  }
  py::tuple as_tuple() const { return py::make_tuple(out, lse, weights); }
};

// Runs `work` without the GIL, with `cancel` bound to every parallel pass it makes.
template <class Work>
void run_released(const std::optional<CancelFlag*>& cancel, Work&& work) {
  py::gil_scoped_release nogil;
  attn::CancelScope scope(flag_ptr(cancel));
  work();
}

py::tuple attention(const py::object& q, const py::object& k, const py::object& v,
                    ATTN_OPTION_PARAMS, bool return_weights, const py::object& weights_rows,
                    bool bfloat16, const std::string& precision, const std::string& out_dtype,
                    int num_threads, std::optional<CancelFlag*> cancel) {
  attn::CallOptions opts = call_options(ATTN_OPTION_VALUES);
  opts.return_weights = return_weights;
  opts.weights_rows = to_ref(weights_rows, "weights_rows", true);
  opts.bfloat16 = bfloat16;
  opts.precision = precision;
  opts.out_dtype = out_dtype;
  opts.num_threads = num_threads;
  attn::AttentionPlan plan = attn::plan_attention(to_ref(q, "q", false), to_ref(k, "k", false),
                                                  to_ref(v, "v", false), scale, opts);
  Outputs o(plan.out_shape, plan.lse_shape, plan.weights, plan.weights_shape,
            plan.args.out_type);
  run_released(cancel, [&] {
    attn::run_attention(plan, o.out.mutable_data(), o.lse.mutable_data(), o.weights_data);
  });
  return o.as_tuple();
}

py::tuple multihead(const py::object& query, const py::object& key, const py::object& value,
                    const py::object& q_weight, const py::object& k_weight,
                    const py::object& v_weight, const py::object& out_weight,
                    const py::object& q_bias, const py::object& k_bias, const py::object& v_bias,
                    const py::object& out_bias, int64_t num_heads, int64_t num_kv_heads,
                    ATTN_OPTION_PARAMS, bool return_weights, const py::object& weights_rows,
                    int num_threads, std::optional<CancelFlag*> cancel) {
  attn::MultiheadInputs in;
  in.query = to_ref(query, "query", false);
  in.key = to_ref(key, "key", false);
  in.value = to_ref(value, "value", false);
  in.q_weight = to_ref(q_weight, "q_weight", false);
  in.k_weight = to_ref(k_weight, "k_weight", false);
  in.v_weight = to_ref(v_weight, "v_weight", false);
  in.out_weight = to_ref(out_weight, "out_weight", false);
  in.q_bias = to_ref(q_bias, "q_bias", true);
  in.k_bias = to_ref(k_bias, "k_bias", true);
  in.v_bias = to_ref(v_bias, "v_bias", true);
  in.out_bias = to_ref(out_bias, "out_bias", true);
  in.num_heads = num_heads;
  in.num_kv_heads = num_kv_heads;
  attn::CallOptions opts = call_options(ATTN_OPTION_VALUES);
  opts.return_weights = return_weights;
  opts.weights_rows = to_ref(weights_rows, "weights_rows", true);
  opts.num_threads = num_threads;
  attn::MultiheadPlan plan = attn::plan_multihead(in, scale, opts);
  Outputs o(plan.out_shape, plan.attn.lse_shape, plan.attn.weights, plan.attn.weights_shape);
  run_released(cancel, [&] {
    attn::run_multihead(plan, static_cast<float*>(o.out.mutable_data()), o.lse.mutable_data(),
                        o.weights_data);
  });
  return o.as_tuple();
}

py::tuple attention_maps(const py::object& q, const py::object& k, const py::object& v,
                         ATTN_OPTION_PARAMS, int64_t bins_q, int64_t bins_k, int64_t top_k,
                         int num_threads, std::optional<CancelFlag*> cancel) {
  attn::CallOptions opts = call_options(ATTN_OPTION_VALUES);
  opts.num_threads = num_threads;
  attn::MapsPlan plan = attn::plan_maps(to_ref(q, "q", false), to_ref(k, "k", false),
                                        to_ref(v, "v", false), scale, opts, bins_q, bins_k,
                                        top_k);
  Outputs o(plan.attn.out_shape, plan.attn.lse_shape, false, {});
  auto pooled = empty<double>(plan.pooled_shape);
  auto entropy = empty<float>(plan.attn.lse_shape);
  auto top_idx = empty<int64_t>(plan.top_shape);
  auto top_w = empty<float>(plan.top_shape);
  auto colsum = empty<double>(plan.colsum_shape);
  run_released(cancel, [&] {
    attn::run_maps(plan, static_cast<float*>(o.out.mutable_data()), o.lse.mutable_data(),
                   pooled.mutable_data(),
                   entropy.mutable_data(), top_idx.mutable_data(), top_w.mutable_data(),
                   colsum.mutable_data());
  });
  return py::make_tuple(o.out, o.lse, pooled, entropy, top_idx, top_w, colsum);
}

// The mask plan a call with these shapes and masking options would follow, summarised: for
// benchmarks (its build time) and tests (its size follows the tiles, never Lq x Lk).
py::dict mask_plan(int64_t b, int64_t hq, int64_t lq, int64_t lk, ATTN_MASK_PARAMS,
                   const std::string& kernel) {
  if (kernel != "attention" && kernel != "maps")
    throw std::invalid_argument("kernel: expected 'attention' or 'maps', got '" + kernel + "'");
  for (const int64_t n : {b, hq, lq, lk})
    if (n < 0 || n >= attn::kMaxLen)
      throw std::invalid_argument("shape: each of b, hq, lq, lk must be in [0, 2^31)");
  const attn::MaskOptions opts = mask_options(ATTN_MASK_VALUES);
  attn::PlanStats st;
  {
    py::gil_scoped_release nogil;
    st = attn::plan_stats(opts, kernel == "maps" ? attn::kMapsTiles : attn::kAttentionTiles, b,
                          hq, lq, lk);
  }
  py::dict d;
  d["groups"] = st.groups;
  d["items"] = st.items;
  d["spans"] = st.spans;
  d["full_spans"] = st.full_spans;
  d["pairs"] = st.pairs;
  d["head_dependent"] = st.head_dependent;
  d["build_seconds"] = st.build_seconds;
  return d;
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("n: must be >= 1, got " + std::to_string(n));
  attn::set_default_num_threads(n);
}

void warn(const std::string& msg) {
  if (PyErr_WarnEx(PyExc_RuntimeWarning, msg.c_str(), 1) < 0) throw py::error_already_set();
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "Fused attention kernels (tiled online-softmax attention, projections, dispatch).";
  // One version, one source: pyproject.toml, through scikit-build-core and CMake.
  m.attr("__version__") = ATTN_VERSION;
  m.def("version", [] { return ATTN_VERSION; }, "The package version (same as __version__).");

  py::register_exception<attn::Cancelled>(m, "Cancelled", PyExc_RuntimeError);
  py::class_<CancelFlag>(m, "CancelFlag",
                         "Pass as cancel= to a call; set() from another thread stops it (it "
                         "raises Cancelled) after each worker finishes its current item.")
      .def(py::init<>())
      .def("set", [](CancelFlag& f) { f.value.store(1, std::memory_order_relaxed); })
      .def("is_set", [](const CancelFlag& f) {
        return f.value.load(std::memory_order_relaxed) != 0;
      });

  const auto tail = [](auto... extra) {
    return std::make_tuple(extra..., py::arg("num_threads") = 0, py::arg("cancel") = py::none());
  };
  def_with(
      m, "attention", &attention,
      std::make_tuple(py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only()), option_args(),
      tail(py::arg("return_weights") = false, py::arg("weights_rows") = py::none(),
           py::arg("bfloat16") = false, py::arg("precision") = "auto",
           py::arg("out_dtype") = "float32",
           "Exact attention. q, k, v: float32, float16 or bfloat16 (ml_dtypes' bfloat16, or "
           "int16/uint16 bit patterns with bfloat16=True), one dtype for the three. precision: "
           "'auto' (bf16 dot products for bfloat16 inputs where the CPU has AVX512_BF16, else "
           "float32), 'fp32' or 'bf16' (bf16 numerics, emulated without the instruction). "
           "out_dtype: float32, bfloat16 (returned as uint16 bits), float16, or input. Returns "
           "(out (B,Hq,Lq,Dv), lse (B,Hq,Lq), weights or None): the weights are (B,Hq,Lq,Lk) "
           "with return_weights, (B,Hq,len(weights_rows),Lk) for the rows asked for."));
  def_with(
      m, "multihead", &multihead,
      std::make_tuple(py::arg("query"), py::arg("key"), py::arg("value"), py::arg("q_weight"),
                      py::arg("k_weight"), py::arg("v_weight"), py::arg("out_weight"),
                      py::arg("q_bias") = py::none(), py::arg("k_bias") = py::none(),
                      py::arg("v_bias") = py::none(), py::arg("out_bias") = py::none(),
                      py::kw_only(), py::arg("num_heads"), py::arg("num_kv_heads")),
      option_args(),
      tail(py::arg("return_weights") = false, py::arg("weights_rows") = py::none(),
           "torch.nn.MultiheadAttention(batch_first=True) math with grouped kv heads. Returns "
           "(out (B,Lq,E), lse (B,H,Lq), weights (B,H,Lq or len(weights_rows),Lk) or None)."));
  def_with(
      m, "attention_maps", &attention_maps,
      std::make_tuple(py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only()), option_args(),
      tail(py::arg("bins_q") = 1, py::arg("bins_k") = 1, py::arg("top_k") = 0,
           "Exact attention maps in O(L) memory. Returns (out, lse, pooled (B,Hq,Pq,Pk) bin "
           "means, entropy (B,Hq,Lq), top_idx and top_w (B,Hq,Lq,K), column sums (B,Hq,Lk)); "
           "Pq, Pk, K are clamped to Lq, Lk, Lk."));

  def_with(m, "mask_plan", &mask_plan,
           std::make_tuple(py::arg("b"), py::arg("hq"), py::arg("lq"), py::arg("lk"),
                           py::kw_only()),
           mask_args(),
           std::make_tuple(py::arg("kernel") = "attention",
                           "Summary of the mask plan of a call with these shapes and masking "
                           "options: groups of query rows, work items, key spans (and how many "
                           "are full), (query, key) pairs visited over all heads, whether it "
                           "differs by head, and the seconds its checks and building took."));
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        "Default number of threads for calls with num_threads=0.");
  m.def("get_num_threads", &attn::default_num_threads);
  m.def("isa", &attn::current_isa,
        "Instruction set in use: baseline, avx2, avx512 or avx512bf16.");
  m.def("bf16_dot", [] { return attn::kernels().bf16_dot; },
        "Whether the build in use forms bf16 products with the CPU's instruction (AVX512_BF16).");
  m.def("available_isas", &attn::available_isas,
        "Instruction sets this CPU supports and this build contains.");
  m.def("set_isa", &attn::set_isa, py::arg("name"), "Force an instruction set.");

  if (const char* isa = std::getenv("ATTN_ISA"); isa != nullptr && *isa != '\0') {
    try {
      attn::set_isa(isa);
    } catch (const std::invalid_argument& e) {
      warn(std::string("ATTN_ISA ignored: ") + e.what() + "; using " + attn::current_isa());
    }
  }
  if (const std::string problem = attn::num_threads_env_problem(); !problem.empty())
    warn(problem);
}
