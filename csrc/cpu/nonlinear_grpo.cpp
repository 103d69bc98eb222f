// CPU glue for iama::nonlinear_grpo_fwd: group rewards to advantages, then the token loss, in one
// op call (the group work is tiny next to the token pass; on the CPU the gain of the one-pass op
// is one dispatch and no Python between the two halves).
#include <ATen/ops/empty.h>

#include "common.h"
#include "ops.h"

namespace iama::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
nonlinear_grpo_fwd(
    const at::Tensor& logp, const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp,
    const at::Tensor& mask, const at::Tensor& rewards, const at::Tensor& criterion_weights, at::IntArrayRef kinds,
    at::IntArrayRef ns, at::ArrayRef<double> taus, c10::string_view estimator, c10::string_view scale, double eps,
    double eps_low, double eps_high, double beta, c10::string_view loss_type,
    std::optional<int64_t> max_completion_length, int64_t kl_form, std::optional<double> dual_clip,
    bool seq_ratio, c10::string_view surrogate, double tau_pos, double tau_neg, double vespo_k_pos,
    double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg) {
  TORCH_CHECK_VALUE(rewards.dim() == 3, "rewards must have shape [B, G, m], got ", rewards.sizes());
  TORCH_CHECK_VALUE(logp.dim() == 2 && logp.size(0) == rewards.size(0) * rewards.size(1), "logp must have B * G = ",
                    rewards.size(0) * rewards.size(1), " rows (group-major), got shape ", logp.sizes());
  at::Tensor adv, values;
  {
    // The shaped rewards are not returned: freed before the token pass allocates its gradient.
    auto [a, shaped, v] =
        group_advantages(rewards, std::nullopt, criterion_weights, kinds, ns, taus, estimator, scale, eps);
    adv = a;
    values = v;
  }
  auto [loss, kl, clip, ratio, lratio, dual, high, seq, row_clip, grad] =
      policy_loss_fwd(logp, old_logp, ref_logp, adv.reshape({-1}), mask, eps_low, eps_high, beta, loss_type,
                      max_completion_length, kl_form, dual_clip, seq_ratio, surrogate, tau_pos, tau_neg, false,
                      vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg);
  return {loss, adv, kl, clip, ratio, values, lratio, dual, high, seq, grad};
}

}  // namespace iama::cpu
