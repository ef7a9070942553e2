// The CUDA path: builds each launch's metadata on the host (pinned memory), copies it to the
// device asynchronously on the current stream and launches. Nothing here reads device memory.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda_kernels.h"
#include "device_ops.h"

namespace eupmu {
namespace cuda_ops {
namespace {

using cuda::kChunk;
using cuda::LaunchMeta;

// Pointer rows of one launch: rows[r][t] is tensor t of list r (null where the list is absent).
using PointerRows = std::vector<std::vector<const void*>>;

// The device copy must outlive the kernels that read it; the caching allocator keeps it
// reserved for the stream until they have run.
struct DeviceMeta {
  at::Tensor storage;
  LaunchMeta view;
};

DeviceMeta upload_meta(const PointerRows& rows, const std::vector<int64_t>& numels, const at::Device& device) {
  const int64_t t_count = static_cast<int64_t>(numels.size());
  TORCH_CHECK(t_count <= std::numeric_limits<int32_t>::max(), "too many tensors in one launch");
  std::vector<int64_t> chunk_tensor, chunk_start;
  for (int64_t t = 0; t < t_count; ++t) {
    for (int64_t start = 0; start < numels[t]; start += kChunk) {
      chunk_tensor.push_back(t);
      chunk_start.push_back(start);
    }
  }
  const int64_t c_count = static_cast<int64_t>(chunk_tensor.size());
  TORCH_CHECK(c_count <= std::numeric_limits<int32_t>::max(), "too many chunks in one launch");
  const int64_t r_count = static_cast<int64_t>(rows.size());
  const int64_t length = std::max<int64_t>((r_count + 1) * t_count + 2 * c_count, 1);
  at::Tensor host = at::empty({length}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t r = 0; r < r_count; ++r) {
    for (int64_t t = 0; t < t_count; ++t) h[r * t_count + t] = reinterpret_cast<int64_t>(rows[r][t]);
  }
  for (int64_t t = 0; t < t_count; ++t) h[r_count * t_count + t] = numels[t];
  int64_t* table = h + (r_count + 1) * t_count;
  for (int64_t c = 0; c < c_count; ++c) {
    table[c] = chunk_tensor[c];
    table[c_count + c] = chunk_start[c];
  }
  DeviceMeta meta;
  meta.storage = host.to(at::TensorOptions().device(device).dtype(at::kLong), /*non_blocking=*/true);
  meta.view = LaunchMeta{meta.storage.data_ptr<int64_t>(), static_cast<int32_t>(t_count), c_count};
  return meta;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

std::vector<int64_t> numels_of(const TensorList& tensors) {
  std::vector<int64_t> out;
  for (const at::Tensor& t : tensors) out.push_back(t.numel());
  return out;
}

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

at::Tensor float_on(const std::optional<at::Tensor>& t, const at::Device& device) {
  if (!t) return at::Tensor();
  return t->to(device, at::kFloat).reshape({-1}).contiguous();
}

void launch_group(const UpdateGroup& group, const UpdateRequest& req, const at::Tensor& coef) {
  PointerRows rows(cuda::kUpdateRows);
  std::vector<int64_t> numels;
  for (const UpdateEntry& e : group.entries) {
    rows[0].push_back(e.p.data_ptr());
    rows[1].push_back(e.gf.data_ptr());
    rows[2].push_back(ptr_or_null(e.gr));
    rows[3].push_back(ptr_or_null(e.s1));
    rows[4].push_back(ptr_or_null(e.s2));
    rows[cuda::kStepRow].push_back(e.step.data_ptr());
    numels.push_back(e.p.numel());
  }
  const at::Device device = coef.device();
  const DeviceMeta meta = upload_meta(rows, numels, device);
  cuda::UpdateLaunch launch;
  launch.kind = req.rule != kRuleSgd        ? cuda::UpdateKind::kAdam
                : uses_momentum_buffer(req) ? cuda::UpdateKind::kSgdMomentum
                                            : cuda::UpdateKind::kSgdPlain;
  launch.param = group.param_dtype;
  launch.state = group.state_dtype;
  launch.has_gr = req.grads_r.has_value();
  launch.hyper = rule_hyper(req);
  launch.decay = decay_mode(req.rule, launch.hyper);
  C10_CUDA_CHECK(cuda::launch_update(launch, meta.view, coef.data_ptr<float>(), current_stream(device)));
}

}  // namespace

at::Tensor gramian(const TensorList& a, const std::optional<TensorList>& b) {
  const ReadPairs pairs = prepare_read_pairs(a, b, "gramian");
  const at::Device device = a[0].device();
  const c10::cuda::CUDAGuard guard(device);
  PointerRows rows(cuda::kGramRows);
  for (size_t i = 0; i < pairs.a.size(); ++i) {
    rows[0].push_back(pairs.a[i].data_ptr());
    rows[1].push_back(pairs.has_b ? pairs.b[i].data_ptr() : nullptr);
  }
  const DeviceMeta meta = upload_meta(rows, numels_of(pairs.a), device);
  const at::TensorOptions f64 = at::TensorOptions().device(device).dtype(at::kDouble);
  at::Tensor slots = at::empty({std::max<int64_t>(3 * meta.view.nchunks, 3)}, f64);
  at::Tensor out = at::empty({3}, f64);
  C10_CUDA_CHECK(cuda::launch_gramian(to_kernel_dtype(a[0].scalar_type()), pairs.has_b, meta.view,
                                      slots.data_ptr<double>(), out.data_ptr<double>(), current_stream(device)));
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
  PointerRows rows(cuda::kCombineRows);
  for (size_t i = 0; i < work.gf.size(); ++i) {
    rows[0].push_back(work.gf[i].data_ptr());
    rows[1].push_back(work.has_gr ? work.gr[i].data_ptr() : nullptr);
  }
  const DeviceMeta meta = upload_meta(rows, numels_of(work.gf), device);
  C10_CUDA_CHECK(cuda::launch_combine(to_kernel_dtype(gf[0].scalar_type()), work.has_gr, meta.view,
                                      coef.data_ptr<float>(), current_stream(device)));
  finish_combine(work);
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
