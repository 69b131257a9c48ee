#include "ffi/cpu_handlers.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "cpu/attention_cpu.h"
#include "ffi/bindings.h"
#include "ffi/decode_params.h"
#include "ffi/poison.h"

namespace jax_flash::ffi_glue {
namespace {

// Runs tasks on XLA's intra-op thread pool with the calling thread taking part. Tasks are
// claimed from a shared counter, and the caller waits for finished tasks rather than for
// helpers, so a helper that the pool starts late (or never) cannot stall the call.
template <typename... Buffers>
void poison_if_requested(Buffers&... buffers) {
  if (!poison_outputs_requested()) return;
  (std::memset(buffers.untyped_data(), kPoisonByte, buffers.size_bytes()), ...);
}

cpu::ParallelFor make_parallel_for(ffi::ThreadPool& pool) {
  return [&pool](int64_t num_tasks, const std::function<void(int64_t)>& task) {
    if (num_tasks <= 0) return;
    struct Shared {
      std::atomic<int64_t> next{0};
      std::atomic<int64_t> done{0};
      std::mutex mutex;
      std::condition_variable finished;
      const std::function<void(int64_t)>* task;
      int64_t num_tasks;
    };
    auto shared = std::make_shared<Shared>();
    shared->task = &task;
    shared->num_tasks = num_tasks;
    auto work = [shared] {
      for (int64_t i; (i = shared->next.fetch_add(1)) < shared->num_tasks;) {
        (*shared->task)(i);
        if (shared->done.fetch_add(1) + 1 == shared->num_tasks) {
          std::lock_guard<std::mutex> lock(shared->mutex);
          shared->finished.notify_all();
        }
      }
    };
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_tasks - 1);
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
    work();
    std::unique_lock<std::mutex> lock(shared->mutex);
    shared->finished.wait(lock, [&] { return shared->done.load() == shared->num_tasks; });
  };
}

ffi::Error forward_cpu(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::Buffer<ffi::F32> alibi_slopes, ffi::Buffer<ffi::S32> q_segment_ids,
                       ffi::Buffer<ffi::S32> kv_segment_ids,
                       ffi::Buffer<ffi::U32> dropout_seeds, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::Buffer<ffi::F32>> lse, const ScalarAttributes& attrs) {
  AttentionParams p;
  const MaskOperands masks{alibi_slopes, q_segment_ids, kv_segment_ids, dropout_seeds};
  if (auto e = decode_forward(q, k, v, masks, attrs, *out, *lse, &p); e.failure())
    return e;
  poison_if_requested(*out, *lse);
  cpu::attention_forward(p, make_parallel_for(pool));
  return ffi::Error::Success();
}

ffi::Error backward_cpu(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::AnyBuffer out, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dlse, ffi::Buffer<ffi::F32> alibi_slopes,
                        ffi::Buffer<ffi::S32> q_segment_ids, ffi::Buffer<ffi::S32> kv_segment_ids,
                        ffi::Buffer<ffi::U32> dropout_seeds,
                        ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                        ffi::Result<ffi::AnyBuffer> dv, const ScalarAttributes& attrs) {
  AttentionParams p;
  const MaskOperands masks{alibi_slopes, q_segment_ids, kv_segment_ids, dropout_seeds};
  if (auto e = decode_backward(q, k, v, out, dout, lse, dlse, masks, attrs, *dq, *dk, *dv, &p);
      e.failure())
    return e;
  poison_if_requested(*dq, *dk, *dv);
  cpu::attention_backward(p, make_parallel_for(pool));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flash::ffi_glue

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashForwardCpu, jax_flash::ffi_glue::forward_cpu,
                              jax_flash::ffi_glue::bind_attributes(
                                  jax_flash::ffi_glue::bind_forward_operands(
                                      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashBackwardCpu, jax_flash::ffi_glue::backward_cpu,
                              jax_flash::ffi_glue::bind_attributes(
                                  jax_flash::ffi_glue::bind_backward_operands(
                                      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())));

// ---- KV cache (flash_attn_with_kvcache) ----
namespace jax_flash::ffi_glue {
namespace {

ffi::Error kvcache_forward_cpu(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                               ffi::AnyBuffer v_cache, ffi::Buffer<ffi::F32> alibi_slopes,
                               ffi::Buffer<ffi::S32> seqlens_k, ffi::Buffer<ffi::S32> kv_batch_idx,
                               ffi::Buffer<ffi::S32> block_table, ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::Buffer<ffi::F32>> lse,
                               const KvCacheAttributes& attrs) {
  AttentionParams p;
  if (auto e = decode_kvcache_forward(
          {q, k_cache, v_cache, alibi_slopes, seqlens_k, kv_batch_idx, block_table}, attrs, *out,
          *lse, &p);
      e.failure())
    return e;
  poison_if_requested(*out, *lse);
  cpu::attention_forward(p, make_parallel_for(pool));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_flash::ffi_glue

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashKvCacheForwardCpu, jax_flash::ffi_glue::kvcache_forward_cpu,
                              jax_flash::ffi_glue::bind_kvcache_attributes(
                                  jax_flash::ffi_glue::bind_kvcache_operands(
                                      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())));
