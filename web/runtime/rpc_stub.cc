/*
 * llmopt's web runtime leaves TVM's RPC client and server out (they need sources the apache-tvm
 * wheel does not ship, and a model page never uses them). tvmjs_support.cc still refers to the
 * one RPC entry point below; it fails with this message if anything ever calls it.
 */
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>

#include <memory>

namespace tvm {
namespace runtime {

class RPCSession;

ffi::Module CreateRPCSessionModule(std::shared_ptr<RPCSession> sess) {
  TVM_FFI_THROW(RuntimeError) << "llmopt's web runtime is built without TVM's RPC";
}

}  // namespace runtime
}  // namespace tvm
