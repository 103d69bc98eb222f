// The token pass compiled for AVX-512 (F, VL, BW, DQ) with 512-bit vectors: on CPUs with full-width
// AVX-512 units the compute-bound token loop runs up to twice as fast as with AVX2. Only called
// after a run-time CPU check. As in token_pass_avx2.cpp, the torch/c10 headers come before the
// target pragma and the iama headers go to their own namespace (iama::avx512). The float32,
// bfloat16 and float16 rows with a bool/uint8 mask (the common cases) use the hand-vectorised row
// of token_row_byte_avx512.h.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "token_pass.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define IAMA_ISA_NAMESPACE avx512
#define IAMA_TOKEN_ROW_BYTE16
#include "token_row_byte_avx512.h"
#include "token_pass_impl.h"

namespace iama::cpu {
bool token_pass_avx512(const TokenProblem& p, std::vector<double>& rows) {
  avx512::dispatch_token_pass(p, rows);
  return true;
}
}  // namespace iama::cpu

#else

namespace iama::cpu {
bool token_pass_avx512(const TokenProblem&, std::vector<double>&) { return false; }
}  // namespace iama::cpu

#endif
