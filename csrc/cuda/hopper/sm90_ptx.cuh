// Wrappers over the Hopper (sm_90a) instructions the warp-specialized kernels are built
// from: mbarriers, bulk tensor copies (TMA), wgmma fences and shared-memory descriptors,
// register reallocation and named barriers. Inline PTX, like ptx.cuh for sm80.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace jax_flash::cuda::sm90 {

// ---- mbarriers (64-bit, in shared memory) ----

__device__ __forceinline__ void mbarrier_init(uint32_t bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}

// Makes initialized barriers visible to the copy engine and the other threads.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also tells the barrier to expect `bytes` from bulk copies.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Waits until the phase of parity `phase` has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t phase) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_loop:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_loop;\n"
      "}\n" ::"r"(bar),
      "r"(phase)
      : "memory");
}

// ---- bulk tensor copies ----

// Copies the box at coordinates (c0, c1, c2, c3) (innermost first) of a 4-d tensor map into
// shared memory at `dst`, completing `bytes` on the mbarrier `bar`. Elements outside the
// tensor arrive as zeros.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// The box at coordinates (c0, c1) of a 2-d tensor map into shared memory at `dst`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

// A tile of kRows rows by kChunks * 64 two-byte columns from (row0, head, batch) of `map`,
// stored as kChunks swizzled [kRows][64] chunks at `dst` (the boxes are 64 columns wide).
template <int kChunks, int kRows>
__device__ __forceinline__ void tma_load_tile(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                              int row0, int head, int batch) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
    tma_load_4d(dst + c * kRows * 128, map, bar, 64 * c, row0, head, batch);
}

// Adds the float32 box at `src` into the tensor at coordinates (c0, c1, c2, c3); elements
// outside the tensor are skipped. Completion is tracked by bulk groups of the issuing thread.
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, uint32_t src, int c0,
                                                  int c1, int c2, int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Copies the box at `src` into the tensor at coordinates (c0, c1, c2, c3); elements outside
// the tensor are skipped. Completion is tracked by bulk groups of the issuing thread.
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, uint32_t src, int c0, int c1,
                                             int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Four 8x8 matrices of 16-bit elements to shared memory: lanes 8k..8k+7 give the addresses
// of matrix k's rows; each lane's register k holds its two elements of row lane / 4.
__device__ __forceinline__ void store_matrix_x4(uint32_t address, uint32_t r0, uint32_t r1,
                                                uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Waits until at most kPending of this thread's bulk groups still read shared memory.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
// Waits until at most kPending of this thread's bulk groups are incomplete.
template <int kPending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---- wgmma ----

// Orders this warpgroup's register writes before the wgmmas that read them.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving reads or writes of accumulator (or register-operand)
// values across the asynchronous wgmma that owns them.
template <int kCount>
__device__ __forceinline__ void fence_registers(float* values) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(values[i])::"memory");
}
template <int kCount>
__device__ __forceinline__ void fence_registers(uint32_t* values) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+r"(values[i])::"memory");
}

// Descriptor of a shared-memory operand stored in 128-byte swizzled atoms (8 rows of 128
// bytes, 1024-byte aligned), as the copy engine writes them with CU_TENSOR_MAP_SWIZZLE_128B.
// `leading_bytes`: K-major operands ignore it; N-major ones step by it from one 64-element
// column chunk to the next. `stride_bytes`: from one group of 8 rows to the next.
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>(leading_bytes >> 4) << 16) |
         (static_cast<uint64_t>(stride_bytes >> 4) << 32) | (uint64_t{1} << 62);
}

// Makes this thread's ordinary shared-memory stores visible to wgmma and the copy engine
// (the async proxy); a barrier must follow before they read.
__device__ __forceinline__ void fence_shared_for_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The value, made opaque to the compiler: descriptors are a base plus a constant step per
// k-slice, and without this the compiler hoists one 64-bit descriptor per slice out of the
// key loop, holding dozens of registers.
__device__ __forceinline__ uint64_t opaque(uint64_t value) {
  asm volatile("" : "+l"(value));
  return value;
}

// ---- warp specialization ----

// The value as the compiler's uniform datapath sees it: a lane-0 broadcast of a value every
// lane already holds. A consumer's index computed from threadIdx.x is not known to be warp-
// uniform, so every wgmma descriptor built from it was a 64-bit add in vector registers and
// two R2UR moves (about 50 instructions per warp and step in the backward, 2026-12-06
// profile); from this value they stay in uniform registers, one UIADD3 per wgmma.
__device__ __forceinline__ int warp_uniform(int value) {
  return __shfl_sync(0xffffffffu, value, 0);
}

template <int kRegisters>
__device__ __forceinline__ void registers_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void registers_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// Named barriers (id 0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace jax_flash::cuda::sm90
