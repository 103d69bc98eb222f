// The token pass compiled for AVX2 + FMA (about twice the baseline's throughput: the loop is
// compute-bound on the two exps per token). Only called after a run-time CPU check.
//
// The torch/c10 headers are included before the target pragma so that only this file's kernels
// (and the iama headers, in their own iama::avx2 namespace) are compiled for AVX2.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "token_pass.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define IAMA_ISA_NAMESPACE avx2
#include "token_pass_impl.h"

namespace iama::cpu {
bool token_pass_avx2(const TokenProblem& p, std::vector<double>& rows) {
  avx2::dispatch_token_pass(p, rows);
  return true;
}
}  // namespace iama::cpu

#else

namespace iama::cpu {
bool token_pass_avx2(const TokenProblem&, std::vector<double>&) { return false; }
}  // namespace iama::cpu

#endif
