// The C++ entry points behind the Python module: argument checks (std::invalid_argument naming
// the argument), output shapes, and the runs. Independent of Python: arrays arrive as ArrayRef.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernel_abi.h"
#include "thread_pool.h"

namespace attn {

enum class DType { f32, i64, b8, other };

// A view of an n-d array as handed over by the bindings; strides are in bytes.
struct ArrayRef {
  bool given = false;  // false for None
  const void* data = nullptr;
  DType dtype = DType::other;
  std::string dtype_name;
  std::vector<int64_t> shape, strides;
  int ndim() const { return int(shape.size()); }
};

struct MaskOptions {
  int causal = 0;
  ArrayRef mask, key_lengths, global_tokens, alibi_slopes;
  int64_t window_left = -1, window_right = -1, dilation = 1;
  double softcap = 0.0;
};

// A checked attention call: the kernel arguments (output pointers still unset) plus the data
// they point into that the checks copied out (key lengths, global tokens, slopes).
struct AttentionPlan {
  AttnArgs args{};
  bool return_weights = false;
  std::vector<int64_t> key_lengths, global_tokens;
  std::vector<float> alibi;
  std::vector<int64_t> out_shape, lse_shape, weights_shape;
};

AttentionPlan plan_attention(const ArrayRef& q, const ArrayRef& k, const ArrayRef& v, double scale,
                             const MaskOptions& opts, bool return_weights, int num_threads);
void run_attention(AttentionPlan& plan, float* out, float* lse, float* weights);

struct MultiheadInputs {
  ArrayRef query, key, value, q_weight, k_weight, v_weight, out_weight;
  ArrayRef q_bias, k_bias, v_bias, out_bias;
  int64_t num_heads = 0, num_kv_heads = 0;
};

struct MultiheadPlan {
  MultiheadInputs in;
  AttentionPlan attn;  // q, k, v, out pointers and strides are filled in at run time
  int64_t B = 0, Lq = 0, Lk = 0, E = 0, kdim = 0, vdim = 0, head_dim = 0;
  std::vector<int64_t> out_shape;
};

MultiheadPlan plan_multihead(const MultiheadInputs& in, double scale, const MaskOptions& opts,
                             bool return_weights, int num_threads);
void run_multihead(MultiheadPlan& plan, float* out, float* lse, float* weights);

// Instruction-set dispatch (dispatch.cpp).
const KernelTable& kernels();
std::string current_isa();
std::vector<std::string> available_isas();
void set_isa(const std::string& name);  // std::invalid_argument if unknown or unavailable

}  // namespace attn
