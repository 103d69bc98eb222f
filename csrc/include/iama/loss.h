// The clipped-ratio + k3-KL policy loss per token, forward and backward (SPEC section 5).
//
// Per token, with m the mask weight and w = m * w_scale its aggregation weight:
//   ratio = exp(logp - old);  active = ratio A <= clip(ratio, 1 - eps_low, 1 + eps_high) A
//   dual  = A < 0 and ratio > c   (dual-clip PPO, c = dual_clip; c = +inf turns it off)
//   kl    = exp(ref - logp) - (ref - logp) - 1
//   surr  = c A if dual else (ratio A if active else clip(ratio) A)
//   loss  = w (beta kl - surr)
//   grad  = w (-(ratio A if active and not dual else 0) + beta (1 - exp(ref - logp)))  (d loss / d logp)
// The KL estimator (KlForm; other_kl with its coefficients KlCoef, else the plain k3), with
// x = logp - ref, value and derivative in logp:
//   k3 (above)       exp(-x) + x - 1, 1 - exp(-x)
//   ratio k3 (TRL's bias-corrected KL, the ratio not detached): ratio * k3, its derivative
//                    ratio * k3 + ratio * (1 - exp(-x)) = ratio * x
//   k2               x^2 / 2, x          k1   x, 1          abs   |x|, sign(x) (NaN stays NaN)
//   + kKlStraight    the value as above, the derivative k2's: x (verl's "k3+", "k1+", "abs+")
// Two other surrogates replace `surr` and its gradient (the KL term and the weights stay):
//   CISPO  surr = sg[clip(ratio)] A logp, grad -w clip(ratio) A; clipped: ratio outside the range
//          (whatever A), clipped above: ratio > 1 + eps_high with A > 0; no dual clip.
//   SAPO   surr = (4 / tau) s A with s = sigmoid(tau (ratio - 1)), tau = tau_pos if A > 0 else
//          tau_neg; grad -w 4 s (1 - s) ratio A, where 1 - s = e s with e = exp(-tau (ratio - 1))
//          (no cancellation as s -> 1), and 0 where the gate has saturated (e = 0 or inf, where
//          the product would be 0 * inf); never clipped.
//   VESPO  surr = A logp, grad -w A, where the caller has already multiplied A by the row's
//          detached gamma weight phi (vespo_phi below; per-token advantages: policy_loss_row
//          picks phi_pos or phi_neg by the token's sign); never clipped.
//   DPPO   surr = sg[min(rho', c) v] A logp, grad -w min(rho', c) v A, with rho' = exp(clamp(logp -
//          old, -20, 20)) (verl's clamp), c = dual_c (+inf: no cap) and v DPPO's trust region on
//          p = exp(logp), q = exp(old) with the divergence bounds d_hi (A > 0) and d_lo (else),
//          passed in tau_pos and tau_neg: total variation v = p - q <= d_hi, resp. p - q >= -d_lo;
//          binary KL k = q (old - logp) + (1 - q) log((1 - q + 1e-8) / (1 - p + 1e-8)),
//          v = k <= d_hi or p <= q, resp. k <= d_lo or p >= q. Clipped: v false (above: A > 0);
//          dual: v true and rho' > c.
//   GMPO   the row's objective G = exp(M) Abar, M the mask-weighted mean over the row of the
//          sign-aware clipped log-ratios (min(lr, eps_high) where A > 0, max(lr, -eps_low) where
//          A < 0, 0 where A = 0; row_gmpo_means) and Abar the row's mean advantage: every token's
//          surr is G (so the row's tokens aggregate to its objective), grad -w G where the
//          token's log-ratio is not clipped and A != 0, else 0 (the derivative of the row's w-sum
//          of G). The caller passes the log-space bounds -eps_low and eps_high as lo and hi, G as
//          tau_pos and exp(M) as tau_neg (each token's ratio in the metrics); clipped: A > 0 and
//          lr > hi (above) or A < 0 and lr < lo; no dual clip.
// The log-ratio is (logp - old) + lr0. Per-token ratios have lr0 = 0; GSPO's sequence ratio
// passes old = logp (so logp - old is exactly 0) and lr0 = the row's mean log-ratio: the token's
// log-ratio is then sg[lr0] + logp - sg[logp], whose derivative in logp is 1 as for a token ratio,
// so every formula above holds unchanged.
// Tokens with m == 0 are never read into the arithmetic: their inputs are replaced by 0 before
// use (so NaN/inf padding cannot leak) and they contribute exactly 0.
#pragma once

#include "common.h"

IAMA_NAMESPACE_BEGIN

// A KL estimator other than the plain k3 as coefficients of its pieces, so that the rows reading
// it at run time stay branch-free (selects on a run-time form kept GCC from vectorising the token
// loop: 13x slower). With x = logp - ref:
//   value       (c3 + cr rho) k3 + c2 x^2 / 2 + c1 x + ca |x|
//   derivative  (er rho + e2) x + e1 + ea sign(x)
// where k3 and rho are capped at k3_cap and rho_cap: +inf where their coefficients are 1, a large
// finite value where they are 0, so that an overflowing exp is never multiplied by a 0
// coefficient (0 * inf = NaN); a NaN stays NaN. (A cap, not a second exp at a zeroed exponent:
// that cost TRL's ratio k3 40 %.) The plain k3's derivative 1 - exp(-x) is not among them: the
// plain k3 has rows of its own, and "k3+" takes k2's.
template <typename acc_t>
struct KlCoef {
  acc_t k3_cap, rho_cap, c3, cr, c2, c1, ca, er, e2, e1, ea;
};

template <typename acc_t>
IAMA_HD inline KlCoef<acc_t> kl_coefficients(int kl_form) {
  const acc_t o(1), z(0);
  const int form = kl_form & ~kKlStraight;
  const bool k3 = form == kKlK3, ratio = form == kKlRatioK3;
  KlCoef<acc_t> c;
  const acc_t huge(3.0e38), inf = static_cast<acc_t>(INFINITY);  // (huge: finite in float32)
  c.k3_cap = k3 || ratio ? inf : huge;
  c.rho_cap = ratio ? inf : huge;
  c.c3 = k3 ? o : z;
  c.cr = ratio ? o : z;
  c.c2 = form == kKlK2 ? o : z;
  c.c1 = form == kKlK1 ? o : z;
  c.ca = form == kKlAbs ? o : z;
  const bool straight = (kl_form & kKlStraight) != 0;  // k2's derivative x, whatever the value
  c.er = ratio ? o : z;
  c.e2 = form == kKlK2 || straight ? o : z;
  c.e1 = form == kKlK1 && !straight ? o : z;
  c.ea = form == kKlAbs && !straight ? o : z;
  return c;
}

template <typename acc_t>
struct TokenTerms {
  acc_t grad;   // d loss / d logp
  acc_t loss;   // the token's share of the loss
  acc_t kl;     // m * kl
  acc_t clip;   // m if the clipped term is strictly active (CISPO: the weight is clipped), else 0
  acc_t ratio;  // m * ratio
  acc_t lratio; // m * (logp - old)
  acc_t dual;   // m if the dual clip is active, else 0
  acc_t high;   // m if clipped with A > 0 (ratio > 1 + eps_high)
};

// Always inlined: `surr` is then a constant in each row's loop and the other surrogates' code
// is dropped; as a call (GCC stopped inlining it once the DPPO branch was added) the per-token
// rows ran 10x slower, unvectorised.
template <typename acc_t>
IAMA_HD IAMA_INLINE TokenTerms<acc_t> token_terms(acc_t m, acc_t lp, acc_t old, acc_t ref, acc_t A, acc_t w_scale,
                                             acc_t lo, acc_t hi, acc_t beta, acc_t dual_c,
                                             bool other_kl = false, bool use_dual = true,
                                             acc_t lr0 = acc_t(0), int surr = kSurrClip,
                                             acc_t tau_pos = acc_t(1), acc_t tau_neg = acc_t(1),
                                             const KlCoef<acc_t>& kc = KlCoef<acc_t>{}) {
  const bool keep = m != acc_t(0);
  // old enters only through the log-ratio, which is selected as a whole (one select, as for lp).
  lp = keep ? lp : acc_t(0);
  ref = keep ? ref : acc_t(0);
  const acc_t lr = keep ? (lp - old) + lr0 : acc_t(0);
  const acc_t ratio = exp_acc(lr);
  const acc_t clipped = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const acc_t unclipped_term = ratio * A;
  acc_t surrogate, d_surr;  // the policy term and its derivative in logp
  bool clip_flag, high_flag, dual = false;
  if (surr == kSurrGmpo) {
    // Clipped: lr > hi where A > 0, -lr > -lo where A < 0, never where A = 0; as one compare of
    // selected values (two compares or'ed kept GCC from vectorising the token loop: 8x slower).
    // A NaN log-ratio is never clipped, so it reaches the gradient through G, which it has
    // already made NaN.
    const bool pos = A > acc_t(0);
    const acc_t bound = pos ? hi : (A < acc_t(0) ? -lo : static_cast<acc_t>(INFINITY));
    clip_flag = (pos ? lr : -lr) > bound;
    high_flag = (pos ? lr : hi) > hi;
    surrogate = tau_pos;
    d_surr = clip_flag ? acc_t(0) : (A != acc_t(0) ? tau_pos : acc_t(0));
  } else if (surr == kSurrVespo) {
    surrogate = A * lp;
    d_surr = A;
    clip_flag = high_flag = false;
  } else if (surr == kSurrDppoTv || surr == kSurrDppoKl) {
    const acc_t bound = acc_t(20);
    const acc_t rho = exp_acc(lr < -bound ? -bound : (lr > bound ? bound : lr));
    const acc_t q_log = keep ? old : acc_t(0);
    const acc_t p = exp_acc(lp), q = exp_acc(q_log);
    // Bitwise & and | on the compares, not && and ||: short-circuit branches (on random signs
    // and regions) kept GCC from vectorising the token loop.
    const bool pos = A > acc_t(0);
    bool held_pos, held_neg;
    if (surr == kSurrDppoTv) {
      held_pos = p - q <= tau_pos;
      held_neg = p - q >= -tau_neg;
    } else {
      const acc_t eps = acc_t(1e-8);
      const acc_t k = q * (q_log - lp) + (acc_t(1) - q) * log_acc((acc_t(1) - q + eps) / (acc_t(1) - p + eps));
      held_pos = (k <= tau_pos) | (p <= q);
      held_neg = (k <= tau_neg) | (p >= q);
    }
    const bool valid = (pos & held_pos) | (!pos & held_neg);
    const acc_t capped = rho < dual_c ? rho : dual_c;
    const acc_t weight = valid ? capped : acc_t(0);
    surrogate = weight * A * lp;
    d_surr = weight * A;
    clip_flag = !valid;
    high_flag = !valid & pos;
    dual = valid & (rho > dual_c);
  } else if (surr == kSurrCispo) {
    surrogate = clipped * A * lp;
    d_surr = clipped * A;
    clip_flag = clipped != ratio;  // outside [lo, hi] (verl's test; two compares or'ed kept GCC
                                   // from vectorising the token loop: 7x slower)
    high_flag = ratio > hi && A > acc_t(0);
  } else if (surr == kSurrSapo) {
    const bool pos = A > acc_t(0);
    const acc_t tau = pos ? tau_pos : tau_neg;
    const acc_t four_over_tau = pos ? acc_t(4) / tau_pos : acc_t(4) / tau_neg;  // loop-invariant
    const acc_t e = exp_acc(-tau * (ratio - acc_t(1)));
    const acc_t s = acc_t(1) / (acc_t(1) + e);
    surrogate = four_over_tau * s * A;
    // e = 0 (the gate saturated at 1: the ratio far above 1, or infinite) or e = inf (saturated at
    // 0): the derivative is 0, which the product below would make 0 * inf = NaN. (e * 0 == 0
    // tests that e is finite.)
    const bool live = e > acc_t(0) && e * acc_t(0) == acc_t(0);
    d_surr = live ? acc_t(4) * (e * s * s) * unclipped_term : acc_t(0);
    clip_flag = high_flag = false;
  } else {
    const acc_t clipped_term = clipped * A;
    const bool active = unclipped_term <= clipped_term;
    dual = use_dual && A < acc_t(0) && ratio > dual_c;
    surrogate = dual ? dual_c * A : (active ? unclipped_term : clipped_term);
    d_surr = active && !dual ? unclipped_term : acc_t(0);
    clip_flag = !active;
    high_flag = !active && A > acc_t(0);
  }
  const acc_t d = ref - lp;
  acc_t kl, dkl;
  if (!other_kl) {  // the plain k3
    const acc_t ed = exp_acc(d);
    kl = k3_from_exp(d, ed);
    dkl = acc_t(1) - ed;
  } else {  // any estimator, from its coefficients (KlCoef)
    const acc_t x = -d;
    const acc_t k3_raw = k3_from_exp(d, exp_acc(d));
    const acc_t k3 = kc.k3_cap < k3_raw ? kc.k3_cap : k3_raw;  // (a NaN stays NaN)
    const acc_t rho = kc.rho_cap < ratio ? kc.rho_cap : ratio;
    const acc_t abs_x = x < acc_t(0) ? d : x;
    const acc_t sign_x = x > acc_t(0) ? acc_t(1) : (x < acc_t(0) ? acc_t(-1) : x * acc_t(0));  // NaN stays
    kl = (kc.c3 + kc.cr * rho) * k3 + kc.c2 * (acc_t(0.5) * x * x) + kc.c1 * x + kc.ca * abs_x;
    dkl = (kc.er * rho + kc.e2) * x + kc.e1 + kc.ea * sign_x;
  }
  const acc_t w = m * w_scale;
  TokenTerms<acc_t> t;
  t.loss = keep ? (beta * kl - surrogate) * w : acc_t(0);
  t.grad = keep ? w * (beta * dkl - d_surr) : acc_t(0);
  t.kl = kl * m;
  t.clip = clip_flag ? m : acc_t(0);
  t.ratio = (surr == kSurrGmpo ? tau_neg : ratio) * m;  // GMPO: the row's geometric-mean ratio
  t.lratio = lr * m;
  t.dual = dual ? m : acc_t(0);
  t.high = high_flag ? m : acc_t(0);
  return t;
}

// Sums of one row's token terms: loss, m * kl, clipped weight, m * ratio, m * log-ratio,
// dual-clipped weight, clipped-above weight.
struct RowSums {
  double loss, kl, clip, ratio, lratio, dual, high;
};

// policy_loss_row's flags as run-time values, for a build that takes them so (kRuntimeFlags).
struct RowFlags {
  bool token_adv = false, dual = true;
  int surr = kSurrClip, kl_form = kKlK3;  // KlForm
};

// One row of T tokens: writes grad[0..T) and returns the row's sums.
//
// Tokens go in tiles of kTile: a loop with no cross-token dependency computes every token's terms
// into small arrays (it vectorises), then each array is summed pairwise in acc_t down to 8 lanes,
// which are added lane by lane to 8 double accumulators, summed pairwise at the end of the row.
// Summation error per tile is a few ulp of acc_t, and the row sum is in double, so float32 rows
// of any length keep ~1e-7 relative accuracy.
// kOtherKl: the KL estimator is kl_form (KlForm), read as KlCoef coefficients; without it the
// plain k3 (TRL's and verl's default), with no more arithmetic than its own. kTokenAdv: the
// advantage of token t is A_tok[t] (PPO's per-token advantages, e.g. GAE), not the row's A.
// kDual = false: the caller knows no token of the row is dual-clipped (a row advantage A >= 0,
// or no finite c), and the loop leaves the dual clip and its sum out. lr0: added to every token's
// log-ratio (GSPO's sequence ratio, see token_terms; 0 for per-token ratios). kSurr: the
// surrogate (SurrogateKind; CISPO, SAPO, VESPO and GMPO take kDual = false), tau_pos/tau_neg SAPO's
// temperatures, or VESPO's weights phi_pos/phi_neg of the row (for A >= 0 and A < 0; with row
// advantages the caller passes A * phi as A instead, and these are unused), or DPPO's divergence
// bounds (for A > 0 and otherwise; DPPO takes kDual = true: its dual_c caps the weight), or
// GMPO's row objective G and ratio exp(M) (lo and hi then GMPO's log-space bounds).
// kRuntimeFlags: the four flags are read from `flags` instead, one build for every combination
// (the token loop then keeps its branches and does not vectorise: for float64, where a build per
// combination would cost a quarter of the CPU extension's compile time for a dtype used to check
// results rather than to train). The same arithmetic either way: the results are identical.
template <typename lp_t, typename aux_t, typename mask_t, typename acc_t, bool kOtherKl = false, bool kTokenAdv = false,
          bool kDual = true, int kSurr = kSurrClip, bool kRuntimeFlags = false>
IAMA_HD RowSums policy_loss_row(const lp_t* __restrict__ logp, const aux_t* old, const aux_t* ref,
                                const mask_t* __restrict__ mask, int64_t T, acc_t A, acc_t w_scale, acc_t lo,
                                acc_t hi, acc_t beta, acc_t dual_c, lp_t* __restrict__ grad,
                                const acc_t* __restrict__ A_tok = nullptr, acc_t lr0 = acc_t(0),
                                acc_t tau_pos = acc_t(1), acc_t tau_neg = acc_t(1), RowFlags flags = {},
                                int kl_form = kKlK3) {
  // Compile-time constants unless kRuntimeFlags (then the branches below stay run-time ones).
  const bool other_kl = kRuntimeFlags ? flags.kl_form != kKlK3 : kOtherKl;
  const KlCoef<acc_t> kc = kl_coefficients<acc_t>(kRuntimeFlags ? flags.kl_form : kl_form);
  const bool token_adv = kRuntimeFlags ? flags.token_adv : kTokenAdv;
  const bool use_dual = kRuntimeFlags ? flags.dual : kDual;
  const int surr = kRuntimeFlags ? flags.surr : kSurr;
  // The clipped-above weight needs its own sum unless it follows from the clipped one (below).
  const bool high_sum = token_adv || surr == kSurrCispo;
  constexpr int kTile = 64;
  RowSums sums = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  acc_t t_loss[kTile], t_kl[kTile], t_clip[kTile], t_ratio[kTile], t_lratio[kTile], t_dual[kTile], t_high[kTile];
  // Each tile's 8 lanes go to 8 double accumulators (lane j of every tile into slot j): one
  // vector conversion and one vector add per tile and quantity, where a scalar sum would make
  // 8 dependent additions.
  double lane_loss[8], lane_kl[8], lane_clip[8], lane_ratio[8], lane_lratio[8], lane_dual[8], lane_high[8];
  for (int j = 0; j < 8; ++j) {
    lane_loss[j] = lane_kl[j] = lane_clip[j] = lane_ratio[j] = lane_lratio[j] = lane_dual[j] = lane_high[j] = 0.0;
  }
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int len = (T - t0) < kTile ? static_cast<int>(T - t0) : kTile;
    for (int j = 0; j < len; ++j) {
      const int64_t t = t0 + j;
      const acc_t m = static_cast<acc_t>(mask[t]);
      // A masked token's advantage may be padding (NaN). It is not replaced: token_terms selects
      // every output of a masked token by its mask (the loss and gradient) or multiplies a
      // finite term by its 0 weight, so it never reaches one. (A select here kept GCC from
      // vectorising the loop: 10x slower.)
      acc_t a = A;
      if (token_adv) a = A_tok[t];
      if (token_adv && surr == kSurrVespo) a *= a >= acc_t(0) ? tau_pos : tau_neg;
      const TokenTerms<acc_t> tt = token_terms<acc_t>(m, static_cast<acc_t>(logp[t]), static_cast<acc_t>(old[t]),
                                                      static_cast<acc_t>(ref[t]), a, w_scale, lo, hi, beta, dual_c,
                                                      other_kl, use_dual, lr0, surr, tau_pos, tau_neg, kc);
      grad[t] = static_cast<lp_t>(tt.grad);
      t_loss[j] = tt.loss;
      t_kl[j] = tt.kl;
      t_clip[j] = tt.clip;
      t_ratio[j] = tt.ratio;
      t_lratio[j] = tt.lratio;
      if (use_dual) t_dual[j] = tt.dual;
      if (high_sum) t_high[j] = tt.high;
    }
    for (int j = len; j < kTile; ++j) {
      t_loss[j] = acc_t(0);
      t_kl[j] = acc_t(0);
      t_clip[j] = acc_t(0);
      t_ratio[j] = acc_t(0);
      t_lratio[j] = acc_t(0);
      if (use_dual) t_dual[j] = acc_t(0);
      if (high_sum) t_high[j] = acc_t(0);
    }
    for (int width = kTile / 2; width >= 8; width /= 2) {
      for (int j = 0; j < width; ++j) {
        t_loss[j] += t_loss[j + width];
        t_kl[j] += t_kl[j + width];
        t_clip[j] += t_clip[j + width];
        t_ratio[j] += t_ratio[j + width];
        t_lratio[j] += t_lratio[j + width];
        if (use_dual) t_dual[j] += t_dual[j + width];
        if (high_sum) t_high[j] += t_high[j + width];
      }
    }
    for (int j = 0; j < 8; ++j) {
      lane_loss[j] += static_cast<double>(t_loss[j]);
      lane_kl[j] += static_cast<double>(t_kl[j]);
      lane_clip[j] += static_cast<double>(t_clip[j]);
      lane_ratio[j] += static_cast<double>(t_ratio[j]);
      lane_lratio[j] += static_cast<double>(t_lratio[j]);
      if (use_dual) lane_dual[j] += static_cast<double>(t_dual[j]);
      if (high_sum) lane_high[j] += static_cast<double>(t_high[j]);
    }
  }
  // The 8 lanes, pairwise in a fixed order.
  for (int width = 4; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) {
      lane_loss[j] += lane_loss[j + width];
      lane_kl[j] += lane_kl[j + width];
      lane_clip[j] += lane_clip[j + width];
      lane_ratio[j] += lane_ratio[j + width];
      lane_lratio[j] += lane_lratio[j + width];
      lane_dual[j] += lane_dual[j + width];
      lane_high[j] += lane_high[j + width];
    }
  }
  sums.loss = lane_loss[0];
  sums.kl = lane_kl[0];
  sums.clip = lane_clip[0];
  sums.ratio = lane_ratio[0];
  sums.lratio = lane_lratio[0];
  sums.dual = lane_dual[0];
  // With one advantage per row, every token the clipped surrogate clips is clipped above or every
  // one below: the clipped-above weight is the clipped weight or 0, and needs no sum of its own
  // (SAPO and VESPO clip nothing).
  if (high_sum) {
    sums.high = lane_high[0];
  } else if (surr == kSurrSapo || surr == kSurrVespo) {
    sums.high = 0.0;
  } else {
    sums.high = A > acc_t(0) ? sums.clip : 0.0;
  }
  return sums;
}

// GSPO's log sequence ratio of one row: the mean of logp - old over the tokens with a non-zero
// mask (the row's support, whatever its weights), 0 for an empty row. Each 64-token tile's
// differences go to a small array (the mask selects them: NaN padding cannot leak; the loads are
// unconditional, so the loop vectorises), summed pairwise in acc_t and added in double; the
// support is counted in a loop of its own (a combined loop did not vectorise: 3x slower).
template <typename lp_t, typename aux_t, typename mask_t, typename acc_t>
IAMA_HD inline double row_mean_log_ratio(const lp_t* __restrict__ logp, const aux_t* __restrict__ old,
                                         const mask_t* __restrict__ mask, int64_t T) {
  constexpr int kTile = 64;
  double total = 0.0;
  int64_t t0 = 0;
  for (; t0 + kTile <= T; t0 += kTile) {
    acc_t d[kTile];
    for (int j = 0; j < kTile; ++j) {
      const int64_t t = t0 + j;
      const acc_t diff = static_cast<acc_t>(logp[t]) - static_cast<acc_t>(old[t]);
      d[j] = mask[t] != mask_t(0) ? diff : acc_t(0);
    }
    for (int width = kTile / 2; width >= 1; width /= 2) {
      for (int j = 0; j < width; ++j) d[j] += d[j + width];
    }
    total += static_cast<double>(d[0]);
  }
  for (int64_t t = t0; t < T; ++t) {
    const acc_t diff = static_cast<acc_t>(logp[t]) - static_cast<acc_t>(old[t]);
    total += static_cast<double>(mask[t] != mask_t(0) ? diff : acc_t(0));
  }
  int64_t count = 0;
  for (int64_t t = 0; t < T; ++t) count += mask[t] != mask_t(0) ? 1 : 0;
  return count > 0 ? total / static_cast<double>(count) : 0.0;
}

// VESPO's log sequence weight of one row (TRL's bounds): the sum of clamp(logp - old, -20, 20)
// over the tokens with a non-zero mask, clamped to [log 1e-8, 20]. Tiled as row_mean_log_ratio
// (the mask selects each difference: NaN padding cannot leak).
template <typename lp_t, typename aux_t, typename mask_t, typename acc_t>
IAMA_HD inline double row_vespo_log_weight(const lp_t* __restrict__ logp, const aux_t* __restrict__ old,
                                           const mask_t* __restrict__ mask, int64_t T) {
  constexpr int kTile = 64;
  constexpr acc_t kBound = acc_t(20);
  auto term = [&](int64_t t) {
    acc_t diff = static_cast<acc_t>(logp[t]) - static_cast<acc_t>(old[t]);
    diff = diff < -kBound ? -kBound : (diff > kBound ? kBound : diff);
    return mask[t] != mask_t(0) ? diff : acc_t(0);
  };
  double total = 0.0;
  int64_t t0 = 0;
  for (; t0 + kTile <= T; t0 += kTile) {
    acc_t d[kTile];
    for (int j = 0; j < kTile; ++j) d[j] = term(t0 + j);
    for (int width = kTile / 2; width >= 1; width /= 2) {
      for (int j = 0; j < width; ++j) d[j] += d[j + width];
    }
    total += static_cast<double>(d[0]);
  }
  for (int64_t t = t0; t < T; ++t) total += static_cast<double>(term(t));
  constexpr double kLogWMin = -18.420680743952367;  // log(1e-8)
  return total < kLogWMin ? kLogWMin : (total > 20.0 ? 20.0 : total);
}

// GMPO's row means: over the row's tokens, weighted by their mask, the mean of the sign-aware
// clipped log-ratios (min(lr, hi) where the token's advantage is > 0, max(lr, lo) where it is
// < 0, 0 where it is 0; lo and hi the log-space bounds) into log_mean, and the mean advantage into
// adv_mean (the row's A itself unless kTokenAdv, which reads A_tok). msum: the row's mask sum; an
// empty row has means 0. Tiled as row_mean_log_ratio (the mask selects each term: NaN padding
// cannot leak; a NaN log-ratio of a kept token is not clipped away). kTokenAdv is a template
// parameter: a run-time test of A_tok guarded a load in the loop, which then stayed scalar (5x).
template <typename lp_t, typename aux_t, typename mask_t, typename acc_t, bool kTokenAdv>
IAMA_HD inline void row_gmpo_means(const lp_t* __restrict__ logp, const aux_t* __restrict__ old,
                                   const mask_t* __restrict__ mask, int64_t T, acc_t A,
                                   const acc_t* __restrict__ A_tok, acc_t lo, acc_t hi, double msum,
                                   double& log_mean, double& adv_mean) {
  constexpr int kTile = 64;
  auto advantage = [&](int64_t t) {
    if constexpr (kTokenAdv) {
      return A_tok[t];
    } else {
      return A;
    }
  };
  // max(lr, lo) = -min(-lr, -lo): one min of sign-flipped values either way, and selects in a chain
  // rather than nested on two conditions (which, inlined into the pass, kept the loop scalar).
  auto term = [&](int64_t t) {
    const acc_t a = advantage(t);
    const bool pos = a > acc_t(0);
    const acc_t sgn = pos ? acc_t(1) : acc_t(-1);
    const acc_t bound = pos ? hi : -lo;
    const acc_t x = sgn * (static_cast<acc_t>(logp[t]) - static_cast<acc_t>(old[t]));
    const acc_t c = sgn * (x > bound ? bound : x);  // (a NaN log-ratio stays NaN)
    const acc_t w = a != acc_t(0) ? static_cast<acc_t>(mask[t]) : acc_t(0);  // A = 0: the term is 0
    return w != acc_t(0) ? w * c : acc_t(0);
  };
  auto weighted_adv = [&](int64_t t) {
    const acc_t m = static_cast<acc_t>(mask[t]);
    return m != acc_t(0) ? m * advantage(t) : acc_t(0);
  };
  double total = 0.0, adv_total = 0.0;
  int64_t t0 = 0;
  for (; t0 + kTile <= T; t0 += kTile) {
    acc_t d[kTile], e[kTile];
    for (int j = 0; j < kTile; ++j) d[j] = term(t0 + j);
    for (int width = kTile / 2; width >= 1; width /= 2) {
      for (int j = 0; j < width; ++j) d[j] += d[j + width];
    }
    total += static_cast<double>(d[0]);
    if constexpr (kTokenAdv) {
      for (int j = 0; j < kTile; ++j) e[j] = weighted_adv(t0 + j);
      for (int width = kTile / 2; width >= 1; width /= 2) {
        for (int j = 0; j < width; ++j) e[j] += e[j + width];
      }
      adv_total += static_cast<double>(e[0]);
    }
  }
  for (int64_t t = t0; t < T; ++t) {
    total += static_cast<double>(term(t));
    if constexpr (kTokenAdv) adv_total += static_cast<double>(weighted_adv(t));
  }
  log_mean = msum != 0.0 ? total / msum : 0.0;
  adv_mean = !kTokenAdv ? static_cast<double>(A) : (msum != 0.0 ? adv_total / msum : 0.0);
}

// VESPO's gamma weight of a sequence with log weight log_w: exp(lambda + k log_w - lambda w),
// 1 at w = 1; 0 where it is not finite (TRL's nan_to_num). In double: a per-row scalar.
IAMA_HD inline double vespo_phi(double log_w, double k, double lambda) {
  const double phi = ::exp(lambda + k * log_w - lambda * ::exp(log_w));
  return phi == phi && phi * 0.0 == 0.0 ? phi : 0.0;
}

// The integer mask types the kernels read (bool masks as uint8). Spelled out: these headers use
// no C++ library header, for device code.
template <typename T>
struct IntegerMask {
  static constexpr bool value = false;
};
template <>
struct IntegerMask<uint8_t> {
  static constexpr bool value = true;
};
template <>
struct IntegerMask<int32_t> {
  static constexpr bool value = true;
};
template <>
struct IntegerMask<int64_t> {
  static constexpr bool value = true;
};

// Sum of a row's mask weights (the grpo normaliser and the metrics' token count), in double.
template <typename mask_t>
IAMA_HD inline double mask_row_sum(const mask_t* mask, int64_t T) {
  if constexpr (IntegerMask<mask_t>::value) {
    // bool / integer masks: an exact integer sum, which vectorises (a sum in double of converted
    // int64 values does not). Accumulated modulo 2^64 (no overflow UB): exact while it fits.
    uint64_t total = 0;
    for (int64_t t = 0; t < T; ++t) total += static_cast<uint64_t>(static_cast<int64_t>(mask[t]));
    return static_cast<double>(static_cast<int64_t>(total));
  }
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {
    for (int l = 0; l < 4; ++l) part[l] += static_cast<double>(mask[t + l]);
  }
  for (; t < T; ++t) part[0] += static_cast<double>(mask[t]);
  return (part[0] + part[1]) + (part[2] + part[3]);
}

IAMA_NAMESPACE_END  // namespace iama
