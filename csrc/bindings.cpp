// Python module eupmu_kernels._C, the native backend: the kernel contract of
// eupmu_kernels/contract.py, routed by the tensors' device to the C++ CPU kernels (always built)
// or to the CUDA kernels (built when EUPMU_WITH_CUDA is defined: setup.py, CUDAExtension).
#include <torch/extension.h>

#include "device_ops.h"

namespace eupmu {
namespace {

#if defined(EUPMU_WITH_CUDA)
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// The CPU kernels take t: anything but a CPU tensor is an error here (CUDA tensors are routed
// before this when the CUDA kernels are built).
void check_cpu(const at::Tensor& t) {
  TORCH_CHECK(!t.is_cuda(), "eupmu_kernels._C was built without its CUDA kernels (C++ CPU kernels only); "
              "rebuild it with a CUDA build of torch and nvcc (EUPMU_BUILD_CUDA=1), or use backend='triton'");
  TORCH_CHECK(t.device().is_cpu(), "eupmu_kernels._C runs on CPU and CUDA tensors, got a tensor on ", t.device());
}

at::Tensor gramian(const TensorList& a, const std::optional<TensorList>& b) {
  TORCH_CHECK(!a.empty(), "gramian: the tensor list is empty");
#if defined(EUPMU_WITH_CUDA)
  if (a[0].is_cuda()) return cuda_ops::gramian(a, b);
#endif
  check_cpu(a[0]);
  return cpu_ops::gramian(a, b);
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
                          bool nesterov) {
  if (params.empty()) return {};
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
#if defined(EUPMU_WITH_CUDA)
  if (params[0].is_cuda()) return cuda_ops::step(req, coef);
#endif
  check_cpu(params[0]);
  return cpu_ops::step(req, coef);
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
  methods["ungrad"] = static_cast<int>(kMethodUngrad);
  methods["pcgrad"] = static_cast<int>(kMethodPcgrad);
  methods["graddiff"] = static_cast<int>(kMethodGraddiff);
  methods["none"] = static_cast<int>(kMethodNone);
  rules["sgd"] = static_cast<int>(kRuleSgd);
  rules["adam"] = static_cast<int>(kRuleAdam);
  rules["adamw"] = static_cast<int>(kRuleAdamw);
  out["coef_len"] = kCoefLen;
  out["slots"] = slots;
  out["clip_eps"] = kClipEps;
  out["methods"] = methods;
  out["method_count"] = kMethodCount;
  out["rules"] = rules;
  out["rule_count"] = kRuleCount;
  return out;
}

}  // namespace
}  // namespace eupmu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using py::arg;
  m.doc() = "EUPMU surgery kernels (the native backend): Gramian, coefficients, combine and fused updates";
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("gramian", &eupmu::gramian, nogil, arg("a"), arg("b") = py::none(),
        "float64[3] (<a,a>, <a,b>, <b,b>) over a tensor list of one dtype and device (float64 products and "
        "sums, deterministic)");
  m.def("coefficients", &eupmu::coefficients, nogil, arg("gram"), arg("method"), arg("eps"), arg("alpha"),
        arg("max_norm") = py::none(), arg("inv_scale") = py::none(), arg("found_inf") = py::none(),
        "the float32[8] coefficient vector from a float64 (or float32) Gramian, computed in float64 on the "
        "Gramian's device");
  m.def("combine_", &eupmu::combine, nogil, arg("grads_f"), arg("grads_r"), arg("coef"),
        "g_f <- ca*g_f + cb*g_r in place unless coef[skip] is set");
  m.def("step_", &eupmu::step, nogil, arg("rule"), arg("params"), arg("grads_f"), arg("grads_r"), arg("steps"),
        arg("exp_avg"), arg("exp_avg_sq"), arg("momentum_buffer"), arg("coef"), arg("lr"), arg("beta1"),
        arg("beta2"), arg("eps"), arg("weight_decay"), arg("momentum"), arg("dampening"), arg("nesterov"),
        "fused combine + update in place; returns the indices it left to the caller (unsupported layouts)");

  m.def("has_cuda_kernels", []() { return eupmu::kWithCuda; },
        "whether this build compiled in the CUDA kernels (else CUDA tensors are refused)");
  m.def("contract_codes", &eupmu::contract_codes, "the coefficient slots and rule codes compiled in");
  m.def("cpu_isa", &eupmu::cpu_ops::active_isa, "the CPU kernel variant in use");
  m.def("set_cpu_isa", &eupmu::cpu_ops::select_isa, arg("isa"),
        "use another CPU kernel variant: 'auto' or one of cpu_isas()");
  m.def("cpu_isas", &eupmu::cpu_ops::supported_isas, "CPU kernel variants this machine can run, best first");
}
