/* llmopt's stand-in for TVM's <tvm/support/cuda/nvtx.h> (not in the wheel): NVTX ranges mark
   CUDA profiles; in the web runtime they do nothing. */
#ifndef LLMOPT_SHIM_TVM_SUPPORT_CUDA_NVTX_H_
#define LLMOPT_SHIM_TVM_SUPPORT_CUDA_NVTX_H_
#include <string>
namespace tvm {
namespace support {
class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const char*) {}
  explicit NVTXScopedRange(const std::string&) {}
  NVTXScopedRange(const NVTXScopedRange&) = delete;
  NVTXScopedRange& operator=(const NVTXScopedRange&) = delete;
};
}  // namespace support
}  // namespace tvm
#endif  // LLMOPT_SHIM_TVM_SUPPORT_CUDA_NVTX_H_
