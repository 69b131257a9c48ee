// The Python extension: it only hands XLA the FFI handler capsules.
#include <nanobind/nanobind.h>

#include "ffi/cpu_handlers.h"
#ifdef JAX_FLASH_WITH_CUDA
#include "ffi/cuda_handlers.h"
#endif

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jax_flash, m) {
  m.def("cpu_targets", [] {
    nb::dict targets;
    targets["jax_flash_forward"] = handler_capsule(JaxFlashForwardCpu);
    targets["jax_flash_backward"] = handler_capsule(JaxFlashBackwardCpu);
    targets["jax_flash_kvcache_forward"] = handler_capsule(JaxFlashKvCacheForwardCpu);
    return targets;
  });
  m.def("cuda_targets", [] {
    nb::dict targets;
#ifdef JAX_FLASH_WITH_CUDA
    targets["jax_flash_forward"] = handler_capsule(JaxFlashForwardCuda);
    targets["jax_flash_backward"] = handler_capsule(JaxFlashBackwardCuda);
    targets["jax_flash_kvcache_forward"] = handler_capsule(JaxFlashKvCacheForwardCuda);
#endif
    return targets;
  });
}
