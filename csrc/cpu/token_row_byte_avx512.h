// One row of the policy-loss token pass for float32, bfloat16 or float16 log-probs (old and ref in
// the same dtype) and a byte (bool / uint8) mask or float32 token weights (verl's rollout
// importance weights, a per-response normaliser), written with AVX-512 intrinsics. Included only
// by token_pass_avx512.cpp, after its target pragma. (The `byte16` of its names: 16 tokens a
// vector, and the byte mask it was first written for.)
//
// It computes what iama::policy_loss_row<lp_t, lp_t, mask_t, float> (csrc/include/iama/loss.h)
// computes, in the same order of operations and the same summation tree (tiles of 64 tokens,
// pairwise down to 8 lanes, 8 double accumulators), but leaves less to the auto-vectoriser, which
// on this loop spills its per-tile arrays and turns every clamp and select into a compare and a
// blend. What the intrinsics save:
//   * exp: vmaxps/vminps clamps (their NaN rule passes a NaN x through, so no NaN test) and
//     vscalefps for the 2^k scaling (one rounding, as the two-step scaling of exp_acc, so the
//     denormal range and overflow to inf come out the same);
//   * masking: only the two differences (logp - old, ref - logp) are zeroed where the mask is 0;
//     every other term is then finite and is zeroed by masked arithmetic, not by selects;
//   * the 64-token tile's term vectors stay in registers;
//   * A is the row's constant, so the dual clip, which only acts where A < 0, is compiled into
//     the loop only for rows with A < 0 and a finite c (kDual), and the clipped-above weight is
//     the row's clipped weight or 0 (no sum of its own); SAPO's temperature is the row's too.
//     With per-token advantages (kTokenAdv: PPO's, and verl's [bs, T] ones; the clipped surrogate,
//     CISPO, SAPO and DPPO) each token's A is loaded (0 where the mask is 0, so padding is not
//     read), the dual clip tests its sign (kDual: a finite c), SAPO's temperature and DPPO's
//     bound are picked by it and the clipped-above weight is summed;
//   * half-precision tokens are widened to float32 in registers (bfloat16: a shift; float16:
//     vcvtph2ps) and the gradient rounded back to nearest-even there, as c10's conversions do
//     (NaN to c10's quiet NaN), where the templated row converts token by token.
// kSurr: the surrogate (SurrogateKind), with token_terms' formulas for CISPO, SAPO, VESPO and DPPO
// (CISPO keeps a clipped-above sum: its clipped weight counts both sides; VESPO's A is the row's
// A * phi; DPPO's weight cap is kDual's c, its dual sum the capped tokens, and its binary KL takes
// log16, log_acc's steps).
// Every KL estimator: the plain k3, or the others from their coefficients (kl_terms16).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "iama/loss.h"

namespace iama::cpu {
namespace IAMA_ISA_NAMESPACE {

// exp_acc(float) on 16 lanes: Cody-Waite reduction, the same degree-7 polynomial, vscalefps.
inline __m512 exp16(__m512 x) {
  // max(c, x) and min(c, x) return x when x is NaN, so a NaN runs through to the result.
  __m512 xc = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  xc = _mm512_min_ps(_mm512_set1_ps(89.0f), xc);
  const __m512 shifter = _mm512_set1_ps(12582912.0f);
  const __m512 kf = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, kf);
}

// k3_from_exp on 16 lanes: the Taylor series for |d| < 1/2, ed - d - 1 elsewhere (NaN included).
inline __m512 k3_16(__m512 d, __m512 ed) {
  __m512 q = _mm512_set1_ps(1.0f / 362880.0f);
  q = _mm512_fmadd_ps(q, d, _mm512_set1_ps(1.0f / 40320.0f));
  q = _mm512_fmadd_ps(q, d, _mm512_set1_ps(1.0f / 5040.0f));
  q = _mm512_fmadd_ps(q, d, _mm512_set1_ps(1.0f / 720.0f));
  q = _mm512_fmadd_ps(q, d, _mm512_set1_ps(1.0f / 120.0f));
  q = _mm512_fmadd_ps(q, d, _mm512_set1_ps(1.0f / 24.0f));
  q = _mm512_fmadd_ps(q, d, _mm512_set1_ps(1.0f / 6.0f));
  q = _mm512_fmadd_ps(q, d, _mm512_set1_ps(0.5f));
  const __m512 series = _mm512_mul_ps(_mm512_mul_ps(q, d), d);
  const __m512 direct = _mm512_sub_ps(_mm512_sub_ps(ed, d), _mm512_set1_ps(1.0f));
  const __mmask16 small = _mm512_cmp_ps_mask(_mm512_abs_ps(d), _mm512_set1_ps(0.5f), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(small, direct, series);
}

// log_acc(float) on 16 lanes, the same steps: a denormal scaled by 2^23, x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), 2 atanh((m - 1) / (m + 1)) by its odd series, e ln 2 in two parts, with
// the fused multiply-adds where GCC contracts log_acc's expressions; 0 gives -inf, +inf +inf, a
// negative x NaN, and a NaN x itself.
inline __m512 log16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m512 xs = _mm512_mask_mul_ps(x, tiny, x, _mm512_set1_ps(8388608.0f));
  const __m512i bits = _mm512_castps_si512(xs);
  const __m512i biased = _mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xff));
  __m512 m = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffff)), _mm512_set1_epi32(0x3f800000)));
  const __mmask16 upper = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, upper, m, _mm512_set1_ps(0.5f));
  __m512i e = _mm512_sub_epi32(biased, _mm512_set1_epi32(127));
  e = _mm512_mask_add_epi32(e, upper, e, _mm512_set1_epi32(1));
  e = _mm512_mask_sub_epi32(e, tiny, e, _mm512_set1_epi32(23));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 sv = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
  const __m512 s2 = _mm512_mul_ps(sv, sv);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 11.0f), s2, _mm512_set1_ps(1.0f / 9.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(1.0f / 7.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(1.0f / 5.0f));
  q = _mm512_fmadd_ps(q, s2, _mm512_set1_ps(1.0f / 3.0f));
  q = _mm512_fmadd_ps(q, s2, one);
  const __m512 ef = _mm512_cvtepi32_ps(e);
  const __m512 low = _mm512_fmadd_ps(ef, _mm512_set1_ps(1.42860682030941723212e-6f),
                                     _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f), sv), q));
  __m512 r = _mm512_fmadd_ps(ef, _mm512_set1_ps(0.693145751953125f), low);
  r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ), r, _mm512_set1_ps(-INFINITY));
  r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), r, _mm512_set1_ps(NAN));
  r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), r, x);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, x);
}

// DPPO-KL's binary KL of the sampled token, q (q_log - logp) + (1 - q) log((1 - q + eps) /
// (1 - p + eps)) with p = exp(logp), q = exp(q_log), as token_terms computes it (GCC fuses the
// second product there: fma((1 - q), log, q (q_log - logp))).
inline __m512 binary_kl16(__m512 lp, __m512 q_log, __m512 p, __m512 q) {
  const __m512 one = _mm512_set1_ps(1.0f), eps = _mm512_set1_ps(1e-8f);
  const __m512 one_q = _mm512_sub_ps(one, q);
  const __m512 lg = log16(_mm512_div_ps(_mm512_add_ps(one_q, eps), _mm512_add_ps(_mm512_sub_ps(one, p), eps)));
  return _mm512_fmadd_ps(one_q, lg, _mm512_mul_ps(q, _mm512_sub_ps(q_log, lp)));
}

// 16 tokens as float32 (lanes outside k read as 0; their memory is not touched).
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {  // bfloat16 is float32's upper half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

// 16 gradients stored in the log-probs' dtype, rounded as c10's float conversions round.
inline void store16(float* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
inline void store16(c10::BFloat16* p, __mmask16 k, __m512 v) {
  // Round to nearest even on the upper 16 bits (c10::detail::round_to_nearest_even); NaN: 0x7FC0.
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(r));
}
inline void store16(c10::Half* p, __mmask16 k, __m512 v) {
  // vcvtps2ph rounds to nearest even as c10::Half(float) does; a NaN becomes c10's 0x7E00 with
  // its sign (vcvtps2ph would keep part of the payload).
  __m512i h = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i nan = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16),
                                                       _mm512_set1_epi32(0x8000)),
                                      _mm512_set1_epi32(0x7E00));
  h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(h));
}

// a * b rounded to nearest, never fused with a later add (see token_terms16's sums).
inline __m512 mul_rounded(__m512 a, __m512 b) {
  return _mm512_mul_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

struct Terms16 {
  __m512 loss, kl, clip, ratio, lratio, dual, high;
};

// The row's constants of token_terms16.
struct Row16 {
  __m512 A, w_scale, lo, hi, beta, dual_c, lr0;
  // SAPO's temperature for the row's sign of A, and 4 / it; with per-token advantages (kTokenAdv)
  // those of A > 0, and tau_neg, four_over_tau_neg those of the other tokens.
  // DPPO's divergence bounds: tau for A > 0, tau_neg for the other tokens (rows). GMPO: tau the
  // row's objective G, tau_neg its geometric-mean ratio exp(M). VESPO with per-token advantages:
  // the row's weights phi for A >= 0 (tau) and A < 0 (tau_neg).
  __m512 tau, four_over_tau, tau_neg, four_over_tau_neg;
  bool pos, neg;  // the row's A > 0, A < 0 (with one advantage per row)
  // A KL estimator other than the plain k3 (other_kl): KlCoef's coefficients, and whether its
  // k3 piece is used at all (c3 or cr non-zero: k3+, TRL's ratio k3). Run-time branches, uniform
  // over the row: they cost nothing here, where the templated row needs its loop branch-free.
  bool other_kl, need_k3;
  __m512 k3_cap, rho_cap, c3, cr, c2, c1, ca, er, e2, e1, ea;
};

// The KL term's value and derivative in logp for 16 tokens at d = ref - logp (0 where the mask is
// 0), as token_terms computes them: the plain k3, or from the coefficients in the order GCC
// contracts the templated row's expressions into fused multiply-adds. Without a k3 piece (k2, k1,
// |x|) the exponential and the series are skipped: their product with the zero coefficient
// (c3 + cr rho) is +-0 or NaN (a NaN ratio) whatever the finite, capped k3, and adding it leaves
// the other pieces' sum as it is (+0 where that sum is zero). Every bit equals the templated row's
// but a NaN's sign where two NaN operands meet (a NaN logp: -d and the ratio), which depends on
// the operand order the compiler gives each fused multiply-add.
inline void kl_terms16(__m512 d, __m512 ratio, const Row16& c, __m512& kl, __m512& dkl) {
  if (!c.other_kl) {
    const __m512 ed = exp16(d);
    kl = k3_16(d, ed);
    dkl = _mm512_sub_ps(_mm512_set1_ps(1.0f), ed);
    return;
  }
  const __m512 zero = _mm512_setzero_ps();
  const __m512 x = _mm512_xor_ps(d, _mm512_set1_ps(-0.0f));  // -d, signed zeros included
  __m512 k3 = zero;
  if (c.need_k3) {  // min(cap, k3) as `cap < k3 ? cap : k3`: a NaN k3 stays NaN
    const __m512 raw = k3_16(d, exp16(d));
    k3 = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c.k3_cap, raw, _CMP_LT_OQ), raw, c.k3_cap);
  }
  const __m512 rho = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c.rho_cap, ratio, _CMP_LT_OQ), ratio, c.rho_cap);
  const __mmask16 neg = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
  const __mmask16 pos = _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ);
  const __m512 abs_x = _mm512_mask_blend_ps(neg, x, d);
  // 1, -1, or x * 0 (a signed zero, or NaN)
  const __m512 sign_x = _mm512_mask_blend_ps(pos, _mm512_mask_blend_ps(neg, _mm512_mul_ps(x, zero),
                                                                         _mm512_set1_ps(-1.0f)),
                                             _mm512_set1_ps(1.0f));
  const __m512 half_x2 = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), x);
  kl = _mm512_fmadd_ps(_mm512_fmadd_ps(c.cr, rho, c.c3), k3, _mm512_mul_ps(c.c2, half_x2));
  kl = _mm512_fmadd_ps(c.c1, x, kl);
  kl = _mm512_fmadd_ps(c.ca, abs_x, kl);
  dkl = _mm512_fmadd_ps(_mm512_fmadd_ps(c.er, rho, c.e2), x, c.e1);
  dkl = _mm512_fmadd_ps(c.ea, sign_x, dkl);
}

// The terms of 16 tokens starting at t; lanes outside `lanes` are not read and give 0. kDual: the
// row's A is negative and the dual clip c finite (else no token of the row is dual-clipped); with
// kTokenAdv (each token's A from a_tok): c finite, the sign tested token by token.
template <typename lp_t, bool kDual, bool kSeq, int kSurr, bool kTokenAdv = false, typename mask_t = uint8_t>
inline Terms16 token_terms16(const lp_t* logp, const lp_t* old, const lp_t* ref, const mask_t* mask, lp_t* grad,
                             int64_t t, __mmask16 lanes, const Row16& c, const float* a_tok = nullptr) {
  static_assert(std::is_same_v<mask_t, uint8_t> || std::is_same_v<mask_t, float>, "a byte mask or float weights");
  constexpr bool kDppo = kSurr == kSurrDppoTv || kSurr == kSurrDppoKl;
  static_assert(!kDual || kSurr == kSurrClip || kDppo, "the dual clip is the clipped surrogate's (DPPO's cap)");
  static_assert(kDual || !kDppo, "DPPO's weight cap is its dual clip");
  constexpr bool kGmpo = kSurr == kSurrGmpo;
  static_assert(!kSeq || !(kDppo || kGmpo || kSurr == kSurrVespo), "DPPO, GMPO and VESPO take token-level ratios");
  __mmask16 keep;
  __m512 m;
  if constexpr (std::is_same_v<mask_t, uint8_t>) {
    const __m128i mb = _mm_maskz_loadu_epi8(lanes, mask + t);
    keep = _mm_test_epi8_mask(mb, mb);
    m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mb));
  } else {  // weights: a token is kept where its weight is not 0 (`!=`: a NaN weight too), as in token_terms
    m = _mm512_maskz_loadu_ps(lanes, mask + t);
    keep = _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  }
  const __m512 lp = load16(logp + t, keep);
  const __m512 A = kTokenAdv ? _mm512_maskz_loadu_ps(keep, a_tok + t) : c.A;
  // A > 0 per token (per-token advantages; the row's sign is applied once, in row_byte16, else).
  const __mmask16 pos = kTokenAdv ? _mm512_cmp_ps_mask(A, _mm512_setzero_ps(), _CMP_GT_OQ) : __mmask16(0xFFFF);
  // The log-ratio logp - old, or for GSPO's sequence ratio (kSeq) (logp - logp) + lr0, the row's
  // mean (`old` is then logp itself: not loaded; logp - logp is 0, or NaN for a non-finite logp,
  // as in the templated row and the reference), zeroed where the mask is 0.
  __m512 d_old, old_v = _mm512_setzero_ps();  // (old_v: old, 0 where the mask is 0)
  if constexpr (kSeq) {
    d_old = _mm512_maskz_add_ps(keep, _mm512_sub_ps(lp, lp), c.lr0);
  } else {
    old_v = load16(old + t, keep);
    d_old = _mm512_maskz_sub_ps(keep, lp, old_v);
  }
  const __m512 d = _mm512_maskz_sub_ps(keep, load16(ref + t, keep), lp);
  // (GMPO's metric is the row's ratio, so its tokens' ratios are needed only by a KL estimator
  // other than the plain k3, which reads them; a run-time branch, uniform over the row.)
  const __m512 ratio = kGmpo && !c.other_kl ? _mm512_setzero_ps() : exp16(d_old);
  // max(lo, ratio) then min(hi, .): a NaN ratio stays NaN, as in token_terms.
  const __m512 clipped = _mm512_min_ps(c.hi, _mm512_max_ps(c.lo, ratio));
  const __m512 unclipped_term = _mm512_mul_ps(ratio, A);
  // A > 0 per token, or the row's sign in every lane (DPPO's bound and GMPO's clip side).
  const __mmask16 a_pos = kTokenAdv ? pos : static_cast<__mmask16>(c.pos ? 0xFFFF : 0);
  // The policy term, its derivative in logp, and the clipped / clipped-above / dual flags.
  __m512 surrogate, d_surr;
  __mmask16 clip_flag = 0, high_flag = 0, dual = 0;
  if constexpr (kSurr == kSurrVespo) {  // REINFORCE on A * phi: nothing clipped
    // The row's A * phi, or each token's A times the weight of its sign (phi_pos for A >= 0).
    const __m512 a_phi =
        kTokenAdv ? _mm512_mul_ps(A, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(A, _mm512_setzero_ps(), _CMP_GE_OQ),
                                                          c.tau_neg, c.tau))
                  : c.A;
    surrogate = _mm512_mul_ps(a_phi, lp);
    d_surr = a_phi;
  } else if constexpr (kDppo) {
    // The ratio's weight exp(lr clamped to [-20, 20]) (max then min: a NaN stays NaN) capped at
    // c, where the sampled token's probabilities p = exp(logp) and q = exp(old) keep within the
    // bound on the side of A's sign (total variation p - q, or the binary KL of q to p where the
    // ratio moves away from 1), else 0.
    const __m512 bound = _mm512_set1_ps(20.0f);
    const __m512 rho = exp16(_mm512_min_ps(bound, _mm512_max_ps(_mm512_set1_ps(-20.0f), d_old)));
    const __m512 p = exp16(lp), q = exp16(old_v);
    __mmask16 held_pos, held_neg;
    if constexpr (kSurr == kSurrDppoTv) {
      const __m512 diff = _mm512_sub_ps(p, q);
      held_pos = _mm512_cmp_ps_mask(diff, c.tau, _CMP_LE_OQ);
      held_neg = _mm512_cmp_ps_mask(diff, _mm512_xor_ps(c.tau_neg, _mm512_set1_ps(-0.0f)), _CMP_GE_OQ);
    } else {
      const __m512 k = binary_kl16(lp, old_v, p, q);
      held_pos = _mm512_cmp_ps_mask(k, c.tau, _CMP_LE_OQ) | _mm512_cmp_ps_mask(p, q, _CMP_LE_OQ);
      held_neg = _mm512_cmp_ps_mask(k, c.tau_neg, _CMP_LE_OQ) | _mm512_cmp_ps_mask(p, q, _CMP_GE_OQ);
    }
    const __mmask16 valid = (a_pos & held_pos) | (static_cast<__mmask16>(~a_pos) & held_neg);
    const __m512 wa = _mm512_mul_ps(_mm512_maskz_mov_ps(valid, _mm512_min_ps(rho, c.dual_c)), A);
    surrogate = _mm512_mul_ps(wa, lp);
    d_surr = wa;
    clip_flag = static_cast<__mmask16>(~valid);
    high_flag = clip_flag & a_pos;  // (summed with per-token advantages only)
    dual = valid & _mm512_cmp_ps_mask(rho, c.dual_c, _CMP_GT_OQ);
  } else if constexpr (kGmpo) {
    // The row's objective G, whose derivative (G, or 0) reaches the tokens not clipped: those with
    // lr > hi where A > 0, -lr > -lo where A < 0, none where A = 0 (lo, hi the log-space bounds);
    // a NaN log-ratio is never clipped, as in token_terms.
    const __mmask16 a_neg = kTokenAdv ? _mm512_cmp_ps_mask(A, _mm512_setzero_ps(), _CMP_LT_OQ)
                                      : static_cast<__mmask16>(c.neg ? 0xFFFF : 0);
    const __m512 neg_zero = _mm512_set1_ps(-0.0f);
    const __m512 bound = _mm512_mask_blend_ps(
        a_pos, _mm512_mask_blend_ps(a_neg, _mm512_set1_ps(INFINITY), _mm512_xor_ps(c.lo, neg_zero)), c.hi);
    clip_flag = _mm512_cmp_ps_mask(_mm512_mask_blend_ps(a_pos, _mm512_xor_ps(d_old, neg_zero), d_old), bound,
                                   _CMP_GT_OQ);
    high_flag = _mm512_cmp_ps_mask(_mm512_mask_blend_ps(a_pos, c.hi, d_old), c.hi, _CMP_GT_OQ);
    surrogate = c.tau;
    d_surr = _mm512_maskz_mov_ps(
        static_cast<__mmask16>(~clip_flag) & _mm512_cmp_ps_mask(A, _mm512_setzero_ps(), _CMP_NEQ_UQ), c.tau);
  } else if constexpr (kSurr == kSurrCispo) {
    surrogate = _mm512_mul_ps(_mm512_mul_ps(clipped, A), lp);
    d_surr = _mm512_mul_ps(clipped, A);
    clip_flag = _mm512_cmp_ps_mask(clipped, ratio, _CMP_NEQ_UQ);  // `!=`: true for a NaN ratio
    high_flag = _mm512_cmp_ps_mask(ratio, c.hi, _CMP_GT_OQ) & pos;
  } else if constexpr (kSurr == kSurrSapo) {
    const __m512 one = _mm512_set1_ps(1.0f);
    // The temperature of the token's sign of A (per-token advantages), else of the row's.
    const __m512 tau = kTokenAdv ? _mm512_mask_blend_ps(pos, c.tau_neg, c.tau) : c.tau;
    const __m512 four_over_tau = kTokenAdv ? _mm512_mask_blend_ps(pos, c.four_over_tau_neg, c.four_over_tau)
                                           : c.four_over_tau;
    const __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), tau), _mm512_sub_ps(ratio, one)));
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e));
    surrogate = _mm512_mul_ps(_mm512_mul_ps(four_over_tau, s), A);
    // The saturated gate (e = 0 or inf, where the product is 0 * inf) has derivative 0: live
    // where 0 < e < inf, ordered compares, so a NaN e is not live either (as in token_terms).
    const __mmask16 live = _mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_GT_OQ) &
                           _mm512_cmp_ps_mask(e, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
    d_surr = _mm512_maskz_mul_ps(live,
                                 _mm512_mul_ps(_mm512_set1_ps(4.0f), _mm512_mul_ps(_mm512_mul_ps(e, s), s)),
                                 unclipped_term);
  } else {
    const __m512 clipped_term = _mm512_mul_ps(clipped, A);
    const __mmask16 active = _mm512_cmp_ps_mask(unclipped_term, clipped_term, _CMP_LE_OQ);
    // ratio > c (ordered: a NaN ratio is not dual-clipped, as in token_terms), where A < 0 (the
    // row's, or each token's).
    if constexpr (kDual) {
      dual = _mm512_cmp_ps_mask(ratio, c.dual_c, _CMP_GT_OQ);
      if constexpr (kTokenAdv) dual &= _mm512_cmp_ps_mask(A, _mm512_setzero_ps(), _CMP_LT_OQ);
    }
    surrogate = _mm512_mask_blend_ps(active, clipped_term, unclipped_term);
    if constexpr (kDual) surrogate = _mm512_mask_blend_ps(dual, surrogate, _mm512_mul_ps(c.dual_c, A));
    d_surr = _mm512_maskz_mov_ps(active & static_cast<__mmask16>(~dual), unclipped_term);
    clip_flag = static_cast<__mmask16>(~active);
    high_flag = clip_flag & pos;  // (summed with per-token advantages only)
  }
  __m512 kl, dkl;
  kl_terms16(d, ratio, c, kl, dkl);
  const __m512 w = _mm512_mul_ps(m, c.w_scale);
  Terms16 s;
  s.loss = _mm512_maskz_mul_ps(keep, _mm512_fmsub_ps(c.beta, kl, surrogate), w);
  const __m512 g = _mm512_maskz_mul_ps(keep, w, _mm512_fmsub_ps(c.beta, dkl, d_surr));
  store16(grad + t, lanes, g);
  // The weighted terms that tile_sum adds: multiplies with an explicit rounding, which GCC does
  // not contract with that add into a fused multiply-add (a plain _mm512_mul_ps it does, which
  // rounds once where the templated row, which stores the terms first, rounds twice; with a byte
  // mask the product is exact and either way is the same).
  s.kl = mul_rounded(kl, m);
  s.clip = _mm512_maskz_mov_ps(clip_flag, m);
  s.ratio = mul_rounded(kGmpo ? c.tau_neg : ratio, m);  // GMPO: the row's geometric-mean ratio
  s.lratio = mul_rounded(d_old, m);
  s.dual = kDual ? _mm512_maskz_mov_ps(dual, m) : _mm512_setzero_ps();
  s.high = kSurr == kSurrCispo || kTokenAdv ? _mm512_maskz_mov_ps(high_flag, m) : _mm512_setzero_ps();
  return s;
}

// The 8-lane partial sum of one 64-token tile (4 vectors, pairwise as in policy_loss_row),
// widened to double.
inline __m512d tile_sum(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m512 s = _mm512_add_ps(_mm512_add_ps(v0, v2), _mm512_add_ps(v1, v3));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  return _mm512_cvtps_pd(h);
}

inline double lanes_sum(__m512d v) {
  alignas(64) double lane[8];
  _mm512_store_pd(lane, v);
  for (int width = 4; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
  }
  return lane[0];
}

template <typename lp_t, bool kDual, bool kSeq, int kSurr, bool kTokenAdv = false, typename mask_t = uint8_t>
inline RowSums row_byte16(const lp_t* logp, const lp_t* old, const lp_t* ref, const mask_t* mask, int64_t T,
                          float A_, float w_scale_, float lo_, float hi_, float beta_, float dual_c_, float lr0_,
                          float tau_pos_, float tau_neg_, lp_t* grad, const float* a_tok,
                          const KlCoef<float>* kc) {
  const bool pos = A_ > 0.0f;
  // (per-token advantages, or DPPO's bounds: A > 0's, see Row16)
  constexpr bool kBothSigns = kTokenAdv || kSurr == kSurrDppoTv || kSurr == kSurrDppoKl || kSurr == kSurrGmpo;
  const float tau_ = kBothSigns || pos ? tau_pos_ : tau_neg_;
  const float four_over_tau_ = kBothSigns || pos ? 4.0f / tau_pos_ : 4.0f / tau_neg_;  // as token_terms rounds it
  const KlCoef<float> k = kc != nullptr ? *kc : KlCoef<float>{};
  const Row16 c{_mm512_set1_ps(A_),   _mm512_set1_ps(w_scale_), _mm512_set1_ps(lo_),
                _mm512_set1_ps(hi_),  _mm512_set1_ps(beta_),    _mm512_set1_ps(dual_c_),
                _mm512_set1_ps(lr0_), _mm512_set1_ps(tau_),     _mm512_set1_ps(four_over_tau_),
                _mm512_set1_ps(tau_neg_), _mm512_set1_ps(4.0f / tau_neg_), pos, A_ < 0.0f,
                kc != nullptr,        k.c3 != 0.0f || k.cr != 0.0f,
                _mm512_set1_ps(k.k3_cap), _mm512_set1_ps(k.rho_cap), _mm512_set1_ps(k.c3),
                _mm512_set1_ps(k.cr), _mm512_set1_ps(k.c2), _mm512_set1_ps(k.c1),
                _mm512_set1_ps(k.ca), _mm512_set1_ps(k.er), _mm512_set1_ps(k.e2),
                _mm512_set1_ps(k.e1), _mm512_set1_ps(k.ea)};
  constexpr bool kHighSum = kSurr == kSurrCispo || kTokenAdv;
  __m512d acc_loss = _mm512_setzero_pd(), acc_kl = _mm512_setzero_pd(), acc_clip = _mm512_setzero_pd(),
          acc_ratio = _mm512_setzero_pd(), acc_lratio = _mm512_setzero_pd(), acc_dual = _mm512_setzero_pd(),
          acc_high = _mm512_setzero_pd();
  auto lanes_from = [T](int64_t t) -> __mmask16 {
    const int64_t left = T - t;
    if (left >= 16) return static_cast<__mmask16>(0xFFFF);
    if (left <= 0) return static_cast<__mmask16>(0);
    return static_cast<__mmask16>((1u << left) - 1u);
  };
  for (int64_t t0 = 0; t0 < T; t0 += 64) {
    const bool full = T - t0 >= 64;
    Terms16 v[4];
    // Unrolled, so that the four vectors stay in registers and their chains interleave.
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const int64_t t = t0 + 16 * q;
      const __mmask16 lanes = full ? static_cast<__mmask16>(0xFFFF) : lanes_from(t);
      v[q] = token_terms16<lp_t, kDual, kSeq, kSurr, kTokenAdv>(logp, old, ref, mask, grad, t, lanes, c, a_tok);
    }
    acc_loss = _mm512_add_pd(acc_loss, tile_sum(v[0].loss, v[1].loss, v[2].loss, v[3].loss));
    acc_kl = _mm512_add_pd(acc_kl, tile_sum(v[0].kl, v[1].kl, v[2].kl, v[3].kl));
    if constexpr (kSurr != kSurrSapo && kSurr != kSurrVespo) {  // they clip nothing
      acc_clip = _mm512_add_pd(acc_clip, tile_sum(v[0].clip, v[1].clip, v[2].clip, v[3].clip));
    }
    acc_ratio = _mm512_add_pd(acc_ratio, tile_sum(v[0].ratio, v[1].ratio, v[2].ratio, v[3].ratio));
    acc_lratio = _mm512_add_pd(acc_lratio, tile_sum(v[0].lratio, v[1].lratio, v[2].lratio, v[3].lratio));
    if constexpr (kDual) acc_dual = _mm512_add_pd(acc_dual, tile_sum(v[0].dual, v[1].dual, v[2].dual, v[3].dual));
    if constexpr (kHighSum) acc_high = _mm512_add_pd(acc_high, tile_sum(v[0].high, v[1].high, v[2].high, v[3].high));
  }
  const double clip = lanes_sum(acc_clip);
  // The clipped-above weight: its own sum with per-token advantages (their signs tested token by
  // token); with the row's A, CISPO's own sum or the clipped surrogate's clipped weight (every
  // clipped token is clipped on the same side), for A > 0 only.
  const double high = kTokenAdv ? lanes_sum(acc_high) : (pos ? (kHighSum ? lanes_sum(acc_high) : clip) : 0.0);
  return RowSums{lanes_sum(acc_loss),   lanes_sum(acc_kl),   clip, lanes_sum(acc_ratio),
                 lanes_sum(acc_lratio), lanes_sum(acc_dual), high};
}

// policy_loss_row for float32, bfloat16 or float16 logp/old/ref and a byte mask or float32
// weights (mask_t: uint8_t or float); `dual`: the
// caller's decision that the dual clip can act in this row (A < 0 and a finite c; the clipped
// surrogate only); `seq`: GSPO's sequence ratio, lr0 as in policy_loss_row (compiled in only for
// such rows: adding it to every row cost the per-token rows 3%); `surr`: the surrogate
// (SurrogateKind); `tau_pos` / `tau_neg`: SAPO's temperatures or DPPO's divergence bounds (for
// A > 0 and otherwise); `a_tok`: per-token advantages (the clipped surrogate, CISPO, SAPO and DPPO;
// `dual` then says the dual clip is on, its sign test is per token), or null for the row's A; `kc`: the
// coefficients of a KL estimator other than the plain k3 (kl_coefficients), or null for k3.
template <typename lp_t, typename mask_t>
inline RowSums policy_loss_row_byte16(const lp_t* logp, const lp_t* old, const lp_t* ref, const mask_t* mask,
                                      int64_t T, float A, float w_scale, float lo, float hi, float beta, float dual_c,
                                      bool dual, bool seq, float lr0, int surr, float tau_pos, float tau_neg,
                                      lp_t* grad, const float* a_tok = nullptr,
                                      const KlCoef<float>* kc = nullptr) {
  if (a_tok != nullptr) {  // per-token advantages (verl's [bs, T] ones), every surrogate
    auto token_row = [&](auto with_dual, auto with_seq, auto kind) {
      return row_byte16<lp_t, with_dual(), with_seq(), kind(), true>(logp, old, ref, mask, T, 0.0f, w_scale, lo, hi,
                                                                     beta, dual_c, lr0, tau_pos, tau_neg, grad, a_tok,
                                                                     kc);
    };
    using Clip = std::integral_constant<int, kSurrClip>;
    if (surr == kSurrCispo) {
      return seq ? token_row(std::false_type{}, std::true_type{}, std::integral_constant<int, kSurrCispo>{})
                 : token_row(std::false_type{}, std::false_type{}, std::integral_constant<int, kSurrCispo>{});
    }
    if (surr == kSurrSapo) {
      return seq ? token_row(std::false_type{}, std::true_type{}, std::integral_constant<int, kSurrSapo>{})
                 : token_row(std::false_type{}, std::false_type{}, std::integral_constant<int, kSurrSapo>{});
    }
    // DPPO: token-level ratios only; its weight cap is dual_c (+inf for none)
    if (surr == kSurrDppoTv) {
      return token_row(std::true_type{}, std::false_type{}, std::integral_constant<int, kSurrDppoTv>{});
    }
    if (surr == kSurrDppoKl) {
      return token_row(std::true_type{}, std::false_type{}, std::integral_constant<int, kSurrDppoKl>{});
    }
    if (surr == kSurrGmpo) {  // token-level ratios
      return token_row(std::false_type{}, std::false_type{}, std::integral_constant<int, kSurrGmpo>{});
    }
    if (surr == kSurrVespo) {  // token-level ratios
      return token_row(std::false_type{}, std::false_type{}, std::integral_constant<int, kSurrVespo>{});
    }
    if (dual) {
      return seq ? token_row(std::true_type{}, std::true_type{}, Clip{})
                 : token_row(std::true_type{}, std::false_type{}, Clip{});
    }
    return seq ? token_row(std::false_type{}, std::true_type{}, Clip{})
               : token_row(std::false_type{}, std::false_type{}, Clip{});
  }
  auto row = [&](auto with_dual, auto with_seq, auto kind) {
    return row_byte16<lp_t, with_dual(), with_seq(), kind()>(logp, old, ref, mask, T, A, w_scale, lo, hi, beta,
                                                             dual_c, lr0, tau_pos, tau_neg, grad, nullptr,
                                                             kc);
  };
  auto with_surr = [&](auto with_seq) {
    switch (surr) {
      case kSurrCispo:
        return row(std::false_type{}, with_seq, std::integral_constant<int, kSurrCispo>{});
      case kSurrSapo:
        return row(std::false_type{}, with_seq, std::integral_constant<int, kSurrSapo>{});
      case kSurrVespo:  // token-level ratios only: the with_seq build is never called
        return row(std::false_type{}, std::false_type{}, std::integral_constant<int, kSurrVespo>{});
      case kSurrDppoTv:  // token-level ratios too; the weight cap dual_c
        return row(std::true_type{}, std::false_type{}, std::integral_constant<int, kSurrDppoTv>{});
      case kSurrDppoKl:
        return row(std::true_type{}, std::false_type{}, std::integral_constant<int, kSurrDppoKl>{});
      case kSurrGmpo:  // token-level ratios
        return row(std::false_type{}, std::false_type{}, std::integral_constant<int, kSurrGmpo>{});
      default:
        using Clip = std::integral_constant<int, kSurrClip>;
        return dual ? row(std::true_type{}, with_seq, Clip{}) : row(std::false_type{}, with_seq, Clip{});
    }
  };
  return seq ? with_surr(std::true_type{}) : with_surr(std::false_type{});
}

}  // namespace IAMA_ISA_NAMESPACE
}  // namespace iama::cpu
