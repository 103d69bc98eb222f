// The fixed-size group pass of group_advantages: interface between the torch glue
// (advantages.cpp) and its kernels, compiled twice (group_fast_generic.cpp for any CPU,
// group_fast_avx512.cpp with AVX-512) and chosen at run time by fixed_groups().
//
// It covers the common case, groups of G in kFixedSizes samples, no `valid` mask, m <= kFixedMaxM
// criteria: G is then a compile-time constant, so the rank computation (G^2 comparisons) and
// every loop over a group have constant trip counts and vectorise, and all scratch lives on the
// stack. The arithmetic is the one of the general path (csrc/include/iama/group.h, called with
// the same arguments in the same order, without floating-point contraction), so both paths give
// bit-identical results; the general path handles every other case.
#pragma once

#include <cstdint>

namespace iama::cpu {

constexpr int kFixedMaxM = 8;

// A criterion's transform as iama::CriterionSpec holds it (this header includes no iama kernel
// header: each build includes them in its own namespace).
struct FixedSpec {
  int kind;
  int n;
  double tau;
};
// Whether G has a fixed-size kernel.
inline bool fixed_group_size(int64_t G) { return G == 4 || G == 8 || G == 16 || G == 32 || G == 64; }

// B groups of rewards r[b * rb + j * rg + i * rc] (G samples, m criteria, every sample valid).
template <typename in_t>
struct FixedGroups {
  const in_t* r = nullptr;
  int64_t rb = 0, rg = 0, rc = 0;
  int G = 0, m = 0;
  const FixedSpec* specs = nullptr;  // [m]
  int estimator = 0;
  const double* const* tables = nullptr;  // [m]: BestOfN table for g = G (nullptr if none)
  const double* lam = nullptr;            // [m]
  in_t* values = nullptr;                 // [B, m] contiguous: group values
};

// Groups [begin, end): writes values, and for group b the combined values shaped[(b - begin) * G + j]
// (sample order) and their canonical copy canonical[(b - begin) * G + k] (see iama::combine_group).
template <typename in_t>
void fixed_groups(const FixedGroups<in_t>& p, int64_t begin, int64_t end, double* shaped, double* canonical);

// The builds; the avx512 one returns false when it is not compiled in (non-x86 targets).
template <typename in_t>
void fixed_groups_generic(const FixedGroups<in_t>& p, int64_t begin, int64_t end, double* shaped, double* canonical);
template <typename in_t>
bool fixed_groups_avx512(const FixedGroups<in_t>& p, int64_t begin, int64_t end, double* shaped, double* canonical);

// The fused kernel for G = 16 float32 rewards with AVX-512 (group_fast16_avx512.h): the whole of
// group_advantages for groups [begin, end), writing values, adv [B, 16] and shaped [B, 16].
// fused16_applies says whether it can run p (this CPU, G, dtype, transforms, scale).
bool fused16_applies(const FixedGroups<float>& p, int scale);
void fused16_groups_avx512(const FixedGroups<float>& p, int scale, double eps, float* adv, float* shaped,
                           int64_t begin, int64_t end);

// The widest kernel build this CPU runs: 2 = AVX-512, 1 = AVX2 + FMA, 0 = baseline
// (IAMA_CPU_ISA=generic or avx2 caps it); defined in token_pass_generic.cpp.
int cpu_isa_level();

}  // namespace iama::cpu
