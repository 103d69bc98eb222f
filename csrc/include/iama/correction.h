// The train/rollout correction of one row (torch-free; the CPU backend's baseline row and what a
// CUDA backend would run per row).
//
// Each token's log importance ratio d = old - rollout (log pi_old / pi_rollout), its ratio e^d,
// and a gate statistic per token: the ratio, the total variation |p - q| of the sampled token's
// probabilities, or their binary KL p log(p / q) + (1 - p) log((1 - p) / (1 - q)), with
// p = e^rollout and q = e^old clamped to [1e-6, 1 - 1e-6] and 1 - p = -expm1(rollout), 1 - q
// likewise (the KL held at >= 0). The unit is the token, or the row
// (sequence level: the exp of the row's mean d for the ratio gate, the row's mean statistic
// otherwise, means weighted by the mask). Mask mode keeps a unit whose statistic lies in
// [low, high] (a NaN statistic drops it) and gives its tokens the weight e^d; clip mode (tokens,
// ratio gate) gives every token clamp(e^d, low, high). A token's weight is that coefficient times
// its mask value; tokens with a zero mask are not read (NaN padding cannot leak) and weigh 0.
// docs/math.md section 5 has the formulas.
#pragma once

#include <cmath>
#include <cstdint>

#include "iama/common.h"

IAMA_NAMESPACE_BEGIN

enum CorrectionGate { kGateRatio = 0, kGateTv = 1, kGateBinaryKl = 2 };

// What a row leaves besides its weights: sum of m d, sum of m, the dropped share (token level:
// sum of m over dropped tokens; sequence level: 1 if the row was dropped, else 0) and the row's
// statistic (sequence level; 0 at token level).
struct CorrectionRow {
  double log_ratio_sum = 0.0;
  double mask_sum = 0.0;
  double dropped = 0.0;
  double statistic = 0.0;
};

constexpr double kCorrectionProbBound = 1e-6;

// The gate statistic of one token from its two log-probs (d = old - rollout, ratio = e^d).
template <typename acc_t>
IAMA_HD inline acc_t correction_token_statistic(int gate, acc_t old, acc_t rollout, acc_t ratio) {
  if (gate == kGateRatio) return ratio;
  const acc_t lo = static_cast<acc_t>(kCorrectionProbBound), hi = static_cast<acc_t>(1.0 - kCorrectionProbBound);
  const acc_t ep = exp_acc(rollout), eq = exp_acc(old);
  acc_t p = ep < lo ? lo : (ep > hi ? hi : ep);  // (a NaN stays NaN, as torch.clamp)
  acc_t q = eq < lo ? lo : (eq > hi ? hi : eq);
  if (gate == kGateTv) return p > q ? p - q : q - p;
  // 1 - p as -expm1(rollout) (k3 + x is expm1(x)): 1 - e^x in float32 keeps no digit of a
  // probability within 1e-6 of 1, where a likely token's binary KL lives.
  acc_t np = -(k3_from_exp(rollout, ep) + rollout), nq = -(k3_from_exp(old, eq) + old);
  np = np < lo ? lo : (np > hi ? hi : np);
  nq = nq < lo ? lo : (nq > hi ? hi : nq);
  // A binary KL is >= 0; in float32 the two terms' rounding leaves it below 0 for about one token
  // in ten at a log-prob mismatch of 1e-3, which a lower bound of 0 would drop: held at 0.
  const acc_t kl = p * log_acc(p / q) + np * log_acc(np / nq);
  return kl < acc_t(0) ? acc_t(0) : kl;  // (a NaN stays NaN)
}

// One row: writes weights[0, T) and returns its sums. low/high: the bounds of the statistic (and
// of the clipped ratio in clip mode). sequence: the row is the unit; clip: clip mode.
template <typename in_t, typename mask_t, typename acc_t, typename w_t>
IAMA_HD inline CorrectionRow correction_row(const in_t* __restrict__ old, const in_t* __restrict__ rollout,
                                            const mask_t* __restrict__ mask, int64_t T, bool sequence, int gate,
                                            bool clip, acc_t low, acc_t high, w_t* __restrict__ weights) {
  CorrectionRow row;
  double stat_sum = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const acc_t m = static_cast<acc_t>(mask[t]);
    if (m == acc_t(0)) {
      weights[t] = w_t(0);
      continue;
    }
    const acc_t o = static_cast<acc_t>(old[t]), r = static_cast<acc_t>(rollout[t]);
    const acc_t d = o - r;
    row.log_ratio_sum += static_cast<double>(d * m);
    row.mask_sum += static_cast<double>(m);
    if (sequence) {
      if (gate != kGateRatio) stat_sum += static_cast<double>(correction_token_statistic<acc_t>(gate, o, r, d) * m);
      continue;
    }
    const acc_t ratio = exp_acc(d);
    const acc_t stat = correction_token_statistic<acc_t>(gate, o, r, ratio);
    acc_t coef;
    bool dropped;
    if (clip) {
      dropped = stat < low || stat > high;  // a NaN ratio is neither, and stays NaN
      coef = ratio < low ? low : (ratio > high ? high : ratio);
    } else {
      dropped = !(stat >= low && stat <= high);
      coef = dropped ? acc_t(0) : ratio;
    }
    if (dropped) row.dropped += static_cast<double>(m);
    weights[t] = static_cast<w_t>(coef * m);
  }
  if (!sequence) return row;
  // The row's statistic from its means (0 / 0 for an empty row: NaN, which drops it).
  const double mean = (gate == kGateRatio ? row.log_ratio_sum : stat_sum) / row.mask_sum;
  row.statistic = gate == kGateRatio ? ::exp(mean) : mean;
  const bool kept = row.statistic >= static_cast<double>(low) && row.statistic <= static_cast<double>(high);
  row.dropped = kept ? 0.0 : 1.0;
  for (int64_t t = 0; t < T; ++t) {
    const acc_t m = static_cast<acc_t>(mask[t]);
    if (!kept || m == acc_t(0)) {
      weights[t] = w_t(0);
      continue;
    }
    const acc_t d = static_cast<acc_t>(old[t]) - static_cast<acc_t>(rollout[t]);
    weights[t] = static_cast<w_t>(exp_acc(d) * m);
  }
  return row;
}

IAMA_NAMESPACE_END  // namespace iama
