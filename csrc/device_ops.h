// The two implementations of the extension's operations, one per device type. bindings.cpp
// picks one from the tensors' device; cuda_ops exists only in builds with the CUDA kernels
// (EUPMU_WITH_CUDA).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "ext_common.h"

namespace eupmu {

struct CoefficientArgs {
  SurgerySpec spec;
  std::optional<at::Tensor> inv_scale;
  std::optional<at::Tensor> found_inf;
};

// gramian: float64[3] over the whole list or, with per_tensor, float64[n, 3] with row i the total of
// pair i alone, bit for bit what a call with that pair alone returns (zeros for empty tensors).
namespace cpu_ops {
at::Tensor gramian(const TensorList& a, const std::optional<TensorList>& b, bool per_tensor);
at::Tensor coefficients(const at::Tensor& gram, const CoefficientArgs& args);
void combine(const TensorList& gf, const std::optional<TensorList>& gr, const at::Tensor& coef);
std::vector<int64_t> step(const UpdateRequest& req, const at::Tensor& coef);
// Update-space surgery (docs/design.md): float64[kTermsLen] (Gramian, K0, K1, K2, T0) of the request's
// parameters in one pass (req.grads_r required); the indices the kernels cannot take go to *fallback.
at::Tensor update_terms(const UpdateRequest& req, std::vector<int64_t>* fallback);
at::Tensor update_space_coefficients(const at::Tensor& terms, double budget, std::optional<double> max_norm,
                                     const std::optional<at::Tensor>& found_inf);

std::string active_isa();
void select_isa(const std::string& isa);  // "auto" picks the best one the CPU supports
std::vector<std::string> supported_isas();
}  // namespace cpu_ops

namespace cuda_ops {
at::Tensor gramian(const TensorList& a, const std::optional<TensorList>& b, bool per_tensor);
at::Tensor coefficients(const at::Tensor& gram, const CoefficientArgs& args);
void combine(const TensorList& gf, const std::optional<TensorList>& gr, const at::Tensor& coef);
std::vector<int64_t> step(const UpdateRequest& req, const at::Tensor& coef);
at::Tensor update_terms(const UpdateRequest& req, std::vector<int64_t>* fallback);
at::Tensor update_space_coefficients(const at::Tensor& terms, double budget, std::optional<double> max_norm,
                                     const std::optional<at::Tensor>& found_inf);
}  // namespace cuda_ops

}  // namespace eupmu
