// One translation unit per (head-dim class, dtype) so the kernels compile in parallel.
#include "cuda/kvcache_launch.cuh"

namespace jax_flash::cuda {
template Status launch_kvcache_sm80<128, __half>(const AttentionParams&, const KvCacheWorkspace&,
                                             const LaunchOptions&, cudaStream_t);
}  // namespace jax_flash::cuda
