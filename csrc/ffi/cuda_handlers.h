#pragma once

#include "xla/ffi/api/ffi.h"

// Typed FFI handlers for platform "CUDA"; defined in cuda_handlers.cc. Same operands and
// attributes as the CPU handlers (ffi/bindings.h); the context is the CUDA stream, and the
// backward has one more result, its float32 workspace.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashBackwardCuda);
// flash_attn_with_kvcache's forward: decodes and checks the call like the CPU handler, then
// reports that the CUDA kernel is not written yet (kUnimplemented).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashKvCacheForwardCuda);
