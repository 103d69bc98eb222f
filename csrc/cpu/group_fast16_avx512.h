// The whole of group_advantages for groups of 16 float32 rewards, hand-vectorised with AVX-512
// (included by group_fast_avx512.cpp only). A group's 16 doubles are two 8-lane registers; groups
// go in chunks through four passes (rank and sort; first variations; combination; scale) whose
// results stay in small stack buffers (L1), so that consecutive groups' dependency chains overlap.
//
// Every sum runs in the order of the general path (csrc/include/iama/group.h), operation for
// operation and without contraction into fused multiply-adds, so the results are bit-identical to
// it (tests/test_cpu_backend.py compares the paths bit for bit):
// * sum_of's four partial sums over k = l, l + 4, l + 8, l + 12 are the four lanes of a 256-bit
//   accumulator that adds the four quarters in order, then (p0 + p1) + (p2 + p3);
// * the BestOfN recurrences (a prefix sum for the plug-in, a suffix sum for the unbiased
//   estimator) stay sequential additions (of a value held in every lane), each result put into
//   its lane;
// * tied rewards take the general path's scalar loops on memory.
// Mean and BestOfN criteria, scale "group" or "none"; the caller checks (fused16_applies).
#pragma once

#include <immintrin.h>

#include <algorithm>

#include "group_fast.h"
#include "iama/group.h"

namespace iama::cpu {
namespace IAMA_ISA_NAMESPACE {

// sum_of(x, 16) of the 16 lanes of (a, b), in its order.
inline double sum16(__m512d a, __m512d b) {
  __m256d acc = _mm256_add_pd(_mm256_setzero_pd(), _mm512_castpd512_pd256(a));
  acc = _mm256_add_pd(acc, _mm512_extractf64x4_pd(a, 1));
  acc = _mm256_add_pd(acc, _mm512_castpd512_pd256(b));
  acc = _mm256_add_pd(acc, _mm512_extractf64x4_pd(b, 1));
  const __m128d lo = _mm256_castpd256_pd128(acc);  // p0, p1
  const __m128d hi = _mm256_extractf128_pd(acc, 1);  // p2, p3
  const double p01 = _mm_cvtsd_f64(lo) + _mm_cvtsd_f64(_mm_unpackhi_pd(lo, lo));
  const double p23 = _mm_cvtsd_f64(hi) + _mm_cvtsd_f64(_mm_unpackhi_pd(hi, hi));
  return p01 + p23;
}

// Per-criterion constants of one call: the BestOfN table in lanes (inc shifted by one position).
struct Fused16Criterion {
  int kind;  // kMean (also BestOfN(1)) or kBestOfN
  alignas(64) double inc_shifted[16];  // [p] = inc[p - 1], [0] = 0
  alignas(64) double prefix[16];
  alignas(64) double vw[16];
};

inline void fused16_setup(const FixedGroups<float>& p, Fused16Criterion* crit) {
  for (int i = 0; i < p.m; ++i) {
    Fused16Criterion& c = crit[i];
    c.kind = (p.specs[i].kind == kBestOfN && p.specs[i].n > 1) ? kBestOfN : kMean;
    for (int k = 0; k < 16; ++k) c.inc_shifted[k] = c.prefix[k] = c.vw[k] = 0.0;
    if (c.kind != kBestOfN) continue;
    const double* t = p.tables[i];
    for (int k = 1; k < 16; ++k) c.inc_shifted[k] = t[k - 1];
    for (int k = 0; k < 16; ++k) {
      c.prefix[k] = t[16 + k];
      c.vw[k] = t[32 + k];
    }
  }
}

// Ranks, sorted rewards (widened to double) and sorted order of one criterion of one group.
struct Sorted16 {
  alignas(64) double x[16];    // sorted rewards
  alignas(64) int32_t pos[16];  // sorted position of each sample
  alignas(64) int32_t ord[16];  // sample at each sorted position
  unsigned ties;                // bit p: x[p] == x[p + 1]
};

// 16 rewards r[j * stride], also in the lanes of k -> Sorted16: pos_i = #{j : k_j < k_i} +
// #{j < i : k_j == k_i} and the inverse permutation, in registers. count_j (bit i: sample j comes
// before sample i) gives both sides at once: pos_i is the number of samples before i (a masked
// add per j), and pos_j = 15 - popcount(count_j), the lane where sample j goes (a masked move of
// j into the sorted order; the sorted keys are then one permute of the keys).
// Without ties "before" is just "<"; a tie shows up as two samples sent to one lane (some lane is
// left uncovered), and then the counts are redone with the tie rule. Two interleaved accumulators
// each (disjoint lanes for the moves, merged by OR) keep the dependency chains short.
template <bool kTies>
inline bool rank16(const float* r, int64_t stride, __m512 k, __m512i& pos, __m512& sorted, __m512i& ord) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i pos_even = _mm512_setzero_si512(), pos_odd = _mm512_setzero_si512();
  __m512i ord_a = _mm512_setzero_si512(), ord_b = _mm512_setzero_si512();
  unsigned covered = 0;
  for (int j = 0; j < 16; ++j) {
    const __m512 kj = _mm512_set1_ps(r[j * stride]);
    __mmask16 count = _mm512_cmp_ps_mask(kj, k, _CMP_LT_OQ);
    if constexpr (kTies) {
      const __mmask16 after = static_cast<__mmask16>(0xFFFFu << (j + 1));
      count = static_cast<__mmask16>(count | _mm512_mask_cmp_ps_mask(after, kj, k, _CMP_EQ_OQ));
    }
    const unsigned lane = 1u << (15 - __builtin_popcount(static_cast<unsigned>(count)));
    covered |= lane;
    const __mmask16 at = static_cast<__mmask16>(lane);
    if (j % 2 == 0) {
      pos_even = _mm512_mask_add_epi32(pos_even, count, pos_even, one);
      ord_a = _mm512_mask_mov_epi32(ord_a, at, _mm512_set1_epi32(j));
    } else {
      pos_odd = _mm512_mask_add_epi32(pos_odd, count, pos_odd, one);
      ord_b = _mm512_mask_mov_epi32(ord_b, at, _mm512_set1_epi32(j));
    }
  }
  pos = _mm512_add_epi32(pos_even, pos_odd);
  ord = _mm512_or_si512(ord_a, ord_b);
  sorted = _mm512_permutexvar_ps(ord, k);  // the key of the sample at each sorted position
  return covered == 0xFFFFu;
}

inline void sort16(const float* r, int64_t stride, __m512 k, Sorted16& out) {
  __m512i pos, ord;
  __m512 sorted;
  if (!rank16<false>(r, stride, k, pos, sorted, ord)) rank16<true>(r, stride, k, pos, sorted, ord);
  const __m512d x0 = _mm512_cvtps_pd(_mm512_castps512_ps256(sorted));
  const __m512d x1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sorted), 1)));
  const __m512d next0 = _mm512_castsi512_pd(_mm512_alignr_epi64(_mm512_castpd_si512(x1), _mm512_castpd_si512(x0), 1));
  const __m512d next1 = _mm512_castsi512_pd(_mm512_alignr_epi64(_mm512_castpd_si512(x1), _mm512_castpd_si512(x1), 1));
  out.ties = (static_cast<unsigned>(_mm512_cmp_pd_mask(x0, next0, _CMP_EQ_OQ)) |
              (static_cast<unsigned>(_mm512_cmp_pd_mask(x1, next1, _CMP_EQ_OQ)) << 8)) & 0x7FFFu;
  _mm512_store_pd(out.x, x0);
  _mm512_store_pd(out.x + 8, x1);
  _mm512_store_si512(out.pos, pos);
  _mm512_store_si512(out.ord, ord);
}

// Centred first variation of one criterion of one group, in sample order, into s_out[16];
// returns the group value (sorted_first_variation, lane by lane).
inline double first_variation16(const Sorted16& in, const Fused16Criterion& c, int estimator, double* s_out) {
  const __m512d x0 = _mm512_load_pd(in.x), x1 = _mm512_load_pd(in.x + 8);
  const __m512d shift = _mm512_set1_pd(in.x[0]);
  const __m512d d0 = _mm512_sub_pd(x0, shift), d1 = _mm512_sub_pd(x1, shift);
  __m512d s0, s1;
  double value;
  if (c.kind == kBestOfN) {
    value = sum16(_mm512_mul_pd(_mm512_load_pd(c.vw), d0), _mm512_mul_pd(_mm512_load_pd(c.vw + 8), d1));
    const __m512d inc0 = _mm512_load_pd(c.inc_shifted), inc1 = _mm512_load_pd(c.inc_shifted + 8);
    // The recurrences' running sum is kept in every lane of a register (the additions of a scalar).
    __m512d run = _mm512_setzero_pd();
    if (estimator == kPlugin) {
      // q_k = inc[k-1] (x_k - x_{k-1}); s_0 = 0, s_k = s_{k-1} + q_k.
      const __m512d prev0 = _mm512_castsi512_pd(
          _mm512_alignr_epi64(_mm512_castpd_si512(d0), _mm512_castpd_si512(d0), 7));  // lane l: d_{l-1}
      const __m512d prev1 = _mm512_castsi512_pd(
          _mm512_alignr_epi64(_mm512_castpd_si512(d1), _mm512_castpd_si512(d0), 7));
      const __m512d q0 = _mm512_mul_pd(inc0, _mm512_sub_pd(d0, prev0));
      const __m512d q1 = _mm512_mul_pd(inc1, _mm512_sub_pd(d1, prev1));
      s0 = _mm512_setzero_pd();
      s1 = _mm512_setzero_pd();
      for (int k = 1; k < 8; ++k) {
        run = _mm512_add_pd(run, _mm512_permutexvar_pd(_mm512_set1_epi64(k), q0));
        s0 = _mm512_mask_mov_pd(s0, static_cast<__mmask8>(1u << k), run);
      }
      for (int k = 8; k < 16; ++k) {
        run = _mm512_add_pd(run, _mm512_permutexvar_pd(_mm512_set1_epi64(k - 8), q1));
        s1 = _mm512_mask_mov_pd(s1, static_cast<__mmask8>(1u << (k - 8)), run);
      }
    } else {
      // u_p = inc[p-1] x_p; suffix_15 = 0, suffix_{p-1} = suffix_p + u_p; s_p = x_p A_p + suffix_p.
      const __m512d u0 = _mm512_mul_pd(inc0, d0), u1 = _mm512_mul_pd(inc1, d1);
      __m512d suf0 = _mm512_setzero_pd(), suf1 = _mm512_setzero_pd();
      for (int q = 15; q >= 9; --q) {
        run = _mm512_add_pd(run, _mm512_permutexvar_pd(_mm512_set1_epi64(q - 8), u1));
        suf1 = _mm512_mask_mov_pd(suf1, static_cast<__mmask8>(1u << (q - 9)), run);
      }
      run = _mm512_add_pd(run, _mm512_permutexvar_pd(_mm512_set1_epi64(0), u1));
      suf0 = _mm512_mask_mov_pd(suf0, static_cast<__mmask8>(1u << 7), run);
      for (int q = 7; q >= 1; --q) {
        run = _mm512_add_pd(run, _mm512_permutexvar_pd(_mm512_set1_epi64(q), u0));
        suf0 = _mm512_mask_mov_pd(suf0, static_cast<__mmask8>(1u << (q - 1)), run);
      }
      s0 = _mm512_add_pd(_mm512_mul_pd(d0, _mm512_load_pd(c.prefix)), suf0);
      s1 = _mm512_add_pd(_mm512_mul_pd(d1, _mm512_load_pd(c.prefix + 8)), suf1);
    }
  } else {
    s0 = d0;
    s1 = d1;
    value = sum16(s0, s1) / 16.0;
  }
  if (in.ties != 0) {
    // Tied runs take the value at their last position (the general path's loop).
    alignas(64) double s[16];
    _mm512_store_pd(s, s0);
    _mm512_store_pd(s + 8, s1);
    for (int q = 14; q >= 0; --q) {
      if (in.x[q] == in.x[q + 1]) s[q] = s[q + 1];
    }
    s0 = _mm512_load_pd(s);
    s1 = _mm512_load_pd(s + 8);
  }
  const __m512d mean = _mm512_set1_pd(sum16(s0, s1) / 16.0);
  s0 = _mm512_sub_pd(s0, mean);
  s1 = _mm512_sub_pd(s1, mean);
  // Back to sample order: sample j takes s at its sorted position.
  const __m512i pos = _mm512_load_si512(in.pos);
  const __m512i pos_lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(pos));
  const __m512i pos_hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(pos, 1));
  _mm512_store_pd(s_out, _mm512_permutex2var_pd(s0, pos_lo, s1));
  _mm512_store_pd(s_out + 8, _mm512_permutex2var_pd(s0, pos_hi, s1));
  return value + in.x[0];
}

// Groups [begin, end): values, advantages and shaped rewards, as advantages_kernel writes them.
// Chunks of kChunk groups go through four passes (sort; first variations; combination; scale),
// each a short loop body over independent items, so that the out-of-order core overlaps the
// long dependency chains of consecutive items (one whole group at a time would not fit its window).
inline void fused16_groups(const FixedGroups<float>& p, int scale, double eps, float* adv, float* shaped_out,
                           int64_t begin, int64_t end) {
  constexpr int kChunk = 16;
  const int m = p.m;
  Fused16Criterion crit[kFixedMaxM];
  fused16_setup(p, crit);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i gather_index = _mm512_mullo_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(p.rg)));
  const bool interleaved2 = m == 2 && p.rg == 2 && p.rc == 1;
  const __m512i even = _mm512_slli_epi32(iota, 1);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  Sorted16 sorted[kChunk * kFixedMaxM];
  alignas(64) double s[kChunk * kFixedMaxM][16];
  alignas(64) double sh[kChunk][16];
  alignas(64) double can[kChunk][16];
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, end - c0));
    for (int g = 0; g < n; ++g) {
      const float* rg = p.r + (c0 + g) * p.rb;
      if (interleaved2) {
        // [16, 2] contiguous: two loads, split into the two criteria by two permutes.
        const __m512 a = _mm512_loadu_ps(rg), b = _mm512_loadu_ps(rg + 16);
        sort16(rg, 2, _mm512_permutex2var_ps(a, even, b), sorted[g * m]);
        sort16(rg + 1, 2, _mm512_permutex2var_ps(a, odd, b), sorted[g * m + 1]);
        continue;
      }
      for (int i = 0; i < m; ++i) {
        const float* r = rg + i * p.rc;
        const __m512 k = p.rg == 1 ? _mm512_loadu_ps(r) : _mm512_i32gather_ps(gather_index, r, 4);
        sort16(r, p.rg, k, sorted[g * m + i]);
      }
    }
    for (int g = 0; g < n; ++g) {
      for (int i = 0; i < m; ++i) {
        const double value = first_variation16(sorted[g * m + i], crit[i], p.estimator, s[g * m + i]);
        p.values[(c0 + g) * m + i] = static_cast<float>(value);
      }
    }
    for (int g = 0; g < n; ++g) {
      // shaped = sum_i lambda_i s_i (from 0, criterion by criterion), then the canonical copy.
      __m512d sh0 = _mm512_setzero_pd(), sh1 = _mm512_setzero_pd();
      for (int i = 0; i < m; ++i) {
        const __m512d lam = _mm512_set1_pd(p.lam[i]);
        sh0 = _mm512_add_pd(sh0, _mm512_mul_pd(lam, _mm512_load_pd(s[g * m + i])));
        sh1 = _mm512_add_pd(sh1, _mm512_mul_pd(lam, _mm512_load_pd(s[g * m + i] + 8)));
      }
      _mm512_store_pd(sh[g], sh0);
      _mm512_store_pd(sh[g] + 8, sh1);
      const Sorted16& last = sorted[g * m + m - 1];
      const __m512i ord = _mm512_load_si512(last.ord);
      const __m512i ord_lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(ord));
      const __m512i ord_hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(ord, 1));
      _mm512_store_pd(can[g], _mm512_permutex2var_pd(sh0, ord_lo, sh1));
      _mm512_store_pd(can[g] + 8, _mm512_permutex2var_pd(sh0, ord_hi, sh1));
      if (last.ties != 0) {
        // Samples tied on the last criterion ordered by value (combine_group's insertion sort).
        double* cg = can[g];
        const double* xs = last.x;
        for (int k = 1; k < 16; ++k) {
          if (!(xs[k] == xs[k - 1])) continue;
          const double v = cg[k];
          int j = k - 1;
          while (j >= 0 && xs[j] == xs[k] && v < cg[j]) {
            cg[j + 1] = cg[j];
            --j;
          }
          cg[j + 1] = v;
        }
      }
    }
    for (int g = 0; g < n; ++g) {
      const __m512d sh0 = _mm512_load_pd(sh[g]), sh1 = _mm512_load_pd(sh[g] + 8);
      double denom = 1.0;
      if (scale == kScaleGroup) {
        const __m512d can0 = _mm512_load_pd(can[g]), can1 = _mm512_load_pd(can[g] + 8);
        const __m512d c = _mm512_set1_pd(sum16(can0, can1) / 16.0);
        const __m512d e0 = _mm512_sub_pd(can0, c), e1 = _mm512_sub_pd(can1, c);
        denom = scale_denominator<double>(16.0, sum16(_mm512_mul_pd(e0, e0), _mm512_mul_pd(e1, e1)), eps);
      }
      float* a = adv + (c0 + g) * 16;
      float* h = shaped_out + (c0 + g) * 16;
      _mm256_storeu_ps(h, _mm512_cvtpd_ps(sh0));
      _mm256_storeu_ps(h + 8, _mm512_cvtpd_ps(sh1));
      // advantage = shaped / denominator, 0 where the denominator is 0 (scale_group).
      const __m512d dn = _mm512_set1_pd(denom > 0.0 ? denom : 1.0);
      const __mmask8 keep = denom > 0.0 ? 0xFF : 0x00;
      _mm256_storeu_ps(a, _mm512_cvtpd_ps(_mm512_maskz_div_pd(keep, sh0, dn)));
      _mm256_storeu_ps(a + 8, _mm512_cvtpd_ps(_mm512_maskz_div_pd(keep, sh1, dn)));
    }
  }
}

}  // namespace IAMA_ISA_NAMESPACE
}  // namespace iama::cpu
