// CPU glue for iama::rollout_correction: the train/rollout correction's token weights and per-row
// sums in one pass over old_logp, rollout_logp and the mask (two for sequence-level units: the
// row's statistic, then its weights, while the row is in cache). Rows in parallel; for
// float32/bfloat16/float16 log-probs with a byte mask or float32 weights the AVX-512 build
// (rollout_correction_avx512.cpp, hand-vectorised) or the AVX2 one (rollout_correction_avx2.cpp,
// iama::correction_row vectorised by GCC) where the CPU has it, iama::correction_row
// (csrc/include/iama/correction.h) in the baseline build otherwise.
#include "rollout_correction.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"
#include "group_fast.h"
#include "iama/correction.h"
#include "ops.h"

namespace iama::cpu {
namespace {

template <typename in_t, typename mask_t>
void rows_kernel(const at::Tensor& old, const at::Tensor& rollout, const at::Tensor& mk, const CorrectionProblem& p,
                 at::Tensor& weights) {
  using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
  const in_t* old_ptr = static_cast<const in_t*>(old.const_data_ptr());
  const in_t* ro_ptr = static_cast<const in_t*>(rollout.const_data_ptr());
  const mask_t* mk_ptr = static_cast<const mask_t*>(mk.const_data_ptr());
  acc_t* w_ptr = weights.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.T));
  at::parallel_for(0, p.S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const CorrectionRow row = correction_row<in_t, mask_t, acc_t, acc_t>(
          old_ptr + r * p.s_old, ro_ptr + r * p.s_rollout, mk_ptr + r * p.s_mask, p.T, p.sequence, p.gate, p.clip,
          p.low, p.high, w_ptr + r * p.T);
      store_correction_row(row, p.rows + r * kCorrectionFields);
    }
  });
}

template <typename in_t>
void dispatch_mask(const at::Tensor& old, const at::Tensor& rollout, const at::Tensor& mk, const CorrectionProblem& p,
                   at::Tensor& weights) {
  switch (mk.scalar_type()) {
    case at::kBool:
    case at::kByte:
      rows_kernel<in_t, uint8_t>(old, rollout, mk, p, weights);
      break;
    case at::kLong:
      rows_kernel<in_t, int64_t>(old, rollout, mk, p, weights);
      break;
    case at::kDouble:
      rows_kernel<in_t, double>(old, rollout, mk, p, weights);
      break;
    default:  // float32 (readable_mask converts the others)
      rows_kernel<in_t, float>(old, rollout, mk, p, weights);
      break;
  }
}

int parse_gate(c10::string_view g) {
  if (g == "ratio") return kGateRatio;
  if (g == "tv") return kGateTv;
  if (g == "binary_kl") return kGateBinaryKl;
  TORCH_CHECK_VALUE(false, "gate must be 'ratio', 'tv' or 'binary_kl', got '", std::string(g), "'");
  return -1;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rollout_correction(const at::Tensor& old_logp, const at::Tensor& rollout_logp,
                                                      const at::Tensor& mask, bool sequence, c10::string_view gate,
                                                      bool clip, double low, double high) {
  check_cpu(old_logp, "old_logp");
  check_floating(old_logp, "old_logp");
  TORCH_CHECK_VALUE(old_logp.dim() == 2, "old_logp must have shape [S, T], got ", old_logp.sizes());
  check_cpu(rollout_logp, "rollout_logp");
  check_floating(rollout_logp, "rollout_logp");
  TORCH_CHECK_VALUE(rollout_logp.sizes() == old_logp.sizes(), "rollout_logp must have the shape of old_logp ",
                    old_logp.sizes(), ", got ", rollout_logp.sizes());
  check_mask(mask, old_logp);
  TORCH_CHECK_VALUE(!std::isnan(low) && !std::isnan(high) && low <= high, "low must be <= high, got ", low, " and ",
                    high);
  CorrectionProblem p;
  p.gate = parse_gate(gate);
  TORCH_CHECK_VALUE(!clip || (!sequence && p.gate == kGateRatio),
                    "clip mode takes token-level units and the ratio gate");
  p.sequence = sequence;
  p.clip = clip;
  const at::ScalarType o_dt = old_logp.scalar_type(), r_dt = rollout_logp.scalar_type();
  // Both in their dtype, or when they differ both in float64 if either is, else in float32.
  const at::ScalarType dt =
      r_dt == o_dt ? o_dt : (o_dt == at::kDouble || r_dt == at::kDouble ? at::kDouble : at::kFloat);
  const at::Tensor old = rows_contiguous(old_logp.to(dt));
  const at::Tensor rollout = rows_contiguous(rollout_logp.to(dt));
  const at::Tensor mk = readable_mask(mask);
  p.S = old.size(0);
  p.T = old.size(1);
  p.low = low;
  p.high = high;
  p.old = old.const_data_ptr();
  p.rollout = rollout.const_data_ptr();
  p.mask = mk.const_data_ptr();
  p.s_old = old.stride(0);
  p.s_rollout = rollout.stride(0);
  p.s_mask = mk.stride(0);
  at::Tensor weights = at::empty({p.S, p.T}, old_logp.options().dtype(compute_dtype(dt)));
  at::Tensor rows = at::empty({p.S, kCorrectionFields}, old_logp.options().dtype(at::kDouble));
  p.rows = rows.mutable_data_ptr<double>();
  if (p.S == 0 || p.T == 0) {
    rows.zero_();
    if (sequence) {  // an empty row's statistic is 0 / 0, which drops it
      rows.select(1, 2).fill_(1.0);
      rows.select(1, 3).fill_(std::nan(""));
    }
    return {weights, rows};
  }
  const at::ScalarType mdt = mk.scalar_type();
  const bool wide_row = dt != at::kDouble && (mdt == at::kBool || mdt == at::kByte || mdt == at::kFloat);
  const int isa = cpu_isa_level();
  if (wide_row && isa >= 1) {
    p.dtype = dt == at::kFloat ? 0 : (dt == at::kBFloat16 ? 1 : 2);
    p.byte_mask = mdt != at::kFloat;
    p.weights = weights.mutable_data_ptr<float>();
    const auto build = isa >= 2 ? rollout_correction_avx512 : rollout_correction_avx2;
    const int64_t grain = std::max<int64_t>(1, 32768 / p.T);
    bool done = true;
    at::parallel_for(0, p.S, grain, [&](int64_t begin, int64_t end) {
      if (!build(p, begin, end)) done = false;
    });
    if (done) return {weights, rows};
  }
  switch (dt) {
    case at::kFloat:
      dispatch_mask<float>(old, rollout, mk, p, weights);
      break;
    case at::kDouble:
      dispatch_mask<double>(old, rollout, mk, p, weights);
      break;
    case at::kHalf:
      dispatch_mask<c10::Half>(old, rollout, mk, p, weights);
      break;
    default:
      dispatch_mask<c10::BFloat16>(old, rollout, mk, p, weights);
      break;
  }
  return {weights, rows};
}

}  // namespace iama::cpu
