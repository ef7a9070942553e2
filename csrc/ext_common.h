// Torch-facing preparation shared by the CPU and CUDA paths: input checks, layout matching (the
// kernels walk tensors in memory order, so paired tensors must share one dense layout), and the
// per-parameter update entries.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "eupmu_math.h"

namespace eupmu {

using TensorList = std::vector<at::Tensor>;

DType to_kernel_dtype(at::ScalarType t);  // throws for anything but float32/bfloat16/float16
bool is_kernel_dtype(at::ScalarType t);

// Read-only pairs (a_i, b_i) whose memory orders agree element for element; empty pairs are
// dropped. Tensors are the caller's own or temporary dense copies.
struct ReadPairs {
  TensorList a;
  TensorList b;  // empty when there is no second list
  std::vector<int64_t> index;  // position of each pair in the caller's lists
  bool has_b = false;
};

ReadPairs prepare_read_pairs(const TensorList& a, const std::optional<TensorList>& b, const char* what);

// g_f (written in place) with g_r matched to its layout. When a g_f is not dense the kernels work
// on a dense copy, and finish_combine() writes it back.
struct CombineWork {
  TensorList gf;
  TensorList gr;  // empty when there is no second list
  bool has_gr = false;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, dense copy)
};

CombineWork prepare_combine(const TensorList& gf, const std::optional<TensorList>& gr);
void finish_combine(CombineWork& work);

// One parameter of a fused update: every tensor shares the parameter's dense layout; gr, s1 and
// s2 are undefined when absent (s1: exp_avg or momentum_buffer, s2: exp_avg_sq).
struct UpdateEntry {
  at::Tensor p, gf, gr, s1, s2, step;
};

// A launchable group: entries whose optimizer state has one dtype.
struct UpdateGroup {
  DType param_dtype = DType::kFloat;
  DType state_dtype = DType::kFloat;
  std::vector<UpdateEntry> entries;
};

struct UpdateRequest {
  int rule = kRuleAdamw;
  TensorList params, grads_f;
  std::optional<TensorList> grads_r;
  TensorList steps, exp_avg, exp_avg_sq, momentum_buffer;
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0, momentum = 0, dampening = 0;
  bool nesterov = false;
  bool uncorrected = false;  // adam in update space (docs/design.md, Update-space surgery)
};

struct UpdatePlan {
  std::vector<UpdateGroup> groups;
  std::vector<int64_t> fallback;  // indices the kernels cannot take (e.g. state in another layout)
};

// Validates a request and sorts its parameters into launchable groups and fallbacks. `device` is
// where every tensor must live.
UpdatePlan plan_update(const UpdateRequest& req, const at::Device& device);

RuleHyper rule_hyper(const UpdateRequest& req);
TermHyper term_hyper(const UpdateRequest& req);
bool uses_momentum_buffer(const UpdateRequest& req);

// In-place writes through raw pointers bypass autograd's version counters; bump them as torch's
// own in-place ops do.
void bump_versions(const UpdatePlan& plan);
void bump_versions(const TensorList& tensors);

void check_coefficients(const at::Tensor& coef, const at::Device& device);
void check_same_device(const TensorList& tensors, const at::Device& device, const char* what);

}  // namespace eupmu
