// Helpers shared by the CPU glue files: argument parsing and checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <string>
#include <vector>

#include "iama/common.h"

namespace iama::cpu {

inline int parse_estimator(c10::string_view e) {
  if (e == "plugin") return kPlugin;
  if (e == "unbiased") return kUnbiased;
  TORCH_CHECK_VALUE(false, "estimator must be 'plugin' or 'unbiased', got '", std::string(e), "'");
  return -1;
}

inline int parse_scale(c10::string_view s) {
  if (s == "group") return kScaleGroup;
  if (s == "batch") return kScaleBatch;
  if (s == "none") return kScaleNone;
  TORCH_CHECK_VALUE(false, "scale must be 'group', 'batch' or 'none', got '", std::string(s), "'");
  return -1;
}

inline int parse_loss_type(c10::string_view s) {
  if (s == "grpo") return kLossGrpo;
  if (s == "token") return kLossToken;
  if (s == "dr_grpo") return kLossDrGrpo;
  TORCH_CHECK_VALUE(false, "loss_type must be 'grpo', 'token' or 'dr_grpo', got '", std::string(s), "'");
  return -1;
}

inline int parse_surrogate(c10::string_view s) {
  if (s == "clip") return kSurrClip;
  if (s == "cispo") return kSurrCispo;
  if (s == "sapo") return kSurrSapo;
  if (s == "vespo") return kSurrVespo;
  if (s == "dppo_tv") return kSurrDppoTv;
  if (s == "dppo_kl") return kSurrDppoKl;
  if (s == "gmpo") return kSurrGmpo;
  TORCH_CHECK_VALUE(false, "surrogate must be 'clip', 'cispo', 'sapo', 'vespo', 'dppo_tv', 'dppo_kl' or 'gmpo', got '",
                    std::string(s), "'");
  return -1;
}

inline std::vector<CriterionSpec> parse_specs(at::IntArrayRef kinds, at::IntArrayRef ns, at::ArrayRef<double> taus,
                                              int64_t m) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(kinds.size()) == m && static_cast<int64_t>(ns.size()) == m &&
                        static_cast<int64_t>(taus.size()) == m,
                    "kinds, ns and taus must have one entry per criterion (m = ", m, "), got ", kinds.size(),
                    ", ", ns.size(), ", ", taus.size());
  std::vector<CriterionSpec> specs(m);
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK_VALUE(kinds[i] == kMean || kinds[i] == kBestOfN || kinds[i] == kSoftBestOfN,
                      "kinds[", i, "] must be 0 (Mean), 1 (BestOfN) or 2 (SoftBestOfN), got ", kinds[i]);
    TORCH_CHECK_VALUE(ns[i] >= 1 && ns[i] <= (int64_t{1} << 30), "ns[", i, "] must be >= 1, got ", ns[i]);
    TORCH_CHECK_VALUE(kinds[i] != kSoftBestOfN || (taus[i] > 0 && std::isfinite(taus[i])),
                      "taus[", i, "] must be finite and > 0 for SoftBestOfN, got ", taus[i]);
    specs[i] = CriterionSpec{static_cast<int>(kinds[i]), static_cast<int>(ns[i]), taus[i]};
  }
  return specs;
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the iama CPU kernels, got ", t.device());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, name,
                   " must be float16, bfloat16, float32 or float64, got ", dt);
}

// A floating CPU tensor of logp's shape (old_logp, ref_logp, per-token advantages).
inline void check_like_logp(const at::Tensor& t, const char* name, const at::Tensor& logp) {
  check_cpu(t, name);
  check_floating(t, name);
  TORCH_CHECK_VALUE(t.sizes() == logp.sizes(), name, " must have the shape of logp ", logp.sizes(), ", got ",
                    t.sizes());
}

// The mask: a CPU tensor of logp's shape, bool, integer or floating.
inline void check_mask(const at::Tensor& mask, const at::Tensor& logp) {
  check_cpu(mask, "mask");
  TORCH_CHECK_VALUE(mask.sizes() == logp.sizes(), "mask must have the shape of logp ", logp.sizes(), ", got ",
                    mask.sizes());
  TORCH_CHECK_TYPE(!mask.is_complex(), "mask must be bool, integer or floating, got ", mask.scalar_type());
}

// A [S, T] view whose rows are contiguous (the row stride may be anything): read in place;
// other layouts are copied once.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

// The mask in a dtype the row kernels read as is (bool/uint8, int64, float64, float32; any other
// converted to float32), rows contiguous.
inline at::Tensor readable_mask(const at::Tensor& mask) {
  const auto dt = mask.scalar_type();
  const bool native = dt == at::kBool || dt == at::kByte || dt == at::kLong || dt == at::kDouble || dt == at::kFloat;
  return rows_contiguous(native ? mask : mask.to(at::kFloat));
}

// float64 stays float64; every other floating dtype computes in float32.
inline at::ScalarType compute_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace iama::cpu
