// The backward's walk for one key block: every (query head of the GQA group, query block)
// whose queries may see the block's keys, numbered 0 .. count - 1. Step i covers query head
// head_kv * group_size + i / blocks_per_head and query block i % blocks_per_head; looping
// over the group inside one CTA sums dK and dV over it with no workspace.
#pragma once

#include "common/attention_params.h"

namespace jax_flash::cuda {

template <int kBlockM>
struct QuerySteps {
  int head_kv, group_size;
  int query_begin;      // the first query any step covers
  int blocks_per_head;  // query blocks per head
  int count;

  __device__ __forceinline__ static QuerySteps make(const IndexRange& queries, int head_kv,
                                                    int group_size) {
    QuerySteps steps;
    steps.head_kv = head_kv;
    steps.group_size = group_size;
    steps.query_begin = static_cast<int>(queries.begin);
    steps.blocks_per_head =
        queries.empty() ? 0
                        : (static_cast<int>(queries.end) - steps.query_begin + kBlockM - 1) / kBlockM;
    steps.count = group_size * steps.blocks_per_head;
    return steps;
  }
  __device__ __forceinline__ int head(int step) const {
    return head_kv * group_size + step / blocks_per_head;
  }
  __device__ __forceinline__ int query0(int step) const {
    return query_begin + (step % blocks_per_head) * kBlockM;
  }
};

}  // namespace jax_flash::cuda
