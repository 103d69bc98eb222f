// Compile check: the kernel headers build as CUDA device code (nvcc -c, no torch needed).
// Each kernel instantiates the header functions in __global__ code the way a CUDA backend would
// (one thread per group, one thread per row); nothing here is launched.
#include "iama/correction.h"
#include "iama/group.h"
#include "iama/loss.h"
#include "iama/sort.h"
#include "iama/weights.h"

__global__ void fill_tables(int g, int n, int estimator, double* table) {
  if (threadIdx.x == 0) iama::fill_bestofn_table(g, n, estimator, table);
}

__global__ void group_kernel(const float* rewards, const bool* valid, int B, int G, int m,
                             const iama::CriterionSpec* specs, int estimator, iama::TableIndex tables,
                             float* scratch_keys, int32_t* scratch_ints, double* scratch_acc,
                             iama::KeyIndex<double>* pairs, const double* lam, float* s_out, float* values,
                             float* adv, float* shaped_out) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  iama::GroupScratch<float, double> w{scratch_keys + b * G, scratch_ints + 5 * b * G,
                                      scratch_ints + 5 * b * G + G, scratch_ints + 5 * b * G + 2 * G,
                                      scratch_acc + 6 * b * G, scratch_acc + 6 * b * G + G, pairs + 2 * b * G};
  iama::group_first_variation<float, float, double>(rewards + b * G * m, m, 1, valid ? valid + b * G : nullptr,
                                                    1, G, m, specs, estimator, tables, w, s_out + b * G * m,
                                                    values + b * m);
  double* shaped = scratch_acc + 6 * b * G + 2 * G;
  double* canonical = shaped + G;
  const int count = iama::combine_group<float, double>(s_out + b * G * m, lam, valid ? valid + b * G : nullptr, 1,
                                                       G, m, w.order, w.xs, shaped, canonical);
  const double mean = iama::sum_of(canonical, count) / (count > 0 ? count : 1);
  const double denom =
      iama::scale_denominator<double>(count, iama::sum_of_squared_deviations(canonical, count, mean), 1e-4);
  iama::scale_group<double, float>(shaped, valid ? valid + b * G : nullptr, 1, G, denom, adv + b * G,
                                   shaped_out + b * G);
}

__global__ void loss_kernel(const float* logp, const float* old, const float* ref, const unsigned char* mask,
                            const float* adv, int S, int T, float* grad, iama::RowSums* sums) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= S) return;
  const double msum = iama::mask_row_sum(mask + r * T, T);
  sums[r] = iama::policy_loss_row<float, float, unsigned char, float>(
      logp + r * T, old + r * T, ref + r * T, mask + r * T, T, adv[r], static_cast<float>(1.0 / (S * msum)), 0.8f,
      1.2f, 0.04f, 3.0f, grad + r * T);
}

// VESPO's row: the pre-pass's log weight, the row's gamma weights, the per-token-advantage loop.
__global__ void vespo_kernel(const float* logp, const float* old, const unsigned char* mask, const float* adv_tok,
                             int S, int T, float* grad, iama::RowSums* sums, double* log_w) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= S) return;
  log_w[r] = iama::row_vespo_log_weight<float, float, unsigned char, float>(logp + r * T, old + r * T, mask + r * T, T);
  const float phi_pos = static_cast<float>(iama::vespo_phi(log_w[r], 2.0, 3.0));
  const float phi_neg = static_cast<float>(iama::vespo_phi(log_w[r], 3.0, 2.0));
  sums[r] = iama::policy_loss_row<float, float, unsigned char, float, false, true, false, iama::kSurrVespo>(
      logp + r * T, old + r * T, old + r * T, mask + r * T, T, 0.0f, 1.0f, 1.0f, 1.0f, 0.0f, 0.0f, grad + r * T,
      adv_tok + r * T, 0.0f, phi_pos, phi_neg);
}

// DPPO's rows (the binary-KL trust region: log in device code), per-token advantages.
__global__ void dppo_kernel(const float* logp, const float* old, const unsigned char* mask, const float* adv_tok,
                            int S, int T, float* grad, iama::RowSums* sums) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= S) return;
  sums[r] = iama::policy_loss_row<float, float, unsigned char, float, false, true, true, iama::kSurrDppoKl>(
      logp + r * T, old + r * T, old + r * T, mask + r * T, T, 0.0f, 1.0f, 0.8f, 1.2f, 0.0f, 3.0f, grad + r * T,
      adv_tok + r * T, 0.0f, 0.2f, 0.2f);
  sums[r].loss += iama::policy_loss_row<float, float, unsigned char, float, false, false, true, iama::kSurrDppoTv>(
                      logp + r * T, old + r * T, old + r * T, mask + r * T, T, 1.0f, 1.0f, 0.8f, 1.2f, 0.0f, 3.0f,
                      grad + r * T, nullptr, 0.0f, 0.2f, 0.2f)
                      .loss;
}

// GMPO's rows: the pre-pass's means, then the row with its objective (per-token advantages).
__global__ void gmpo_kernel(const float* logp, const float* old, const unsigned char* mask, const float* adv_tok,
                            int S, int T, float* grad, iama::RowSums* sums) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= S) return;
  const double msum = iama::mask_row_sum(mask + r * T, T);
  double log_mean = 0.0, adv_mean = 0.0;
  iama::row_gmpo_means<float, float, unsigned char, float, true>(logp + r * T, old + r * T, mask + r * T, T, 0.0f,
                                                                 adv_tok + r * T, -0.4f, 0.4f, msum, log_mean,
                                                                 adv_mean);
  const float ratio = static_cast<float>(::exp(log_mean));
  sums[r] = iama::policy_loss_row<float, float, unsigned char, float, false, true, false, iama::kSurrGmpo>(
      logp + r * T, old + r * T, old + r * T, mask + r * T, T, 0.0f, 1.0f, -0.4f, 0.4f, 0.0f, 0.0f, grad + r * T,
      adv_tok + r * T, 0.0f, static_cast<float>(ratio * adv_mean), ratio);
}

// A row with its KL estimator read at run time (k2, then k3's value with k2's gradient).
__global__ void kl_form_kernel(const float* logp, const float* old, const float* ref, const unsigned char* mask,
                               int S, int T, int kl_form, float* grad, iama::RowSums* sums) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= S) return;
  sums[r] = iama::policy_loss_row<float, float, unsigned char, float, true, false, false, iama::kSurrCispo>(
      logp + r * T, old + r * T, ref + r * T, mask + r * T, T, 1.0f, 1.0f, 1.0f, 1.0f, 0.1f, 3.0f, grad + r * T,
      nullptr, 0.0f, 1.0f, 1.0f, iama::RowFlags{}, kl_form);
}

__global__ void loss_kernel_f64(const double* logp, const double* mask, double* out) {
  const iama::TokenTerms<double> t = iama::token_terms<double>(mask[0], logp[0], logp[1], logp[2], 1.0, 1.0, 0.8,
                                                               1.2, 0.1, 3.0);
  out[0] = t.grad + t.loss + t.kl + t.clip + t.ratio + t.lratio + t.dual + t.high;
}

// The train/rollout correction's rows (binary-KL gate, token level; ratio gate, sequence level).
__global__ void correction_kernel(const float* old, const float* rollout, const unsigned char* mask, int S, int T,
                                  float* weights, iama::CorrectionRow* rows) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= S) return;
  rows[r] = iama::correction_row<float, unsigned char, float, float>(old + r * T, rollout + r * T, mask + r * T, T,
                                                                     false, iama::kGateBinaryKl, false, 0.0, 0.01,
                                                                     weights + r * T);
  rows[r].statistic += iama::correction_row<float, unsigned char, float, float>(
                           old + r * T, rollout + r * T, mask + r * T, T, true, iama::kGateRatio, false, 0.5,
                           2.0, weights + r * T)
                           .statistic;
}
