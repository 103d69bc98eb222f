// CPU glue for iama::sequence_log_ratio: each row's sum of (logp - old) over its tokens with a
// non-zero mask, each token's difference first clamped to [clamp_low, clamp_high], and the row's
// support (that token count). One read of logp, old and mask; the rows in parallel.
//
// It is the pre-pass of sequence-level weights computed outside the token pass (TRL's VESPO
// weight sums clamped log-ratios; GSPO's mean is sum / support). Masked tokens are selected out
// before the sum: their values, NaN included, are never read into it.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "ops.h"

namespace iama::cpu {
namespace {

// One row: 64-token tiles summed pairwise in acc_t, each tile added in double. Each tile's mask
// is first narrowed to bytes (and counted), then the differences are selected by those bytes: the
// loads are unconditional, so both loops vectorise whatever the mask's width (selecting by an
// int64 mask inside the float loop kept GCC from vectorising it: 3x slower).
template <typename lp_t, typename mask_t, typename acc_t>
double row_sum(const lp_t* __restrict__ logp, const lp_t* __restrict__ old, const mask_t* __restrict__ mask,
               int64_t T, acc_t lo, acc_t hi, int64_t* support) {
  constexpr int kTile = 64;
  double total = 0.0;
  int64_t count = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int len = (T - t0) < kTile ? static_cast<int>(T - t0) : kTile;
    uint8_t keep[kTile];
    int tile_count = 0;
    for (int j = 0; j < len; ++j) {
      keep[j] = mask[t0 + j] != mask_t(0) ? 1 : 0;
      tile_count += keep[j];
    }
    count += tile_count;
    acc_t d[kTile];
    for (int j = 0; j < len; ++j) {
      acc_t x = static_cast<acc_t>(logp[t0 + j]) - static_cast<acc_t>(old[t0 + j]);
      x = x < lo ? lo : (x > hi ? hi : x);  // NaN stays NaN
      d[j] = keep[j] != 0 ? x : acc_t(0);
    }
    for (int j = len; j < kTile; ++j) d[j] = acc_t(0);
    for (int width = kTile / 2; width >= 1; width /= 2) {
      for (int j = 0; j < width; ++j) d[j] += d[j + width];
    }
    total += static_cast<double>(d[0]);
  }
  *support = count;
  return total;
}

template <typename lp_t, typename mask_t>
void rows_kernel(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& mk, double lo, double hi,
                 double* sums, double* support) {
  using acc_t = std::conditional_t<std::is_same_v<lp_t, double>, double, float>;
  const int64_t S = lp.size(0), T = lp.size(1);
  const lp_t* lp_ptr = static_cast<const lp_t*>(lp.const_data_ptr());
  const lp_t* old_ptr = static_cast<const lp_t*>(old.const_data_ptr());
  const mask_t* mk_ptr = static_cast<const mask_t*>(mk.const_data_ptr());
  const int64_t s_lp = lp.stride(0), s_old = old.stride(0), s_mk = mk.stride(0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, T));
  at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t count = 0;
      sums[r] = row_sum<lp_t, mask_t, acc_t>(lp_ptr + r * s_lp, old_ptr + r * s_old, mk_ptr + r * s_mk, T,
                                             static_cast<acc_t>(lo), static_cast<acc_t>(hi), &count);
      support[r] = static_cast<double>(count);
    }
  });
}

template <typename lp_t>
void dispatch_mask(const at::Tensor& lp, const at::Tensor& old, const at::Tensor& mk, double lo, double hi,
                   double* sums, double* support) {
  switch (mk.scalar_type()) {
    case at::kBool:
    case at::kByte:
      rows_kernel<lp_t, uint8_t>(lp, old, mk, lo, hi, sums, support);
      break;
    case at::kLong:
      rows_kernel<lp_t, int64_t>(lp, old, mk, lo, hi, sums, support);
      break;
    case at::kDouble:
      rows_kernel<lp_t, double>(lp, old, mk, lo, hi, sums, support);
      break;
    default:  // converted to float32 by the caller
      rows_kernel<lp_t, float>(lp, old, mk, lo, hi, sums, support);
      break;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sequence_log_ratio(const at::Tensor& logp, const at::Tensor& old_logp,
                                                      const at::Tensor& mask, std::optional<double> clamp_low,
                                                      std::optional<double> clamp_high) {
  check_cpu(logp, "logp");
  check_floating(logp, "logp");
  TORCH_CHECK_VALUE(logp.dim() == 2, "logp must have shape [S, T], got ", logp.sizes());
  check_like_logp(old_logp, "old_logp", logp);
  check_mask(mask, logp);
  const double inf = std::numeric_limits<double>::infinity();
  const double lo = clamp_low.value_or(-inf), hi = clamp_high.value_or(inf);
  TORCH_CHECK_VALUE(!std::isnan(lo) && !std::isnan(hi) && lo <= hi, "clamp_low must be <= clamp_high, got ", lo,
                    " and ", hi);
  const at::ScalarType lp_dt = logp.scalar_type();
  const at::ScalarType ct = compute_dtype(lp_dt);
  // old in logp's dtype, or both in the compute dtype when they differ (as the reference).
  const at::ScalarType dt = old_logp.scalar_type() == lp_dt ? lp_dt : ct;
  const at::Tensor lp = rows_contiguous(logp.to(dt));
  const at::Tensor old = rows_contiguous(old_logp.to(dt));
  const at::Tensor mk = readable_mask(mask);
  const int64_t S = logp.size(0);
  at::Tensor sums = at::empty({S}, logp.options().dtype(at::kDouble));
  at::Tensor support = at::empty({S}, logp.options().dtype(at::kDouble));
  double* s_ptr = sums.mutable_data_ptr<double>();
  double* c_ptr = support.mutable_data_ptr<double>();
  switch (dt) {
    case at::kFloat:
      dispatch_mask<float>(lp, old, mk, lo, hi, s_ptr, c_ptr);
      break;
    case at::kDouble:
      dispatch_mask<double>(lp, old, mk, lo, hi, s_ptr, c_ptr);
      break;
    case at::kHalf:
      dispatch_mask<c10::Half>(lp, old, mk, lo, hi, s_ptr, c_ptr);
      break;
    default:
      dispatch_mask<c10::BFloat16>(lp, old, mk, lo, hi, s_ptr, c_ptr);
      break;
  }
  return {sums, support};
}

}  // namespace iama::cpu
