// The CUDA path: plans each tensor list into launches whose metadata travels by value in the
// kernel arguments (launch_plan.h): no host-to-device copy, no cached device table, nothing here
// reads device memory or waits for the device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_kernels.h"
#include "device_ops.h"

namespace eupmu {
namespace cuda_ops {
namespace {

// Address rows of one tensor list: rows[r][t] is the address of tensor t of list r (0 where the
// list is absent).
using AddressRows = std::vector<std::vector<uint64_t>>;

uint64_t address_of(const at::Tensor& t) { return t.defined() ? reinterpret_cast<uint64_t>(t.data_ptr()) : 0; }

std::vector<int64_t> numels_of(const TensorList& tensors) {
  std::vector<int64_t> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.numel());
  return out;
}

// Calls run(args, slice) for each launch of the list, in order.
template <int kRows, typename F>
void for_each_launch(const AddressRows& rows, const std::vector<int64_t>& numels, const F& run) {
  const std::vector<launch::LaunchSlice> slices =
      launch::plan_launches(numels, launch::TensorListArgs<kRows>::kCapacity);
  for (const launch::LaunchSlice& s : slices) run(launch::pack_launch<kRows>(s, rows, numels), s);
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

at::Tensor float_on(const std::optional<at::Tensor>& t, const at::Device& device) {
  if (!t) return at::Tensor();
  return t->to(device, at::kFloat).reshape({-1}).contiguous();
}

cuda::UpdateKind update_kind(const UpdateRequest& req) {
  return req.rule != kRuleSgd        ? cuda::UpdateKind::kAdam
         : uses_momentum_buffer(req) ? cuda::UpdateKind::kSgdMomentum
                                     : cuda::UpdateKind::kSgdPlain;
}

// The update kernels' address rows (parameter, g_f, g_r, two state tensors, step) of one group, and
// each tensor's element count into `numels`.
AddressRows update_rows(const UpdateGroup& group, std::vector<int64_t>& numels) {
  AddressRows rows(cuda::kUpdateRows);
  for (const UpdateEntry& e : group.entries) {
    rows[0].push_back(address_of(e.p));
    rows[1].push_back(address_of(e.gf));
    rows[2].push_back(address_of(e.gr));
    rows[3].push_back(address_of(e.s1));
    rows[4].push_back(address_of(e.s2));
    rows[cuda::kStepRow].push_back(address_of(e.step));
    numels.push_back(e.p.numel());
  }
  return rows;
}

void launch_group(const UpdateGroup& group, const UpdateRequest& req, const at::Tensor& coef) {
  std::vector<int64_t> numels;
  const AddressRows rows = update_rows(group, numels);
  cuda::UpdateLaunch u;
  u.kind = update_kind(req);
  u.param = group.param_dtype;
  u.state = group.state_dtype;
  u.has_gr = req.grads_r.has_value();
  u.uncorrected = req.uncorrected && req.rule != kRuleSgd;
  u.hyper = rule_hyper(req);
  u.decay = decay_mode(req.rule, u.hyper);
  const cudaStream_t stream = current_stream(coef.device());
  for_each_launch<cuda::kUpdateRows>(rows, numels, [&](const cuda::UpdateArgs& args, const launch::LaunchSlice& s) {
    C10_CUDA_CHECK(cuda::launch_update(u, args, s.nchunks, coef.data_ptr<float>(), stream));
  });
}

}  // namespace

at::Tensor gramian(const TensorList& a, const std::optional<TensorList>& b, bool per_tensor) {
  const ReadPairs pairs = prepare_read_pairs(a, b, "gramian");
  const at::Device device = a[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  AddressRows rows(cuda::kGramRows);
  for (size_t i = 0; i < pairs.a.size(); ++i) {
    rows[0].push_back(address_of(pairs.a[i]));
    rows[1].push_back(pairs.has_b ? address_of(pairs.b[i]) : 0);
  }
  const std::vector<int64_t> numels = numels_of(pairs.a);
  int64_t nchunks = 0;
  for (int64_t n : numels) nchunks += launch::chunks_of(n);
  const at::TensorOptions f64 = at::TensorOptions().device(device).dtype(at::kDouble);
  at::Tensor slots = at::empty({std::max<int64_t>(3 * nchunks, 3)}, f64);
  const DType dtype = to_kernel_dtype(a[0].scalar_type());
  for_each_launch<cuda::kGramRows>(rows, numels, [&](const cuda::GramArgs& args, const launch::LaunchSlice& s) {
    C10_CUDA_CHECK(cuda::launch_gramian_chunks(dtype, pairs.has_b, args, s.nchunks, slots.data_ptr<double>(), stream));
  });
  if (per_tensor) {  // one range per pair, its row at the pair's position; empty tensors stay zero
    at::Tensor out = at::zeros({static_cast<int64_t>(a.size()), 3}, f64);
    for (const launch::SlotRanges& ranges : launch::per_tensor_ranges(numels, pairs.index)) {
      C10_CUDA_CHECK(cuda::launch_gramian_finish(slots.data_ptr<double>(), ranges, out.data_ptr<double>(), stream));
    }
    return out;
  }
  at::Tensor out = at::empty({3}, f64);
  C10_CUDA_CHECK(cuda::launch_gramian_finish(slots.data_ptr<double>(), launch::total_range(nchunks),
                                             out.data_ptr<double>(), stream));
  return out;
}

at::Tensor coefficients(const at::Tensor& gram, const CoefficientArgs& args) {
  TORCH_CHECK(gram.numel() == 3, "the Gramian must have 3 elements, got ", gram.numel());
  const at::Device device = gram.device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor g = gram.to(at::kDouble).contiguous();  // float32 Gramians are widened exactly
  const at::Tensor inv = float_on(args.inv_scale, device);
  const at::Tensor found = float_on(args.found_inf, device);
  at::Tensor out = at::empty({kCoefLen}, g.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_coefficients(g.data_ptr<double>(), args.spec,
                                           inv.defined() ? inv.data_ptr<float>() : nullptr,
                                           found.defined() ? found.data_ptr<float>() : nullptr,
                                           out.data_ptr<float>(), current_stream(device)));
  return out;
}

void combine(const TensorList& gf, const std::optional<TensorList>& gr, const at::Tensor& coef) {
  CombineWork work = prepare_combine(gf, gr);
  const at::Device device = gf[0].device();
  check_coefficients(coef, device);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  AddressRows rows(cuda::kCombineRows);
  for (size_t i = 0; i < work.gf.size(); ++i) {
    rows[0].push_back(address_of(work.gf[i]));
    rows[1].push_back(work.has_gr ? address_of(work.gr[i]) : 0);
  }
  const DType dtype = to_kernel_dtype(gf[0].scalar_type());
  for_each_launch<cuda::kCombineRows>(
      rows, numels_of(work.gf), [&](const cuda::CombineArgs& args, const launch::LaunchSlice& s) {
        C10_CUDA_CHECK(cuda::launch_combine(dtype, work.has_gr, args, s.nchunks, coef.data_ptr<float>(), stream));
      });
  finish_combine(work);
}

at::Tensor update_terms(const UpdateRequest& req, std::vector<int64_t>* fallback) {
  TORCH_CHECK(req.grads_r.has_value(), "update_terms: grads_r is required");
  TORCH_CHECK(!req.params.empty(), "update_terms: params is empty");
  const at::Device device = req.params[0].device();
  const UpdatePlan plan = plan_update(req, device);
  *fallback = plan.fallback;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const at::TensorOptions f64 = at::TensorOptions().device(device).dtype(at::kDouble);
  // one slot row per chunk of every group, the groups one after the other
  int64_t nchunks = 0;
  for (const UpdateGroup& group : plan.groups) {
    for (const UpdateEntry& e : group.entries) nchunks += launch::chunks_of(e.p.numel());
  }
  at::Tensor slots = at::empty({std::max<int64_t>(kTermsLen * nchunks, kTermsLen)}, f64);
  int64_t offset = 0;
  for (const UpdateGroup& group : plan.groups) {
    std::vector<int64_t> numels;
    const AddressRows rows = update_rows(group, numels);
    int64_t group_chunks = 0;
    for (const int64_t n : numels) group_chunks += launch::chunks_of(n);
    cuda::TermsLaunch t;
    t.kind = update_kind(req);
    t.param = group.param_dtype;
    t.state = group.state_dtype;
    t.hyper = rule_hyper(req);
    t.decay = decay_mode(req.rule, t.hyper);
    t.terms = term_hyper(req);
    double* group_slots = slots.data_ptr<double>() + kTermsLen * offset;
    for_each_launch<cuda::kUpdateRows>(rows, numels, [&](const cuda::UpdateArgs& args, const launch::LaunchSlice& s) {
      C10_CUDA_CHECK(cuda::launch_terms_chunks(t, args, s.nchunks, group_slots, stream));
    });
    offset += group_chunks;
  }
  at::Tensor out = at::empty({kTermsLen}, f64);
  C10_CUDA_CHECK(cuda::launch_terms_finish(slots.data_ptr<double>(), nchunks, out.data_ptr<double>(), stream));
  return out;
}

at::Tensor update_space_coefficients(const at::Tensor& terms, double budget, std::optional<double> max_norm,
                                     const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(terms.numel() == kTermsLen, "the update-space terms must have ", kTermsLen, " elements, got ",
              terms.numel());
  const at::Device device = terms.device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor t = terms.to(at::kDouble).contiguous();
  const at::Tensor found = float_on(found_inf, device);
  at::Tensor out = at::empty({kCoefLen}, t.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_update_space_coefficients(t.data_ptr<double>(), budget, max_norm.has_value() ? 1 : 0,
                                                        max_norm.value_or(0.0),
                                                        found.defined() ? found.data_ptr<float>() : nullptr,
                                                        out.data_ptr<float>(), current_stream(device)));
  return out;
}

std::vector<int64_t> step(const UpdateRequest& req, const at::Tensor& coef) {
  TORCH_CHECK(!req.params.empty(), "step_: params is empty");
  const at::Device device = req.params[0].device();
  const UpdatePlan plan = plan_update(req, device);
  if (plan.groups.empty()) return plan.fallback;
  check_coefficients(coef, device);
  const c10::cuda::CUDAGuard guard(device);
  for (const UpdateGroup& group : plan.groups) launch_group(group, req, coef);
  bump_versions(plan);
  return plan.fallback;
}

}  // namespace cuda_ops
}  // namespace eupmu
