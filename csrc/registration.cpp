// The iama operator library: every op's schema in one place, and the CPU implementations.
//
// Ops (the Python side, iama_kernels/_cpu_ops.py, registers their fake (meta) functions and the
// autograd formulas of the two loss ops):
//   group_stats         per-criterion centred first variations and group values
//   group_advantages    first variations, lambda-combination of the criteria, centring and scale
//   policy_loss_fwd     loss, metrics (and GSPO's per-row log-ratios, per-row clip weights) and the
//                       per-token gradient
//   nonlinear_grpo_fwd  the one-pass op: rewards and log-probs to loss, metrics and gradient
//   sequence_log_ratio  each row's (clamped) log-ratio sum and support
//   covariance_top_k    KL-Cov's tokens: the k largest centred advantage x centred log-prob
//   covariance_band     Clip-Cov's candidates: that product inside a band, PPO's clip inactive
//   rollout_correction  the train/rollout correction: token weights and per-row sums
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(iama, m) {
  m.set_python_module("iama_kernels._cpu_ops");
  m.def(
      "group_stats(Tensor rewards, Tensor? valid, int[] kinds, int[] ns, float[] taus, str estimator)"
      " -> (Tensor s, Tensor values)");
  m.def(
      "group_advantages(Tensor rewards, Tensor? valid, Tensor lam, int[] kinds, int[] ns, float[] taus,"
      " str estimator, str scale, float eps) -> (Tensor advantages, Tensor shaped, Tensor values)");
  m.def(
      "policy_loss_fwd(Tensor logp, Tensor? old_logp, Tensor? ref_logp, Tensor advantages, Tensor mask,"
      " float eps_low, float eps_high, float beta, str loss_type, int? max_completion_length,"
      " int kl_form=0, float? dual_clip=None, bool seq_ratio=False, str surrogate=\"clip\","
      " float tau_pos=1.0, float tau_neg=1.05, bool row_stats=False, float vespo_k_pos=2.0,"
      " float vespo_lambda_pos=3.0, float vespo_k_neg=3.0, float vespo_lambda_neg=2.0) -> (Tensor loss, Tensor kl,"
      " Tensor clip_fraction, Tensor ratio_mean, Tensor log_ratio_mean, Tensor dual_clip_fraction,"
      " Tensor clip_high_fraction, Tensor sequence_log_ratio, Tensor row_clip_weights, Tensor grad)");
  m.def(
      "nonlinear_grpo_fwd(Tensor logp, Tensor? old_logp, Tensor? ref_logp, Tensor mask, Tensor rewards,"
      " Tensor criterion_weights, int[] kinds, int[] ns, float[] taus, str estimator, str scale, float eps,"
      " float eps_low, float eps_high, float beta, str loss_type, int? max_completion_length,"
      " int kl_form=0, float? dual_clip=None, bool seq_ratio=False, str surrogate=\"clip\","
      " float tau_pos=1.0, float tau_neg=1.05, float vespo_k_pos=2.0, float vespo_lambda_pos=3.0,"
      " float vespo_k_neg=3.0, float vespo_lambda_neg=2.0) -> (Tensor loss, Tensor advantages,"
      " Tensor kl, Tensor clip_fraction, Tensor ratio_mean, Tensor values, Tensor log_ratio_mean,"
      " Tensor dual_clip_fraction, Tensor clip_high_fraction, Tensor sequence_log_ratio, Tensor grad)");
  m.def(
      "sequence_log_ratio(Tensor logp, Tensor old_logp, Tensor mask, float? clamp_low, float? clamp_high)"
      " -> (Tensor sums, Tensor support)");
  m.def(
      "rollout_correction(Tensor old_logp, Tensor rollout_logp, Tensor mask, bool sequence, str gate, bool clip,"
      " float low, float high) -> (Tensor weights, Tensor rows)");
  m.def("covariance_top_k(Tensor advantages, Tensor logp, Tensor mask, int k) -> Tensor");
  m.def(
      "covariance_band(Tensor advantages, Tensor logp, Tensor mask, float low, float high, Tensor? old_logp,"
      " float eps_low, float eps_high) -> Tensor");
}

TORCH_LIBRARY_IMPL(iama, CPU, m) {
  m.impl("group_stats", &iama::cpu::group_stats);
  m.impl("group_advantages", &iama::cpu::group_advantages);
  m.impl("policy_loss_fwd", &iama::cpu::policy_loss_fwd);
  m.impl("nonlinear_grpo_fwd", &iama::cpu::nonlinear_grpo_fwd);
  m.impl("sequence_log_ratio", &iama::cpu::sequence_log_ratio);
  m.impl("rollout_correction", &iama::cpu::rollout_correction);
  m.impl("covariance_top_k", &iama::cpu::covariance_top_k);
  m.impl("covariance_band", &iama::cpu::covariance_band);
}
