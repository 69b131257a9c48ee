// Tiled exact attention on the CPU: the same blocked online-softmax algorithm as the GPU
// kernels, in float32 arithmetic (float64 for float32 inputs), with O(seqlen) extra memory per call.
#pragma once

#include <cstdint>
#include <functional>

#include "common/attention_params.h"

namespace jax_flash::cpu {

// Runs task(0) ... task(num_tasks - 1), possibly concurrently, and returns when all are
// done. The caller supplies it so that the kernels stay independent of any thread pool.
using ParallelFor = std::function<void(int64_t num_tasks, const std::function<void(int64_t)>& task)>;

// Writes p.out and p.lse.
void attention_forward(const AttentionParams& p, const ParallelFor& parallel_for);

// Reads p.q, p.k, p.v, p.out, p.dout, p.lse, p.dlse; writes p.dq, p.dk, p.dv.
// dk and dv are summed over the query heads that share a key/value head.
void attention_backward(const AttentionParams& p, const ParallelFor& parallel_for);

}  // namespace jax_flash::cpu
