/* llmopt's stand-in for TVM's src/support/utils.h (not in the wheel). The web runtime sources
   llmopt compiles include it but use none of its helpers. */
#ifndef LLMOPT_SHIM_TVM_SUPPORT_UTILS_H_
#define LLMOPT_SHIM_TVM_SUPPORT_UTILS_H_
#endif  // LLMOPT_SHIM_TVM_SUPPORT_UTILS_H_
