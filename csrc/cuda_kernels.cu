// CUDA kernels over tensor lists (see cuda_kernels.h and launch_plan.h for the launch arguments).
// float32 update math for every storage dtype, float64 Gramian and coefficients; 16-byte vector
// accesses where every pointer of a chunk is aligned, element accesses otherwise.
//
// The tensor-list arguments are __grid_constant__: the kernels read them in place from the
// kernel parameter space (uniform loads, broadcast to the block) instead of copying them to a
// per-thread stack frame.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_kernels.h"

namespace eupmu {
namespace cuda {
namespace {

using launch::ChunkRef;
using launch::locate;

constexpr int kBlock = 512;
constexpr int kCleanupBlock = 256;
constexpr int kStepBlock = 64;
constexpr unsigned kFullMask = 0xffffffffu;
static_assert(launch::capacity_for(kUpdateRows) <= kStepBlock, "one block advances a launch's step counts");

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};

template <>
struct Storage<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct Storage<__half> {
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* ptr, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = Storage<T>::load(pack.v[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* ptr, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = Storage<T>::store(in[k]);
  *reinterpret_cast<Pack<T, N>*>(ptr) = pack;
}

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename T, int kRows>
__device__ __forceinline__ T* row_ptr(const launch::TensorListArgs<kRows>& a, int row, int tensor) {
  return reinterpret_cast<T*>(a.addr[row][tensor]);
}

// Sums (x, y, z) over the block in a fixed order; thread 0 holds the result. blockDim.x must be
// a multiple of 32 and at most 1024.
template <typename V>
__device__ __forceinline__ void block_sum3(V& x, V& y, V& z) {
  __shared__ V partial[3 * 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_down_sync(kFullMask, x, offset);
    y += __shfl_down_sync(kFullMask, y, offset);
    z += __shfl_down_sync(kFullMask, z, offset);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    partial[3 * warp] = x;
    partial[3 * warp + 1] = y;
    partial[3 * warp + 2] = z;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    x = lane < warps ? partial[3 * lane] : V(0);
    y = lane < warps ? partial[3 * lane + 1] : V(0);
    z = lane < warps ? partial[3 * lane + 2] : V(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      x += __shfl_down_sync(kFullMask, x, offset);
      y += __shfl_down_sync(kFullMask, y, offset);
      z += __shfl_down_sync(kFullMask, z, offset);
    }
  }
}

// Sums v[0..kN) over the block in a fixed order; thread 0 holds the result. blockDim.x must be a
// multiple of 32 and at most 1024.
template <int kN>
__device__ __forceinline__ void block_sum_n(double (&v)[kN]) {
  __shared__ double partial[kN][32];
#pragma unroll
  for (int k = 0; k < kN; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_down_sync(kFullMask, v[k], offset);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kN; ++k) partial[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      v[k] = lane < warps ? partial[k][lane] : 0.0;
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_down_sync(kFullMask, v[k], offset);
    }
  }
}

// ------------------------------------------------------------------------------ Gramian
//
// Every element is widened to double before it is multiplied (docs/design.md, Kernel contract):
// the product of two floats is exact in double, and no finite float32/bf16/fp16 input can make
// a partial overflow or underflow. The conversions and double FMAs stay well below the memory
// time on sm_80 and sm_90 (see the readiness report for registers).

template <typename T, bool kHasB>
__global__ void __launch_bounds__(kBlock)
    gram_chunks_kernel(const __grid_constant__ GramArgs m, double* __restrict__ slots) {
  const ChunkRef ch = locate(m, static_cast<int32_t>(blockIdx.x));
  const int64_t c = m.chunk_base + blockIdx.x;
  const T* __restrict__ a = row_ptr<const T>(m, 0, ch.tensor) + ch.start;
  const T* __restrict__ b = kHasB ? row_ptr<const T>(m, 1, ch.tensor) + ch.start : nullptr;
  constexpr int N = 16 / sizeof(T);
  double aa = 0.0, ab = 0.0, bb = 0.0;
  int done = 0;
  if (aligned_to(a, 16) && (!kHasB || aligned_to(b, 16))) {
    const int packs = ch.n / N;
#pragma unroll 2
    for (int v = threadIdx.x; v < packs; v += blockDim.x) {
      float x[N];
      load_pack<T, N>(a + v * N, x);
      if constexpr (kHasB) {
        float y[N];
        load_pack<T, N>(b + v * N, y);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const double xd = x[k], yd = y[k];
          aa += xd * xd;
          ab += xd * yd;
          bb += yd * yd;
        }
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) {
          const double xd = x[k];
          aa += xd * xd;
        }
      }
    }
    done = packs * N;
  }
  for (int i = done + threadIdx.x; i < ch.n; i += blockDim.x) {
    const double x = Storage<T>::load(a[i]);
    aa += x * x;
    if constexpr (kHasB) {
      const double y = Storage<T>::load(b[i]);
      ab += x * y;
      bb += y * y;
    }
  }
  block_sum3(aa, ab, bb);
  if (threadIdx.x == 0) {
    slots[3 * c] = aa;
    slots[3 * c + 1] = ab;
    slots[3 * c + 2] = bb;
  }
}

// One block per range: every thread sums a fixed strided subset of the range's slots, then the
// block tree. No atomics, so the result depends only on the inputs; a tensor's range gives the
// same bits whether it was launched alone or in a list (launch_plan.h, SlotRanges).
__global__ void __launch_bounds__(kCleanupBlock)
    gram_cleanup_kernel(const double* __restrict__ slots, const __grid_constant__ launch::SlotRanges ranges,
                        double* __restrict__ out) {
  const int r = blockIdx.x;
  const double* __restrict__ first = slots + 3 * ranges.first[r];
  const int64_t count = ranges.count[r];
  double x = 0.0, y = 0.0, z = 0.0;
  for (int64_t s = threadIdx.x; s < count; s += blockDim.x) {
    x += first[3 * s];
    y += first[3 * s + 1];
    z += first[3 * s + 2];
  }
  block_sum3(x, y, z);
  if (threadIdx.x == 0) {
    double* row = out + 3 * ranges.out_row[r];
    row[0] = x;
    row[1] = y;
    row[2] = z;
  }
}

template <typename T>
void gram_kernels(bool has_b, const GramArgs& m, int32_t nchunks, double* slots, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(nchunks));
  if (has_b) {
    gram_chunks_kernel<T, true><<<grid, kBlock, 0, stream>>>(m, slots);
  } else {
    gram_chunks_kernel<T, false><<<grid, kBlock, 0, stream>>>(m, slots);
  }
}

// ------------------------------------------------------------------------------ coefficients

__global__ void coefficients_kernel(const double* gram, SurgerySpec spec, const float* inv_scale,
                                    const float* found_inf, float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) compute_coefficients(gram, spec, inv_scale, found_inf, out);
}

// ------------------------------------------------------------------------------ combine

// One block's chunk of g_f <- ca*g_f (+ cb*g_r when kReadGr).
template <typename T, bool kReadGr>
__device__ __forceinline__ void combine_chunk(const CombineArgs& m, float ca, float cb) {
  const ChunkRef ch = locate(m, static_cast<int32_t>(blockIdx.x));
  T* __restrict__ gf = row_ptr<T>(m, 0, ch.tensor) + ch.start;
  const T* __restrict__ gr = kReadGr ? row_ptr<const T>(m, 1, ch.tensor) + ch.start : nullptr;
  constexpr int N = 16 / sizeof(T);
  int done = 0;
  if (aligned_to(gf, 16) && (!kReadGr || aligned_to(gr, 16))) {
    const int packs = ch.n / N;
    for (int v = threadIdx.x; v < packs; v += blockDim.x) {
      float g[N];
      load_pack<T, N>(gf + v * N, g);
      if constexpr (kReadGr) {
        float r[N];
        load_pack<T, N>(gr + v * N, r);
#pragma unroll
        for (int k = 0; k < N; ++k) g[k] = ca * g[k] + cb * r[k];
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) g[k] = ca * g[k];
      }
      store_pack<T, N>(gf + v * N, g);
    }
    done = packs * N;
  }
  for (int i = done + threadIdx.x; i < ch.n; i += blockDim.x) {
    float g = ca * Storage<T>::load(gf[i]);
    if constexpr (kReadGr) g = g + cb * Storage<T>::load(gr[i]);
    gf[i] = Storage<T>::store(g);
  }
}

template <typename T, bool kHasGr>
__global__ void __launch_bounds__(kBlock)
    combine_chunks_kernel(const __grid_constant__ CombineArgs m, const float* __restrict__ coef) {
  if (coef[kSkip] != 0.0f) return;
  const float ca = coef[kCa], cb = coef[kCb];
  if (kHasGr && cb != 0.0f) {
    combine_chunk<T, true>(m, ca, cb);
  } else {  // cb == 0: g_r is not needed (see update_chunks_kernel)
    combine_chunk<T, false>(m, ca, cb);
  }
}

template <typename T>
void combine_kernels(bool has_gr, const CombineArgs& m, int32_t nchunks, const float* coef, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(nchunks));
  if (has_gr) {
    combine_chunks_kernel<T, true><<<grid, kBlock, 0, stream>>>(m, coef);
  } else {
    combine_chunks_kernel<T, false><<<grid, kBlock, 0, stream>>>(m, coef);
  }
}

// ------------------------------------------------------------------------------ fused update

// One element of the update: d from (g, r), then the rule on (p, s1, s2). kUncorrected (Adam in
// update space): the denominator from g itself (eupmu_math.h, adam_element_uncorrected).
template <UpdateKind K, bool kHasGr, bool kUncorrected>
__device__ __forceinline__ void update_element(float& p, float g, float r, float& s1, float& s2, float ca, float cb,
                                               const RuleHyper& h, const StepConsts& c, DecayMode wd) {
  float d = ca * g;
  if constexpr (kHasGr) d = d + cb * r;
  if constexpr (K == UpdateKind::kAdam && kUncorrected) {
    adam_element_uncorrected<true>(p, d, g, s1, s2, h, c, wd);
  } else if constexpr (K == UpdateKind::kAdam) {
    adam_element<true>(p, d, s1, s2, h, c, wd);
  } else if constexpr (K == UpdateKind::kSgdMomentum) {
    sgd_momentum_element(p, d, s1, h, c, wd);
  } else {
    sgd_plain_element(p, d, h, wd);
  }
}

// Two blocks per SM at least (<= 64 registers): half the warps an SM can hold, as before the
// launch arguments grew; without the bound ptxas takes up to 80 registers for the bf16/fp16
// Adam variants, one block of 512 threads per SM.
template <typename P, typename S, UpdateKind K, bool kHasGr, bool kUncorrected>
__global__ void __launch_bounds__(kBlock, 2)
    update_chunks_kernel(const __grid_constant__ UpdateArgs m, const float* __restrict__ coef, RuleHyper h,
                         DecayMode wd) {
  if (coef[kSkip] != 0.0f) return;
  const float ca = coef[kCa], cb = coef[kCb];
  const ChunkRef ch = locate(m, static_cast<int32_t>(blockIdx.x));
  // The step constants first: pow() is a call, and the fewer values live across it the fewer
  // registers the kernel needs (with them last, one instantiation spilled at sm_90).
  const StepConsts c = step_consts(h, *row_ptr<const float>(m, kStepRow, ch.tensor));
  constexpr bool kHasS1 = K != UpdateKind::kSgdPlain;
  constexpr bool kHasS2 = K == UpdateKind::kAdam;
  P* __restrict__ p = row_ptr<P>(m, 0, ch.tensor) + ch.start;
  const P* __restrict__ gf = row_ptr<const P>(m, 1, ch.tensor) + ch.start;
  // With cb == 0 (no conflict) d is ca*g_f alone: g_r is not read. When coef comes from this
  // step's Gramian, a non-finite g_r has already made it a skipped step.
  const bool read_gr = kHasGr && cb != 0.0f;
  const P* __restrict__ gr = kHasGr ? row_ptr<const P>(m, 2, ch.tensor) + ch.start : nullptr;
  S* __restrict__ s1 = kHasS1 ? row_ptr<S>(m, 3, ch.tensor) + ch.start : nullptr;
  S* __restrict__ s2 = kHasS2 ? row_ptr<S>(m, 4, ch.tensor) + ch.start : nullptr;

  constexpr int N = 16 / sizeof(P);
  constexpr unsigned kStateBytes = N * sizeof(S);
  const bool vectorised = aligned_to(p, 16) && aligned_to(gf, 16) && (!kHasGr || aligned_to(gr, 16)) &&
                          (!kHasS1 || aligned_to(s1, kStateBytes)) && (!kHasS2 || aligned_to(s2, kStateBytes));
  int done = 0;
  if (vectorised) {
    const int packs = ch.n / N;
    for (int v = threadIdx.x; v < packs; v += blockDim.x) {
      const int off = v * N;
      float pv[N], gv[N], rv[N] = {}, m1[N] = {}, m2[N] = {};
      load_pack<P, N>(p + off, pv);
      load_pack<P, N>(gf + off, gv);
      if (read_gr) load_pack<P, N>(gr + off, rv);
      if constexpr (kHasS1) load_pack<S, N>(s1 + off, m1);
      if constexpr (kHasS2) load_pack<S, N>(s2 + off, m2);
#pragma unroll
      for (int k = 0; k < N; ++k) update_element<K, kHasGr, kUncorrected>(pv[k], gv[k], rv[k], m1[k], m2[k], ca, cb, h, c, wd);
      store_pack<P, N>(p + off, pv);
      if constexpr (kHasS1) store_pack<S, N>(s1 + off, m1);
      if constexpr (kHasS2) store_pack<S, N>(s2 + off, m2);
    }
    done = packs * N;
  }
  for (int i = done + threadIdx.x; i < ch.n; i += blockDim.x) {
    float pv = Storage<P>::load(p[i]);
    const float gv = Storage<P>::load(gf[i]);
    float rv = 0.0f, m1 = 0.0f, m2 = 0.0f;
    if (read_gr) rv = Storage<P>::load(gr[i]);
    if constexpr (kHasS1) m1 = Storage<S>::load(s1[i]);
    if constexpr (kHasS2) m2 = Storage<S>::load(s2[i]);
    update_element<K, kHasGr, kUncorrected>(pv, gv, rv, m1, m2, ca, cb, h, c, wd);
    p[i] = Storage<P>::store(pv);
    if constexpr (kHasS1) s1[i] = Storage<S>::store(m1);
    if constexpr (kHasS2) s2[i] = Storage<S>::store(m2);
  }
}

// Runs after the update kernel of the same slice on the same stream, so every block of it read
// the old count.
__global__ void __launch_bounds__(kStepBlock)
    advance_steps_kernel(const __grid_constant__ UpdateArgs m, const float* __restrict__ coef) {
  if (coef[kSkip] != 0.0f) return;
  const int t = threadIdx.x;
  if (t < m.ntensors) {
    float* step = row_ptr<float>(m, kStepRow, t);
    *step = *step + 1.0f;
  }
}

template <typename P, typename S, UpdateKind K>
void update_kernels_kind(const UpdateLaunch& u, const UpdateArgs& m, int32_t nchunks, const float* coef,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(nchunks));
  if constexpr (K == UpdateKind::kAdam) {
    if (u.has_gr && u.uncorrected) {  // update space always has g_r
      update_chunks_kernel<P, S, K, true, true><<<grid, kBlock, 0, stream>>>(m, coef, u.hyper, u.decay);
      return;
    }
  }
  if (u.has_gr) {
    update_chunks_kernel<P, S, K, true, false><<<grid, kBlock, 0, stream>>>(m, coef, u.hyper, u.decay);
  } else {
    update_chunks_kernel<P, S, K, false, false><<<grid, kBlock, 0, stream>>>(m, coef, u.hyper, u.decay);
  }
}

template <typename P, typename S>
void update_kernels(const UpdateLaunch& u, const UpdateArgs& m, int32_t n, const float* coef, cudaStream_t stream) {
  switch (u.kind) {
    case UpdateKind::kAdam: return update_kernels_kind<P, S, UpdateKind::kAdam>(u, m, n, coef, stream);
    case UpdateKind::kSgdMomentum: return update_kernels_kind<P, S, UpdateKind::kSgdMomentum>(u, m, n, coef, stream);
    case UpdateKind::kSgdPlain: return update_kernels_kind<P, P, UpdateKind::kSgdPlain>(u, m, n, coef, stream);
  }
}

// ------------------------------------------------------------------------------ update-space terms
//
// docs/design.md, Update-space surgery: one block per chunk forms the chunk's raw float64 sums
// (elements widened before they are multiplied; Adam's P g_r divides by the float32 denominator of
// the update, uncorrected_denominator), reduces them over the block in a fixed order, and thread 0
// scales them by the tensor's factors (chunk_terms) into the chunk's slots.

template <typename P, typename S, UpdateKind K, bool kL2>
__global__ void __launch_bounds__(kBlock)
    terms_chunks_kernel(const __grid_constant__ UpdateArgs m, double* __restrict__ slots, RuleHyper h,
                        TermHyper th) {
  const ChunkRef ch = locate(m, static_cast<int32_t>(blockIdx.x));
  const int64_t chunk = m.chunk_base + blockIdx.x;
  const float step_before = *row_ptr<const float>(m, kStepRow, ch.tensor);
  const StepConsts c = step_consts(h, step_before);
  const P* __restrict__ p = row_ptr<const P>(m, 0, ch.tensor) + ch.start;
  const P* __restrict__ gf = row_ptr<const P>(m, 1, ch.tensor) + ch.start;
  const P* __restrict__ gr = row_ptr<const P>(m, 2, ch.tensor) + ch.start;
  const S* __restrict__ s1 = K != UpdateKind::kSgdPlain ? row_ptr<const S>(m, 3, ch.tensor) + ch.start : nullptr;
  const S* __restrict__ s2 = K == UpdateKind::kAdam ? row_ptr<const S>(m, 4, ch.tensor) + ch.start : nullptr;
  double acc[kTermSums];
#pragma unroll
  for (int k = 0; k < kTermSums; ++k) acc[k] = 0.0;
  for (int i = threadIdx.x; i < ch.n; i += blockDim.x) {
    const float f32 = Storage<P>::load(gf[i]), p32 = Storage<P>::load(p[i]);
    const double f = f32, r = Storage<P>::load(gr[i]), theta = p32;
    acc[kSumFF] += f * f;
    acc[kSumFR] += f * r;
    acc[kSumRR] += r * r;
    acc[kSumThetaR] += theta * r;
    if constexpr (K == UpdateKind::kSgdMomentum) acc[kSumState] += static_cast<double>(Storage<S>::load(s1[i])) * r;
    if constexpr (K == UpdateKind::kAdam) {
      const float g0 = kL2 ? f32 + h.weight_decay * p32 : f32;
      const double pr = r / static_cast<double>(uncorrected_denominator(Storage<S>::load(s2[i]), g0, h, c));
      acc[kSumState] += static_cast<double>(Storage<S>::load(s1[i])) * pr;
      acc[kSumThetaPR] += theta * pr;
      acc[kSumFPR] += f * pr;
      acc[kSumRPR] += r * pr;
    }
  }
  block_sum_n<kTermSums>(acc);
  if (threadIdx.x == 0) chunk_terms(th, step_before, acc, slots + kTermsLen * chunk);
}

__global__ void __launch_bounds__(kCleanupBlock)
    terms_cleanup_kernel(const double* __restrict__ slots, int64_t nslots, double* __restrict__ out) {
  double v[kTermsLen];
#pragma unroll
  for (int k = 0; k < kTermsLen; ++k) v[k] = 0.0;
  for (int64_t s = threadIdx.x; s < nslots; s += blockDim.x) {
#pragma unroll
    for (int k = 0; k < kTermsLen; ++k) v[k] += slots[kTermsLen * s + k];
  }
  block_sum_n<kTermsLen>(v);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kTermsLen; ++k) out[k] = v[k];
  }
}

__global__ void update_space_coefficients_kernel(const double* terms, double budget, int has_max_norm,
                                                 double max_norm, const float* found_inf, float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    compute_update_space_coefficients(terms, budget, has_max_norm, max_norm, found_inf, out);
  }
}

template <typename P, typename S>
void terms_kernels(const TermsLaunch& t, const UpdateArgs& m, int32_t nchunks, double* slots, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(nchunks));
  switch (t.kind) {
    case UpdateKind::kAdam:
      if (t.decay.l2) {
        terms_chunks_kernel<P, S, UpdateKind::kAdam, true><<<grid, kBlock, 0, stream>>>(m, slots, t.hyper, t.terms);
      } else {
        terms_chunks_kernel<P, S, UpdateKind::kAdam, false><<<grid, kBlock, 0, stream>>>(m, slots, t.hyper, t.terms);
      }
      return;
    case UpdateKind::kSgdMomentum:
      terms_chunks_kernel<P, S, UpdateKind::kSgdMomentum, false><<<grid, kBlock, 0, stream>>>(m, slots, t.hyper,
                                                                                              t.terms);
      return;
    case UpdateKind::kSgdPlain:
      terms_chunks_kernel<P, P, UpdateKind::kSgdPlain, false><<<grid, kBlock, 0, stream>>>(m, slots, t.hyper,
                                                                                           t.terms);
      return;
  }
}

template <typename P>
void terms_kernels_state(const TermsLaunch& t, const UpdateArgs& m, int32_t n, double* slots, cudaStream_t stream) {
  if (t.state == DType::kFloat) return terms_kernels<P, float>(t, m, n, slots, stream);
  return terms_kernels<P, P>(t, m, n, slots, stream);
}

template <typename P>
void update_kernels_state(const UpdateLaunch& u, const UpdateArgs& m, int32_t n, const float* coef,
                          cudaStream_t stream) {
  if (u.state == DType::kFloat) return update_kernels<P, float>(u, m, n, coef, stream);
  return update_kernels<P, P>(u, m, n, coef, stream);
}

}  // namespace

cudaError_t launch_gramian_chunks(DType dtype, bool has_b, const GramArgs& args, int32_t nchunks, double* slots,
                                  cudaStream_t stream) {
  if (nchunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat: gram_kernels<float>(has_b, args, nchunks, slots, stream); break;
    case DType::kBFloat16: gram_kernels<__nv_bfloat16>(has_b, args, nchunks, slots, stream); break;
    case DType::kHalf: gram_kernels<__half>(has_b, args, nchunks, slots, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_gramian_finish(const double* slots, const launch::SlotRanges& ranges, double* out,
                                  cudaStream_t stream) {
  if (ranges.nranges == 0) return cudaSuccess;
  gram_cleanup_kernel<<<static_cast<unsigned>(ranges.nranges), kCleanupBlock, 0, stream>>>(slots, ranges, out);
  return cudaGetLastError();
}

cudaError_t launch_coefficients(const double* gram, const SurgerySpec& spec, const float* inv_scale,
                                const float* found_inf, float* out, cudaStream_t stream) {
  coefficients_kernel<<<1, 1, 0, stream>>>(gram, spec, inv_scale, found_inf, out);
  return cudaGetLastError();
}

cudaError_t launch_combine(DType dtype, bool has_gr, const CombineArgs& args, int32_t nchunks, const float* coef,
                           cudaStream_t stream) {
  if (nchunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat: combine_kernels<float>(has_gr, args, nchunks, coef, stream); break;
    case DType::kBFloat16: combine_kernels<__nv_bfloat16>(has_gr, args, nchunks, coef, stream); break;
    case DType::kHalf: combine_kernels<__half>(has_gr, args, nchunks, coef, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_terms_chunks(const TermsLaunch& launch, const UpdateArgs& args, int32_t nchunks, double* slots,
                                cudaStream_t stream) {
  if (nchunks == 0) return cudaSuccess;
  switch (launch.param) {
    case DType::kFloat: terms_kernels<float, float>(launch, args, nchunks, slots, stream); break;
    case DType::kBFloat16: terms_kernels_state<__nv_bfloat16>(launch, args, nchunks, slots, stream); break;
    case DType::kHalf: terms_kernels_state<__half>(launch, args, nchunks, slots, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_terms_finish(const double* slots, int64_t nslots, double* out, cudaStream_t stream) {
  terms_cleanup_kernel<<<1, kCleanupBlock, 0, stream>>>(slots, nslots, out);
  return cudaGetLastError();
}

cudaError_t launch_update_space_coefficients(const double* terms, double budget, int has_max_norm, double max_norm,
                                             const float* found_inf, float* out, cudaStream_t stream) {
  update_space_coefficients_kernel<<<1, 1, 0, stream>>>(terms, budget, has_max_norm, max_norm, found_inf, out);
  return cudaGetLastError();
}

cudaError_t launch_update(const UpdateLaunch& launch, const UpdateArgs& args, int32_t nchunks, const float* coef,
                          cudaStream_t stream) {
  if (nchunks > 0) {
    switch (launch.param) {
      case DType::kFloat: update_kernels<float, float>(launch, args, nchunks, coef, stream); break;
      case DType::kBFloat16: update_kernels_state<__nv_bfloat16>(launch, args, nchunks, coef, stream); break;
      case DType::kHalf: update_kernels_state<__half>(launch, args, nchunks, coef, stream); break;
    }
  }
  if (args.ntensors > 0) advance_steps_kernel<<<1, kStepBlock, 0, stream>>>(args, coef);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace eupmu
