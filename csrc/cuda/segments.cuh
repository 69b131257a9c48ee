// Segment ids (packed sequences) in the CUDA kernels: which part of a row a block of queries
// or keys can meet, and which tiles need the per-element id comparison.
//
// A CTA first narrows its key (or query) range to the indices whose ids fall inside the id
// range of its own block, so that documents sorted by id cost what the documents cost;
// unsorted ids stay correct (the element mask is exact), they only narrow less. Inside the
// range, a warp compares ids element by element only on tiles where its rows and the
// tile's keys do not all share one id.
#pragma once

#include <climits>
#include <cstdint>

#include "common/attention_params.h"

namespace jax_flash::cuda {

struct IdRange {
  int lo;
  int hi;  // inclusive; lo > hi when empty
  // Every pair of the two ranges has equal ids.
  __device__ __forceinline__ bool single_id_with(const IdRange& other) const {
    return lo == hi && other.lo == other.hi && lo == other.lo;
  }
};

__device__ __forceinline__ IdRange warp_id_range(int lo, int hi) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
  }
  return {lo, hi};
}

// The range of ids[0, count) over a warp (every lane gets it); count <= kMaxCount, a
// compile-time bound so that the loop unrolls. Empty when count <= 0.
template <int kMaxCount>
__device__ __forceinline__ IdRange warp_ids_range(const int32_t* ids, int count, int lane) {
  int lo = INT_MAX, hi = INT_MIN;
#pragma unroll
  for (int i = lane; i < kMaxCount; i += 32)
    if (i < count) lo = min(lo, ids[i]), hi = max(hi, ids[i]);
  return warp_id_range(lo, hi);
}

// Reductions over the whole CTA through two shared ints. Every thread must call them (they
// synchronize); every thread gets the result.
template <int kThreads>
struct CtaReduce {
  int* scratch;  // two ints of shared memory

  __device__ __forceinline__ IdRange min_max(int lo, int hi) const {
    const IdRange warp = warp_id_range(lo, hi);
    if (threadIdx.x == 0) scratch[0] = INT_MAX, scratch[1] = INT_MIN;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) atomicMin(scratch, warp.lo), atomicMax(scratch + 1, warp.hi);
    __syncthreads();
    const IdRange result{scratch[0], scratch[1]};
    __syncthreads();  // scratch may be reused right away
    return result;
  }

  // The ids ids[0, count) as a range.
  __device__ __forceinline__ IdRange ids_range(const int32_t* ids, int count) const {
    int lo = INT_MAX, hi = INT_MIN;
    for (int i = threadIdx.x; i < count; i += kThreads) lo = min(lo, ids[i]), hi = max(hi, ids[i]);
    return min_max(lo, hi);
  }

  // The smallest sub-range of [begin, end) of a row of `row_length` ids that holds every
  // index i with ids[i] in `wanted`; empty (begin >= end) when there is none. This scan is the one cost of segment
  // ids that grows with the row rather than with the documents, so it reads 16 bytes per
  // thread and keeps several reads in flight where the ids are 16-byte aligned.
  __device__ __forceinline__ IndexRange narrow(const int32_t* ids, int row_length,
                                               IndexRange range, const IdRange& wanted) const {
    int first = INT_MAX, last = INT_MIN;
    const int begin = static_cast<int>(range.begin), end = static_cast<int>(range.end);
    auto visit = [&](int i, int id) {
      if (i >= begin && i < end && id >= wanted.lo && id <= wanted.hi)
        first = min(first, i), last = max(last, i);
    };
    // Whole 16-byte words only where they all lie inside the row.
    if (reinterpret_cast<uintptr_t>(ids) % 16 == 0 && row_length % 4 == 0) {
      const int4* quads = reinterpret_cast<const int4*>(ids);
#pragma unroll 4
      for (int q = begin / 4 + static_cast<int>(threadIdx.x); 4 * q < end; q += kThreads) {
        const int4 id = quads[q];
        visit(4 * q, id.x), visit(4 * q + 1, id.y), visit(4 * q + 2, id.z), visit(4 * q + 3, id.w);
      }
    } else {
#pragma unroll 4
      for (int i = begin + static_cast<int>(threadIdx.x); i < end; i += kThreads) visit(i, ids[i]);
    }
    // min_max of (first, last) reduces first with min and last with max.
    const IdRange found = min_max(first, last);
    if (found.lo > found.hi) return {begin, begin};
    return {found.lo, found.hi + 1};
  }
};

// The keys that query rows [row0, row0 + rows) of batch row `batch` may see: the window's
// range, narrowed to the keys whose ids fall in the rows' id range in the segment variant.
// Every thread of the CTA must call it.
template <int kThreads, bool kHasSegments>
__device__ __forceinline__ IndexRange keys_of_query_block(const AttentionParams& p, int batch,
                                                          int row0, int rows) {
  IndexRange keys = visible_keys(p, row0, row0 + rows);
  if constexpr (kHasSegments) {
    __shared__ int reduce_scratch[2];
    const CtaReduce<kThreads> cta{reduce_scratch};
    keys = cta.narrow(p.kv_segment_ids + batch * p.seqlen_k, static_cast<int>(p.seqlen_k), keys,
                      cta.ids_range(p.q_segment_ids + batch * p.seqlen_q + row0, rows));
  }
  return keys;
}

// The same from the keys' side: the query rows that keys [key0, key0 + keys) may be seen by.
template <int kThreads, bool kHasSegments>
__device__ __forceinline__ IndexRange queries_of_key_block(const AttentionParams& p, int batch,
                                                           int key0, int keys) {
  IndexRange queries = visible_queries(p, key0, key0 + keys);
  if constexpr (kHasSegments) {
    __shared__ int reduce_scratch[2];
    const CtaReduce<kThreads> cta{reduce_scratch};
    queries = cta.narrow(p.q_segment_ids + batch * p.seqlen_q, static_cast<int>(p.seqlen_q),
                         queries, cta.ids_range(p.kv_segment_ids + batch * p.seqlen_k + key0, keys));
  }
  return queries;
}

}  // namespace jax_flash::cuda
