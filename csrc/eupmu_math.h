// Scalar math shared by the CUDA kernels and the C++ CPU kernels: the coefficient stage
// (semantics of eupmu_kernels/coefficients.py, float64 math) and the per-element update rules
// (torch.optim formulas, float32 math). No torch headers: this file is also compiled by nvcc
// on its own.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

// The coefficient slots (kCa ... kA, kCoefLen), kClipEps and the codes of the surgery rules
// (kMethod*) and base rules (kRule*): generated from eupmu_kernels/contract.py at build time
// into the build folder (docs/design.md, Kernel contract).
#include "eupmu_contract.h"

#if defined(__CUDACC__)
#define EUPMU_HD __host__ __device__ __forceinline__
#else
#define EUPMU_HD inline __attribute__((always_inline))
#endif

namespace eupmu {

// Storage dtypes of the kernels (the update math is float32 for all of them).
enum class DType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// ----------------------------------------------------------------------------- coefficients
//
// The Gramian is float64[3] (docs/design.md, Kernel contract): its element products and sums are
// float64, so it is finite and accurate for any finite float32/bf16/fp16 gradients. This stage
// reads it and computes in float64 too; only the eight output slots are rounded to float32.

constexpr double kFloatMax = 3.4028234663852886e38;
constexpr double kDoubleMax = 1.7976931348623157e308;

struct SurgerySpec {
  int method;
  double eps;
  double alpha;
  double max_norm;
  int has_max_norm;
};

EUPMU_HD bool is_finite(double x) { return fabs(x) <= kDoubleMax; }  // false for inf and NaN
EUPMU_HD bool fits_float(double x) { return fabs(x) <= kFloatMax; }  // false for NaN too

// num / den where den > 0, else 0.
EUPMU_HD double safe_div(double num, double den) { return den > 0.0 ? num / den : 0.0; }

// torch.clamp keeps NaN; so do these (a NaN comparison is false).
EUPMU_HD double clamp_min_zero(double x) { return x < 0.0 ? 0.0 : x; }
EUPMU_HD double clamp_max_one(double x) { return x > 1.0 ? 1.0 : x; }

// The rule's (a, b) with d = a*g_f + b*g_r, from an already unscaled Gramian.
EUPMU_HD void pair_coefficients(double aa, double ab, double bb, const SurgerySpec& s, double* a, double* b) {
  *a = 1.0;
  switch (s.method) {
    case kMethodUngrad:
      *b = clamp_min_zero(safe_div(-ab - s.eps, bb));
      break;
    case kMethodGraddiff:
      *b = s.alpha;
      break;
    case kMethodPcgrad: {
      const bool conflict = ab < 0.0;
      *a = conflict ? 1.0 - safe_div(ab, aa) : 1.0;
      *b = conflict ? 1.0 - safe_div(ab, bb) : 1.0;
      break;
    }
    default:
      *b = 0.0;
      break;
  }
}

// gram: double[3] (scaled by the loss scale when inv_scale is given); inv_scale and found_inf
// may be null. Writes the float[8] vector. The step is skipped on a non-finite Gramian, on
// found_inf != 0 (NaN included), and when ca or cb does not fit in float32: the update kernels
// multiply by them in float32, and an infinite coefficient must never reach the parameters.
EUPMU_HD void compute_coefficients(const double* gram, const SurgerySpec& s, const float* inv_scale,
                                   const float* found_inf, float* out) {
  const double inv = inv_scale != nullptr ? static_cast<double>(*inv_scale) : 1.0;
  double aa = gram[0], ab = gram[1], bb = gram[2];
  if (inv_scale != nullptr) {
    const double inv2 = inv * inv;
    aa *= inv2;
    ab *= inv2;
    bb *= inv2;
  }
  bool skip = !(is_finite(aa) && is_finite(ab) && is_finite(bb));
  if (found_inf != nullptr && *found_inf != 0.0f) skip = true;

  double a, b;
  pair_coefficients(aa, ab, bb, s, &a, &b);
  const double sq = a * a * aa + 2.0 * a * b * ab + b * b * bb;
  const double dnorm = sqrt(clamp_min_zero(sq));
  const double clip = s.has_max_norm ? clamp_max_one(s.max_norm / (dnorm + kClipEps)) : 1.0;
  const double cos = safe_div(ab, sqrt(aa) * sqrt(bb));
  const double ca = a * clip * inv, cb = b * clip * inv;
  if (!(fits_float(ca) && fits_float(cb))) skip = true;
  out[kCa] = skip ? 1.0f : static_cast<float>(ca);
  out[kCb] = skip ? 0.0f : static_cast<float>(cb);
  out[kSkip] = skip ? 1.0f : 0.0f;
  out[kLam] = static_cast<float>(b);
  out[kClip] = static_cast<float>(clip);
  out[kCos] = static_cast<float>(cos);
  out[kDnorm] = static_cast<float>(dnorm);
  out[kA] = static_cast<float>(a);
}

// ----------------------------------------------------------------------------- update rules

// Hyperparameters of one launch. Derived factors such as 1 - beta2 are computed in double on the
// host and rounded once, as torch does with Python-float scalars.
struct RuleHyper {
  double beta1_d;
  double beta2_d;
  float lr;
  float beta2;
  float eps;
  float weight_decay;
  float momentum;
  float one_minus_beta1;
  float one_minus_beta2;
  float one_minus_dampening;
  float decay;  // 1 - lr*wd
  int nesterov;
};

EUPMU_HD RuleHyper make_rule_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                                   double momentum, double dampening, bool nesterov) {
  RuleHyper h;
  h.beta1_d = beta1;
  h.beta2_d = beta2;
  h.lr = (float)lr;
  h.beta2 = (float)beta2;
  h.eps = (float)eps;
  h.weight_decay = (float)weight_decay;
  h.momentum = (float)momentum;
  h.one_minus_beta1 = (float)(1.0 - beta1);
  h.one_minus_beta2 = (float)(1.0 - beta2);
  h.one_minus_dampening = (float)(1.0 - dampening);
  h.decay = (float)(1.0 - lr * weight_decay);
  h.nesterov = nesterov ? 1 : 0;
  return h;
}

// Per-tensor constants of one step, derived from the step count before the step.
struct StepConsts {
  float step_size;  // adam: lr / (1 - beta1^t)
  float bc2_sqrt;   // adam: sqrt(1 - beta2^t)
  int first;        // sgd: no momentum buffer yet (step == 0)
};

EUPMU_HD StepConsts step_consts(const RuleHyper& h, float step_before) {
  StepConsts c;
  const double t = (double)step_before + 1.0;
  // The bias corrections are rounded to float32 first, and lr / bc1 is taken as (1 / bc1) * lr,
  // exactly as the torch backend computes them from its float32 step tensor.
  const float bc1 = (float)(1.0 - pow(h.beta1_d, t));
  c.step_size = (1.0f / bc1) * h.lr;
  c.bc2_sqrt = (float)sqrt(1.0 - pow(h.beta2_d, t));
  c.first = step_before == 0.0f ? 1 : 0;
  return c;
}

// Which optional weight-decay terms a launch applies (torch skips them when weight_decay == 0).
struct DecayMode {
  bool decoupled;  // adamw: p *= 1 - lr*wd
  bool l2;         // adam, sgd: d += wd*p
};

EUPMU_HD DecayMode decay_mode(int rule, const RuleHyper& h) {
  DecayMode m;
  m.decoupled = rule == kRuleAdamw && h.weight_decay != 0.0f;
  m.l2 = rule != kRuleAdamw && h.weight_decay != 0.0f;
  return m;
}

// torch.lerp(start, end, w) for a scalar weight: its two-sided formula, with the fused
// multiply-add that torch's vectorised CPU kernel and CUDA kernel use when kFused.
template <bool kFused>
EUPMU_HD float lerp(float start, float end, float w) {
  const bool small = w < 0.5f;
  const float coeff = small ? w : w - 1.0f;
  const float base = small ? start : end;
  if (kFused) return fmaf(coeff, end - start, base);
  return base + coeff * (end - start);
}

// One Adam/AdamW element: p, m, v in/out, d the combined direction. kFusedLerp: see lerp().
template <bool kFusedLerp>
EUPMU_HD void adam_element(float& p, float d, float& m, float& v, const RuleHyper& h, const StepConsts& c,
                           DecayMode wd) {
  if (wd.decoupled) p = p * h.decay;
  if (wd.l2) d = d + h.weight_decay * p;
  m = lerp<kFusedLerp>(m, d, h.one_minus_beta1);
  v = v * h.beta2 + (h.one_minus_beta2 * d) * d;
  const float denom = sqrtf(v) / c.bc2_sqrt + h.eps;
  p = p - c.step_size * (m / denom);
}

// ----------------------------------------------------------------------------- update space
//
// docs/design.md, Update-space surgery. Adam's step there takes its denominator from the
// uncorrected gradient g0 = g_f (+ the L2 term): v_bar = beta2*v + (1 - beta2)*g0^2, while the
// stored second moment is the usual one. The reduction pass and the update both form that
// denominator with this one function, in float32, so the terms describe the step applied.

EUPMU_HD float uncorrected_denominator(float v, float g0, const RuleHyper& h, const StepConsts& c) {
  return sqrtf(v * h.beta2 + (h.one_minus_beta2 * g0) * g0) / c.bc2_sqrt + h.eps;
}

// One Adam/AdamW element of the update-space step: d the combined direction, g the stored g_f.
template <bool kFusedLerp>
EUPMU_HD void adam_element_uncorrected(float& p, float d, float g, float& m, float& v, const RuleHyper& h,
                                       const StepConsts& c, DecayMode wd) {
  if (wd.l2) g = g + h.weight_decay * p;
  const float denom = uncorrected_denominator(v, g, h, c);
  if (wd.decoupled) p = p * h.decay;
  if (wd.l2) d = d + h.weight_decay * p;
  m = lerp<kFusedLerp>(m, d, h.one_minus_beta1);
  v = v * h.beta2 + (h.one_minus_beta2 * d) * d;
  p = p - c.step_size * (m / denom);
}

// Raw float64 sums of one chunk of the update-space reduction (elements widened before they are
// multiplied, as in the Gramian). kSumState is <b, g_r> (SGD's momentum buffer) or <m, P g_r> (Adam).
enum TermSum : int {
  kSumFF = 0, kSumFR, kSumRR, kSumThetaR, kSumState, kSumThetaPR, kSumFPR, kSumRPR, kTermSums
};

// Hyperparameters of the terms, in float64 as the host has them.
struct TermHyper {
  int rule;
  bool momentum_buffer;  // sgd with momentum
  bool nesterov;
  double lr, beta1, weight_decay, momentum, dampening;
};

// The chunk's Gramian and terms (K0, K1, K2, T0) from its raw sums and its tensor's step count before
// the step: the factors of the table in docs/design.md, in float64.
EUPMU_HD void chunk_terms(const TermHyper& h, float step_before, const double* s, double* out) {
  out[kTermAa] = s[kSumFF];
  out[kTermAb] = s[kSumFR];
  out[kTermBb] = s[kSumRR];
  out[kTermT0] = s[kSumThetaR];
  if (h.rule == kRuleSgd) {
    const bool first = step_before == 0.0f;
    double s_b = 0.0, s_d = 1.0;
    if (h.momentum_buffer && h.nesterov) {  // D = (1 + mu) d_total + mu^2 b
      s_b = first ? 0.0 : h.momentum;
      s_d = 1.0 + h.momentum;
    } else if (h.momentum_buffer) {  // D = mu b + (1 - dampening) d_total; the first step D = d_total
      s_b = first ? 0.0 : 1.0;
      s_d = first ? 1.0 : 1.0 - h.dampening;
    }
    out[kTermK0] = h.lr * (s_b * h.momentum * s[kSumState] + s_d * h.weight_decay * s[kSumThetaR]);
    out[kTermK1] = h.lr * s_d * s[kSumFR];
    out[kTermK2] = h.lr * s_d * s[kSumRR];
  } else {
    const double bc1 = 1.0 - pow(h.beta1, (double)step_before + 1.0);
    const bool decoupled = h.rule == kRuleAdamw;
    const double wd_dec = decoupled ? h.weight_decay : 0.0, wd_l2 = decoupled ? 0.0 : h.weight_decay;
    const double moments = h.beta1 * s[kSumState] + (1.0 - h.beta1) * wd_l2 * s[kSumThetaPR];
    out[kTermK0] = h.lr * (wd_dec * s[kSumThetaR] + moments / bc1);
    const double scale = (1.0 - h.beta1) / bc1;
    out[kTermK1] = h.lr * scale * s[kSumFPR];
    out[kTermK2] = h.lr * scale * s[kSumRPR];
  }
}

// max(0, (-budget - K0 - c*K1) / (c*K2)), 0 where c*K2 <= 0; NaN stays NaN.
EUPMU_HD double update_space_lambda(double c, double budget, double k0, double k1, double k2) {
  return clamp_min_zero(safe_div(-budget - k0 - c * k1, c * k2));
}

EUPMU_HD double direction_norm(double lam, double aa, double ab, double bb) {
  return sqrt(clamp_min_zero(aa + 2.0 * lam * ab + lam * lam * bb));
}

// The smallest float32 >= x for x >= 0 (x itself rounded to nearest otherwise, NaN included).
EUPMU_HD float round_up_to_float(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x && f >= 0.0f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof(bits));
    bits += 1u;
    memcpy(&f, &bits, sizeof(f));
  }
  return f;
}

// terms: double[kTermsLen] (the global Gramian and terms). Writes the float[8] vector: the smallest
// lambda >= 0 with K0 + c*(K1 + lambda*K2) >= -budget, c the clip factor of g_f + lambda*g_r (a fixed
// number of fixed-point steps under clipping), cb = c*lambda rounded up to float32. The semantics of
// eupmu_kernels/coefficients.py, update_space_coefficients, operation for operation.
EUPMU_HD void compute_update_space_coefficients(const double* terms, double budget, int has_max_norm, double max_norm,
                                                const float* found_inf, float* out) {
  const double aa = terms[kTermAa], ab = terms[kTermAb], bb = terms[kTermBb];
  const double k0 = terms[kTermK0], k1 = terms[kTermK1], k2 = terms[kTermK2];
  bool skip = false;
  for (int i = 0; i < kTermsLen; ++i) skip = skip || !is_finite(terms[i]);
  if (found_inf != nullptr && *found_inf != 0.0f) skip = true;
  double lam = update_space_lambda(1.0, budget, k0, k1, k2), clip = 1.0;
  if (has_max_norm) {
    for (int i = 0; i < kClipIterations; ++i) {
      clip = clamp_max_one(max_norm / (direction_norm(lam, aa, ab, bb) + kClipEps));
      lam = update_space_lambda(clip, budget, k0, k1, k2);
    }
    clip = clamp_max_one(max_norm / (direction_norm(lam, aa, ab, bb) + kClipEps));
  }
  const double dnorm = direction_norm(lam, aa, ab, bb);
  const double cos = safe_div(ab, sqrt(aa) * sqrt(bb));
  const double ca = clip;
  const float cb = round_up_to_float(lam * clip);
  if (!(fits_float(ca) && fits_float(cb))) skip = true;
  out[kCa] = skip ? 1.0f : static_cast<float>(ca);
  out[kCb] = skip ? 0.0f : cb;
  out[kSkip] = skip ? 1.0f : 0.0f;
  out[kLam] = static_cast<float>(lam);
  out[kClip] = static_cast<float>(clip);
  out[kCos] = static_cast<float>(cos);
  out[kDnorm] = static_cast<float>(dnorm);
  out[kA] = 1.0f;
}

// One SGD element with a momentum buffer.
EUPMU_HD void sgd_momentum_element(float& p, float d, float& buf, const RuleHyper& h, const StepConsts& c,
                                   DecayMode wd) {
  if (wd.l2) d = d + h.weight_decay * p;
  buf = c.first ? d : buf * h.momentum + h.one_minus_dampening * d;
  d = h.nesterov ? d + h.momentum * buf : buf;
  p = p - h.lr * d;
}

// One SGD element without momentum.
EUPMU_HD void sgd_plain_element(float& p, float d, const RuleHyper& h, DecayMode wd) {
  if (wd.l2) d = d + h.weight_decay * p;
  p = p - h.lr * d;
}

}  // namespace eupmu
