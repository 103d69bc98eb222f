// CPU implementations of the iama ops (schemas in csrc/registration.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace iama::cpu {

// rewards [B, G, m] (any float dtype, any strides), valid [B, G] bool or None
//   -> (s [B, G, m] centred first variations, values [B, m]), float64 for float64 rewards else float32.
std::tuple<at::Tensor, at::Tensor> group_stats(const at::Tensor& rewards, const std::optional<at::Tensor>& valid,
                                               at::IntArrayRef kinds, at::IntArrayRef ns,
                                               at::ArrayRef<double> taus, c10::string_view estimator);

// rewards [B, G, m], valid [B, G] or None, lam [m] -> (advantages [B, G], shaped [B, G], values [B, m]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_advantages(
    const at::Tensor& rewards, const std::optional<at::Tensor>& valid, const at::Tensor& lam, at::IntArrayRef kinds,
    at::IntArrayRef ns, at::ArrayRef<double> taus, c10::string_view estimator, c10::string_view scale, double eps);

// -> (loss, kl, clip_fraction, ratio_mean, log_ratio_mean, dual_clip_fraction, clip_high_fraction)
// scalars in the compute dtype, sequence_log_ratio ([S] with seq_ratio, else [0]),
// row_clip_weights ([S, 3] with row_stats, else [0, 3]: each row's mask total, clipped weight and
// clipped-above weight) and grad [S, T]
// (logp's dtype). dual_clip: c > 1 of dual-clip PPO, or none. seq_ratio: GSPO's ratio, one per
// sequence (the exp of its mean log-ratio, which sequence_log_ratio holds). surrogate: "clip",
// "cispo", "sapo" or "vespo" (csrc/include/iama/loss.h), tau_pos/tau_neg SAPO's temperatures, the
// vespo_* VESPO's shapes and rates (with "vespo", sequence_log_ratio holds each row's log weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
policy_loss_fwd(
    const at::Tensor& logp, const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp,
    const at::Tensor& advantages, const at::Tensor& mask, double eps_low, double eps_high, double beta,
    c10::string_view loss_type, std::optional<int64_t> max_completion_length, int64_t kl_form,
    std::optional<double> dual_clip, bool seq_ratio, c10::string_view surrogate, double tau_pos, double tau_neg,
    bool row_stats, double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg);

// -> (loss, advantages [B, G], kl, clip_fraction, ratio_mean, values [B, m], log_ratio_mean,
//     dual_clip_fraction, clip_high_fraction, sequence_log_ratio, grad [B * G, T]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
nonlinear_grpo_fwd(
    const at::Tensor& logp, const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp,
    const at::Tensor& mask, const at::Tensor& rewards, const at::Tensor& criterion_weights, at::IntArrayRef kinds,
    at::IntArrayRef ns, at::ArrayRef<double> taus, c10::string_view estimator, c10::string_view scale, double eps,
    double eps_low, double eps_high, double beta, c10::string_view loss_type,
    std::optional<int64_t> max_completion_length, int64_t kl_form, std::optional<double> dual_clip,
    bool seq_ratio, c10::string_view surrogate, double tau_pos, double tau_neg, double vespo_k_pos,
    double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg);

// logp, old_logp, mask [S, T] -> (sums [S], support [S]) in float64: each row's sum of
// clamp(logp - old_logp, clamp_low, clamp_high) over its tokens with a non-zero mask, and their
// count (csrc/cpu/sequence_log_ratio.cpp).
std::tuple<at::Tensor, at::Tensor> sequence_log_ratio(const at::Tensor& logp, const at::Tensor& old_logp,
                                                      const at::Tensor& mask, std::optional<double> clamp_low,
                                                      std::optional<double> clamp_high);

// advantages, logp, mask [S, T] -> int64 flat indices (row-major into [S, T]) of the tokens with a
// non-zero mask ranked by (A - mean A)(logp - mean logp), the means over those tokens
// (csrc/cpu/covariance.cpp). covariance_top_k: the min(k, n) largest, largest first (NaN first,
// ties by index). covariance_band: every token whose product lies strictly between low and high,
// in row-major order; with old_logp, less those on which PPO's clip with eps_low/eps_high acts.
at::Tensor covariance_top_k(const at::Tensor& advantages, const at::Tensor& logp, const at::Tensor& mask,
                            int64_t k);
at::Tensor covariance_band(const at::Tensor& advantages, const at::Tensor& logp, const at::Tensor& mask,
                           double low, double high, const std::optional<at::Tensor>& old_logp, double eps_low,
                           double eps_high);

// old_logp, rollout_logp, mask [S, T] -> (weights [S, T] in the compute dtype, rows [S, 4] float64:
// each row's sum of m d, sum of m, dropped share and statistic): the train/rollout correction
// (csrc/include/iama/correction.h; csrc/cpu/rollout_correction.cpp). gate: "ratio", "tv" or
// "binary_kl"; sequence: the row is the unit; clip: clip mode (token level, ratio gate).
std::tuple<at::Tensor, at::Tensor> rollout_correction(const at::Tensor& old_logp, const at::Tensor& rollout_logp,
                                                      const at::Tensor& mask, bool sequence, c10::string_view gate,
                                                      bool clip, double low, double high);

}  // namespace iama::cpu
