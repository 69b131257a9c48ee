#pragma once

#include "xla/ffi/api/ffi.h"

// Typed FFI handlers for platform "cpu"; defined in cpu_handlers.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashBackwardCpu);
// flash_attn_with_kvcache's forward (ffi/bindings.h: bind_kvcache_operands).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFlashKvCacheForwardCpu);
