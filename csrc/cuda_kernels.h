// Launchers of the CUDA kernels (cuda_kernels.cu). Plain C++ and the CUDA runtime only, so the
// kernel file compiles without torch headers.
//
// Every launch works on a list of tensors of one dtype on one device, described by a metadata
// array of int64 in device memory:
//   rows * T   pointers (row r holds the r-th tensor list, 0 where a list is absent)
//   T          element counts
//   C          chunk -> tensor index
//   C          chunk -> first element (a multiple of kChunk)
// One thread block handles one chunk of at most kChunk elements. Sizes and offsets are int64,
// so single tensors may exceed 2^31 elements; empty tensors have no chunks.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "eupmu_math.h"

namespace eupmu {
namespace cuda {

constexpr int64_t kChunk = 65536;

constexpr int kGramRows = 2;     // a, b
constexpr int kCombineRows = 2;  // g_f, g_r
constexpr int kUpdateRows = 6;   // param, g_f, g_r, state 1, state 2, step
constexpr int kStepRow = 5;

struct LaunchMeta {
  const int64_t* data;
  int32_t ntensors;
  int64_t nchunks;
};

enum class UpdateKind : int { kAdam = 0, kSgdMomentum = 1, kSgdPlain = 2 };

struct UpdateLaunch {
  UpdateKind kind;
  DType param;
  DType state;
  bool has_gr;
  RuleHyper hyper;
  DecayMode decay;
};

// Per-chunk float64 partial sums into slots[3*C], then one block sums them in a fixed order into
// out[3] (float64).
cudaError_t launch_gramian(DType dtype, bool has_b, const LaunchMeta& meta, double* slots, double* out,
                           cudaStream_t stream);

// One thread: the float32[8] coefficient vector from the float64 Gramian. inv_scale and found_inf
// may be null.
cudaError_t launch_coefficients(const double* gram, const SurgerySpec& spec, const float* inv_scale,
                                const float* found_inf, float* out, cudaStream_t stream);

// g_f <- ca*g_f + cb*g_r unless coef[skip] is set.
cudaError_t launch_combine(DType dtype, bool has_gr, const LaunchMeta& meta, const float* coef, cudaStream_t stream);

// Fused combine + rule update, then step += 1 for every tensor; all of it skipped on the device
// when coef[skip] is set.
cudaError_t launch_update(const UpdateLaunch& launch, const LaunchMeta& meta, const float* coef,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace eupmu
