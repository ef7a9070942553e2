// The C++ CPU kernels: plain loops over raw pointers, compiled once per instruction set
// (cpu_kernels.cpp) and picked at run time. Callers split work into chunks; every function here
// handles one chunk of one tensor and is free of torch headers.
#pragma once

#include <stdint.h>

#include "eupmu_math.h"

namespace eupmu {
namespace cpu {

// Element pointers of one chunk (already offset to the chunk's first element). gr, s1, s2 may be
// null when absent: s1 is exp_avg or the momentum buffer, s2 is exp_avg_sq.
struct UpdatePointers {
  void* p;
  const void* gf;
  const void* gr;
  void* s1;
  void* s2;
};

struct UpdateSpec {
  int rule;  // eupmu::Rule (kRule*)
  DType param;
  DType state;
  bool momentum;  // sgd with a momentum buffer
  bool uncorrected;  // adam in update space: the denominator from g_f (docs/design.md, Update-space surgery)
  float ca;
  float cb;
  RuleHyper hyper;
  DecayMode decay;
};

// out[0..2] = partial (<a,a>, <a,b>, <b,b>) of n elements, summed in a fixed order; b may be null.
using GramChunkFn = void (*)(DType dtype, const void* a, const void* b, int64_t n, double* out);
// gf = ca*gf + cb*gr (gr may be null).
using CombineChunkFn = void (*)(DType dtype, void* gf, const void* gr, int64_t n, float ca, float cb);
// The fused combine + rule update of n elements.
using UpdateChunkFn = void (*)(const UpdateSpec& spec, const StepConsts& consts, const UpdatePointers& ptrs,
                               int64_t n);
// sums[0..kTermSums) = the raw float64 sums of update-space surgery over n elements (eupmu_math.h,
// TermSum), in a fixed order; ptrs.gr must be set, ptrs.p is only read. spec.ca and spec.cb are unused.
using TermsChunkFn = void (*)(const UpdateSpec& spec, const StepConsts& consts, const UpdatePointers& ptrs,
                              int64_t n, double* sums);

struct KernelTable {
  const char* isa;
  GramChunkFn gram;
  CombineChunkFn combine;
  UpdateChunkFn update;
  TermsChunkFn terms;
};

// Instruction-set variants compiled into this build, best first: "avx512", "avx2", "default"
// (only "default" off x86-64). isa_supported() tells whether the running CPU can execute one.
const char* const* compiled_isas(int* count);
bool isa_supported(const char* isa);
const KernelTable* kernel_table(const char* isa);  // null when unknown

}  // namespace cpu
}  // namespace eupmu
