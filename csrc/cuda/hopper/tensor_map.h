// Host side of the bulk tensor copies: a tensor map describing one BSHD operand (or the
// backward's float32 dQ accumulator) as the 4-d tensor (head_dim, seqlen, heads, batch),
// moved in boxes of one 128-byte swizzle span of head-dim columns by `box_rows` rows, or the
// backward's per-row statistics as a 2-d tensor. The driver's encoder is looked up through
// the runtime, so the extension does not link libcuda.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <string>

#include "common/attention_params.h"
#include "cuda/status.h"

namespace jax_flash::cuda {

// The driver's cuTensorMapEncodeTiled, or nullptr.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      function = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  return encode;
}

inline Status encode_status(CUresult result) {
  if (result != CUDA_SUCCESS)
    return Status::Internal("jax_flash CUDA: cuTensorMapEncodeTiled failed with error " +
                            std::to_string(static_cast<int>(result)));
  return Status::Ok();
}

inline Status no_encoder() {
  return Status::Unimplemented("jax_flash CUDA: the driver has no cuTensorMapEncodeTiled");
}

// `element_bytes` per element of `data_type`; the box is `box_cols` innermost elements (one
// 128-byte swizzle span: 64 16-bit or 32 float32 values) by `box_rows` rows.
inline Status encode_tensor_map(CUtensorMap* map, const void* base, CUtensorMapDataType data_type,
                                int element_bytes, int64_t head_dim, int64_t seqlen, int64_t heads,
                                int64_t batch, const TensorStrides& strides, int box_rows) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return no_encoder();
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(seqlen),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t byte_strides[3] = {static_cast<cuuint64_t>(strides.row * element_bytes),
                                      static_cast<cuuint64_t>(strides.head * element_bytes),
                                      static_cast<cuuint64_t>(strides.batch * element_bytes)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(128 / element_bytes),
                             static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result = encode(map, data_type, 4, const_cast<void*>(base), dims, byte_strides, box,
                                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return encode_status(result);
}

// Float32 per-row statistics (the backward's lse_log2 or delta): `rows` rows of `length`
// values, `row_stride` floats apart (a multiple of 4), moved `box` values of one row at a
// time; values past `length` arrive as zeros.
inline Status encode_row_vectors_map(CUtensorMap* map, const float* base, int64_t length,
                                     int64_t rows, int64_t row_stride, int box) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return no_encoder();
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(length), static_cast<cuuint64_t>(rows)};
  const cuuint64_t byte_strides[1] = {static_cast<cuuint64_t>(row_stride * 4)};
  const cuuint32_t box_dims[2] = {static_cast<cuuint32_t>(box), 1};
  const cuuint32_t element_strides[2] = {1, 1};
  return encode_status(encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, const_cast<float*>(base),
                              dims, byte_strides, box_dims, element_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                              CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
}

// A BSHD operand of the call's 16-bit element type.
inline Status encode_tensor_map(CUtensorMap* map, const void* base, ElementType element_type,
                                int64_t head_dim, int64_t seqlen, int64_t heads, int64_t batch,
                                const TensorStrides& strides, int box_rows) {
  return encode_tensor_map(map, base,
                           element_type == ElementType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                  : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                           2, head_dim, seqlen, heads, batch, strides, box_rows);
}

}  // namespace jax_flash::cuda
