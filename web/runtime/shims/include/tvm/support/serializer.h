/* llmopt's stand-in for TVM's <tvm/support/serializer.h> (not in the wheel): the serializers live
   with the Stream in io.h. */
#ifndef LLMOPT_SHIM_TVM_SUPPORT_SERIALIZER_H_
#define LLMOPT_SHIM_TVM_SUPPORT_SERIALIZER_H_
#include <tvm/support/io.h>
#endif  // LLMOPT_SHIM_TVM_SUPPORT_SERIALIZER_H_
