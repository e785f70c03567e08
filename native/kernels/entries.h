// The entry points each kernel file defines in its instruction set's namespace
// (attn::isa_<name>, from -DATTN_ISA_NS); table.cpp gathers them into that build's KernelTable.
#pragma once

#include "kernel_abi.h"

#ifndef ATTN_ISA_NS
#error "kernels/ files are compiled with -DATTN_ISA_NS=isa_<name> -DATTN_ISA_NAME=<name>"
#endif

namespace attn {
namespace ATTN_ISA_NS {

void attention(const AttnArgs& a);  // attention.cpp
void gemm(const GemmArgs& g);       // gemm.cpp
void maps(const MapArgs& m);        // maps.cpp

}  // namespace ATTN_ISA_NS
}  // namespace attn
