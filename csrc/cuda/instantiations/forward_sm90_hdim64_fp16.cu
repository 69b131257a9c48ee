// The Hopper forward for one (head-dim class, dtype); compiled for sm_90a only.
#include "cuda/hopper/forward_sm90_launch.cuh"

namespace jax_flash::cuda {
template Status launch_forward_sm90<64, __half>(const AttentionParams&, const LaunchOptions&,
                                                cudaStream_t);
}  // namespace jax_flash::cuda
