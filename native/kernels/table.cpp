// This instruction set's entry points, as the table dispatch.cpp chooses from.
#include "entries.h"

#define ATTN_STR2(x) #x
#define ATTN_STR(x) ATTN_STR2(x)

namespace attn {
namespace ATTN_ISA_NS {

extern const KernelTable table;
#if defined(__AVX512BF16__)
const KernelTable table = {ATTN_STR(ATTN_ISA_NAME), &attention, &gemm, &maps, true};
#else
const KernelTable table = {ATTN_STR(ATTN_ISA_NAME), &attention, &gemm, &maps, false};
#endif

}  // namespace ATTN_ISA_NS
}  // namespace attn
