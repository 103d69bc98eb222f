// The token pass for any CPU (baseline instruction set), its run-time choice, and the mask sums.
#include <cstdlib>
#include <string>

#include "group_fast.h"
#include "token_pass_impl.h"

namespace iama::cpu {

void token_pass_generic(const TokenProblem& p, std::vector<double>& rows) { generic::dispatch_token_pass(p, rows); }

namespace {
// The widest build this CPU runs: 2 = AVX-512, 1 = AVX2 + FMA, 0 = baseline. IAMA_CPU_ISA=generic,
// avx2 or avx512 caps it (to test the narrower builds on a wide machine).
int cpu_level() {
  static const int level = [] {
    int have = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) have = 1;
    if (have == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      have = 2;
    }
#endif
    const char* cap = std::getenv("IAMA_CPU_ISA");
    if (cap != nullptr) {
      const std::string c(cap);
      if (c == "generic") have = 0;
      if (c == "avx2" && have > 1) have = 1;
    }
    return have;
  }();
  return level;
}

template <typename mask_t>
void mask_sums_kernel(const TokenProblem& p, std::vector<double>& out) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.T));
  at::parallel_for(0, p.S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = mask_row_sum(static_cast<const mask_t*>(p.mask) + r * p.s_mask, p.T);
  });
}
}  // namespace

int cpu_isa_level() { return cpu_level(); }

void token_pass(const TokenProblem& p, std::vector<double>& rows) {
  const int level = cpu_level();
  if (level >= 2 && token_pass_avx512(p, rows)) return;
  if (level >= 1 && token_pass_avx2(p, rows)) return;
  token_pass_generic(p, rows);
}

void mask_row_sums(const TokenProblem& p, std::vector<double>& out) {
  if (p.mask_kind == MaskKind::kByte) {
    mask_sums_kernel<uint8_t>(p, out);
  } else if (p.mask_kind == MaskKind::kInt64) {
    mask_sums_kernel<int64_t>(p, out);
  } else if (p.mask_kind == MaskKind::kInt32) {
    mask_sums_kernel<int32_t>(p, out);
  } else if (p.logp_dtype == TokenDtype::kFloat64) {
    mask_sums_kernel<double>(p, out);
  } else {
    mask_sums_kernel<float>(p, out);
  }
}

}  // namespace iama::cpu
