// The one place that picks a kernel for a call: validates what the kernels assume, reads
// the device's compute capability (once per device), and dispatches on element type and
// head-dim class. Hopper (sm90) runs the wgmma kernels (the forward and the backward's main
// kernel, head dims 64, 128 and 256) where the build has them and the call suits them
// (sm90_eligible); everything else runs the sm80 kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>

#include "common/kv_cache.h"
#include "cuda/flash_api.h"
#include "cuda/launch.h"

// CMake defines JAX_FLASH_CUDA_HDIM_<d> for each head-dim class it builds
// (JAX_FLASH_CUDA_HEAD_DIMS); a build outside CMake gets all of them.
#if !defined(JAX_FLASH_CUDA_HDIM_32) && !defined(JAX_FLASH_CUDA_HDIM_64) && \
    !defined(JAX_FLASH_CUDA_HDIM_128) && !defined(JAX_FLASH_CUDA_HDIM_256)
#define JAX_FLASH_CUDA_HDIM_32 1
#define JAX_FLASH_CUDA_HDIM_64 1
#define JAX_FLASH_CUDA_HDIM_128 1
#define JAX_FLASH_CUDA_HDIM_256 1
#endif

namespace jax_flash::cuda {
namespace {

// Head-dim classes compiled into this build, ascending.
constexpr int kBuiltHeadDims[] = {
#ifdef JAX_FLASH_CUDA_HDIM_32
    32,
#endif
#ifdef JAX_FLASH_CUDA_HDIM_64
    64,
#endif
#ifdef JAX_FLASH_CUDA_HDIM_128
    128,
#endif
#ifdef JAX_FLASH_CUDA_HDIM_256
    256,
#endif
};

std::string built_head_dims() {
  std::string list;
  for (int d : kBuiltHeadDims) list += (list.empty() ? "" : ", ") + std::to_string(d);
  return list;
}

struct DeviceInfo {
  int major = 0, minor = 0;
  int max_smem_per_block = 0;  // opt-in maximum for dynamic shared memory
  int num_sms = 0;
};

// Queried on first use per device, never at import: building the extension must not
// touch the GPU.
Status current_device_info(DeviceInfo* info) {
  int device = 0;
  if (Status s = Status::FromCuda(cudaGetDevice(&device), "cudaGetDevice"); !s.ok()) return s;
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(device); it != cache.end()) {
    *info = it->second;
    return Status::Ok();
  }
  DeviceInfo fresh;
  cudaError_t error = cudaDeviceGetAttribute(&fresh.major, cudaDevAttrComputeCapabilityMajor, device);
  if (error == cudaSuccess)
    error = cudaDeviceGetAttribute(&fresh.minor, cudaDevAttrComputeCapabilityMinor, device);
  if (error == cudaSuccess)
    error = cudaDeviceGetAttribute(&fresh.max_smem_per_block,
                                   cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error == cudaSuccess)
    error = cudaDeviceGetAttribute(&fresh.num_sms, cudaDevAttrMultiProcessorCount, device);
  if (Status s = Status::FromCuda(error, "querying the device"); !s.ok()) return s;
  cache.emplace(device, fresh);
  *info = fresh;
  return Status::Ok();
}

// Every sm80+ GPU runs the sm80 kernels; compute capability 9.0 may also run the sm_90a
// ones (LaunchOptions::sm90, sm90_eligible).
Status check_compute_capability(const DeviceInfo& device) {
  if (device.major < 8)
    return Status::Unimplemented(
        "jax_flash CUDA kernels need compute capability 8.0 or newer (Ampere, Ada, Hopper, "
        "...); this GPU is sm_" + std::to_string(device.major) + std::to_string(device.minor));
  return Status::Ok();
}

// Smallest built class that holds head_dim, or 0.
int head_dim_class(int64_t head_dim) {
  for (int d : kBuiltHeadDims)
    if (head_dim <= d) return d;
  return 0;
}

constexpr int64_t kMaxSeqlen = int64_t{1} << 29;  // keeps window arithmetic inside int32
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kMaxKvCacheSplits = 128;

// Window sides so wide that they cannot mask anything become unbounded (-1), which is
// exactly equivalent, keeps indices small, and lets such calls use the unmasked kernels.
AttentionParams normalized(const AttentionParams& in) {
  AttentionParams p = in;
  const int64_t offset_size = p.diagonal_offset < 0 ? -p.diagonal_offset : p.diagonal_offset;
  const int64_t reach = p.seqlen_q + p.seqlen_k + offset_size;
  if (p.window_left >= reach) p.window_left = -1;
  if (p.window_right >= reach) p.window_right = -1;
  return p;
}

Status validate(const AttentionParams& p, int* head_dim_class_out) {
  if (p.element_type == ElementType::kFloat32)
    return Status::InvalidArgument(
        "jax_flash CUDA kernels take float16 or bfloat16; cast inputs to jnp.bfloat16 (or "
        "jnp.float16) before calling, or run float32 attention on the CPU backend");
  if (p.element_type != ElementType::kFloat16 && p.element_type != ElementType::kBFloat16)
    return Status::InvalidArgument("jax_flash CUDA: unsupported element type");
  if (p.head_dim < 1 || p.head_dim > 256)
    return Status::InvalidArgument("jax_flash CUDA: head_dim must be in [1, 256]");
  if (p.seqlen_q > kMaxSeqlen || p.seqlen_k > kMaxSeqlen)
    return Status::Unimplemented("jax_flash CUDA: sequence lengths above 2^29 are not supported");
  if (p.diagonal_offset > kMaxSeqlen || p.diagonal_offset < -kMaxSeqlen)
    return Status::Unimplemented("jax_flash CUDA: |diagonal_offset| above 2^29 is not supported");
  if (p.num_heads > kMaxGridYZ || p.batch > kMaxGridYZ)
    return Status::Unimplemented("jax_flash CUDA: batch and num_heads must be at most 65535");
  if (p.num_heads_kv <= 0 || p.num_heads % p.num_heads_kv != 0)
    return Status::InvalidArgument("jax_flash CUDA: num_heads must be a multiple of num_heads_kv");
  if (p.seqlen_q * p.head_dim > std::numeric_limits<int32_t>::max())
    return Status::Unimplemented("jax_flash CUDA: seqlen_q * head_dim must be below 2^31");
  if (p.batch * p.num_heads * p.seqlen_q / 8 >= std::numeric_limits<int32_t>::max())
    return Status::Unimplemented("jax_flash CUDA: batch * num_heads * seqlen_q is too large");
  const int d = head_dim_class(p.head_dim);
  if (d == 0)
    return Status::Unimplemented(
        "jax_flash CUDA: head_dim " + std::to_string(p.head_dim) +
        " needs a larger head-dim class than this build has (built: " + built_head_dims() +
        "); rebuild with JAX_FLASH_CUDA_HEAD_DIMS including 256, e.g. "
        "CMAKE_ARGS=\"-DJAX_FLASH_CUDA_HEAD_DIMS=64;128;256\" pip install .");
  *head_dim_class_out = d;
  return Status::Ok();
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }
bool strides_multiple_of_8(const TensorStrides& s) {
  return s.batch % 8 == 0 && s.row % 8 == 0 && s.head % 8 == 0;
}

// Whether tiles can move in 16-byte chunks: see LaunchOptions::vectorized.
bool vectorizable(const AttentionParams& p, bool backward) {
  bool ok = p.head_dim % 8 == 0 && strides_multiple_of_8(p.q_strides) &&
            strides_multiple_of_8(p.k_strides) && strides_multiple_of_8(p.v_strides) &&
            strides_multiple_of_8(p.out_strides) && aligned16(p.q) && aligned16(p.k) &&
            aligned16(p.v) && aligned16(p.out);
  if (backward)
    ok = ok && aligned16(p.dout) && aligned16(p.dq) && aligned16(p.dk) && aligned16(p.dv);
  return ok;
}

Status launch_options(const AttentionParams& p, bool backward, LaunchOptions* options) {
  DeviceInfo device;
  if (Status s = current_device_info(&device); !s.ok()) return s;
  if (Status s = check_compute_capability(device); !s.ok()) return s;
  options->vectorized = vectorizable(p, backward);
  // sm_90a code runs on compute capability 9.0 only; later GPUs take the sm80 kernels.
  options->sm90 = device.major == 9 && device.minor == 0;
  options->max_smem_per_block = device.max_smem_per_block;
  options->num_sms = device.num_sms;
  // Test aid: JAX_FLASH_CUDA_SMEM_LIMIT=<bytes> caps the shared memory the launchers may
  // use, so that the tile shapes chosen for GPUs with less of it (sm80, sm86/89) run and
  // are tested on a Hopper GPU.
  static const int limit = [] {
    const char* value = std::getenv("JAX_FLASH_CUDA_SMEM_LIMIT");
    return value != nullptr ? std::atoi(value) : 0;
  }();
  if (limit > 0) options->max_smem_per_block = std::min(options->max_smem_per_block, limit);
  // Test aid: JAX_FLASH_CUDA_PERSISTENT_CTAS=<n> runs the Hopper forward and backward on at
  // most n CTAs (normally one per SM), so that few CTAs take many tiles of every kind (fully
  // masked ones included) even on small inputs.
  static const int persistent_ctas = [] {
    const char* value = std::getenv("JAX_FLASH_CUDA_PERSISTENT_CTAS");
    return value != nullptr ? std::atoi(value) : 0;
  }();
  options->persistent_ctas = persistent_ctas;
  return Status::Ok();
}

// Calls launch(std::integral_constant<int, d>) for the built head-dim class d.
template <typename Launch>
Status with_head_dim_class(int d, Launch&& launch) {
  switch (d) {
#ifdef JAX_FLASH_CUDA_HDIM_32
    case 32: return launch(std::integral_constant<int, 32>{});
#endif
#ifdef JAX_FLASH_CUDA_HDIM_64
    case 64: return launch(std::integral_constant<int, 64>{});
#endif
#ifdef JAX_FLASH_CUDA_HDIM_128
    case 128: return launch(std::integral_constant<int, 128>{});
#endif
#ifdef JAX_FLASH_CUDA_HDIM_256
    case 256: return launch(std::integral_constant<int, 256>{});
#endif
    default: return Status::Unimplemented("jax_flash CUDA: no kernel for this head_dim class");
  }
}

#ifdef JAX_FLASH_CUDA_SM90
bool sm90_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("JAX_FLASH_CUDA_SM90");
    return value == nullptr || value[0] != '0';
  }();
  return enabled;
}

// Whether the Hopper kernels take this call: built for the class, head_dim exactly the
// class (the tensor maps read whole 64-column chunks), TMA-friendly layout (16-byte aligned
// bases and strides: `vectorized`), rows on both sides, and no segment ids or dropout
// (those run on the sm80 kernels). JAX_FLASH_CUDA_SM90=0 turns them off (comparisons,
// fallback tests).
bool sm90_eligible(int d, const AttentionParams& p, const LaunchOptions& options) {
  // Every Hopper GPU has 227 KB per block, which the head dim 256 backward uses; a smaller
  // limit is JAX_FLASH_CUDA_SMEM_LIMIT making this GPU stand in for an older one, whose
  // kernels are the sm80 ones.
  constexpr int kSm90SmemBytes = 227 * 1024;
  // The Hopper forward numbers its 128-row query tiles with int.
  constexpr int64_t kSm90BlockM = 128;
  const int64_t m_blocks = (p.seqlen_q + kSm90BlockM - 1) / kSm90BlockM;
  return options.sm90 && sm90_enabled() && options.max_smem_per_block >= kSm90SmemBytes &&
         d >= 64 && p.head_dim == d && options.vectorized &&
         p.seqlen_q > 0 && p.seqlen_k > 0 && !p.has_segment_ids() && !p.has_dropout() &&
         m_blocks * p.num_heads * p.batch <= std::numeric_limits<int32_t>::max();
}
#endif  // JAX_FLASH_CUDA_SM90

// The forward, and the backward's main kernel, of head-dim class d: Hopper's where it takes
// the call (sm90_eligible, which never holds below class 64), else sm80's.
template <typename Element>
Status forward_main(int d, const AttentionParams& p, const LaunchOptions& options,
                    cudaStream_t stream) {
  return with_head_dim_class(d, [&](auto head_dim_class) {
    constexpr int kHeadDim = decltype(head_dim_class)::value;
#ifdef JAX_FLASH_CUDA_SM90
    if constexpr (kHeadDim >= 64)
      if (sm90_eligible(d, p, options))
        return launch_forward_sm90<kHeadDim, Element>(p, options, stream);
#endif
    return launch_forward_sm80<kHeadDim, Element>(p, options, stream);
  });
}

template <typename Element>
Status backward_main(int d, const AttentionParams& p, const BackwardWorkspace& workspace,
                     const LaunchOptions& options, cudaStream_t stream) {
  return with_head_dim_class(d, [&](auto head_dim_class) {
    constexpr int kHeadDim = decltype(head_dim_class)::value;
#ifdef JAX_FLASH_CUDA_SM90
    if constexpr (kHeadDim >= 64)
      if (sm90_eligible(d, p, options))
        return launch_backward_sm90<kHeadDim, Element>(p, workspace, options, stream);
#endif
    return launch_backward_sm80<kHeadDim, Element>(p, workspace, options, stream);
  });
}

template <typename Element>
Status backward_dq_sm80(int d, const AttentionParams& p, const BackwardWorkspace& workspace,
                        const LaunchOptions& options, cudaStream_t stream) {
  return with_head_dim_class(d, [&](auto head_dim_class) {
    return launch_backward_dq_sm80<decltype(head_dim_class)::value, Element>(p, workspace,
                                                                            options, stream);
  });
}

// delta and dQ accumulator zeroing, main kernel, dQ conversion, in order on one stream; in
// a deterministic call the dQ pass replaces the atomics and the conversion.
template <typename Element>
Status backward_all(int d, const AttentionParams& p, const BackwardWorkspace& workspace,
                    const LaunchOptions& options, cudaStream_t stream) {
  const bool has_rows = p.seqlen_q > 0;
  if (has_rows) {
    Status s = launch_backward_preprocess<Element>(p, workspace, options.vectorized, stream);
    if (!s.ok()) return s;
  }
  // Runs even when seqlen_q == 0: it is what writes dK = dV = 0 then.
  if (p.seqlen_k > 0) {
    if (Status s = backward_main<Element>(d, p, workspace, options, stream); !s.ok()) return s;
  }
  if (!has_rows) return Status::Ok();
  if (p.deterministic) return backward_dq_sm80<Element>(d, p, workspace, options, stream);
  return launch_backward_finish_dq<Element>(p, workspace, options.vectorized, stream);
}

size_t round_up(size_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

// Rows of the per-row statistics, in floats: whole 16-byte units (BackwardWorkspace).
int64_t stats_stride(const AttentionParams& p) { return (p.seqlen_q + 3) / 4 * 4; }

// One of the two statistics arrays (delta, lse_log2).
size_t stats_bytes(const AttentionParams& p) {
  return round_up(static_cast<size_t>(p.batch * p.num_heads * stats_stride(p)) * sizeof(float));
}

size_t dq_accum_bytes(const AttentionParams& p) {
  return static_cast<size_t>(p.batch * p.num_heads * p.seqlen_q * p.head_dim) * sizeof(float);
}

}  // namespace

Status flash_forward(const AttentionParams& p_in, cudaStream_t stream) {
  const AttentionParams p = normalized(p_in);
  int d = 0;
  if (Status s = validate(p, &d); !s.ok()) return s;
  if (p.batch == 0 || p.num_heads == 0 || p.seqlen_q == 0) return Status::Ok();
  LaunchOptions options;
  if (Status s = launch_options(p, /*backward=*/false, &options); !s.ok()) return s;
  if (p.element_type == ElementType::kFloat16) return forward_main<__half>(d, p, options, stream);
  return forward_main<__nv_bfloat16>(d, p, options, stream);
}

size_t kvcache_workspace_bytes(const AttentionParams& p) {
  if (p.num_splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(p.num_splits * p.batch * p.num_heads * p.seqlen_q);
  return round_up(rows * p.head_dim * sizeof(float)) + round_up(rows * sizeof(float));
}

KvCacheWorkspace kvcache_workspace(void* base, const AttentionParams& p) {
  KvCacheWorkspace workspace;
  workspace.num_splits = p.num_splits > 1 ? p.num_splits : 1;
  if (workspace.num_splits == 1) return workspace;
  const size_t rows = static_cast<size_t>(p.num_splits * p.batch * p.num_heads * p.seqlen_q);
  workspace.out_accum = static_cast<float*>(base);
  workspace.lse_accum = reinterpret_cast<float*>(static_cast<char*>(base) +
                                                 round_up(rows * p.head_dim * sizeof(float)));
  return workspace;
}

Status flash_kvcache_forward(const AttentionParams& p, const KvCacheWorkspace& workspace,
                             cudaStream_t stream) {
  int d = 0;
  if (Status s = validate(p, &d); !s.ok()) return s;
  if (!has_kv_cache(p) || p.page_size <= 0)
    return Status::InvalidArgument("jax_flash CUDA: a KV-cache call without cache lengths");
  if (p.k_strides.batch != p.v_strides.batch || p.k_strides.row != p.v_strides.row ||
      p.k_strides.head != p.v_strides.head)
    return Status::InvalidArgument("jax_flash CUDA: the key and value caches must share a layout");
  if (workspace.num_splits < 1 || workspace.num_splits > kMaxKvCacheSplits)
    return Status::InvalidArgument("jax_flash CUDA: num_splits must be in [1, 128]");
  if (p.num_heads_kv > kMaxGridYZ)
    return Status::Unimplemented("jax_flash CUDA: num_heads_kv must be at most 65535");
  if (workspace.num_splits > 1 &&
      p.batch * p.num_heads * p.seqlen_q > std::numeric_limits<int32_t>::max())
    return Status::Unimplemented(
        "jax_flash CUDA: split-KV needs batch * num_heads * seqlen_q below 2^31 (use num_splits=1)");
  if (p.batch == 0 || p.num_heads == 0 || p.seqlen_q == 0) return Status::Ok();
  LaunchOptions options;
  if (Status s = launch_options(p, /*backward=*/false, &options); !s.ok()) return s;
  auto launch = [&](auto element) {
    using Element = decltype(element);
    return with_head_dim_class(d, [&](auto head_dim_class) {
      return launch_kvcache_sm80<decltype(head_dim_class)::value, Element>(p, workspace, options,
                                                                           stream);
    });
  };
  if (p.element_type == ElementType::kFloat16) return launch(__half{});
  return launch(__nv_bfloat16{});
}

size_t backward_workspace_bytes(const AttentionParams& p) {
  return 2 * stats_bytes(p) + round_up(dq_accum_bytes(p));
}

BackwardWorkspace backward_workspace(void* base, const AttentionParams& p) {
  BackwardWorkspace workspace;
  char* bytes = static_cast<char*>(base);
  workspace.delta = reinterpret_cast<float*>(bytes);
  workspace.lse_log2 = reinterpret_cast<float*>(bytes + stats_bytes(p));
  workspace.dq_accum = reinterpret_cast<float*>(bytes + 2 * stats_bytes(p));
  workspace.stats_stride = stats_stride(p);
  return workspace;
}

Status flash_backward(const AttentionParams& p_in, const BackwardWorkspace& workspace,
                      cudaStream_t stream) {
  const AttentionParams p = normalized(p_in);
  int d = 0;
  if (Status s = validate(p, &d); !s.ok()) return s;
  if (p.batch == 0 || p.num_heads == 0) return Status::Ok();
  LaunchOptions options;
  if (Status s = launch_options(p, /*backward=*/true, &options); !s.ok()) return s;
  if (p.element_type == ElementType::kFloat16)
    return backward_all<__half>(d, p, workspace, options, stream);
  return backward_all<__nv_bfloat16>(d, p, workspace, options, stream);
}

}  // namespace jax_flash::cuda
