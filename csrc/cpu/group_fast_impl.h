// Templates of the fixed-size group pass (see group_fast.h), included by group_fast_generic.cpp and
// group_fast_avx512.cpp, each compiling them for its instruction set in iama::<IAMA_ISA_NAMESPACE>.
#pragma once

#include <type_traits>

#include "group_fast.h"
#include "iama/group.h"

#if defined(IAMA_FIXED_AVX512)
#include <immintrin.h>
#endif

namespace iama::cpu {
namespace IAMA_ISA_NAMESPACE {

// pos[i] = #{j : k_j < k_i} + #{j < i : k_j == k_i}, as iama::rank_positions, for a constant n:
// the loop over i is one or a few vector compares per j, with no branch and no reduction.
template <int N, typename T>
inline void rank_fixed(const T* keys, int32_t* pos) {
  int32_t p[N];
  for (int i = 0; i < N; ++i) p[i] = 0;
  for (int j = 0; j < N; ++j) {
    const T kj = keys[j];
    for (int i = 0; i < N; ++i) {
      p[i] += static_cast<int32_t>(kj < keys[i]) | (static_cast<int32_t>(kj == keys[i]) & static_cast<int32_t>(j < i));
    }
  }
  for (int i = 0; i < N; ++i) pos[i] = p[i];
}

#if defined(IAMA_FIXED_AVX512)
// rank_fixed for 16 floats read at r[j * stride], in registers: the ranks by 16 vector compares,
// then the inverse permutation (sorted keys, widened to double, and the sample at each sorted
// position) by 16 masked moves, written with vector stores (the scalar code that reads them
// then loads from whole stores: no store-forwarding stall, unlike a scalar scatter).
inline void rank_sort16(const float* r, int64_t stride, int32_t* pos, double* xs, int32_t* order) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 k = _mm512_i32gather_ps(_mm512_mullo_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(stride))), r,
                                       4);
  __m512i p = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  for (int j = 0; j < 16; ++j) {
    const __m512 kj = _mm512_set1_ps(r[j * stride]);
    const __mmask16 lt = _mm512_cmp_ps_mask(kj, k, _CMP_LT_OQ);
    const __mmask16 eq = _mm512_cmp_ps_mask(kj, k, _CMP_EQ_OQ);
    const __mmask16 after = static_cast<__mmask16>(0xFFFFu << (j + 1));
    p = _mm512_mask_add_epi32(p, static_cast<__mmask16>(lt | (eq & after)), p, one);
  }
  __m512 sorted = _mm512_setzero_ps();
  __m512i ord = _mm512_setzero_si512();
  for (int j = 0; j < 16; ++j) {
    const __m512i pj = _mm512_permutexvar_epi32(_mm512_set1_epi32(j), p);
    const __mmask16 at = _mm512_cmpeq_epi32_mask(pj, iota);
    sorted = _mm512_mask_mov_ps(sorted, at, _mm512_set1_ps(r[j * stride]));
    ord = _mm512_mask_mov_epi32(ord, at, _mm512_set1_epi32(j));
  }
  _mm512_storeu_si512(pos, p);
  _mm512_storeu_si512(order, ord);
  _mm512_storeu_pd(xs, _mm512_cvtps_pd(_mm512_castps512_ps256(sorted)));
  _mm512_storeu_pd(xs + 8, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sorted), 1))));
}
#endif

template <int N, typename in_t>
void fixed_groups_n(const FixedGroups<in_t>& p, int64_t begin, int64_t end, double* shaped, double* canonical) {
  const int m = p.m;
  CriterionSpec specs[kFixedMaxM];
  for (int i = 0; i < m; ++i) specs[i] = CriterionSpec{p.specs[i].kind, p.specs[i].n, p.specs[i].tau};
  double s_all[N * kFixedMaxM];
  for (int64_t b = begin; b < end; ++b) {
    const in_t* r = p.r + b * p.rb;
    double xs[N];
    int32_t order[N];
    for (int i = 0; i < m; ++i) {
      int32_t pos[N];
#if defined(IAMA_FIXED_AVX512)
      if constexpr (N == 16 && std::is_same_v<in_t, float>) {
        rank_sort16(r + i * p.rc, p.rg, pos, xs, order);
      } else
#endif
      {
        in_t keys[N];
        for (int j = 0; j < N; ++j) keys[j] = r[j * p.rg + i * p.rc];
        rank_fixed<N>(keys, pos);
        for (int k = 0; k < N; ++k) {
          xs[pos[k]] = static_cast<double>(keys[k]);
          order[pos[k]] = k;
        }
      }
      double s[N];
      const double value = sorted_first_variation<double>(xs, N, specs[i], p.estimator, p.tables[i], s);
      for (int j = 0; j < N; ++j) s_all[j * m + i] = s[pos[j]];
      p.values[b * m + i] = static_cast<in_t>(value);
    }
    // xs and order still hold the last criterion's sorted rewards: the canonical order.
    const int64_t o = (b - begin) * N;
    combine_group<double, double>(s_all, p.lam, nullptr, 0, N, m, order, xs, shaped + o, canonical + o);
  }
}

template <typename in_t>
void dispatch_fixed_groups(const FixedGroups<in_t>& p, int64_t begin, int64_t end, double* shaped,
                           double* canonical) {
  switch (p.G) {
    case 4:
      return fixed_groups_n<4>(p, begin, end, shaped, canonical);
    case 8:
      return fixed_groups_n<8>(p, begin, end, shaped, canonical);
    case 16:
      return fixed_groups_n<16>(p, begin, end, shaped, canonical);
    case 32:
      return fixed_groups_n<32>(p, begin, end, shaped, canonical);
    default:
      return fixed_groups_n<64>(p, begin, end, shaped, canonical);
  }
}

}  // namespace IAMA_ISA_NAMESPACE
}  // namespace iama::cpu
