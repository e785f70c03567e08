// Argument checks shared by the ISA-neutral entry points (api.cpp, masking.cpp, maps_api.cpp):
// arrays arrive from the bindings as ArrayRef, and every problem is a std::invalid_argument
// whose message starts with the argument's name ("field: problem"), which the Python side
// turns into an error naming the field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace attn {

enum class DType { f32, i64, i32, b8, other };

// A view of an n-d array as handed over by the bindings; strides are in bytes.
struct ArrayRef {
  bool given = false;  // false for None
  const void* data = nullptr;
  DType dtype = DType::other;
  std::string dtype_name;
  std::vector<int64_t> shape, strides;
  int ndim() const { return int(shape.size()); }
};

// Positions and lengths must stay well below 2^31 so that products of two cannot overflow.
constexpr int64_t kMaxLen = int64_t(1) << 31;

[[noreturn]] void fail(const std::string& msg);
std::string shape_str(const std::vector<int64_t>& s);
void check_dtype(const ArrayRef& a, const std::string& name, DType want);
void check_ndim(const ArrayRef& a, const std::string& name, int ndim, const char* dims);
// Strides must be whole elements and the data aligned; with unit_last, the last axis must be
// contiguous (the kernels read rows with vector loads).
void check_layout(const ArrayRef& a, const std::string& name, int64_t itemsize, bool unit_last);
void check_float_tensor(const ArrayRef& a, const std::string& name, int ndim, const char* dims);
// A 1-D array of dtype dt (DType::i32: int32 or int64) and length len (len < 0: any length).
void check_1d(const ArrayRef& a, const std::string& name, DType dt, int64_t len,
              const std::string& len_desc);
// The values of a 1-D int64 or int32 array (checked by the caller), as int64.
std::vector<int64_t> read_ints(const ArrayRef& a);
// Element strides of a float32 array.
inline int64_t es(const ArrayRef& a, int d) { return a.strides[d] / 4; }
float read_f32(const ArrayRef& a, int64_t i);  // element i of a 1-D float32 array

}  // namespace attn
