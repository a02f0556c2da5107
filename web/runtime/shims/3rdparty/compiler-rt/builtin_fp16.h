/* llmopt's stand-in for TVM's 3rdparty/compiler-rt/builtin_fp16.h (not in the wheel). The web
   runtime's contrib/sort uses __extendXfYf2__ to widen IEEE half bits to float for comparisons;
   this is an exact widening between IEEE binary formats, written for llmopt. */
#ifndef LLMOPT_SHIM_BUILTIN_FP16_H_
#define LLMOPT_SHIM_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>

/*! \brief Widen the IEEE value with bits `a` (SRC_SIG_BITS mantissa bits in a SRC_REP_T) to DST_T. */
template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __extendXfYf2__(SRC_T a) {
  constexpr int kSrcBits = sizeof(SRC_REP_T) * 8, kDstBits = sizeof(DST_REP_T) * 8;
  constexpr int kSrcExpBits = kSrcBits - SRC_SIG_BITS - 1, kDstExpBits = kDstBits - DST_SIG_BITS - 1;
  constexpr int kSrcBias = (1 << (kSrcExpBits - 1)) - 1, kDstBias = (1 << (kDstExpBits - 1)) - 1;
  SRC_REP_T bits;
  std::memcpy(&bits, &a, sizeof(bits));
  const DST_REP_T sign = static_cast<DST_REP_T>((bits >> (kSrcBits - 1)) & 1) << (kDstBits - 1);
  const DST_REP_T src_exp = (bits >> SRC_SIG_BITS) & ((SRC_REP_T(1) << kSrcExpBits) - 1);
  DST_REP_T man = bits & ((SRC_REP_T(1) << SRC_SIG_BITS) - 1);
  DST_REP_T exp;
  if (src_exp == (DST_REP_T(1) << kSrcExpBits) - 1) {  // inf or nan
    exp = (DST_REP_T(1) << kDstExpBits) - 1;
  } else if (src_exp != 0) {
    exp = src_exp - kSrcBias + kDstBias;
  } else if (man == 0) {
    exp = 0;
  } else {  // a subnormal source value: normal in the wider format
    int shift = 0;
    while (!(man & (DST_REP_T(1) << SRC_SIG_BITS))) {
      man <<= 1;
      ++shift;
    }
    man &= (DST_REP_T(1) << SRC_SIG_BITS) - 1;
    exp = static_cast<DST_REP_T>(1 - kSrcBias - shift + kDstBias);
  }
  const DST_REP_T out = sign | (exp << DST_SIG_BITS) | (man << (DST_SIG_BITS - SRC_SIG_BITS));
  DST_T result;
  std::memcpy(&result, &out, sizeof(result));
  return result;
}

#endif  // LLMOPT_SHIM_BUILTIN_FP16_H_
