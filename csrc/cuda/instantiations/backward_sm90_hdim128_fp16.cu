// The Hopper backward's main kernel for head dim 128 and one dtype; compiled for sm_90a only.
#include "cuda/hopper/backward_sm90_launch.cuh"

namespace jax_flash::cuda {
template Status launch_backward_sm90<128, __half>(const AttentionParams&, const BackwardWorkspace&,
                                                  const LaunchOptions&, cudaStream_t);
}  // namespace jax_flash::cuda
