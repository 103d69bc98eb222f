// The fixed-size group pass compiled for AVX-512 (F, VL, BW, DQ): 16 float keys or 8 doubles per
// vector, so ranking a group of 16 is 16 compares of one vector. Only called after a run-time CPU
// check. As in token_pass_avx512.cpp, the iama headers go to their own namespace (iama::avx512).
// No floating-point contraction (see group_fast_generic.cpp).
#include "group_fast.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt,prefer-vector-width=512")
#define IAMA_ISA_NAMESPACE avx512
#define IAMA_FIXED_AVX512 1  // the hand-vectorised ranking of group_fast_impl.h
#include "group_fast16_avx512.h"
#include "group_fast_impl.h"

namespace iama::cpu {
bool fused16_applies(const FixedGroups<float>& p, int scale) {
  if (cpu_isa_level() < 2 || p.G != 16 || p.m > kFixedMaxM || scale == kScaleBatch) return false;
  for (int i = 0; i < p.m; ++i) {
    if (p.specs[i].kind == kSoftBestOfN) return false;
    if (p.specs[i].kind == kBestOfN && p.specs[i].n > 1 && p.tables[i] == nullptr) return false;
  }
  return true;
}

void fused16_groups_avx512(const FixedGroups<float>& p, int scale, double eps, float* adv, float* shaped,
                           int64_t begin, int64_t end) {
  avx512::fused16_groups(p, scale, eps, adv, shaped, begin, end);
}

template <typename in_t>
bool fixed_groups_avx512(const FixedGroups<in_t>& p, int64_t begin, int64_t end, double* shaped, double* canonical) {
  avx512::dispatch_fixed_groups(p, begin, end, shaped, canonical);
  return true;
}
}  // namespace iama::cpu

#else

namespace iama::cpu {
template <typename in_t>
bool fixed_groups_avx512(const FixedGroups<in_t>&, int64_t, int64_t, double*, double*) {
  return false;
}
bool fused16_applies(const FixedGroups<float>&, int) { return false; }
void fused16_groups_avx512(const FixedGroups<float>&, int, double, float*, float*, int64_t, int64_t) {}
}  // namespace iama::cpu

#endif

namespace iama::cpu {
template bool fixed_groups_avx512<float>(const FixedGroups<float>&, int64_t, int64_t, double*, double*);
template bool fixed_groups_avx512<double>(const FixedGroups<double>&, int64_t, int64_t, double*, double*);
}  // namespace iama::cpu
