// The fixed-size group pass for any CPU (baseline instruction set) and its run-time choice.
//
// No floating-point contraction: the AVX-512 build must round exactly as this one and as the
// general path (a fused multiply-add rounds once where they round twice).
#pragma GCC optimize("fp-contract=off")
#include "group_fast_impl.h"

namespace iama::cpu {

template <typename in_t>
void fixed_groups_generic(const FixedGroups<in_t>& p, int64_t begin, int64_t end, double* shaped, double* canonical) {
  generic::dispatch_fixed_groups(p, begin, end, shaped, canonical);
}

template <typename in_t>
void fixed_groups(const FixedGroups<in_t>& p, int64_t begin, int64_t end, double* shaped, double* canonical) {
  if (cpu_isa_level() >= 2 && fixed_groups_avx512(p, begin, end, shaped, canonical)) return;
  fixed_groups_generic(p, begin, end, shaped, canonical);
}

template void fixed_groups<float>(const FixedGroups<float>&, int64_t, int64_t, double*, double*);
template void fixed_groups<double>(const FixedGroups<double>&, int64_t, int64_t, double*, double*);

}  // namespace iama::cpu
