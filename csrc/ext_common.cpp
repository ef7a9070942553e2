#include "ext_common.h"

#include <c10/core/TensorImpl.h>

namespace eupmu {
namespace {

bool is_dense(const at::Tensor& t) { return t.numel() <= 1 || t.is_non_overlapping_and_dense(); }

// Whether x and y, both dense, visit their logical elements in the same memory order.
bool same_memory_order(const at::Tensor& x, const at::Tensor& y) {
  if (x.numel() != y.numel()) return false;
  if (x.numel() <= 1) return true;
  if (x.is_contiguous() && y.is_contiguous()) return true;
  if (x.sizes() != y.sizes()) return false;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1 && x.stride(d) != y.stride(d)) return false;
  }
  return true;
}

// x (read only) laid out like `like` (dense): x itself when it already is, else a copy.
at::Tensor matched_to(const at::Tensor& x, const at::Tensor& like) {
  if (is_dense(x) && same_memory_order(x, like)) return x;
  at::Tensor out = at::empty_strided(like.sizes(), like.strides(), x.options());
  out.copy_(x.reshape(like.sizes()));
  return out;
}

void check_strided(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.defined(), what, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, what, "[", i, "] is not a dense (strided) tensor");
}

// x (element i of list `what`) has the device and dtype of `ref` (from list `ref_what`).
void check_same_kind(const at::Tensor& x, const at::Tensor& ref, const char* what, const char* ref_what, size_t i) {
  check_strided(x, what, i);
  TORCH_CHECK(x.device() == ref.device(), what, "[", i, "] is on ", x.device(), " but ", ref_what, " is on ",
              ref.device());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), what, "[", i, "] has dtype ", x.scalar_type(), " but ",
              ref_what, " has dtype ", ref.scalar_type());
}

// x pairs element for element with ref: same device, dtype and element count.
void check_partner(const at::Tensor& x, const at::Tensor& ref, const char* what, const char* ref_what, size_t i) {
  check_same_kind(x, ref, what, ref_what, i);
  TORCH_CHECK(x.numel() == ref.numel(), what, "[", i, "] has ", x.numel(), " elements but ", ref_what, " has ",
              ref.numel());
}

// A state tensor the kernels may write: same device and layout as the parameter, float32 or
// the parameter's dtype.
bool state_usable(const at::Tensor& s, const at::Tensor& p) {
  if (!s.defined() || s.layout() != at::kStrided || s.device() != p.device()) return false;
  if (s.scalar_type() != at::kFloat && s.scalar_type() != p.scalar_type()) return false;
  return is_dense(s) && same_memory_order(s, p);
}

bool step_usable(const at::Tensor& step, const at::Device& device) {
  return step.defined() && step.layout() == at::kStrided && step.device() == device &&
         step.scalar_type() == at::kFloat && step.numel() == 1;
}

void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

UpdateGroup& group_for(std::vector<UpdateGroup>& groups, DType param, DType state) {
  for (UpdateGroup& g : groups) {
    if (g.state_dtype == state) return g;
  }
  groups.push_back(UpdateGroup{param, state, {}});
  return groups.back();
}

void check_list_length(const TensorList& list, size_t n, const char* what) {
  TORCH_CHECK(list.size() == n, what, " has ", list.size(), " tensors but params has ", n);
}

}  // namespace

bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default: break;
  }
  TORCH_CHECK(false, "eupmu_kernels._C supports float32, bfloat16 and float16 tensors, got ", t);
}

void check_same_device(const TensorList& tensors, const at::Device& device, const char* what) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_strided(tensors[i], what, i);
    TORCH_CHECK(tensors[i].device() == device, what, "[", i, "] is on ", tensors[i].device(), ", expected ", device);
  }
}

void check_coefficients(const at::Tensor& coef, const at::Device& device) {
  TORCH_CHECK(coef.defined() && coef.scalar_type() == at::kFloat && coef.numel() >= kCoefLen,
              "the coefficient vector must be a float32 tensor of ", kCoefLen, " elements");
  TORCH_CHECK(coef.is_contiguous(), "the coefficient vector must be contiguous");
  TORCH_CHECK(coef.device() == device, "the coefficient vector is on ", coef.device(), " but the tensors are on ",
              device);
}

ReadPairs prepare_read_pairs(const TensorList& a, const std::optional<TensorList>& b, const char* what) {
  TORCH_CHECK(!a.empty(), what, ": the tensor list is empty");
  ReadPairs out;
  out.has_b = b.has_value();
  if (out.has_b) {
    TORCH_CHECK(b->size() == a.size(), what, ": the lists have ", a.size(), " and ", b->size(), " tensors");
  }
  const at::Tensor& first = a[0];
  check_strided(first, "a", 0);
  to_kernel_dtype(first.scalar_type());
  for (size_t i = 0; i < a.size(); ++i) {
    check_same_kind(a[i], first, "a", "a[0]", i);
    if (out.has_b) check_partner((*b)[i], a[i], "b", "its partner in a", i);
    if (a[i].numel() == 0) continue;
    out.index.push_back(static_cast<int64_t>(i));
    const bool usable = is_dense(a[i]) && (!out.has_b || (is_dense((*b)[i]) && same_memory_order(a[i], (*b)[i])));
    if (usable) {
      out.a.push_back(a[i]);
      if (out.has_b) out.b.push_back((*b)[i]);
    } else {
      out.a.push_back(a[i].contiguous());
      if (out.has_b) out.b.push_back((*b)[i].reshape(a[i].sizes()).contiguous());
    }
  }
  return out;
}

CombineWork prepare_combine(const TensorList& gf, const std::optional<TensorList>& gr) {
  TORCH_CHECK(!gf.empty(), "combine_: grads_f is empty");
  CombineWork work;
  work.has_gr = gr.has_value();
  if (work.has_gr) {
    TORCH_CHECK(gr->size() == gf.size(), "combine_: grads_f has ", gf.size(), " tensors but grads_r has ", gr->size());
  }
  const at::Tensor& first = gf[0];
  check_strided(first, "grads_f", 0);
  to_kernel_dtype(first.scalar_type());
  for (size_t i = 0; i < gf.size(); ++i) {
    check_same_kind(gf[i], first, "grads_f", "grads_f[0]", i);
    if (work.has_gr) check_partner((*gr)[i], gf[i], "grads_r", "its grads_f", i);
    if (gf[i].numel() == 0) continue;
    at::Tensor target = gf[i];
    if (!is_dense(target)) {
      target = gf[i].contiguous();
      work.write_back.emplace_back(gf[i], target);
    }
    work.gf.push_back(target);
    if (work.has_gr) work.gr.push_back(matched_to((*gr)[i], target));
  }
  return work;
}

void finish_combine(CombineWork& work) {
  for (auto& [original, copy] : work.write_back) original.copy_(copy);
  bump_versions(work.gf);
}

bool uses_momentum_buffer(const UpdateRequest& req) { return req.rule == kRuleSgd && req.momentum != 0.0; }

RuleHyper rule_hyper(const UpdateRequest& req) {
  return make_rule_hyper(req.lr, req.beta1, req.beta2, req.eps, req.weight_decay, req.momentum, req.dampening,
                         req.nesterov);
}

TermHyper term_hyper(const UpdateRequest& req) {
  TermHyper h;
  h.rule = req.rule;
  h.momentum_buffer = uses_momentum_buffer(req);
  h.nesterov = req.nesterov;
  h.lr = req.lr;
  h.beta1 = req.beta1;
  h.weight_decay = req.weight_decay;
  h.momentum = req.momentum;
  h.dampening = req.dampening;
  return h;
}

UpdatePlan plan_update(const UpdateRequest& req, const at::Device& device) {
  TORCH_CHECK(req.rule >= 0 && req.rule < kRuleCount, "unknown rule code ", req.rule);
  const size_t n = req.params.size();
  check_list_length(req.grads_f, n, "grads_f");
  check_list_length(req.steps, n, "step");
  if (req.grads_r) check_list_length(*req.grads_r, n, "grads_r");
  const bool adam = req.rule != kRuleSgd;
  const bool momentum = uses_momentum_buffer(req);
  if (adam) {
    check_list_length(req.exp_avg, n, "exp_avg");
    check_list_length(req.exp_avg_sq, n, "exp_avg_sq");
  }
  if (momentum) check_list_length(req.momentum_buffer, n, "momentum_buffer");

  UpdatePlan plan;
  if (n == 0) return plan;
  const DType param_dtype = to_kernel_dtype(req.params[0].scalar_type());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = req.params[i];
    check_strided(p, "params", i);
    TORCH_CHECK(p.device() == device, "params[", i, "] is on ", p.device(), ", expected ", device);
    TORCH_CHECK(p.scalar_type() == req.params[0].scalar_type(), "params[", i, "] has dtype ", p.scalar_type(),
                " but params[0] has dtype ", req.params[0].scalar_type());
    check_partner(req.grads_f[i], p, "grads_f", "its parameter", i);
    if (req.grads_r) check_partner((*req.grads_r)[i], p, "grads_r", "its parameter", i);

    UpdateEntry e;
    e.p = p;
    e.step = req.steps[i];
    bool usable = is_dense(p) && step_usable(e.step, device);
    if (adam) {
      e.s1 = req.exp_avg[i];
      e.s2 = req.exp_avg_sq[i];
      usable = usable && state_usable(e.s1, p) && state_usable(e.s2, p) && e.s1.scalar_type() == e.s2.scalar_type();
    } else if (momentum) {
      e.s1 = req.momentum_buffer[i];
      usable = usable && state_usable(e.s1, p);
    }
    if (!usable) {
      plan.fallback.push_back(static_cast<int64_t>(i));
      continue;
    }
    e.gf = matched_to(req.grads_f[i], p);
    if (req.grads_r) e.gr = matched_to((*req.grads_r)[i], p);
    const DType state_dtype = e.s1.defined() ? to_kernel_dtype(e.s1.scalar_type()) : param_dtype;
    group_for(plan.groups, param_dtype, state_dtype).entries.push_back(std::move(e));
  }
  return plan;
}

void bump_versions(const UpdatePlan& plan) {
  for (const UpdateGroup& g : plan.groups) {
    for (const UpdateEntry& e : g.entries) {
      bump(e.p);
      bump(e.s1);
      bump(e.s2);
      bump(e.step);
    }
  }
}

void bump_versions(const TensorList& tensors) {
  for (const at::Tensor& t : tensors) bump(t);
}

}  // namespace eupmu
