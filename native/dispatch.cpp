// Run-time choice of the kernel build: the best instruction set the CPU supports, unless
// set_isa() (or ATTN_ISA, applied by the bindings at import) forces one. Compiled for the
// baseline target, so nothing here executes an instruction the CPU may lack.
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"

namespace attn {
namespace {

struct Isa {
  const char* name;
  const KernelTable* table;
  bool (*supported)();
};

bool has_baseline() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
}
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
// __builtin_cpu_supports reports AVX and AVX-512 features only when the OS saves their
// registers (OSXSAVE and XCR0, read by libgcc), so these also check the OS support.
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512bf16() {
  __builtin_cpu_init();
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
}

// Ordered from the most to the least capable.
const Isa kIsas[] = {
    {"avx512bf16", &isa_avx512bf16::table, &has_avx512bf16},
    {"avx512", &isa_avx512::table, &has_avx512},
    {"avx2", &isa_avx2::table, &has_avx2},
    {"baseline", &isa_baseline::table, &has_baseline},
};

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable* best() {
  for (const Isa& isa : kIsas)
    if (isa.supported()) return isa.table;
  throw std::runtime_error("this CPU lacks SSE4.2, which the attention kernels need");
}

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::string current_isa() { return kernels().name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (auto it = std::rbegin(kIsas); it != std::rend(kIsas); ++it)
    if (it->supported()) out.emplace_back(it->name);
  return out;
}

void set_isa(const std::string& name) {
  for (const Isa& isa : kIsas) {
    if (name != isa.name) continue;
    if (!isa.supported())
      throw std::invalid_argument("isa: '" + name + "' is not supported by this CPU");
    g_table.store(isa.table, std::memory_order_release);
    return;
  }
  throw std::invalid_argument("isa: unknown instruction set '" + name +
                              "' (expected baseline, avx2, avx512 or avx512bf16)");
}

}  // namespace attn
