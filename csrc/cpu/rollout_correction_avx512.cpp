// The train/rollout correction's row pass compiled for AVX-512 (F, VL, BW, DQ), 16 tokens a vector,
// for float32, bfloat16 or float16 log-probs and a byte mask or float32 weights: what
// iama::correction_row (csrc/include/iama/correction.h) computes, with exp16 / log16 (the
// exp_acc / log_acc steps on 16 lanes) and the sums widened to double every 16 tokens. Only
// called after a run-time CPU check (cpu_isa_level). As in token_pass_avx512.cpp, the torch/c10
// headers come before the target pragma and the helpers live in iama::cpu::avx512.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "rollout_correction.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#define IAMA_ISA_NAMESPACE avx512
#include "iama/correction.h"
#include "rollout_correction_rows.h"
#include "token_row_byte_avx512.h"

namespace iama::cpu {
namespace avx512 {
namespace {

// a + the 16 floats of v, widened to double (two vectors of 8 lanes).
inline void add_wide(__m512d& lo, __m512d& hi, __m512 v) {
  lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
}

inline double wide_sum(__m512d lo, __m512d hi) { return lanes_sum(_mm512_add_pd(lo, hi)); }

// correction_token_statistic's TV and binary KL on 16 lanes (o, r: the two log-probs).
inline __m512 gate_statistic16(int gate, __m512 o, __m512 r) {
  const __m512 lo = _mm512_set1_ps(static_cast<float>(kCorrectionProbBound));
  const __m512 hi = _mm512_set1_ps(static_cast<float>(1.0 - kCorrectionProbBound));
  // max(lo, x) and min(hi, x) return x when x is NaN: a NaN stays NaN, as torch.clamp.
  const __m512 ep = exp16(r), eq = exp16(o);
  const __m512 p = _mm512_min_ps(hi, _mm512_max_ps(lo, ep));
  const __m512 q = _mm512_min_ps(hi, _mm512_max_ps(lo, eq));
  if (gate == kGateTv) return _mm512_abs_ps(_mm512_sub_ps(p, q));
  // 1 - p = -expm1(r) = -(k3 + r), clamped alike (correction_token_statistic says why).
  const __m512 zero = _mm512_setzero_ps();
  const __m512 one_p = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_sub_ps(zero, _mm512_add_ps(k3_16(r, ep), r))));
  const __m512 one_q = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_sub_ps(zero, _mm512_add_ps(k3_16(o, eq), o))));
  const __m512 kl_1 = _mm512_mul_ps(one_p, log16(_mm512_div_ps(one_p, one_q)));
  // max(0, kl): held at >= 0 as in correction_token_statistic (a NaN kl is returned as is).
  return _mm512_max_ps(_mm512_setzero_ps(), _mm512_fmadd_ps(p, log16(_mm512_div_ps(p, q)), kl_1));
}

inline __mmask16 tail_lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// The mask's 16 values as floats and the lanes where it is not 0 (a NaN weight counts, as in
// correction_row).
template <typename mask_t>
inline __m512 load_mask16(const mask_t* mask, __mmask16 lanes, __mmask16& keep) {
  if constexpr (std::is_same_v<mask_t, uint8_t>) {
    const __m128i mb = _mm_maskz_loadu_epi8(lanes, mask);
    keep = _mm_test_epi8_mask(mb, mb);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mb));
  } else {
    const __m512 m = _mm512_maskz_loadu_ps(lanes, mask);
    keep = _mm512_mask_cmp_ps_mask(lanes, m, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    return m;
  }
}

template <typename in_t, typename mask_t>
CorrectionRow row16(const in_t* old, const in_t* rollout, const mask_t* mask, int64_t T, const CorrectionProblem& p,
                    float* w) {
  const __m512 low = _mm512_set1_ps(static_cast<float>(p.low)), high = _mm512_set1_ps(static_cast<float>(p.high));
  __m512d d_lo = _mm512_setzero_pd(), d_hi = d_lo, m_lo = d_lo, m_hi = d_lo, x_lo = d_lo, x_hi = d_lo;
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 lanes = tail_lanes(T - t);
    __mmask16 keep;
    const __m512 m = load_mask16(mask + t, lanes, keep);
    const __m512 o = load16(old + t, keep), r = load16(rollout + t, keep);  // 0 where the mask is 0
    const __m512 d = _mm512_sub_ps(o, r);
    add_wide(d_lo, d_hi, _mm512_mul_ps(d, m));
    add_wide(m_lo, m_hi, m);
    if (p.sequence) {  // the row's mean statistic (the ratio gate's is the exp of the mean d)
      if (p.gate != kGateRatio) add_wide(x_lo, x_hi, _mm512_maskz_mul_ps(keep, gate_statistic16(p.gate, o, r), m));
      continue;
    }
    const __m512 ratio = exp16(d);
    const __m512 stat = p.gate == kGateRatio ? ratio : gate_statistic16(p.gate, o, r);
    __m512 coef;
    __mmask16 dropped;
    if (p.clip) {  // a NaN ratio is neither below nor above, and stays NaN
      dropped = _mm512_mask_cmp_ps_mask(keep, stat, low, _CMP_LT_OQ) |
                _mm512_mask_cmp_ps_mask(keep, stat, high, _CMP_GT_OQ);
      coef = _mm512_min_ps(high, _mm512_max_ps(low, ratio));
    } else {  // kept where low <= stat <= high (ordered: a NaN statistic drops its token)
      const __mmask16 in = _mm512_cmp_ps_mask(stat, low, _CMP_GE_OQ) & _mm512_cmp_ps_mask(stat, high, _CMP_LE_OQ);
      dropped = keep & static_cast<__mmask16>(~in);
      coef = _mm512_maskz_mov_ps(in, ratio);
    }
    _mm512_mask_storeu_ps(w + t, lanes, _mm512_maskz_mul_ps(keep, coef, m));
    add_wide(x_lo, x_hi, _mm512_maskz_mov_ps(dropped, m));
  }
  CorrectionRow row;
  row.log_ratio_sum = wide_sum(d_lo, d_hi);
  row.mask_sum = wide_sum(m_lo, m_hi);
  if (!p.sequence) {
    row.dropped = wide_sum(x_lo, x_hi);
    return row;
  }
  const double mean = (p.gate == kGateRatio ? row.log_ratio_sum : wide_sum(x_lo, x_hi)) / row.mask_sum;
  row.statistic = p.gate == kGateRatio ? ::exp(mean) : mean;
  const bool kept = row.statistic >= p.low && row.statistic <= p.high;
  row.dropped = kept ? 0.0 : 1.0;
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 lanes = tail_lanes(T - t);
    if (!kept) {
      _mm512_mask_storeu_ps(w + t, lanes, _mm512_setzero_ps());
      continue;
    }
    __mmask16 keep;
    const __m512 m = load_mask16(mask + t, lanes, keep);
    const __m512 d = _mm512_sub_ps(load16(old + t, keep), load16(rollout + t, keep));
    _mm512_mask_storeu_ps(w + t, lanes, _mm512_maskz_mul_ps(keep, exp16(d), m));
  }
  return row;
}

}  // namespace
}  // namespace avx512

bool rollout_correction_avx512(const CorrectionProblem& p, int64_t begin, int64_t end) {
  avx512::correction_rows(p, begin, end, [&](const auto* old, const auto* rollout, const auto* mask, float* w) {
    return avx512::row16(old, rollout, mask, p.T, p, w);
  });
  return true;
}

}  // namespace iama::cpu

#else

namespace iama::cpu {
bool rollout_correction_avx512(const CorrectionProblem&, int64_t, int64_t) { return false; }
}  // namespace iama::cpu

#endif
