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

// A probability clamped to [1e-6, 1 - 1e-6] (a NaN stays NaN, as torch.clamp).
template <typename acc_t>
IAMA_HD inline acc_t clamp_correction_prob(acc_t x) {
  const acc_t lo = static_cast<acc_t>(kCorrectionProbBound), hi = static_cast<acc_t>(1.0 - kCorrectionProbBound);
  return x < lo ? lo : (x > hi ? hi : x);
}

// The gate statistic of one token from its two log-probs (d = old - rollout, ratio = e^d).
template <typename acc_t>
IAMA_HD inline acc_t correction_token_statistic(int gate, acc_t old, acc_t rollout, acc_t ratio) {
  if (gate == kGateRatio) return ratio;
  const acc_t ep = exp_acc(rollout), eq = exp_acc(old);
  const acc_t p = clamp_correction_prob(ep), q = clamp_correction_prob(eq);
  if (gate == kGateTv) return p > q ? p - q : q - p;
  // 1 - p as -expm1(rollout) (k3 + x is expm1(x)), clamped itself: 1 - 1e-6 is not a float32,
  // and 1 - p of a clamped p is 1.0133e-6, which puts a token's KL ~1e-5 off where the other
  // probability is not clamped; 1 - e^x also loses the digits of any probability near 1.
  const acc_t np = clamp_correction_prob(-(k3_from_exp(rollout, ep) + rollout));
  const acc_t nq = clamp_correction_prob(-(k3_from_exp(old, eq) + old));
  // A binary KL is >= 0; in float32 the two terms' rounding leaves it below 0 for about one token
  // in ten at a log-prob mismatch of 1e-3, which a lower bound of 0 would drop: held at 0.
  const acc_t kl = p * log_acc(p / q) + np * log_acc(np / nq);
  return kl < acc_t(0) ? acc_t(0) : kl;  // (a NaN stays NaN)
}

// One row with its unit, gate and mode fixed at compile time: writes weights[0, T) and returns its
// sums. low_bound/high_bound: the bounds of the statistic (and of the clipped ratio in clip mode).
//
// As policy_loss_row (loss.h), tokens go in tiles of kTile: a loop with no branch and no
// cross-token dependency writes each token's weight and its terms into small arrays (GCC
// vectorises it), each array is summed pairwise in acc_t down to 8 lanes, added lane by lane to
// 8 double accumulators, summed pairwise at the end of the row. A token with a zero mask is
// selected out on load (its log-probs replaced by 0: padding, NaN included, never reaches a sum
// or a weight) and weighs 0.
template <bool kSequence, int kGate, bool kClip, typename in_t, typename mask_t, typename acc_t, typename w_t>
IAMA_HD inline CorrectionRow correction_row_fixed(const in_t* __restrict__ old, const in_t* __restrict__ rollout,
                                                  const mask_t* __restrict__ mask, int64_t T, double low_bound,
                                                  double high_bound, w_t* __restrict__ weights) {
  // The tokens' statistics compare with the bounds in acc_t, a row's (a double) in double.
  const acc_t low = static_cast<acc_t>(low_bound), high = static_cast<acc_t>(high_bound);
  constexpr int kTile = 64;
  acc_t t_d[kTile], t_m[kTile], t_x[kTile];  // m d, m, and the dropped mass or m times the statistic
  double lane_d[8], lane_m[8], lane_x[8];
  for (int j = 0; j < 8; ++j) lane_d[j] = lane_m[j] = lane_x[j] = 0.0;
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int len = (T - t0) < kTile ? static_cast<int>(T - t0) : kTile;
    // The mask's values as acc_t first: tested in acc_t, not (as GCC would fold the test) in the
    // mask's type, whose narrower flags mixed with float ones keep the loop below scalar.
    for (int j = 0; j < len; ++j) t_m[j] = static_cast<acc_t>(mask[t0 + j]);
    for (int j = 0; j < len; ++j) {
      const int64_t t = t0 + j;
      const acc_t m = t_m[j];
      const bool live = m != acc_t(0);
      // Loaded unconditionally, then selected: a conditional load would be a masked one, which
      // GCC does not always vectorise.
      const acc_t o_in = static_cast<acc_t>(old[t]), r_in = static_cast<acc_t>(rollout[t]);
      const acc_t o = live ? o_in : acc_t(0);
      const acc_t r = live ? r_in : acc_t(0);
      const acc_t d = o - r;
      t_d[j] = d * m;
      if constexpr (kSequence) {
        t_x[j] = kGate == kGateRatio ? acc_t(0) : correction_token_statistic<acc_t>(kGate, o, r, acc_t(1)) * m;
      } else {
        const acc_t ratio = exp_acc(d);
        const acc_t stat = correction_token_statistic<acc_t>(kGate, o, r, ratio);
        // (Selects of floats only: GCC does not vectorise this loop where two comparisons'
        // flags are combined and then select a float.)
        acc_t coef, dropped_mass;  // m for a dropped token (m is 0 for a masked one), else 0
        if constexpr (kClip) {  // a NaN ratio is neither below nor above, and stays NaN
          dropped_mass = (stat < low ? m : acc_t(0)) + (stat > high ? m : acc_t(0));  // (low <= high)
          const acc_t above_low = ratio < low ? low : ratio;
          coef = above_low > high ? high : above_low;
        } else {  // kept where low <= stat <= high: a NaN statistic drops its token
          const acc_t kept_ratio = stat >= low ? (stat <= high ? ratio : acc_t(0)) : acc_t(0);
          dropped_mass = stat >= low ? (stat <= high ? acc_t(0) : m) : m;
          coef = kept_ratio;
        }
        t_x[j] = dropped_mass;
        weights[t] = static_cast<w_t>(coef * m);  // (a masked token's coef is finite: d = 0)
      }
    }
    for (int j = len; j < kTile; ++j) t_d[j] = t_m[j] = t_x[j] = acc_t(0);
    for (int width = kTile / 2; width >= 8; width /= 2) {
      for (int j = 0; j < width; ++j) {
        t_d[j] += t_d[j + width];
        t_m[j] += t_m[j + width];
        t_x[j] += t_x[j + width];
      }
    }
    for (int j = 0; j < 8; ++j) {
      lane_d[j] += static_cast<double>(t_d[j]);
      lane_m[j] += static_cast<double>(t_m[j]);
      lane_x[j] += static_cast<double>(t_x[j]);
    }
  }
  for (int width = 4; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) {
      lane_d[j] += lane_d[j + width];
      lane_m[j] += lane_m[j + width];
      lane_x[j] += lane_x[j + width];
    }
  }
  CorrectionRow row;
  row.log_ratio_sum = lane_d[0];
  row.mask_sum = lane_m[0];
  if (!kSequence) {
    row.dropped = lane_x[0];
    return row;
  }
  // The row's statistic from its means (0 / 0 for an empty row: NaN, which drops it).
  const double mean = (kGate == kGateRatio ? row.log_ratio_sum : lane_x[0]) / row.mask_sum;
  row.statistic = kGate == kGateRatio ? ::exp(mean) : mean;
  const bool kept = row.statistic >= low_bound && row.statistic <= high_bound;
  row.dropped = kept ? 0.0 : 1.0;
  if (!kept) {
    for (int64_t t = 0; t < T; ++t) weights[t] = w_t(0);
    return row;
  }
  for (int64_t t = 0; t < T; ++t) {
    const acc_t m = static_cast<acc_t>(mask[t]);
    const bool live = m != acc_t(0);
    const acc_t o_in = static_cast<acc_t>(old[t]), r_in = static_cast<acc_t>(rollout[t]);
    const acc_t o = live ? o_in : acc_t(0);
    const acc_t r = live ? r_in : acc_t(0);
    weights[t] = static_cast<w_t>(live ? exp_acc(o - r) * m : acc_t(0));
  }
  return row;
}

// One row, the unit (sequence), gate (CorrectionGate) and mode (clip) chosen at run time.
template <typename in_t, typename mask_t, typename acc_t, typename w_t>
IAMA_HD inline CorrectionRow correction_row(const in_t* __restrict__ old, const in_t* __restrict__ rollout,
                                            const mask_t* __restrict__ mask, int64_t T, bool sequence, int gate,
                                            bool clip, double low_bound, double high_bound,
                                            w_t* __restrict__ weights) {
#define IAMA_CORRECTION_ROW(seq, g, c) \
  correction_row_fixed<seq, g, c, in_t, mask_t, acc_t, w_t>(old, rollout, mask, T, low_bound, high_bound, weights)
  if (sequence) {
    if (gate == kGateRatio) return IAMA_CORRECTION_ROW(true, kGateRatio, false);
    if (gate == kGateTv) return IAMA_CORRECTION_ROW(true, kGateTv, false);
    return IAMA_CORRECTION_ROW(true, kGateBinaryKl, false);
  }
  if (clip) return IAMA_CORRECTION_ROW(false, kGateRatio, true);  // (clip mode takes the ratio gate)
  if (gate == kGateRatio) return IAMA_CORRECTION_ROW(false, kGateRatio, false);
  if (gate == kGateTv) return IAMA_CORRECTION_ROW(false, kGateTv, false);
  return IAMA_CORRECTION_ROW(false, kGateBinaryKl, false);
#undef IAMA_CORRECTION_ROW
}

IAMA_NAMESPACE_END  // namespace iama
