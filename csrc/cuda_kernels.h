// Launchers of the CUDA kernels (cuda_kernels.cu). Plain C++ and the CUDA runtime only, so the
// kernel file compiles without torch headers.
//
// Every launch works on one slice of a list of tensors of one dtype on one device, described by
// its kernel arguments (launch_plan.h: addresses, element counts, first chunk of each tensor),
// with one thread block per chunk of at most launch::kChunk elements. Sizes and offsets are
// int64, so single tensors may exceed 2^31 elements; empty tensors have no chunks. Nothing is
// copied to the device for a launch.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "eupmu_math.h"
#include "launch_plan.h"

namespace eupmu {
namespace cuda {

constexpr int kGramRows = 2;     // a, b
constexpr int kCombineRows = 2;  // g_f, g_r
constexpr int kUpdateRows = 6;   // param, g_f, g_r, state 1, state 2, step
constexpr int kStepRow = 5;

using GramArgs = launch::TensorListArgs<kGramRows>;
using CombineArgs = launch::TensorListArgs<kCombineRows>;
using UpdateArgs = launch::TensorListArgs<kUpdateRows>;

enum class UpdateKind : int { kAdam = 0, kSgdMomentum = 1, kSgdPlain = 2 };

struct UpdateLaunch {
  UpdateKind kind;
  DType param;
  DType state;
  bool has_gr;
  bool uncorrected;  // adam in update space: the denominator from g_f (docs/design.md, Update-space surgery)
  RuleHyper hyper;
  DecayMode decay;
};

// The update-space reduction pass of one slice (the update's own tensor lists: p, g_f, g_r, states, step).
struct TermsLaunch {
  UpdateKind kind;
  DType param;
  DType state;
  RuleHyper hyper;
  DecayMode decay;
  TermHyper terms;
};

// Per-chunk float64 partial sums of one slice into slots[3 * (args.chunk_base + c)].
cudaError_t launch_gramian_chunks(DType dtype, bool has_b, const GramArgs& args, int32_t nchunks, double* slots,
                                  cudaStream_t stream);

// One block per range: sums its chunk slots in a fixed order into out[3 * out_row .. + 3] (float64).
cudaError_t launch_gramian_finish(const double* slots, const launch::SlotRanges& ranges, double* out,
                                  cudaStream_t stream);

// One thread: the float32[8] coefficient vector from the float64 Gramian. inv_scale and found_inf
// may be null.
cudaError_t launch_coefficients(const double* gram, const SurgerySpec& spec, const float* inv_scale,
                                const float* found_inf, float* out, cudaStream_t stream);

// g_f <- ca*g_f + cb*g_r unless coef[skip] is set, over one slice.
cudaError_t launch_combine(DType dtype, bool has_gr, const CombineArgs& args, int32_t nchunks, const float* coef,
                           cudaStream_t stream);

// Update-space surgery: each chunk's Gramian and terms (eupmu_math.h, chunk_terms) into
// slots[kTermsLen * (args.chunk_base + c)], float64, in a fixed order.
cudaError_t launch_terms_chunks(const TermsLaunch& launch, const UpdateArgs& args, int32_t nchunks, double* slots,
                                cudaStream_t stream);

// One block: out[k] = the fixed-order sum of slots[kTermsLen * s + k] over s < nslots.
cudaError_t launch_terms_finish(const double* slots, int64_t nslots, double* out, cudaStream_t stream);

// One thread: the float32[8] coefficient vector of update-space surgery from the float64 terms.
cudaError_t launch_update_space_coefficients(const double* terms, double budget, int has_max_norm, double max_norm,
                                             const float* found_inf, float* out, cudaStream_t stream);

// Fused combine + rule update of one slice, then step += 1 for each of its tensors; all of it
// skipped on the device when coef[skip] is set.
cudaError_t launch_update(const UpdateLaunch& launch, const UpdateArgs& args, int32_t nchunks, const float* coef,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace eupmu
