// Instantiates the CPU chunk kernels (cpu_loops.inc) once per instruction set and picks the best
// one the running CPU supports. Only this file's own loops are compiled for AVX2/AVX-512: every
// header is included before the target pragmas, so no inline library code is built for an
// instruction set the machine may lack.
#include "cpu_kernels.h"

#include <string.h>

#include "cpu_storage.h"

namespace eupmu {
namespace cpu {

namespace isa_default {
constexpr bool kHasFma = false;
constexpr int kVectorBytes = 16;
#include "cpu_loops.inc"
}  // namespace isa_default

#if defined(__x86_64__) && defined(__GNUC__)
#define EUPMU_HAVE_X86_VARIANTS 1

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
constexpr bool kHasFma = true;
constexpr int kVectorBytes = 32;
#include "cpu_loops.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
constexpr bool kHasFma = true;
constexpr int kVectorBytes = 64;
#include "cpu_loops.inc"
}  // namespace isa_avx512
#pragma GCC pop_options

#endif

namespace {

#define EUPMU_TABLE(name, ns) \
  KernelTable { name, &ns::gram_chunk, &ns::combine_chunk, &ns::update_chunk, &ns::terms_chunk }

#if defined(EUPMU_HAVE_X86_VARIANTS)
const KernelTable kTables[] = {
    EUPMU_TABLE("avx512", isa_avx512),
    EUPMU_TABLE("avx2", isa_avx2),
    EUPMU_TABLE("default", isa_default),
};
const char* const kIsaNames[] = {"avx512", "avx2", "default"};
#else
const KernelTable kTables[] = {EUPMU_TABLE("default", isa_default)};
const char* const kIsaNames[] = {"default"};
#endif

#undef EUPMU_TABLE

constexpr int kNumTables = sizeof(kTables) / sizeof(kTables[0]);

}  // namespace

const char* const* compiled_isas(int* count) {
  *count = kNumTables;
  return kIsaNames;
}

bool isa_supported(const char* isa) {
#if defined(EUPMU_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
  if (strcmp(isa, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (strcmp(isa, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  return strcmp(isa, "default") == 0;
}

const KernelTable* kernel_table(const char* isa) {
  for (const KernelTable& table : kTables) {
    if (strcmp(table.isa, isa) == 0) return &table;
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace eupmu
