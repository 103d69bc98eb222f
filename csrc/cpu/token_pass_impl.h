// Templates of the token pass, included by token_pass_generic.cpp and token_pass_avx2.cpp (each
// compiles them for its instruction set, in its own iama::<IAMA_ISA_NAMESPACE>).
//
// at::parallel_for over blocks of rows; each row is handled by iama::policy_loss_row (the tiled,
// vectorisable loop of csrc/include/iama/loss.h) and leaves its sums in its own slot, which the
// caller adds in row order, so the result does not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "iama/loss.h"
#include "token_pass.h"

namespace iama::cpu {
namespace IAMA_ISA_NAMESPACE {

// One row of the pass: its loss terms and gradient, its sums in out[0 .. kRowFields). `mk` is the
// row's mask as the row loops read it (bytes, or weights in the compute dtype; see
// token_kernel), msum its sum.
template <typename lp_t, typename aux_t, typename mask_t>
void token_row(const TokenProblem& p, int64_t r, const mask_t* mk, double msum, double* out) {
  using acc_t = std::conditional_t<std::is_same_v<lp_t, double>, double, float>;
  const bool gmpo = p.surrogate == kSurrGmpo;
  // The clip range of the ratio, or GMPO's of the log-ratio.
  const acc_t lo = static_cast<acc_t>(gmpo ? -p.eps_low : 1.0 - p.eps_low);
  const acc_t hi = static_cast<acc_t>(gmpo ? p.eps_high : 1.0 + p.eps_high);
  const acc_t beta = static_cast<acc_t>(p.beta);
  const acc_t dual_c = static_cast<acc_t>(p.dual_clip);
  const bool has_dual = std::isfinite(p.dual_clip);  // +inf: the dual clip is off
  const acc_t tau_pos = static_cast<acc_t>(p.tau_pos);
  const acc_t tau_neg = static_cast<acc_t>(p.tau_neg);
  const double w_scale =
      p.loss_type == kLossGrpo ? 1.0 / (static_cast<double>(p.S) * std::max(1.0, msum)) : p.uniform_scale;
  const lp_t* lp_row = static_cast<const lp_t*>(p.logp) + r * p.s_logp;
  const aux_t* old_row = static_cast<const aux_t*>(p.old) + r * p.s_old;
  acc_t lr0 = acc_t(0);
  if (p.seq_old != nullptr) {  // GSPO: the row's mean log-ratio, then `old` := logp itself
    lr0 = static_cast<acc_t>(row_mean_log_ratio<lp_t, aux_t, mask_t, acc_t>(lp_row, old_row, mk, p.T));
    old_row = static_cast<const aux_t*>(p.seq_old) + r * p.s_seq_old;
  }
  const aux_t* ref_row = static_cast<const aux_t*>(p.ref) + r * p.s_ref;
  lp_t* grad_row = static_cast<lp_t*>(p.grad) + r * p.T;
  const bool token_adv = p.adv_tokens != nullptr;
  acc_t A = token_adv ? acc_t(0) : static_cast<acc_t>(p.adv[r]);
  const acc_t* a_row = token_adv ? static_cast<const acc_t*>(p.adv_tokens) + r * p.s_adv : nullptr;
  // SAPO's temperatures, VESPO's two weights of this row or DPPO's divergence bounds (see
  // policy_loss_row).
  const bool dppo = p.surrogate == kSurrDppoTv || p.surrogate == kSurrDppoKl;
  acc_t sign_pos = dppo ? static_cast<acc_t>(p.eps_high) : tau_pos;
  acc_t sign_neg = dppo ? static_cast<acc_t>(p.eps_low) : tau_neg;
  double row_seq = static_cast<double>(lr0);
  if (p.surrogate == kSurrVespo) {  // the row's weight, a pre-pass over logp, old and mask
    row_seq = row_vespo_log_weight<lp_t, aux_t, mask_t, acc_t>(lp_row, old_row, mk, p.T);
    // A weight past the compute dtype's range is 0, as the reference's (and TRL's) exp in
    // that dtype overflows to inf, which they set to 0.
    auto in_range = [](double phi) {
      const acc_t v = static_cast<acc_t>(phi);
      return v * acc_t(0) == acc_t(0) ? v : acc_t(0);
    };
    sign_pos = in_range(vespo_phi(row_seq, p.vespo_k_pos, p.vespo_lambda_pos));
    sign_neg = in_range(vespo_phi(row_seq, p.vespo_k_neg, p.vespo_lambda_neg));
    // Row advantages: A * phi, in double, and no per-token select.
    if (!token_adv) A = static_cast<acc_t>(p.adv[r] * static_cast<double>(p.adv[r] >= 0.0 ? sign_pos : sign_neg));
  }
  if (gmpo) {  // the row's objective G = exp(M) Abar and ratio exp(M), a pre-pass over its tokens
    double log_mean = 0.0, adv_mean = 0.0;
    if (token_adv) {
      row_gmpo_means<lp_t, aux_t, mask_t, acc_t, true>(lp_row, old_row, mk, p.T, A, a_row, lo, hi, msum, log_mean,
                                                       adv_mean);
    } else {
      row_gmpo_means<lp_t, aux_t, mask_t, acc_t, false>(lp_row, old_row, mk, p.T, A, nullptr, lo, hi, msum,
                                                        log_mean, adv_mean);
    }
    row_seq = log_mean;
    const double ratio = std::exp(log_mean);
    sign_pos = static_cast<acc_t>(ratio * adv_mean);
    sign_neg = static_cast<acc_t>(ratio);
  }
  // With one advantage per row the dual clip can act only in a row with A < 0 (and c finite);
  // the per-token rows test it token by token.
  const bool dual = has_dual && A < acc_t(0);
  const bool other_kl = p.kl_form != kKlK3;
  RowSums sums;
#ifdef IAMA_TOKEN_ROW_BYTE16
  // A build with the hand-vectorised row (token_row_byte_avx512.h) takes it for float32, bfloat16
  // and float16 log-probs (old and ref alike) with a byte mask or float32 weights, every
  // surrogate, KL estimator and kind of advantage; float64 takes the templated row, which such a
  // build then compiles for it only.
  constexpr bool kHandRow = std::is_same_v<lp_t, aux_t> &&
                            (std::is_same_v<mask_t, uint8_t> || std::is_same_v<mask_t, float>) &&
                            (std::is_same_v<lp_t, float> || std::is_same_v<lp_t, c10::BFloat16> ||
                             std::is_same_v<lp_t, c10::Half>);
#else
  constexpr bool kHandRow = false;
#endif
#ifdef IAMA_TOKEN_ROW_BYTE16
  if constexpr (kHandRow) {
    // The dual clip: the row's A < 0 and a finite c, or with per-token advantages a finite c
    // (each token's sign is tested).
    const bool row_dual = (token_adv ? has_dual : dual) && p.surrogate == kSurrClip;
    const KlCoef<float> kc = kl_coefficients<float>(p.kl_form);
    // (sign_pos / sign_neg: SAPO's temperatures, DPPO's divergence bounds, GMPO's row objective
    // and ratio, or VESPO's row weights, which with row advantages are already in A)
    sums = policy_loss_row_byte16<lp_t>(lp_row, old_row, ref_row, mk, p.T, A, static_cast<float>(w_scale), lo, hi,
                                        beta, dual_c, row_dual, p.seq_old != nullptr, lr0, p.surrogate, sign_pos,
                                        sign_neg, grad_row, token_adv ? a_row : nullptr, other_kl ? &kc : nullptr);
  } else  // (the templated rows below are then not compiled for these types)
#endif
  if constexpr (std::is_same_v<lp_t, double>) {
    // float64: one build with run-time flags (see policy_loss_row's kRuntimeFlags).
    RowFlags flags;
    flags.kl_form = p.kl_form;
    flags.token_adv = token_adv;
    flags.dual = dppo || (p.surrogate == kSurrClip && (token_adv || dual));
    flags.surr = p.surrogate;
    sums = policy_loss_row<lp_t, aux_t, mask_t, acc_t, false, false, true, kSurrClip, true>(
        lp_row, old_row, ref_row, mk, p.T, A, static_cast<acc_t>(w_scale), lo, hi, beta, dual_c, grad_row, a_row,
        lr0, sign_pos, sign_neg, flags);
  } else {
    const acc_t ws = static_cast<acc_t>(w_scale);
    // The run-time flags as template arguments (each a bool_constant or integral_constant):
    // see policy_loss_row.
    using Clip = std::integral_constant<int, kSurrClip>;
    auto row = [&](auto other_kl, auto per_token, auto with_dual, auto surr) -> RowSums {
      return policy_loss_row<lp_t, aux_t, mask_t, acc_t, other_kl(), per_token(), with_dual(), surr()>(
          lp_row, old_row, ref_row, mk, p.T, A, ws, lo, hi, beta, dual_c, grad_row, a_row, lr0, sign_pos, sign_neg,
          RowFlags{}, p.kl_form);
    };
    auto with_dual = [&](auto other_kl, auto per_token) {
      if constexpr (per_token()) {  // one build: the dual clip is tested token by token
        return row(other_kl, per_token, std::true_type{}, Clip{});
      } else {
        return dual ? row(other_kl, per_token, std::true_type{}, Clip{})
                    : row(other_kl, per_token, std::false_type{}, Clip{});
      }
    };
    // CISPO, SAPO, VESPO and GMPO have no dual clip (the glue refuses one); DPPO's caps its
    // weight.
    auto with_surrogate = [&](auto other_kl, auto per_token) {
      switch (p.surrogate) {
        case kSurrCispo:
          return row(other_kl, per_token, std::false_type{}, std::integral_constant<int, kSurrCispo>{});
        case kSurrSapo:
          return row(other_kl, per_token, std::false_type{}, std::integral_constant<int, kSurrSapo>{});
        case kSurrVespo:
          return row(other_kl, per_token, std::false_type{}, std::integral_constant<int, kSurrVespo>{});
        case kSurrGmpo:
          return row(other_kl, per_token, std::false_type{}, std::integral_constant<int, kSurrGmpo>{});
        case kSurrDppoTv:  // DPPO's weight cap is dual_c, and its truncated tokens the dual sum
          return row(other_kl, per_token, std::true_type{}, std::integral_constant<int, kSurrDppoTv>{});
        case kSurrDppoKl:
          return row(other_kl, per_token, std::true_type{}, std::integral_constant<int, kSurrDppoKl>{});
        default:
          return with_dual(other_kl, per_token);
      }
    };
    auto with_adv = [&](auto other_kl) {
      return token_adv ? with_surrogate(other_kl, std::true_type{}) : with_surrogate(other_kl, std::false_type{});
    };
    // The plain k3 in rows of its own (a compile-time form); every other estimator in one more
    // set, which reads p.kl_form.
    sums = other_kl ? with_adv(std::true_type{}) : with_adv(std::false_type{});
  }
  out[0] = sums.loss;
  out[1] = sums.kl;
  out[2] = sums.clip;
  out[3] = sums.ratio;
  out[4] = msum;
  out[5] = sums.lratio;
  out[6] = sums.dual;
  out[7] = sums.high;
  out[8] = row_seq;
}

// Narrows a row's mask to bytes (0 or 1) and returns whether each of its values is 0 or 1, when
// the bytes say all it says. (Branch-free, so that it vectorises.)
template <typename src_t>
bool narrow_mask_row(const src_t* __restrict__ src, int64_t T, uint8_t* __restrict__ bytes) {
  uint8_t binary = 1;
  for (int64_t t = 0; t < T; ++t) {
    const src_t v = src[t];
    bytes[t] = static_cast<uint8_t>(v != src_t(0));
    binary &= static_cast<uint8_t>((v == src_t(0)) | (v == src_t(1)));
  }
  return binary != 0;
}

// The pass over every row, at::parallel_for over blocks of rows. The row loops read a mask of
// bytes or of weights in the compute dtype, and nothing else: a mask of other values (TRL's and
// verl's int64, an int32 one, float weights) is narrowed to bytes row by row when its row holds
// only 0 and 1 (then it takes the byte rows, the hand-vectorised one included), else read as
// weights in the compute dtype (converted row by row from an integer type). An int64 mask read in
// the row loops themselves kept them from vectorising (1.75x the bool mask's time), and a row
// build per mask type multiplied the build time.
template <typename lp_t, typename src_mask_t>
void token_kernel(const TokenProblem& p, std::vector<double>& rows) {
  using acc_t = std::conditional_t<std::is_same_v<lp_t, double>, double, float>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.T));
  at::parallel_for(0, p.S, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> bytes;
    std::vector<acc_t> weights;
    for (int64_t r = begin; r < end; ++r) {
      const src_mask_t* mk = static_cast<const src_mask_t*>(p.mask) + r * p.s_mask;
      double* out = rows.data() + r * kRowFields;
      if constexpr (std::is_same_v<src_mask_t, uint8_t>) {
        const double msum = p.row_mask_sums != nullptr ? p.row_mask_sums[r] : mask_row_sum(mk, p.T);
        token_row<lp_t, lp_t, uint8_t>(p, r, mk, msum, out);
      } else {
        bytes.resize(static_cast<size_t>(p.T));
        const bool binary = narrow_mask_row(mk, p.T, bytes.data());
        // A 0/1 row's sum is its bytes' (exact; a byte sum reads the narrow copy, and for a float
        // mask it replaces a sum in double, which does not vectorise).
        const double msum = p.row_mask_sums != nullptr ? p.row_mask_sums[r]
                            : binary                   ? mask_row_sum(bytes.data(), p.T)
                                                       : mask_row_sum(mk, p.T);
        if (binary) {
          token_row<lp_t, lp_t, uint8_t>(p, r, bytes.data(), msum, out);
        } else if constexpr (std::is_same_v<src_mask_t, acc_t>) {
          token_row<lp_t, lp_t, acc_t>(p, r, mk, msum, out);
        } else {
          weights.resize(static_cast<size_t>(p.T));
          for (int64_t t = 0; t < p.T; ++t) weights[t] = static_cast<acc_t>(mk[t]);
          token_row<lp_t, lp_t, acc_t>(p, r, weights.data(), msum, out);
        }
      }
    }
  });
}

template <typename lp_t>
void dispatch_mask(const TokenProblem& p, std::vector<double>& rows) {
  using acc_t = std::conditional_t<std::is_same_v<lp_t, double>, double, float>;
  switch (p.mask_kind) {
    case MaskKind::kByte:
      token_kernel<lp_t, uint8_t>(p, rows);
      break;
    case MaskKind::kInt64:
      token_kernel<lp_t, int64_t>(p, rows);
      break;
    case MaskKind::kInt32:
      token_kernel<lp_t, int32_t>(p, rows);
      break;
    case MaskKind::kCompute:
      token_kernel<lp_t, acc_t>(p, rows);
      break;
  }
}

// logp dtype (old and ref in the same one) x the mask the rows read (bytes or compute-dtype
// weights) x (the plain k3 or another KL estimator x row advantages with or without the dual
// clip, or per-token advantages, for the clipped surrogate, and row or per-token advantages for
// each of CISPO, SAPO, VESPO, the two DPPOs and GMPO; float64 in one build with run-time flags):
// 8 token rows, 182 row instantiations, about half a second of compilation each per instruction set, the bulk of the
// extension's build; a new dimension multiplies it (the mask's source type does not: it is
// narrowed or converted before the row). The AVX-512 build compiles only float64's 2 of them: its
// hand row takes the other dtypes, in 24 builds per dtype and mask (surrogate, kind of
// advantage, dual clip, sequence ratio).
inline void dispatch_token_pass(const TokenProblem& p, std::vector<double>& rows) {
  switch (p.logp_dtype) {
    case TokenDtype::kFloat32:
      dispatch_mask<float>(p, rows);
      break;
    case TokenDtype::kFloat64:
      dispatch_mask<double>(p, rows);
      break;
    case TokenDtype::kFloat16:
      dispatch_mask<c10::Half>(p, rows);
      break;
    case TokenDtype::kBFloat16:
      dispatch_mask<c10::BFloat16>(p, rows);
      break;
  }
}

}  // namespace IAMA_ISA_NAMESPACE
}  // namespace iama::cpu
