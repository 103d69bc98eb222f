// The token pass of the policy loss: interface between the torch glue (policy_loss.cpp) and the
// kernels, which are compiled three times (token_pass_generic.cpp for any CPU,
// token_pass_avx2.cpp with AVX2+FMA, token_pass_avx512.cpp with AVX-512) and chosen at run time
// by token_pass().
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

namespace iama::cpu {

enum class TokenDtype { kFloat32, kFloat64, kFloat16, kBFloat16 };
// The mask's element type as the kernels receive it: bool/uint8 bytes, int64 (TRL's and verl's
// masks) or int32 as given, or anything else converted to the compute dtype by the glue. The
// kernels narrow a non-byte mask to bytes row by row where it holds only 0 and 1 (token_kernel).
enum class MaskKind { kByte, kInt64, kInt32, kCompute };

struct TokenProblem {
  int64_t S = 0, T = 0;
  TokenDtype logp_dtype = TokenDtype::kFloat32;
  MaskKind mask_kind = MaskKind::kByte;
  int kl_form = 0;                    // iama::KlForm: the KL term's estimator (k3, TRL's ratio * k3, ...)
  const void* logp = nullptr;  // logp, old and ref in one dtype (the glue converts mixed ones)
  const void* old = nullptr;
  const void* ref = nullptr;
  const void* mask = nullptr;
  int64_t s_logp = 0, s_old = 0, s_ref = 0, s_mask = 0;  // row strides (elements); rows are contiguous
  void* grad = nullptr;                                  // [S, T] contiguous, logp's dtype
  const double* adv = nullptr;                           // [S], or null with adv_tokens
  const void* adv_tokens = nullptr;                      // [S, T] per-token advantages, compute dtype
  int64_t s_adv = 0;                                     // their row stride
  const double* row_mask_sums = nullptr;                 // [S] when known in advance ("token")
  int loss_type = 0;                                     // iama::LossKind
  double uniform_scale = 0.0;                            // w_scale for "token" and "dr_grpo"
  double eps_low = 0.2, eps_high = 0.2, beta = 0.0;
  double dual_clip = std::numeric_limits<double>::infinity();  // c of the dual clip; +inf: off
  int surrogate = 0;                                     // iama::SurrogateKind
  double tau_pos = 1.0, tau_neg = 1.05;                  // SAPO's temperatures
  // VESPO's shape and rate for A >= 0 and A < 0 (surrogate kSurrVespo): each row's weight phi is
  // computed from its log sequence weight (row_vespo_log_weight) before its loss pass.
  double vespo_k_pos = 2.0, vespo_lambda_pos = 3.0, vespo_k_neg = 3.0, vespo_lambda_neg = 2.0;
  // GSPO's sequence ratio: each row's log-ratio is its mean over the row's support, computed from
  // logp and old first; the loss pass then reads seq_old (logp itself, in old's dtype) as `old`
  // and adds that mean to every token's (zero) log-ratio. Null: per-token ratios.
  const void* seq_old = nullptr;
  int64_t s_seq_old = 0;
};

// Per-row results in rows[r * kRowFields + q]: loss, m * kl, clipped weight, m * ratio, mask sum,
// m * log-ratio, dual-clipped weight, clipped-above weight, and GSPO's mean log-ratio of the row
// (VESPO's log sequence weight; 0 for the other per-token ratios).
constexpr int kRowFields = 9;

// Runs the pass with the best kernel build for this CPU.
void token_pass(const TokenProblem& p, std::vector<double>& rows);
// Mask sums of every row (for loss_type "token").
void mask_row_sums(const TokenProblem& p, std::vector<double>& out);

// The builds; token_pass_avx2/avx512 return false when they are not compiled in (non-x86 targets).
void token_pass_generic(const TokenProblem& p, std::vector<double>& rows);
bool token_pass_avx2(const TokenProblem& p, std::vector<double>& rows);
bool token_pass_avx512(const TokenProblem& p, std::vector<double>& rows);

}  // namespace iama::cpu
