// Metadata of the multi-tensor CUDA launches, passed by value in the kernels' arguments: each
// launch carries the addresses and sizes of up to kCapacity tensors and where each tensor's chunks
// start, so nothing is copied to the device, nothing is cached, and temporaries (the dense copies
// the wrappers make, a single gradient in a post-accumulate-grad hook) cost no more than the
// optimizer's own tensors (docs/design.md, Kernel contract).
//
// The planning and packing below are plain host code, compiled into every build (nvcc's and the
// C++ CPU one), so they are unit-tested on the CPU with fake addresses (_C._launch_plan); locate()
// is the very function the kernels call to find their chunk. No torch or CUDA headers.
#pragma once

#include <stdint.h>
#include <string.h>

#include <stdexcept>
#include <vector>

#include "eupmu_math.h"

namespace eupmu {
namespace launch {

// Elements per chunk; one thread block handles one chunk. A multiple of every vector width.
constexpr int64_t kChunk = 65536;

// Bytes of kernel arguments one tensor list may take. 4 KiB is the limit for all the arguments
// of a kernel on every toolkit and driver (CUDA 12.1+ allows 32 KiB from Volta on, but needs a
// 12.1+ driver); this leaves room for the launch's other arguments (coefficients pointer, rule
// hyperparameters). Raising it packs more tensors into a launch.
constexpr int kArgBytes = 3584;

// Tensors per launch with `rows` pointers each: addresses, element count, first chunk.
constexpr int capacity_for(int rows) { return (kArgBytes - 32) / (rows * 8 + 8 + 4); }

template <int kRows>
struct TensorListArgs {
  static constexpr int kCapacity = capacity_for(kRows);
  uint64_t addr[kRows][kCapacity];        // address of tensor t in list r (0 where a list is absent)
  int64_t numel[kCapacity];               // elements of tensor t
  int32_t first_chunk[kCapacity + 1];     // tensor t owns chunks [first_chunk[t], first_chunk[t + 1])
  int32_t ntensors;
  int64_t chunk_base;                     // chunks of the whole list before this launch's first one
};

// A launch's share of a tensor list: tensors [first_tensor, first_tensor + ntensors), whose
// chunks are [chunk_base, chunk_base + nchunks) of the whole list (the Gramian's slot indices).
struct LaunchSlice {
  int64_t first_tensor;
  int32_t ntensors;
  int64_t chunk_base;
  int32_t nchunks;
};

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Consecutive slices of at most `capacity` tensors (empty tensors included: the update still
// advances their step counts) and at most 2^31 - 1 chunks (the grid size) each.
inline std::vector<LaunchSlice> plan_launches(const std::vector<int64_t>& numels, int capacity) {
  constexpr int64_t kMaxChunks = INT32_MAX;
  std::vector<LaunchSlice> out;
  int64_t chunk = 0;
  LaunchSlice cur{0, 0, 0, 0};
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] < 0) throw std::invalid_argument("negative element count");
    const int64_t c = chunks_of(numels[t]);
    if (c > kMaxChunks) throw std::invalid_argument("a tensor has more chunks than one launch can take");
    if (cur.ntensors == capacity || cur.nchunks + c > kMaxChunks) {
      out.push_back(cur);
      cur = LaunchSlice{static_cast<int64_t>(t), 0, chunk, 0};
    }
    cur.ntensors += 1;
    cur.nchunks += static_cast<int32_t>(c);
    chunk += c;
  }
  if (cur.ntensors > 0) out.push_back(cur);
  return out;
}

// The kernel arguments of one slice; rows[r][t] is the address of tensor t of list r (0 where the
// list is absent). Unused entries are zero, so equal inputs give byte-equal arguments.
template <int kRows>
TensorListArgs<kRows> pack_launch(const LaunchSlice& s, const std::vector<std::vector<uint64_t>>& rows,
                                  const std::vector<int64_t>& numels) {
  static_assert(sizeof(TensorListArgs<kRows>) <= kArgBytes, "tensor list arguments too large");
  if (rows.size() != kRows) throw std::invalid_argument("wrong number of tensor lists");
  if (s.ntensors > TensorListArgs<kRows>::kCapacity) throw std::invalid_argument("slice over capacity");
  TensorListArgs<kRows> a;
  memset(&a, 0, sizeof(a));
  a.ntensors = s.ntensors;
  a.chunk_base = s.chunk_base;
  int32_t chunk = 0;
  for (int32_t i = 0; i < s.ntensors; ++i) {
    const size_t t = static_cast<size_t>(s.first_tensor + i);
    for (int r = 0; r < kRows; ++r) a.addr[r][i] = rows[r].at(t);
    a.numel[i] = numels.at(t);
    a.first_chunk[i] = chunk;
    chunk += static_cast<int32_t>(chunks_of(numels[t]));
  }
  a.first_chunk[s.ntensors] = chunk;
  return a;
}

// Chunk `block` of a launch: its tensor (index in the launch), first element and length.
struct ChunkRef {
  int tensor;
  int64_t start;
  int n;
};

// The tensor that owns chunk `block`: the last one whose first chunk is <= block, found by binary
// search over the arguments (uniform across the block, so the loads are broadcasts). Empty
// tensors own no chunk; the last of several tensors with equal first chunks is the non-empty one.
template <int kRows>
EUPMU_HD ChunkRef locate(const TensorListArgs<kRows>& a, int32_t block) {
  int lo = 0, hi = a.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (a.first_chunk[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  ChunkRef c;
  c.tensor = lo;
  c.start = static_cast<int64_t>(block - a.first_chunk[lo]) * kChunk;
  const int64_t left = a.numel[lo] - c.start;
  c.n = static_cast<int>(left < kChunk ? left : kChunk);
  return c;
}

// The Gramian's finishing pass: block r sums the chunk slots [first[r], first[r] + count[r]) in a
// fixed order into row out_row[r] of the output (one range for the total, one per tensor for
// per-tensor rows). Summing a tensor's range gives the same bits whether the tensor was launched
// alone or within a list: the same slot values in the same order.
constexpr int kRangeCapacity = (kArgBytes - 16) / 24;

struct SlotRanges {
  int64_t first[kRangeCapacity];
  int64_t count[kRangeCapacity];
  int64_t out_row[kRangeCapacity];
  int32_t nranges;
};

// One range per non-empty tensor, in list order (chunk offsets as plan_launches counts them), its
// output row from out_rows; packed kRangeCapacity to a launch.
inline std::vector<SlotRanges> per_tensor_ranges(const std::vector<int64_t>& numels,
                                                 const std::vector<int64_t>& out_rows) {
  static_assert(sizeof(SlotRanges) <= kArgBytes, "slot range arguments too large");
  if (out_rows.size() != numels.size()) throw std::invalid_argument("one output row per tensor");
  std::vector<SlotRanges> out;
  int64_t chunk = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    const int64_t c = chunks_of(numels[t]);
    if (c > 0) {
      if (out.empty() || out.back().nranges == kRangeCapacity) {
        out.emplace_back();
        memset(&out.back(), 0, sizeof(SlotRanges));
      }
      SlotRanges& r = out.back();
      r.first[r.nranges] = chunk;
      r.count[r.nranges] = c;
      r.out_row[r.nranges] = out_rows[t];
      r.nranges += 1;
    }
    chunk += c;
  }
  return out;
}

// The single range of a total over `nchunks` slots (zero slots give a zero row).
inline SlotRanges total_range(int64_t nchunks) {
  SlotRanges r;
  memset(&r, 0, sizeof(r));
  r.first[0] = 0;
  r.count[0] = nchunks;
  r.out_row[0] = 0;
  r.nranges = 1;
  return r;
}

}  // namespace launch
}  // namespace eupmu
