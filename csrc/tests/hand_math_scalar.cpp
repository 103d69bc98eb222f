// The scalar side of hand_math_check.cpp: log_acc and DPPO's binary KL as the templated row of the
// AVX2 build computes them (the same target, so GCC contracts the same fused multiply-adds).
#pragma GCC target("avx2,fma")
#define IAMA_ISA_NAMESPACE avx2
#include <stdint.h>

#include "iama/common.h"

extern "C" void scalar_log(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = iama::log_acc(x[i]);
}

// DPPO-KL's k of token_terms (csrc/include/iama/loss.h), from logp and old.
extern "C" void scalar_dppo_k(const float* lp, const float* old, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float q_log = old[i];
    const float p = iama::exp_acc(lp[i]), q = iama::exp_acc(q_log);
    const float eps = 1e-8f;
    out[i] = q * (q_log - lp[i]) + (1.0f - q) * iama::log_acc((1.0f - q + eps) / (1.0f - p + eps));
  }
}
