// Test aid: with JAX_FLASH_POISON_OUTPUTS=1 in the environment, every output buffer is
// filled with 0xFF bytes (a NaN in float32, float16 and bfloat16) before the kernel runs,
// so an element that a kernel forgets to write shows up as NaN instead of stale memory.
#pragma once

#include <cstdlib>
#include <cstring>

namespace jax_flash::ffi_glue {

inline bool poison_outputs_requested() {
  static const bool requested = [] {
    const char* value = std::getenv("JAX_FLASH_POISON_OUTPUTS");
    return value != nullptr && value[0] != '\0' && value[0] != '0';
  }();
  return requested;
}

constexpr int kPoisonByte = 0xFF;

}  // namespace jax_flash::ffi_glue
