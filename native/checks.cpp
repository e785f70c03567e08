#include "checks.h"

#include <sstream>
#include <stdexcept>

namespace attn {

void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << '(';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ',';
  o << ')';
  return o.str();
}

namespace {

// The label and item size of each DType, in the enum's order (checks.h).
struct DTypeInfo {
  const char* label;
  int64_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {"float32", 4}, {"float16", 2}, {"bfloat16", 2}, {"int16/uint16", 2},
    {"int64", 8},   {"int32", 4},   {"bool", 1},     {"?", 4}};
static_assert(sizeof(kDTypes) / sizeof(kDTypes[0]) == size_t(DType::other) + 1,
              "kDTypes must list every DType");

const DTypeInfo& info(DType t) { return kDTypes[size_t(t)]; }

template <class T>
T at1(const ArrayRef& a, int64_t i) {
  return *reinterpret_cast<const T*>(static_cast<const char*>(a.data) + i * a.strides[0]);
}

}  // namespace

int64_t itemsize(DType t) { return info(t).size; }

void check_dtype(const ArrayRef& a, const std::string& name, DType want) {
  if (a.dtype != want)
    fail(name + ": expected dtype " + info(want).label + ", got " + a.dtype_name);
}

void check_ndim(const ArrayRef& a, const std::string& name, int ndim, const char* dims) {
  if (a.ndim() != ndim)
    fail(name + ": expected " + std::to_string(ndim) + " dimension" + (ndim == 1 ? "" : "s") +
         " " + dims + ", got " + std::to_string(a.ndim()));
}

void check_layout(const ArrayRef& a, const std::string& name, int64_t size, bool unit_last) {
  for (int64_t n : a.shape)
    if (n == 0) return;  // empty: never read, and numpy gives such arrays arbitrary strides
  if (reinterpret_cast<uintptr_t>(a.data) % uintptr_t(size) != 0)
    fail(name + ": data is not aligned to its element size");
  for (int d = 0; d < a.ndim(); ++d)
    if (a.strides[d] % size != 0)
      fail(name + ": strides must be multiples of the element size, got " + shape_str(a.strides));
  const int last = a.ndim() - 1;
  if (unit_last && last >= 0 && a.shape[last] > 1 && a.strides[last] != size)
    fail(name + ": the last axis must be contiguous (stride " + std::to_string(size) +
         " bytes), got stride " + std::to_string(a.strides[last]) + " bytes");
}

void check_float_tensor(const ArrayRef& a, const std::string& name, int ndim, const char* dims) {
  check_ndim(a, name, ndim, dims);
  check_dtype(a, name, DType::f32);
  check_layout(a, name, 4, true);
  for (int64_t s : a.shape)
    if (s >= kMaxLen) fail(name + ": dimension too large " + shape_str(a.shape));
}

void check_1d(const ArrayRef& a, const std::string& name, DType dt, int64_t len,
              const std::string& len_desc) {
  check_ndim(a, name, 1, len_desc.c_str());
  if (dt == DType::i32) {  // int32 stands for "int32 or int64"
    if (a.dtype != DType::i32 && a.dtype != DType::i64)
      fail(name + ": expected dtype int32 or int64, got " + a.dtype_name);
  } else {
    check_dtype(a, name, dt);
  }
  check_layout(a, name, itemsize(a.dtype), false);
  if (len >= 0 && a.shape[0] != len)
    fail(name + ": expected shape " + len_desc + " = (" + std::to_string(len) + ",), got " +
         shape_str(a.shape));
}

std::vector<int64_t> read_ints(const ArrayRef& a) {
  std::vector<int64_t> out(size_t(a.shape[0]));
  for (int64_t i = 0; i < a.shape[0]; ++i)
    out[size_t(i)] = a.dtype == DType::i32 ? at1<int32_t>(a, i) : at1<int64_t>(a, i);
  return out;
}

float read_f32(const ArrayRef& a, int64_t i) { return at1<float>(a, i); }

}  // namespace attn
