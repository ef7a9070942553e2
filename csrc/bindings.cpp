// Python module eupmu_kernels._C, the native backend: the kernel contract of
// eupmu_kernels/contract.py, routed by the tensors' device to the C++ CPU kernels (always built)
// or to the CUDA kernels (built when EUPMU_WITH_CUDA is defined: setup.py, CUDAExtension).
#include <torch/extension.h>

#include "device_ops.h"
#include "launch_plan.h"

namespace eupmu {
namespace {

#if defined(EUPMU_WITH_CUDA)
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Only CPU tensors go on to the C++ CPU kernels. A CUDA tensor gets here only in a build without
// the CUDA kernels (with them, the callers route it first).
void check_cpu(const at::Tensor& t) {
  TORCH_CHECK(!t.is_cuda(), "eupmu_kernels._C was built without its CUDA kernels (C++ CPU kernels only); "
              "rebuild it with a CUDA build of torch and nvcc (EUPMU_BUILD_CUDA=1), or use backend='triton'");
  TORCH_CHECK(t.device().is_cpu(), "eupmu_kernels._C runs on CPU and CUDA tensors, got a tensor on ", t.device());
}

at::Tensor gramian(const TensorList& a, const std::optional<TensorList>& b, bool per_tensor) {
  TORCH_CHECK(!a.empty(), "gramian: the tensor list is empty");
#if defined(EUPMU_WITH_CUDA)
  if (a[0].is_cuda()) return cuda_ops::gramian(a, b, per_tensor);
#endif
  check_cpu(a[0]);
  return cpu_ops::gramian(a, b, per_tensor);
}

at::Tensor coefficients(const at::Tensor& gram, int64_t method, double eps, double alpha,
                        std::optional<double> max_norm, const std::optional<at::Tensor>& inv_scale,
                        const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(method >= 0 && method < kMethodCount, "unknown surgery method code ", method);
  CoefficientArgs args;
  args.spec = SurgerySpec{static_cast<int>(method), eps, alpha, max_norm.value_or(0.0), max_norm.has_value() ? 1 : 0};
  args.inv_scale = inv_scale;
  args.found_inf = found_inf;
#if defined(EUPMU_WITH_CUDA)
  if (gram.is_cuda()) return cuda_ops::coefficients(gram, args);
#endif
  check_cpu(gram);
  return cpu_ops::coefficients(gram, args);
}

// The step's and the update-space pass's arguments, as the kernels take them.
UpdateRequest update_request(int64_t rule, const TensorList& params, const TensorList& grads_f,
                             const std::optional<TensorList>& grads_r, const TensorList& steps,
                             const TensorList& exp_avg, const TensorList& exp_avg_sq,
                             const TensorList& momentum_buffer, double lr, double beta1, double beta2, double eps,
                             double weight_decay, double momentum, double dampening, bool nesterov,
                             bool uncorrected) {
  UpdateRequest req;
  req.rule = static_cast<int>(rule);
  req.params = params;
  req.grads_f = grads_f;
  req.grads_r = grads_r;
  req.steps = steps;
  req.exp_avg = exp_avg;
  req.exp_avg_sq = exp_avg_sq;
  req.momentum_buffer = momentum_buffer;
  req.lr = lr;
  req.beta1 = beta1;
  req.beta2 = beta2;
  req.eps = eps;
  req.weight_decay = weight_decay;
  req.momentum = momentum;
  req.dampening = dampening;
  req.nesterov = nesterov;
  req.uncorrected = uncorrected;
  return req;
}

void combine(const TensorList& grads_f, const std::optional<TensorList>& grads_r, const at::Tensor& coef) {
  TORCH_CHECK(!grads_f.empty(), "combine_: grads_f is empty");
#if defined(EUPMU_WITH_CUDA)
  if (grads_f[0].is_cuda()) return cuda_ops::combine(grads_f, grads_r, coef);
#endif
  check_cpu(grads_f[0]);
  cpu_ops::combine(grads_f, grads_r, coef);
}

std::vector<int64_t> step(int64_t rule, const TensorList& params, const TensorList& grads_f,
                          const std::optional<TensorList>& grads_r, const TensorList& steps,
                          const TensorList& exp_avg, const TensorList& exp_avg_sq,
                          const TensorList& momentum_buffer, const at::Tensor& coef, double lr, double beta1,
                          double beta2, double eps, double weight_decay, double momentum, double dampening,
                          bool nesterov, bool uncorrected) {
  if (params.empty()) return {};
  const UpdateRequest req = update_request(rule, params, grads_f, grads_r, steps, exp_avg, exp_avg_sq,
                                           momentum_buffer, lr, beta1, beta2, eps, weight_decay, momentum,
                                           dampening, nesterov, uncorrected);
#if defined(EUPMU_WITH_CUDA)
  if (params[0].is_cuda()) return cuda_ops::step(req, coef);
#endif
  check_cpu(params[0]);
  return cpu_ops::step(req, coef);
}

// Update-space surgery (docs/design.md): the reduction pass and the coefficient stage.
pybind11::tuple update_terms(int64_t rule, const TensorList& params, const TensorList& grads_f,
                             const TensorList& grads_r, const TensorList& steps, const TensorList& exp_avg,
                             const TensorList& exp_avg_sq, const TensorList& momentum_buffer, double lr, double beta1,
                             double beta2, double eps, double weight_decay, double momentum, double dampening,
                             bool nesterov) {
  TORCH_CHECK(!params.empty(), "update_terms: params is empty");
  const UpdateRequest req = update_request(rule, params, grads_f, grads_r, steps, exp_avg, exp_avg_sq,
                                           momentum_buffer, lr, beta1, beta2, eps, weight_decay, momentum,
                                           dampening, nesterov, /*uncorrected=*/true);
  std::vector<int64_t> fallback;
  at::Tensor terms;
  {
    pybind11::gil_scoped_release release;
#if defined(EUPMU_WITH_CUDA)
    if (params[0].is_cuda()) terms = cuda_ops::update_terms(req, &fallback);
#endif
    if (!terms.defined()) {
      check_cpu(params[0]);
      terms = cpu_ops::update_terms(req, &fallback);
    }
  }
  return pybind11::make_tuple(terms, fallback);
}

at::Tensor update_space_coefficients(const at::Tensor& terms, double budget, std::optional<double> max_norm,
                                     const std::optional<at::Tensor>& found_inf) {
#if defined(EUPMU_WITH_CUDA)
  if (terms.is_cuda()) return cuda_ops::update_space_coefficients(terms, budget, max_norm, found_inf);
#endif
  check_cpu(terms);
  return cpu_ops::update_space_coefficients(terms, budget, max_norm, found_inf);
}

// The slot indices and codes this module was compiled with (eupmu_contract.h), under the names of
// the Python registries, so a test can compare them with eupmu_kernels.contract.
pybind11::dict contract_codes() {
  pybind11::dict slots, methods, rules, out;
  slots["ca"] = kCa;
  slots["cb"] = kCb;
  slots["skip"] = kSkip;
  slots["lam"] = kLam;
  slots["clip"] = kClip;
  slots["cos"] = kCos;
  slots["dnorm"] = kDnorm;
  slots["a"] = kA;
  for (int code = 0; code < kMethodCount; ++code) methods[kMethodNames[code]] = code;
  for (int code = 0; code < kRuleCount; ++code) rules[kRuleNames[code]] = code;
  out["coef_len"] = kCoefLen;
  out["slots"] = slots;
  out["clip_eps"] = kClipEps;
  out["methods"] = methods;
  out["method_count"] = kMethodCount;
  out["rules"] = rules;
  out["rule_count"] = kRuleCount;
  pybind11::dict terms;
  terms["aa"] = kTermAa;
  terms["ab"] = kTermAb;
  terms["bb"] = kTermBb;
  terms["k0"] = kTermK0;
  terms["k1"] = kTermK1;
  terms["k2"] = kTermK2;
  terms["t0"] = kTermT0;
  out["terms"] = terms;
  out["terms_len"] = kTermsLen;
  out["clip_iterations"] = kClipIterations;
  return out;
}

// The CUDA launch plan of a tensor list, computed by the host code the CUDA path runs
// (launch_plan.h) for given addresses and sizes, which may be fake: no GPU is touched. For each
// launch: its slice, the kernel arguments as packed, and for each block the chunk locate() finds
// (global tensor index, first element, length); plus the per-tensor ranges of the Gramian's
// finishing pass. Two address rows plan a Gramian/combine list, six an update list.
template <int kRows>
pybind11::dict plan_of(const std::vector<std::vector<uint64_t>>& rows, const std::vector<int64_t>& numels) {
  using Args = launch::TensorListArgs<kRows>;
  pybind11::list launches;
  for (const launch::LaunchSlice& s : launch::plan_launches(numels, Args::kCapacity)) {
    const Args a = launch::pack_launch<kRows>(s, rows, numels);
    pybind11::list addresses, blocks;
    for (int r = 0; r < kRows; ++r) {
      pybind11::list row;
      for (int t = 0; t < a.ntensors; ++t) row.append(a.addr[r][t]);
      addresses.append(row);
    }
    for (int32_t b = 0; b < s.nchunks; ++b) {
      const launch::ChunkRef c = launch::locate(a, b);
      blocks.append(pybind11::make_tuple(s.first_tensor + c.tensor, c.start, c.n));
    }
    pybind11::dict d;
    d["first_tensor"] = s.first_tensor;
    d["ntensors"] = a.ntensors;
    d["chunk_base"] = a.chunk_base;
    d["nchunks"] = s.nchunks;
    d["addresses"] = addresses;
    d["blocks"] = blocks;
    launches.append(d);
  }
  std::vector<int64_t> out_rows(numels.size());
  for (size_t t = 0; t < numels.size(); ++t) out_rows[t] = static_cast<int64_t>(t);
  pybind11::list ranges;
  for (const launch::SlotRanges& r : launch::per_tensor_ranges(numels, out_rows)) {
    pybind11::list launch_ranges;
    for (int i = 0; i < r.nranges; ++i) {
      launch_ranges.append(pybind11::make_tuple(r.first[i], r.count[i], r.out_row[i]));
    }
    ranges.append(launch_ranges);
  }
  pybind11::dict out;
  out["capacity"] = Args::kCapacity;
  out["arg_bytes"] = sizeof(Args);
  out["chunk"] = launch::kChunk;
  out["range_capacity"] = launch::kRangeCapacity;
  out["launches"] = launches;
  out["ranges"] = ranges;
  return out;
}

pybind11::dict launch_plan(const std::vector<std::vector<uint64_t>>& addresses, const std::vector<int64_t>& numels) {
  for (const auto& row : addresses) TORCH_CHECK(row.size() == numels.size(), "one address per tensor in each row");
  if (addresses.size() == 2) return plan_of<2>(addresses, numels);
  TORCH_CHECK(addresses.size() == 6, "2 (Gramian, combine) or 6 (update) address rows, got ", addresses.size());
  return plan_of<6>(addresses, numels);
}

}  // namespace
}  // namespace eupmu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using py::arg;
  m.doc() = "EUPMU surgery kernels (the native backend): Gramian, coefficients, combine and fused updates";
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("gramian", &eupmu::gramian, nogil, arg("a"), arg("b") = py::none(), arg("per_tensor") = false,
        "float64[3] (<a,a>, <a,b>, <b,b>) over a tensor list of one dtype and device (float64 products and "
        "sums, deterministic); with per_tensor, float64[n, 3]: row i is pair i's own Gramian, bit for bit");
  m.def("coefficients", &eupmu::coefficients, nogil, arg("gram"), arg("method"), arg("eps"), arg("alpha"),
        arg("max_norm") = py::none(), arg("inv_scale") = py::none(), arg("found_inf") = py::none(),
        "the float32[8] coefficient vector from a float64 (or float32) Gramian, computed in float64 on the "
        "Gramian's device");
  m.def("combine_", &eupmu::combine, nogil, arg("grads_f"), arg("grads_r"), arg("coef"),
        "g_f <- ca*g_f + cb*g_r in place unless coef[skip] is set");
  m.def("step_", &eupmu::step, nogil, arg("rule"), arg("params"), arg("grads_f"), arg("grads_r"), arg("steps"),
        arg("exp_avg"), arg("exp_avg_sq"), arg("momentum_buffer"), arg("coef"), arg("lr"), arg("beta1"),
        arg("beta2"), arg("eps"), arg("weight_decay"), arg("momentum"), arg("dampening"), arg("nesterov"),
        arg("uncorrected") = false,
        "fused combine + update in place; returns the indices it left to the caller (unsupported layouts); "
        "uncorrected: Adam's denominator from g_f (update-space surgery)");
  m.def("update_terms", &eupmu::update_terms, arg("rule"), arg("params"), arg("grads_f"), arg("grads_r"),
        arg("steps"), arg("exp_avg"), arg("exp_avg_sq"), arg("momentum_buffer"), arg("lr"), arg("beta1"),
        arg("beta2"), arg("eps"), arg("weight_decay"), arg("momentum"), arg("dampening"), arg("nesterov"),
        "update-space surgery: (float64[7] Gramian and terms K0, K1, K2, T0 in one pass, indices left to the "
        "caller)");
  m.def("update_space_coefficients", &eupmu::update_space_coefficients, nogil, arg("terms"), arg("budget"),
        arg("max_norm") = py::none(), arg("found_inf") = py::none(),
        "update-space surgery: the float32[8] coefficient vector from the float64[7] terms, on their device");

  m.def("has_cuda_kernels", []() { return eupmu::kWithCuda; },
        "whether this build compiled in the CUDA kernels (else CUDA tensors are refused)");
  m.def("contract_codes", &eupmu::contract_codes, "the coefficient slots and rule codes compiled in");
  m.def("_launch_plan", &eupmu::launch_plan, arg("addresses"), arg("numels"),
        "the CUDA path's launch plan for (possibly fake) addresses and sizes, computed on the host; for tests");
  m.def("cpu_isa", &eupmu::cpu_ops::active_isa, "the CPU kernel variant in use");
  m.def("set_cpu_isa", &eupmu::cpu_ops::select_isa, arg("isa"),
        "use another CPU kernel variant: 'auto' or one of cpu_isas()");
  m.def("cpu_isas", &eupmu::cpu_ops::supported_isas, "CPU kernel variants this machine can run, best first");
}
