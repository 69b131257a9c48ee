// One translation unit per (head-dim class, dtype) so the kernels compile in parallel.
#include "cuda/backward_launch.cuh"

namespace jax_flash::cuda {
template Status launch_backward_sm80<32, __nv_bfloat16>(const AttentionParams&,
                                                 const BackwardWorkspace&, const LaunchOptions&,
                                                 cudaStream_t);
template Status launch_backward_dq_sm80<32, __nv_bfloat16>(const AttentionParams&,
                                                    const BackwardWorkspace&, const LaunchOptions&,
                                                    cudaStream_t);
}  // namespace jax_flash::cuda
