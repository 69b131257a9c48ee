// The Hopper backward's main kernel for head dim 64 and one dtype; compiled for sm_90a only.
#include "cuda/hopper/backward_sm90_launch.cuh"

namespace jax_flash::cuda {
template Status launch_backward_sm90<64, __nv_bfloat16>(const AttentionParams&, const BackwardWorkspace&,
                                                        const LaunchOptions&, cudaStream_t);
}  // namespace jax_flash::cuda
