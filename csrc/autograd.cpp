// Autograd of the two loss ops, in C++: d loss / d logp is computed by the forward op (its last
// output); the backward scales it by the incoming gradient of `loss`.
//
// Why in C++ and not with torch.library.register_autograd: the Python wrapper of the latter
// (argument binding, default filling, autograd.Function.apply) costs 25-60 us per call for these
// 10- and 17-argument ops, a few per cent of a whole training step's loss on the CPU.
//
// A grad_output of exactly 1 (loss.backward()) returns the saved gradient as is: no multiply, and
// above all no new [S, T] allocation, whose first-touch page faults cost more than the multiply.
// The outputs other than `loss` get no gradient, and autograd is told not to materialise one:
// by default it hands the backward a zero tensor for each, and filling the [S, T] one cost as
// much as a third of the forward pass.
// It is saved as a detached alias (not as the op's output), so autograd keeps this very tensor
// and gradient accumulation takes it over only when nothing else holds it, i.e. when the graph is
// being freed; with retain_graph=True it copies it, and the saved gradient is never written to.
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mul.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/ops.h"

namespace iama::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// grad_output is a plain 0-dim CPU tensor equal to 1, outside any tracing (fake, functional or
// proxy tensors have no value to read) and not itself differentiated (double backward).
bool is_plain_one(const at::Tensor& g) {
  if (!g.defined() || g.dim() != 0 || !g.device().is_cpu() || g.requires_grad()) return false;
  if (g.key_set().has(c10::DispatchKey::Python) || at::functionalization::impl::isFunctionalTensor(g) ||
      c10::impl::TorchDispatchModeTLS::any_modes_set()) {
    return false;
  }
  return g.item<double>() == 1.0;
}

at::Tensor scaled(AutogradContext* ctx, const at::Tensor& grad_loss) {
  const at::Tensor token_grad = ctx->get_saved_variables()[0];
  if (!grad_loss.defined()) return at::Tensor();
  if (is_plain_one(grad_loss)) return token_grad;
  // A 0-dim grad_output does not promote: the result keeps logp's dtype.
  return at::mul(token_grad, grad_loss);
}

template <typename Fn>
auto typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

struct PolicyLossFunction : public torch::autograd::Function<PolicyLossFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                               const std::optional<at::Tensor>& ref_logp, const at::Tensor& advantages,
                               const at::Tensor& mask, double eps_low, double eps_high, double beta,
                               c10::string_view loss_type, std::optional<int64_t> max_completion_length,
                               int64_t kl_form, std::optional<double> dual_clip, bool seq_ratio,
                               c10::string_view surrogate, double tau_pos, double tau_neg, bool row_stats,
                               double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg,
                               double vespo_lambda_neg) {
    static const auto op = typed_op<decltype(policy_loss_fwd)>("iama::policy_loss_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, kl, clip, ratio, lratio, dual, high, seq, row_clip, grad] = op.call(
        logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, loss_type, max_completion_length, kl_form,
        dual_clip, seq_ratio, surrogate, tau_pos, tau_neg, row_stats, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
        vespo_lambda_neg);
    ctx->save_for_backward({grad.detach()});
    ctx->set_materialize_grads(false);  // else autograd fills a zero [S, T] for the grad output
    ctx->mark_non_differentiable({kl, clip, ratio, lratio, dual, high, seq, row_clip, grad});
    return {loss, kl, clip, ratio, lratio, dual, high, seq, row_clip, grad};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(21);
    out[0] = scaled(ctx, grads[0]);
    return out;
  }
};

struct NonlinearGRPOFunction : public torch::autograd::Function<NonlinearGRPOFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logp, const std::optional<at::Tensor>& old_logp,
                               const std::optional<at::Tensor>& ref_logp, const at::Tensor& mask,
                               const at::Tensor& rewards, const at::Tensor& criterion_weights, at::IntArrayRef kinds,
                               at::IntArrayRef ns, at::ArrayRef<double> taus, c10::string_view estimator,
                               c10::string_view scale, double eps, double eps_low, double eps_high, double beta,
                               c10::string_view loss_type, std::optional<int64_t> max_completion_length,
                               int64_t kl_form, std::optional<double> dual_clip, bool seq_ratio,
                               c10::string_view surrogate, double tau_pos, double tau_neg, double vespo_k_pos,
                               double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg) {
    static const auto op = typed_op<decltype(nonlinear_grpo_fwd)>("iama::nonlinear_grpo_fwd");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, adv, kl, clip, ratio, values, lratio, dual, high, seq, grad] =
        op.call(logp, old_logp, ref_logp, mask, rewards, criterion_weights, kinds, ns, taus, estimator, scale, eps,
                eps_low, eps_high, beta, loss_type, max_completion_length, kl_form, dual_clip, seq_ratio,
                surrogate, tau_pos, tau_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg);
    ctx->save_for_backward({grad.detach()});
    ctx->set_materialize_grads(false);  // else autograd fills a zero [S, T] for the grad output
    ctx->mark_non_differentiable({adv, kl, clip, ratio, values, lratio, dual, high, seq, grad});
    return {loss, adv, kl, clip, ratio, values, lratio, dual, high, seq, grad};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(27);
    out[0] = scaled(ctx, grads[0]);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
policy_loss_autograd(
    const at::Tensor& logp, const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp,
    const at::Tensor& advantages, const at::Tensor& mask, double eps_low, double eps_high, double beta,
    c10::string_view loss_type, std::optional<int64_t> max_completion_length, int64_t kl_form,
    std::optional<double> dual_clip, bool seq_ratio, c10::string_view surrogate, double tau_pos, double tau_neg,
    bool row_stats, double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg) {
  const variable_list o =
      PolicyLossFunction::apply(logp, old_logp, ref_logp, advantages, mask, eps_low, eps_high, beta, loss_type,
                                max_completion_length, kl_form, dual_clip, seq_ratio, surrogate, tau_pos, tau_neg,
                                row_stats, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
nonlinear_grpo_autograd(
    const at::Tensor& logp, const std::optional<at::Tensor>& old_logp, const std::optional<at::Tensor>& ref_logp,
    const at::Tensor& mask, const at::Tensor& rewards, const at::Tensor& criterion_weights, at::IntArrayRef kinds,
    at::IntArrayRef ns, at::ArrayRef<double> taus, c10::string_view estimator, c10::string_view scale, double eps,
    double eps_low, double eps_high, double beta, c10::string_view loss_type,
    std::optional<int64_t> max_completion_length, int64_t kl_form, std::optional<double> dual_clip,
    bool seq_ratio, c10::string_view surrogate, double tau_pos, double tau_neg, double vespo_k_pos,
    double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg) {
  const variable_list o =
      NonlinearGRPOFunction::apply(logp, old_logp, ref_logp, mask, rewards, criterion_weights, kinds, ns, taus,
                                   estimator, scale, eps, eps_low, eps_high, beta, loss_type, max_completion_length,
                                   kl_form, dual_clip, seq_ratio, surrogate, tau_pos, tau_neg, vespo_k_pos,
                                   vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10]};
}

}  // namespace
}  // namespace iama::cpu

TORCH_LIBRARY_IMPL(iama, Autograd, m) {
  m.impl("policy_loss_fwd", &iama::cpu::policy_loss_autograd);
  m.impl("nonlinear_grpo_fwd", &iama::cpu::nonlinear_grpo_autograd);
}
