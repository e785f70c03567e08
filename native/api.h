// The C++ entry points behind the Python module: argument checks (std::invalid_argument naming
// the argument), output shapes, and the runs. Independent of Python: arrays arrive as ArrayRef.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "checks.h"
#include "kernel_abi.h"
#include "masking.h"
#include "thread_pool.h"

namespace attn {

// Options of every entry point beyond the tensors.
struct CallOptions {
  MaskOptions masking;
  ArrayRef alibi_slopes;
  double softcap = 0.0;
  bool return_weights = false;
  ArrayRef weights_rows;  // weights for these query rows only (implies weights)
  int num_threads = 0;
};

// A checked attention call: the kernel arguments (output pointers still unset) plus the data
// they point into (masking, slopes, the weights rows).
struct AttentionPlan {
  AttnArgs args{};
  Masking masking;
  bool weights = false;  // a weights output exists
  std::vector<float> alibi;
  std::vector<int64_t> weight_index;  // query row -> weights row (-1: none), with weights_rows
  std::vector<int64_t> out_shape, lse_shape, weights_shape;
};

AttentionPlan plan_attention(const ArrayRef& q, const ArrayRef& k, const ArrayRef& v, double scale,
                             const CallOptions& opts);
void run_attention(AttentionPlan& plan, float* out, float* lse, float* weights);
// Builds the mask plan for the kernel's tiles and runs the attention kernel on plan.args,
// whose tensor and output pointers are set.
void run_kernel(AttentionPlan& plan);

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

MultiheadPlan plan_multihead(const MultiheadInputs& in, double scale, const CallOptions& opts);
void run_multihead(MultiheadPlan& plan, float* out, float* lse, float* weights);

// Instruction-set dispatch (dispatch.cpp).
const KernelTable& kernels();
std::string current_isa();
std::vector<std::string> available_isas();
void set_isa(const std::string& name);  // std::invalid_argument if unknown or unavailable

}  // namespace attn
