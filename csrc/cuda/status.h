// Result of a host-side launch: ok, or a message meant for the user and what kind of
// failure it is (so the FFI layer can pick an XLA error code).
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <utility>

namespace jax_flash::cuda {

class Status {
 public:
  enum class Code { kOk, kInvalidArgument, kUnimplemented, kInternal };

  static Status Ok() { return Status(); }
  // The call itself is wrong (dtype, shapes): the caller must change it.
  static Status InvalidArgument(std::string message) {
    return Status(Code::kInvalidArgument, std::move(message));
  }
  // A valid call this build or this GPU cannot run (head dim not built, GPU too old).
  static Status Unimplemented(std::string message) {
    return Status(Code::kUnimplemented, std::move(message));
  }
  // Something failed that neither the caller nor the build can fix (a driver call).
  static Status Internal(std::string message) { return Status(Code::kInternal, std::move(message)); }
  // Ok for cudaSuccess, else "<what>: <CUDA error name> (<description>)".
  static Status FromCuda(cudaError_t error, const char* what) {
    if (error == cudaSuccess) return Ok();
    return Status(Code::kInternal, std::string("jax_flash CUDA: ") + what + ": " +
                                       cudaGetErrorName(error) + " (" + cudaGetErrorString(error) +
                                       ")");
  }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}
  Code code_ = Code::kOk;
  std::string message_;
};

}  // namespace jax_flash::cuda
