// Turns XLA FFI buffers and attributes into AttentionParams, checking every shape the
// kernels rely on. The Python layer checks the same rules with friendlier messages; these
// checks exist so that nothing reaches a kernel unchecked even when the op is called
// directly through jax.ffi.
#pragma once

#include <cstdint>
#include <string>

#include "common/attention_params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash::ffi_glue {

namespace ffi = xla::ffi;

// Scalars of the op, passed as FFI attributes by the one ffi_call wrapper in Python and
// decoded by name into this struct (registered at the end of this file), so a new scalar
// is added here, in the registration and in KernelConfig, and nowhere else.
struct ScalarAttributes {
  float softmax_scale;
  float softcap;
  int64_t window_left;
  int64_t window_right;
  int64_t diagonal_offset;
  bool has_alibi;
  bool has_segment_ids;
  bool deterministic;
  bool has_dropout;
  int64_t dropout_keep_threshold;
  float dropout_scale;
};

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_flash: " + what);
}

inline bool element_type_of(ffi::DataType type, ElementType* out) {
  switch (type) {
    case ffi::DataType::F32: *out = ElementType::kFloat32; return true;
    case ffi::DataType::F16: *out = ElementType::kFloat16; return true;
    case ffi::DataType::BF16: *out = ElementType::kBFloat16; return true;
    default: return false;
  }
}

inline TensorStrides contiguous_bshd(int64_t seqlen, int64_t heads, int64_t head_dim) {
  return TensorStrides{seqlen * heads * head_dim, heads * head_dim, head_dim};
}

inline bool same_dims(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != db.size()) return false;
  for (size_t i = 0; i < da.size(); ++i)
    if (da[i] != db[i]) return false;
  return true;
}

// The mask operands of every call: ALiBi slopes, segment ids and dropout seeds
// (placeholders of the right shape when the attributes say they are off).
struct MaskOperands {
  const ffi::Buffer<ffi::F32>& alibi_slopes;
  const ffi::Buffer<ffi::S32>& q_segment_ids;
  const ffi::Buffer<ffi::S32>& kv_segment_ids;
  const ffi::Buffer<ffi::U32>& dropout_seeds;
};

inline bool has_dims(const ffi::Buffer<ffi::S32>& buffer, int64_t rows, int64_t cols) {
  auto d = buffer.dimensions();
  return d.size() == 2 && d[0] == rows && d[1] == cols;
}

// Fills shapes, strides, scalars and forward input pointers from q, k, v and the masks.
inline ffi::Error decode_forward_inputs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                        const ffi::AnyBuffer& v, const MaskOperands& masks,
                                        const ScalarAttributes& attrs, AttentionParams* p) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return invalid("q, k and v must have rank 4 (BSHD)");
  if (!same_dims(k, v)) return invalid("k and v must have the same shape");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return invalid("q, k and v must share one dtype");
  if (!element_type_of(q.element_type(), &p->element_type))
    return invalid("dtype must be float32, float16 or bfloat16");
  p->batch = qd[0];
  p->seqlen_q = qd[1];
  p->num_heads = qd[2];
  p->head_dim = qd[3];
  p->seqlen_k = kd[1];
  p->num_heads_kv = kd[2];
  if (kd[0] != p->batch || kd[3] != p->head_dim) return invalid("q and k disagree on batch or head_dim");
  if (p->num_heads_kv <= 0 || p->num_heads % p->num_heads_kv != 0)
    return invalid("num_heads must be a multiple of num_heads_kv");
  if (p->head_dim < 1 || p->head_dim > 256) return invalid("head_dim must be in [1, 256]");
  if (attrs.window_left < -1 || attrs.window_right < -1) return invalid("window sizes must be >= -1");
  if (!(attrs.softcap >= 0.0f)) return invalid("softcap must be >= 0");

  auto sd = masks.alibi_slopes.dimensions();
  if (sd.size() != 2 || sd[0] != p->batch || sd[1] != p->num_heads)
    return invalid("alibi_slopes buffer must be (batch, num_heads) float32");
  if (!has_dims(masks.q_segment_ids, p->batch, p->seqlen_q) ||
      !has_dims(masks.kv_segment_ids, p->batch, p->seqlen_k))
    return invalid("segment id buffers must be (batch, seqlen_q) and (batch, seqlen_k) int32");
  auto seed_dims = masks.dropout_seeds.dimensions();
  if (seed_dims.size() != 3 || seed_dims[0] != p->batch || seed_dims[1] != p->num_heads ||
      seed_dims[2] != 2)
    return invalid("dropout seed buffer must be (batch, num_heads, 2) uint32");
  if (attrs.has_dropout && (attrs.dropout_keep_threshold < 0 ||
                            attrs.dropout_keep_threshold > 65536 || !(attrs.dropout_scale > 0.0f)))
    return invalid("dropout keep threshold must be in [0, 65536] and its scale > 0");

  p->softmax_scale = attrs.softmax_scale;
  p->softcap = attrs.softcap;
  p->window_left = attrs.window_left;
  p->window_right = attrs.window_right;
  p->diagonal_offset = attrs.diagonal_offset;
  p->alibi_slopes = attrs.has_alibi ? masks.alibi_slopes.typed_data() : nullptr;
  p->q_segment_ids = attrs.has_segment_ids ? masks.q_segment_ids.typed_data() : nullptr;
  p->kv_segment_ids = attrs.has_segment_ids ? masks.kv_segment_ids.typed_data() : nullptr;
  p->deterministic = attrs.deterministic;
  p->dropout_seeds = attrs.has_dropout ? masks.dropout_seeds.typed_data() : nullptr;
  p->dropout_keep_threshold = static_cast<uint32_t>(attrs.dropout_keep_threshold);
  p->dropout_scale = attrs.has_dropout ? attrs.dropout_scale : 1.0f;
  p->q = q.untyped_data();
  p->k = k.untyped_data();
  p->v = v.untyped_data();
  p->q_strides = contiguous_bshd(p->seqlen_q, p->num_heads, p->head_dim);
  p->k_strides = contiguous_bshd(p->seqlen_k, p->num_heads_kv, p->head_dim);
  p->v_strides = p->k_strides;
  p->out_strides = p->q_strides;
  return ffi::Error::Success();
}

inline bool is_lse_shape(const AttentionParams& p, const ffi::Buffer<ffi::F32>& lse) {
  auto d = lse.dimensions();
  return d.size() == 3 && d[0] == p.batch && d[1] == p.num_heads && d[2] == p.seqlen_q;
}

// Adds the backward operands; q, k, v, slopes and scalars come from decode_forward_inputs.
inline ffi::Error decode_backward_operands(const ffi::AnyBuffer& q, const ffi::AnyBuffer& out,
                                           const ffi::AnyBuffer& dout,
                                           const ffi::Buffer<ffi::F32>& lse,
                                           const ffi::Buffer<ffi::F32>& dlse, AttentionParams* p) {
  if (!same_dims(q, out) || !same_dims(q, dout) || out.element_type() != q.element_type() ||
      dout.element_type() != q.element_type())
    return invalid("out and dout must match q in shape and dtype");
  if (!is_lse_shape(*p, lse) || !is_lse_shape(*p, dlse))
    return invalid("lse and its cotangent must be (batch, num_heads, seqlen_q) float32");
  p->out = const_cast<void*>(out.untyped_data());
  p->dout = dout.untyped_data();
  p->lse = const_cast<float*>(lse.typed_data());
  p->dlse = dlse.typed_data();
  return ffi::Error::Success();
}

// Adds the forward results: out like q, lse (batch, num_heads, seqlen_q).
inline ffi::Error decode_forward_results(const ffi::AnyBuffer& q, ffi::AnyBuffer& out,
                                         ffi::Buffer<ffi::F32>& lse, AttentionParams* p) {
  if (!same_dims(q, out) || out.element_type() != q.element_type() || !is_lse_shape(*p, lse))
    return invalid("forward results must be out (like q) and lse (batch, num_heads, seqlen_q)");
  p->out = out.untyped_data();
  p->lse = lse.typed_data();
  return ffi::Error::Success();
}

// Adds the backward results: dq, dk, dv like q, k, v.
inline ffi::Error decode_gradients(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                   const ffi::AnyBuffer& v, ffi::AnyBuffer& dq,
                                   ffi::AnyBuffer& dk, ffi::AnyBuffer& dv, AttentionParams* p) {
  if (!same_dims(q, dq) || !same_dims(k, dk) || !same_dims(v, dv) ||
      dq.element_type() != q.element_type() || dk.element_type() != q.element_type() ||
      dv.element_type() != q.element_type())
    return invalid("gradients must match q, k and v in shape and dtype");
  p->dq = dq.untyped_data();
  p->dk = dk.untyped_data();
  p->dv = dv.untyped_data();
  return ffi::Error::Success();
}

// Everything a forward call needs: inputs, scalars and results.
inline ffi::Error decode_forward(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                 const ffi::AnyBuffer& v, const MaskOperands& masks,
                                 const ScalarAttributes& attrs, ffi::AnyBuffer& out,
                                 ffi::Buffer<ffi::F32>& lse, AttentionParams* p) {
  if (auto e = decode_forward_inputs(q, k, v, masks, attrs, p); e.failure()) return e;
  return decode_forward_results(q, out, lse, p);
}

// Everything a backward call needs: the forward's inputs and outputs, the cotangents, the
// scalars and the gradients.
inline ffi::Error decode_backward(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                  const ffi::AnyBuffer& v, const ffi::AnyBuffer& out,
                                  const ffi::AnyBuffer& dout, const ffi::Buffer<ffi::F32>& lse,
                                  const ffi::Buffer<ffi::F32>& dlse, const MaskOperands& masks,
                                  const ScalarAttributes& attrs, ffi::AnyBuffer& dq,
                                  ffi::AnyBuffer& dk, ffi::AnyBuffer& dv, AttentionParams* p) {
  if (auto e = decode_forward_inputs(q, k, v, masks, attrs, p); e.failure()) return e;
  if (auto e = decode_backward_operands(q, out, dout, lse, dlse, p); e.failure()) return e;
  return decode_gradients(q, k, v, dq, dk, dv, p);
}

}  // namespace jax_flash::ffi_glue

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_flash::ffi_glue::ScalarAttributes,
                                      xla::ffi::StructMember<float>("softmax_scale"),
                                      xla::ffi::StructMember<float>("softcap"),
                                      xla::ffi::StructMember<int64_t>("window_left"),
                                      xla::ffi::StructMember<int64_t>("window_right"),
                                      xla::ffi::StructMember<int64_t>("diagonal_offset"),
                                      xla::ffi::StructMember<bool>("has_alibi"),
                                      xla::ffi::StructMember<bool>("has_segment_ids"),
                                      xla::ffi::StructMember<bool>("deterministic"),
                                      xla::ffi::StructMember<bool>("has_dropout"),
                                      xla::ffi::StructMember<int64_t>("dropout_keep_threshold"),
                                      xla::ffi::StructMember<float>("dropout_scale"));
