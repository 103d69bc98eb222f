// CPU glue for iama::policy_loss_fwd: checks, dtype and layout preparation, then the token pass
// (token_pass.h), which computes the per-token loss, its metrics and d loss / d logp in one pass.
//
// Half-precision log-probs are read as they are and computed in float32; the gradient is written
// in logp's dtype (the autograd backward only multiplies it by grad_output). Rows may have any
// stride as long as each row is contiguous; other layouts are copied once.
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "ops.h"
#include "token_pass.h"

namespace iama::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
policy_loss_fwd(
    const at::Tensor& logp, const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp,
    const at::Tensor& advantages, const at::Tensor& mask, double eps_low, double eps_high, double beta,
    c10::string_view loss_type, std::optional<int64_t> max_completion_length, int64_t kl_form,
    std::optional<double> dual_clip, bool seq_ratio, c10::string_view surrogate, double tau_pos, double tau_neg,
    bool row_stats, double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg) {
  check_cpu(logp, "logp");
  check_floating(logp, "logp");
  TORCH_CHECK_VALUE(logp.dim() == 2, "logp must have shape [S, T], got ", logp.sizes());
  const int64_t S = logp.size(0), T = logp.size(1);
  for (const auto& [opt, name] : {std::pair{&old_logp, "old_logp"}, std::pair{&ref_logp, "ref_logp"}}) {
    if (opt->has_value()) check_like_logp(**opt, name, logp);
  }
  check_cpu(advantages, "advantages");
  check_floating(advantages, "advantages");
  const bool token_adv = advantages.dim() == 2;
  TORCH_CHECK_VALUE((advantages.dim() == 1 && advantages.size(0) == S) || (token_adv && advantages.sizes() == logp.sizes()),
                    "advantages must have shape [S] = [", S, "] or the shape of logp ", logp.sizes(), ", got ",
                    advantages.sizes());
  check_mask(mask, logp);
  const int surr = parse_surrogate(surrogate);
  const bool gmpo = surr == kSurrGmpo;  // GMPO's bounds are on the log-ratio: eps_low may pass 1
  TORCH_CHECK_VALUE(eps_low >= 0 && (gmpo ? std::isfinite(eps_low) : eps_low <= 1),
                    gmpo ? "eps_low must be finite and >= 0 with surrogate='gmpo', got " : "eps_low must be in [0, 1], got ",
                    eps_low);
  TORCH_CHECK_VALUE(eps_high >= 0 && std::isfinite(eps_high), "eps_high must be finite and >= 0, got ", eps_high);
  TORCH_CHECK_VALUE(beta >= 0 && std::isfinite(beta), "beta must be finite and >= 0, got ", beta);
  TORCH_CHECK_VALUE(!dual_clip.has_value() || (*dual_clip > 1 && std::isfinite(*dual_clip)),
                    "dual_clip must be a finite float > 1 or None, got ", dual_clip.value_or(0.0));
  TORCH_CHECK_VALUE(beta == 0 || ref_logp.has_value(), "ref_logp is required when beta > 0 (got beta=", beta, ")");
  const int kind = parse_loss_type(loss_type);
  // KlForm: an estimator, plus kKlStraight for k3, k1 and |x| (k2's is its own gradient; the
  // ratio-weighted k3 is TRL's, differentiated as a whole).
  const int64_t kl_base = kl_form & ~int64_t(kKlStraight);
  const bool straight = (kl_form & kKlStraight) != 0;
  TORCH_CHECK_VALUE(kl_form >= 0 && kl_base <= kKlAbs && !(straight && (kl_base == kKlK2 || kl_base == kKlRatioK3)),
                    "kl_form must be an iama::KlForm code (0-4, or 8, 11, 12 with the straight-through flag), got ",
                    kl_form);
  TORCH_CHECK_VALUE(tau_pos > 0 && std::isfinite(tau_pos) && tau_neg > 0 && std::isfinite(tau_neg),
                    "tau_pos and tau_neg must be finite and > 0, got ", tau_pos, " and ", tau_neg);
  const bool dppo = surr == kSurrDppoTv || surr == kSurrDppoKl;
  TORCH_CHECK_VALUE(!dual_clip.has_value() || surr == kSurrClip || dppo,
                    "dual_clip applies to surrogate='clip' (and DPPO's weight cap) only, got '", std::string(surrogate),
                    "'");
  TORCH_CHECK_VALUE(!((dppo || gmpo) && seq_ratio), "surrogate='", std::string(surrogate),
                    "' takes token-level ratios (seq_ratio=False)");
  TORCH_CHECK_VALUE(std::isfinite(vespo_k_pos) && std::isfinite(vespo_k_neg) && vespo_lambda_pos > 0 &&
                        std::isfinite(vespo_lambda_pos) && vespo_lambda_neg > 0 && std::isfinite(vespo_lambda_neg),
                    "vespo_k_pos/_neg must be finite and vespo_lambda_pos/_neg finite and > 0, got ", vespo_k_pos,
                    ", ", vespo_lambda_pos, ", ", vespo_k_neg, ", ", vespo_lambda_neg);
  const bool vespo = surr == kSurrVespo;
  TORCH_CHECK_VALUE(!(vespo && seq_ratio), "surrogate='vespo' takes token-level ratios (seq_ratio=False)");
  TORCH_CHECK_VALUE(!max_completion_length.has_value() || *max_completion_length >= 1,
                    "max_completion_length must be a positive int, got ", max_completion_length.value_or(0));

  const at::ScalarType lp_dt = logp.scalar_type();
  const at::ScalarType ct = compute_dtype(lp_dt);
  // old/ref are read in logp's dtype when they share it, otherwise both in the compute dtype
  // (as the reference converts them); an absent one reads logp itself (ratio 1, kl 0 exactly).
  const bool mixed = (old_logp.has_value() && old_logp->scalar_type() != lp_dt) ||
                     (ref_logp.has_value() && ref_logp->scalar_type() != lp_dt);
  if (mixed && ct != lp_dt) {
    // Half-precision logp with old/ref in another dtype: the pass computes in float32 either way,
    // so logp goes in as float32 (exactly) and the gradient, computed in float32, is rounded to
    // logp's dtype once, as the kernel would have stored it: the same results, and the kernels
    // need no build for half-precision logp with float32 old/ref (a third of the token-pass
    // instantiations, and of the extension's compile time).
    auto out = policy_loss_fwd(logp.to(ct), old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, loss_type,
                               max_completion_length, kl_form, dual_clip, seq_ratio, surrogate, tau_pos, tau_neg,
                               row_stats, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg);
    std::get<9>(out) = std::get<9>(out).to(lp_dt);
    return out;
  }
  const at::ScalarType aux_dt = mixed ? ct : lp_dt;
  const at::Tensor lp = rows_contiguous(logp);
  at::Tensor lp_as_aux;
  auto aux = [&](const std::optional<at::Tensor>& t) -> at::Tensor {
    if (t.has_value()) return rows_contiguous(t->to(aux_dt));
    if (aux_dt == lp_dt) return lp;
    if (!lp_as_aux.defined()) lp_as_aux = rows_contiguous(logp.to(aux_dt));
    return lp_as_aux;
  };
  const at::Tensor old = aux(old_logp);
  // GSPO reads logp in old's dtype in place of old in its loss pass (see TokenProblem::seq_old);
  // without old_logp every ratio is 1 at either level.
  const at::Tensor seq_old = seq_ratio && old_logp.has_value() ? aux(std::nullopt) : at::Tensor();
  const at::Tensor ref = aux(ref_logp);
  const MaskKind mask_kind = mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte ? MaskKind::kByte
                             : mask.scalar_type() == at::kLong                                 ? MaskKind::kInt64
                             : mask.scalar_type() == at::kInt                                  ? MaskKind::kInt32
                                                                                               : MaskKind::kCompute;
  const at::Tensor mk = rows_contiguous(mask_kind == MaskKind::kCompute ? mask.to(ct) : mask);
  // Row advantages in double (one per row); per-token ones in the compute dtype, rows contiguous.
  const at::Tensor adv64 = token_adv ? at::Tensor() : advantages.to(ct).to(at::kDouble).contiguous();
  const at::Tensor adv_tok = token_adv ? rows_contiguous(advantages.to(ct)) : at::Tensor();

  at::Tensor grad = at::empty({S, T}, logp.options().memory_format(at::MemoryFormat::Contiguous));
  TokenProblem p;
  p.S = S;
  p.T = T;
  p.logp_dtype = lp_dt == at::kFloat    ? TokenDtype::kFloat32
                 : lp_dt == at::kDouble ? TokenDtype::kFloat64
                 : lp_dt == at::kHalf   ? TokenDtype::kFloat16
                                        : TokenDtype::kBFloat16;
  p.mask_kind = mask_kind;
  p.kl_form = static_cast<int>(kl_form);
  p.logp = lp.const_data_ptr();
  p.old = old.const_data_ptr();
  p.ref = ref.const_data_ptr();
  p.mask = mk.const_data_ptr();
  p.s_logp = lp.stride(0);
  p.s_old = old.stride(0);
  p.s_ref = ref.stride(0);
  p.s_mask = mk.stride(0);
  p.grad = grad.mutable_data_ptr();
  if (token_adv) {
    p.adv_tokens = adv_tok.const_data_ptr();
    p.s_adv = adv_tok.stride(0);
  } else {
    p.adv = adv64.const_data_ptr<double>();
  }
  p.loss_type = kind;
  p.eps_low = eps_low;
  p.eps_high = eps_high;
  p.beta = beta;
  if (dual_clip.has_value()) p.dual_clip = *dual_clip;
  p.surrogate = surr;
  p.tau_pos = tau_pos;
  p.tau_neg = tau_neg;
  p.vespo_k_pos = vespo_k_pos;
  p.vespo_lambda_pos = vespo_lambda_pos;
  p.vespo_k_neg = vespo_k_neg;
  p.vespo_lambda_neg = vespo_lambda_neg;
  if (seq_old.defined()) {
    p.seq_old = seq_old.const_data_ptr();
    p.s_seq_old = seq_old.stride(0);
  }

  std::vector<double> rows(static_cast<size_t>(S) * kRowFields, 0.0);
  std::vector<double> mask_sums;
  if (S > 0 && T > 0) {
    if (kind == kLossToken) {
      mask_sums.resize(S);
      mask_row_sums(p, mask_sums);
      double total = 0.0;
      for (double v : mask_sums) total += v;
      p.row_mask_sums = mask_sums.data();
      p.uniform_scale = 1.0 / std::max(1.0, total);
    } else if (kind == kLossDrGrpo) {
      p.uniform_scale = 1.0 / (static_cast<double>(S) * static_cast<double>(max_completion_length.value_or(T)));
    }
    token_pass(p, rows);
  }
  double sums[kRowFields] = {};
  for (int64_t r = 0; r < S; ++r) {
    for (int q = 0; q < kRowFields; ++q) sums[q] += rows[r * kRowFields + q];
  }
  const double tokens = std::max(1.0, sums[4]);
  const auto opts = logp.options().dtype(ct);
  // GSPO's per-row mean log-ratios ([S], 0 without old_logp), VESPO's log sequence weights or
  // GMPO's mean clipped log-ratios; an empty [0] for the other per-token ratios.
  const bool per_row = seq_ratio || vespo || gmpo;
  at::Tensor seq_log_ratio = at::zeros({per_row ? S : 0}, opts.dtype(at::kDouble));
  if (seq_old.defined() || vespo || gmpo) {  // (GSPO without old_logp: zeros)
    double* dst = seq_log_ratio.mutable_data_ptr<double>();
    for (int64_t r = 0; r < S; ++r) dst[r] = rows[r * kRowFields + 8];
  }
  // Per row: mask total, clipped weight, clipped-above weight (the row sums of the metrics).
  at::Tensor row_clip = at::zeros({row_stats ? S : 0, 3}, opts.dtype(at::kDouble));
  if (row_stats) {
    double* dst = row_clip.mutable_data_ptr<double>();
    for (int64_t r = 0; r < S; ++r) {
      const double* src = rows.data() + r * kRowFields;
      dst[3 * r] = src[4];
      dst[3 * r + 1] = src[2];
      dst[3 * r + 2] = src[7];
    }
  }
  return {at::scalar_tensor(sums[0], opts), at::scalar_tensor(sums[1] / tokens, opts),
          at::scalar_tensor(sums[2] / tokens, opts), at::scalar_tensor(sums[3] / tokens, opts),
          at::scalar_tensor(sums[5] / tokens, opts), at::scalar_tensor(sums[6] / tokens, opts),
          at::scalar_tensor(sums[7] / tokens, opts), seq_log_ratio.to(ct), row_clip.to(ct), grad};
}

}  // namespace iama::cpu
