// The token pass for any CPU (baseline instruction set), its run-time choice, and the mask sums.
#include <cstdlib>

#include "token_pass_impl.h"

namespace iama::cpu {

void token_pass_generic(const TokenProblem& p, std::vector<double>& rows) { generic::dispatch_token_pass(p, rows); }

namespace {
bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

template <typename mask_t>
void mask_sums_kernel(const TokenProblem& p, std::vector<double>& out) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.T));
  at::parallel_for(0, p.S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = mask_row_sum(static_cast<const mask_t*>(p.mask) + r * p.s_mask, p.T);
  });
}
}  // namespace

void token_pass(const TokenProblem& p, std::vector<double>& rows) {
  // IAMA_CPU_NO_AVX2=1 forces the baseline build (to test it on AVX2 machines).
  static const bool no_avx2 = [] {
    const char* v = std::getenv("IAMA_CPU_NO_AVX2");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  if (!no_avx2 && cpu_has_avx2_fma() && token_pass_avx2(p, rows)) return;
  token_pass_generic(p, rows);
}

void mask_row_sums(const TokenProblem& p, std::vector<double>& out) {
  if (p.byte_mask) {
    mask_sums_kernel<uint8_t>(p, out);
  } else if (p.logp_dtype == TokenDtype::kFloat64) {
    mask_sums_kernel<double>(p, out);
  } else {
    mask_sums_kernel<float>(p, out);
  }
}

}  // namespace iama::cpu
