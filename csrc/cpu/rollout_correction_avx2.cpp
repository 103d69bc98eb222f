// The train/rollout correction's rows (iama::correction_row, csrc/include/iama/correction.h)
// compiled for AVX2 + FMA, for float32, bfloat16 or float16 log-probs and a byte mask or float32
// weights: the tile loop vectorised 8 tokens wide, for CPUs without AVX-512. Only called after a
// run-time CPU check (cpu_isa_level). As in token_pass_avx2.cpp, the c10 headers come before the
// target pragma and the iama headers are compiled into their own iama::avx2 namespace.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "rollout_correction.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define IAMA_ISA_NAMESPACE avx2
#include "rollout_correction_rows.h"

namespace iama::cpu {

bool rollout_correction_avx2(const CorrectionProblem& p, int64_t begin, int64_t end) {
  avx2::correction_rows(p, begin, end, [&](const auto* old, const auto* rollout, const auto* mask, float* w) {
    using in_t = std::remove_cv_t<std::remove_pointer_t<decltype(old)>>;
    using mask_t = std::remove_cv_t<std::remove_pointer_t<decltype(mask)>>;
    return iama::correction_row<in_t, mask_t, float, float>(old, rollout, mask, p.T, p.sequence, p.gate, p.clip, p.low,
                                                            p.high, w);
  });
  return true;
}

}  // namespace iama::cpu

#else

namespace iama::cpu {
bool rollout_correction_avx2(const CorrectionProblem&, int64_t, int64_t) { return false; }
}  // namespace iama::cpu

#endif
