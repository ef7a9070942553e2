// The CPU path: fixed-size chunks of every tensor, run on ATen's intra-op threads. Reading the
// coefficient vector here is fine: on the CPU it already is host memory.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "cpu_kernels.h"
#include "device_ops.h"

namespace eupmu {
namespace cpu_ops {
namespace {

// Elements per chunk: the unit of work and of the Gramian's fixed summation order.
constexpr int64_t kChunk = 16384;
// Below this many elements in total, one thread does the whole list.
constexpr int64_t kSerialBelow = 1 << 15;

struct Chunk {
  int64_t item;
  int64_t begin;
  int64_t n;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t begin = 0; begin < numels[i]; begin += kChunk) {
      chunks.push_back(Chunk{static_cast<int64_t>(i), begin, std::min(kChunk, numels[i] - begin)});
    }
  }
  return chunks;
}

// Runs f(chunk, index) for every chunk, on contiguous runs of chunks with equal element counts
// per thread. Which thread runs a chunk never changes what the chunk computes.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  int64_t total = 0;
  for (const Chunk& c : chunks) total += c.n;
  const int64_t count = static_cast<int64_t>(chunks.size());
  int64_t parts = std::min<int64_t>(at::get_num_threads(), count);
  if (total < kSerialBelow || parts <= 1) {
    for (int64_t j = 0; j < count; ++j) f(chunks[j], j);
    return;
  }
  std::vector<int64_t> bounds(parts + 1, count);
  bounds[0] = 0;
  int64_t seen = 0, j = 0;
  for (int64_t k = 1; k < parts; ++k) {
    const int64_t target = total * k / parts;
    while (j < count && seen + chunks[j].n <= target) seen += chunks[j++].n;
    bounds[k] = j;
  }
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      for (int64_t c = bounds[k]; c < bounds[k + 1]; ++c) f(chunks[c], c);
    }
  });
}

template <typename T>
T* offset(const at::Tensor& t, int64_t elements) {
  if (!t.defined()) return nullptr;
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + elements * static_cast<int64_t>(t.element_size()));
}

std::atomic<const cpu::KernelTable*> g_table{nullptr};
std::mutex g_table_mutex;

const cpu::KernelTable* best_table() {
  int count = 0;
  const char* const* names = cpu::compiled_isas(&count);
  for (int i = 0; i < count; ++i) {
    if (cpu::isa_supported(names[i])) return cpu::kernel_table(names[i]);
  }
  return cpu::kernel_table("default");
}

const cpu::KernelTable* table_for(const std::string& isa) {
  if (isa == "auto") return best_table();
  const cpu::KernelTable* table = cpu::kernel_table(isa.c_str());
  TORCH_CHECK(table != nullptr, "unknown CPU kernel variant '", isa, "'");
  TORCH_CHECK(cpu::isa_supported(isa.c_str()), "this CPU cannot run the '", isa, "' kernels");
  return table;
}

// The variant in use: EUPMU_CPU_ISA (auto, avx512, avx2, default) on first use, else the best.
const cpu::KernelTable& table() {
  const cpu::KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t != nullptr) return *t;
  std::lock_guard<std::mutex> lock(g_table_mutex);
  t = g_table.load(std::memory_order_relaxed);
  if (t == nullptr) {
    const char* env = std::getenv("EUPMU_CPU_ISA");
    t = table_for(env != nullptr && env[0] != '\0' ? std::string(env) : std::string("auto"));
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::vector<int64_t> numels_of(const TensorList& tensors) {
  std::vector<int64_t> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.numel());
  return out;
}

void run_update_group(const UpdateGroup& group, const UpdateRequest& req, float ca, float cb) {
  cpu::UpdateSpec spec;
  spec.rule = req.rule;
  spec.param = group.param_dtype;
  spec.state = group.state_dtype;
  spec.momentum = uses_momentum_buffer(req);
  spec.uncorrected = req.uncorrected && req.rule != kRuleSgd;
  spec.ca = ca;
  spec.cb = cb;
  spec.hyper = rule_hyper(req);
  spec.decay = decay_mode(req.rule, spec.hyper);

  std::vector<int64_t> numels;
  std::vector<StepConsts> consts;
  for (const UpdateEntry& e : group.entries) {
    numels.push_back(e.p.numel());
    consts.push_back(step_consts(spec.hyper, *e.step.data_ptr<float>()));
  }
  // With cb == 0 (no conflict) d is ca*g_f alone: skip reading g_r. When coef comes from this
  // step's Gramian, a non-finite g_r has already made it a skipped step.
  const bool read_gr = cb != 0.0f;
  const cpu::UpdateChunkFn update = table().update;
  for_each_chunk(make_chunks(numels), [&](const Chunk& c, int64_t) {
    const UpdateEntry& e = group.entries[c.item];
    const cpu::UpdatePointers ptrs{offset<void>(e.p, c.begin), offset<const void>(e.gf, c.begin),
                                   read_gr ? offset<const void>(e.gr, c.begin) : nullptr,
                                   offset<void>(e.s1, c.begin), offset<void>(e.s2, c.begin)};
    update(spec, consts[c.item], ptrs, c.n);
  });
}

}  // namespace

at::Tensor gramian(const TensorList& a, const std::optional<TensorList>& b, bool per_tensor) {
  const ReadPairs pairs = prepare_read_pairs(a, b, "gramian");
  const DType dtype = to_kernel_dtype(a[0].scalar_type());
  const std::vector<Chunk> chunks = make_chunks(numels_of(pairs.a));
  std::vector<double> partial(3 * chunks.size());
  const cpu::GramChunkFn gram = table().gram;
  for_each_chunk(chunks, [&](const Chunk& c, int64_t j) {
    const void* pa = offset<const void>(pairs.a[c.item], c.begin);
    const void* pb = pairs.has_b ? offset<const void>(pairs.b[c.item], c.begin) : nullptr;
    gram(dtype, pa, pb, c.n, &partial[3 * j]);
  });
  // Chunk partials summed in chunk order: over the whole list, or per pair (the same sequence a
  // call with that pair alone sums, hence the same bits).
  const at::TensorOptions f64 = a[0].options().dtype(at::kDouble);
  at::Tensor out = per_tensor ? at::zeros({static_cast<int64_t>(a.size()), 3}, f64) : at::zeros({3}, f64);
  double* o = out.data_ptr<double>();
  double sums[3] = {0.0, 0.0, 0.0};
  for (size_t j = 0; j < chunks.size(); ++j) {
    for (int k = 0; k < 3; ++k) sums[k] += partial[3 * j + k];
    const bool pair_ends = j + 1 == chunks.size() || chunks[j + 1].item != chunks[j].item;
    if (per_tensor && pair_ends) {
      double* row = o + 3 * pairs.index[chunks[j].item];
      for (int k = 0; k < 3; ++k) row[k] = sums[k];
      sums[0] = sums[1] = sums[2] = 0.0;
    }
  }
  if (!per_tensor) {
    for (int k = 0; k < 3; ++k) o[k] = sums[k];
  }
  return out;
}

at::Tensor coefficients(const at::Tensor& gram, const CoefficientArgs& args) {
  TORCH_CHECK(gram.numel() == 3, "the Gramian must have 3 elements, got ", gram.numel());
  const at::Tensor g = gram.to(at::kDouble).contiguous();  // float32 Gramians are widened exactly
  at::Tensor inv, found;
  if (args.inv_scale) inv = args.inv_scale->to(gram.device(), at::kFloat).reshape({-1}).contiguous();
  if (args.found_inf) found = args.found_inf->to(gram.device(), at::kFloat).reshape({-1}).contiguous();
  at::Tensor out = at::empty({kCoefLen}, g.options().dtype(at::kFloat));
  compute_coefficients(g.data_ptr<double>(), args.spec, inv.defined() ? inv.data_ptr<float>() : nullptr,
                       found.defined() ? found.data_ptr<float>() : nullptr, out.data_ptr<float>());
  return out;
}

void combine(const TensorList& gf, const std::optional<TensorList>& gr, const at::Tensor& coef) {
  CombineWork work = prepare_combine(gf, gr);
  check_coefficients(coef, gf[0].device());
  const float* c = coef.data_ptr<float>();
  if (c[kSkip] != 0.0f) return;
  const float ca = c[kCa], cb = c[kCb];
  const DType dtype = to_kernel_dtype(gf[0].scalar_type());
  const cpu::CombineChunkFn combine_chunk = table().combine;
  const bool read_gr = work.has_gr && cb != 0.0f;  // as in run_update_group
  for_each_chunk(make_chunks(numels_of(work.gf)), [&](const Chunk& ch, int64_t) {
    void* g = offset<void>(work.gf[ch.item], ch.begin);
    const void* r = read_gr ? offset<const void>(work.gr[ch.item], ch.begin) : nullptr;
    combine_chunk(dtype, g, r, ch.n, ca, cb);
  });
  finish_combine(work);
}

std::vector<int64_t> step(const UpdateRequest& req, const at::Tensor& coef) {
  const UpdatePlan plan = plan_update(req, at::Device(at::kCPU));
  if (plan.groups.empty()) return plan.fallback;
  check_coefficients(coef, at::Device(at::kCPU));
  const float* c = coef.data_ptr<float>();
  if (c[kSkip] != 0.0f) return plan.fallback;
  for (const UpdateGroup& group : plan.groups) run_update_group(group, req, c[kCa], c[kCb]);
  for (const UpdateGroup& group : plan.groups) {
    for (const UpdateEntry& e : group.entries) *e.step.data_ptr<float>() += 1.0f;
  }
  bump_versions(plan);
  return plan.fallback;
}

at::Tensor update_terms(const UpdateRequest& req, std::vector<int64_t>* fallback) {
  TORCH_CHECK(req.grads_r.has_value(), "update_terms: grads_r is required");
  const UpdatePlan plan = plan_update(req, at::Device(at::kCPU));
  *fallback = plan.fallback;
  const TermHyper th = term_hyper(req);
  const RuleHyper rh = rule_hyper(req);
  // one list of chunks over every group, each chunk's raw sums in its own slots
  std::vector<const UpdateEntry*> entries;
  std::vector<const UpdateGroup*> owners;
  std::vector<int64_t> numels;
  for (const UpdateGroup& group : plan.groups) {
    for (const UpdateEntry& e : group.entries) {
      entries.push_back(&e);
      owners.push_back(&group);
      numels.push_back(e.p.numel());
    }
  }
  std::vector<StepConsts> consts;
  std::vector<float> steps;
  for (const UpdateEntry* e : entries) {
    steps.push_back(*e->step.data_ptr<float>());
    consts.push_back(step_consts(rh, steps.back()));
  }
  const std::vector<Chunk> chunks = make_chunks(numels);
  std::vector<double> partial(static_cast<size_t>(kTermsLen) * chunks.size());
  const cpu::TermsChunkFn terms = table().terms;
  for_each_chunk(chunks, [&](const Chunk& c, int64_t j) {
    const UpdateEntry& e = *entries[c.item];
    cpu::UpdateSpec spec;
    spec.rule = req.rule;
    spec.param = owners[c.item]->param_dtype;
    spec.state = owners[c.item]->state_dtype;
    spec.momentum = uses_momentum_buffer(req);
    spec.uncorrected = true;
    spec.ca = 1.0f;
    spec.cb = 0.0f;
    spec.hyper = rh;
    spec.decay = decay_mode(req.rule, rh);
    const cpu::UpdatePointers ptrs{offset<void>(e.p, c.begin), offset<const void>(e.gf, c.begin),
                                   offset<const void>(e.gr, c.begin), offset<void>(e.s1, c.begin),
                                   offset<void>(e.s2, c.begin)};
    double sums[kTermSums];
    terms(spec, consts[c.item], ptrs, c.n, sums);
    chunk_terms(th, steps[c.item], sums, &partial[static_cast<size_t>(kTermsLen) * j]);
  });
  at::Tensor out = at::zeros({kTermsLen}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (size_t j = 0; j < chunks.size(); ++j) {  // chunk order: independent of the thread count
    for (int k = 0; k < kTermsLen; ++k) o[k] += partial[static_cast<size_t>(kTermsLen) * j + k];
  }
  return out;
}

at::Tensor update_space_coefficients(const at::Tensor& terms, double budget, std::optional<double> max_norm,
                                     const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(terms.numel() == kTermsLen, "the update-space terms must have ", kTermsLen, " elements, got ",
              terms.numel());
  const at::Tensor t = terms.to(at::kDouble).contiguous();
  at::Tensor found;
  if (found_inf) found = found_inf->to(terms.device(), at::kFloat).reshape({-1}).contiguous();
  at::Tensor out = at::empty({kCoefLen}, t.options().dtype(at::kFloat));
  compute_update_space_coefficients(t.data_ptr<double>(), budget, max_norm.has_value() ? 1 : 0,
                                    max_norm.value_or(0.0), found.defined() ? found.data_ptr<float>() : nullptr,
                                    out.data_ptr<float>());
  return out;
}

std::string active_isa() { return table().isa; }

void select_isa(const std::string& isa) {
  const cpu::KernelTable* t = table_for(isa);
  std::lock_guard<std::mutex> lock(g_table_mutex);
  g_table.store(t, std::memory_order_release);
}

std::vector<std::string> supported_isas() {
  int count = 0;
  const char* const* names = cpu::compiled_isas(&count);
  std::vector<std::string> out;
  for (int i = 0; i < count; ++i) {
    if (cpu::isa_supported(names[i])) out.emplace_back(names[i]);
  }
  return out;
}

}  // namespace cpu_ops
}  // namespace eupmu
