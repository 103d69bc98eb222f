// CPU glue for iama::covariance_top_k and iama::covariance_band: the token selections of
// KL-Cov and Clip-Cov (Cui et al., 2025), by each response token's centred advantage times its
// centred log-prob, cov_t = (A_t - mean A) (logp_t - mean logp), the means over the tokens with a
// non-zero mask. Two reads of advantages, logp and mask (the means, then the selection); no [S, T]
// temporary and no gather of the response tokens.
//
// The rows are cut into fixed blocks (about 16K tokens each, whatever the thread count): each
// block's sums are computed on one thread and added in block order, and the selections are exact
// (a total order for the top k, the row-major order for the band), so the result does not depend
// on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace iama::cpu {
namespace {

constexpr int kTile = 64;

template <typename scalar_t>
struct Entry {
  scalar_t value;
  int64_t index;
};

// The selection's total order: NaN first (as torch.topk ranks it), then larger values, then the
// lower flat index. Under a total order a block's pruned buffer keeps exactly its top k, so the
// merged top k is exact and deterministic.
template <typename scalar_t>
bool ranks_before(const Entry<scalar_t>& a, const Entry<scalar_t>& b) {
  const bool a_nan = std::isnan(a.value), b_nan = std::isnan(b.value);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a.value != b.value) return a.value > b.value;
  return a.index < b.index;
}

struct Layout {
  int64_t S, T, rows_per_block, blocks;
};

Layout layout_of(int64_t S, int64_t T) {
  const int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, T));
  return {S, T, rows, (S + rows - 1) / rows};
}

// One row's sums of a and l over the tokens with a non-zero mask, and that token count: 64-token
// tiles summed pairwise in double (the selects and adds vectorise; float32 tiles were no faster
// and overflow where 64 values near 1e37 add up), each tile's sum added to the row's.
template <typename scalar_t, typename mask_t>
void row_sums(const scalar_t* __restrict__ a, const scalar_t* __restrict__ l, const mask_t* __restrict__ m,
              int64_t T, double* sum_a, double* sum_l, int64_t* count) {
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int len = (T - t0) < kTile ? static_cast<int>(T - t0) : kTile;
    double da[kTile], dl[kTile];
    int tile_count = 0;
    for (int j = 0; j < len; ++j) {
      const bool keep = m[t0 + j] != mask_t(0);
      tile_count += keep ? 1 : 0;
      da[j] = keep ? static_cast<double>(a[t0 + j]) : 0.0;  // masked values (NaN too) never added
      dl[j] = keep ? static_cast<double>(l[t0 + j]) : 0.0;
    }
    for (int j = len; j < kTile; ++j) da[j] = dl[j] = 0.0;
    for (int width = kTile / 2; width >= 1; width /= 2) {
      for (int j = 0; j < width; ++j) {
        da[j] += da[j + width];
        dl[j] += dl[j + width];
      }
    }
    *sum_a += da[0];
    *sum_l += dl[0];
    *count += tile_count;
  }
}

template <typename scalar_t, typename mask_t>
struct Inputs {
  const scalar_t* a;
  const scalar_t* l;
  const scalar_t* o;  // old log-probs (band with the clip test only)
  const mask_t* m;
  int64_t sa, sl, so, sm;  // row strides
};

template <typename scalar_t>
struct Means {
  scalar_t a, l;
  int64_t count;
};

// The means of a and l over the masked-in tokens, rounded to scalar_t (as the products are then
// computed), and their count. `offset` is added to the count in scalar_t before the division.
template <typename scalar_t, typename mask_t>
Means<scalar_t> means(const Inputs<scalar_t, mask_t>& in, const Layout& g, double offset) {
  std::vector<double> sa(g.blocks, 0.0), sl(g.blocks, 0.0);
  std::vector<int64_t> cnt(g.blocks, 0);
  at::parallel_for(0, g.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r1 = std::min(g.S, (b + 1) * g.rows_per_block);
      for (int64_t r = b * g.rows_per_block; r < r1; ++r) {
        row_sums(in.a + r * in.sa, in.l + r * in.sl, in.m + r * in.sm, g.T, &sa[b], &sl[b], &cnt[b]);
      }
    }
  });
  double total_a = 0.0, total_l = 0.0;
  int64_t n = 0;
  for (int64_t b = 0; b < g.blocks; ++b) {
    total_a += sa[b];
    total_l += sl[b];
    n += cnt[b];
  }
  const double denominator = static_cast<double>(static_cast<scalar_t>(n) + static_cast<scalar_t>(offset));
  if (n == 0) return {scalar_t(0), scalar_t(0), 0};
  return {static_cast<scalar_t>(total_a / denominator), static_cast<scalar_t>(total_l / denominator), n};
}

// One tile's products (a - ma)(l - ml) and mask flags.
template <typename scalar_t, typename mask_t>
void tile_products(const scalar_t* __restrict__ a, const scalar_t* __restrict__ l, const mask_t* __restrict__ m,
                   int len, scalar_t ma, scalar_t ml, scalar_t* __restrict__ cov, uint8_t* __restrict__ keep) {
  for (int j = 0; j < len; ++j) {
    cov[j] = (a[j] - ma) * (l[j] - ml);
    keep[j] = m[j] != mask_t(0) ? 1 : 0;
  }
}

template <typename scalar_t, typename mask_t>
std::vector<int64_t> top_k_kernel(const Inputs<scalar_t, mask_t>& in, const Layout& g, int64_t k) {
  using E = Entry<scalar_t>;
  const Means<scalar_t> mean = means(in, g, 0.0);
  const scalar_t ma = mean.a, ml = mean.l;
  const int64_t n = mean.count;
  const int64_t want = std::min<int64_t>(k, n);
  if (want == 0) return {};
  // Each thread keeps a buffer of candidates; when it reaches `cap` it is cut to its best `want`,
  // whose last then bars every token that does not rank before it. A tile whose largest product
  // (it has no NaN) is below the bar is passed over whole: most tiles, once the bar has risen.
  const int64_t cap = std::max<int64_t>(2 * want, 1024);
  std::vector<std::vector<E>> found(g.blocks);
  at::parallel_for(0, g.blocks, 1, [&](int64_t b0, int64_t b1) {
    scalar_t cov[kTile], top[kTile];
    uint8_t keep[kTile];
    std::vector<E>& buf = found[b0];
    bool barred = false;
    E bar{scalar_t(0), 0};
    const scalar_t lowest = -std::numeric_limits<scalar_t>::infinity();
    const int64_t r1 = std::min(g.S, b1 * g.rows_per_block);
    for (int64_t r = b0 * g.rows_per_block; r < r1; ++r) {
      for (int64_t t0 = 0; t0 < g.T; t0 += kTile) {
        const int len = (g.T - t0) < kTile ? static_cast<int>(g.T - t0) : kTile;
        tile_products(in.a + r * in.sa + t0, in.l + r * in.sl + t0, in.m + r * in.sm + t0, len, ma, ml, cov,
                      keep);
        if (barred) {
          uint8_t nan = 0;
          for (int j = 0; j < len; ++j) {
            top[j] = keep[j] ? cov[j] : lowest;
            nan |= static_cast<uint8_t>(keep[j] & (cov[j] != cov[j]));
          }
          for (int j = len; j < kTile; ++j) top[j] = lowest;
          for (int width = kTile / 2; width >= 1; width /= 2) {
            for (int j = 0; j < width; ++j) top[j] = top[j] > top[j + width] ? top[j] : top[j + width];
          }
          if (!nan && top[0] < bar.value) continue;
        }
        for (int j = 0; j < len; ++j) {
          if (!keep[j]) continue;
          const E e{cov[j], r * g.T + t0 + j};
          if (barred && !ranks_before(e, bar)) continue;
          buf.push_back(e);
          if (static_cast<int64_t>(buf.size()) >= cap) {
            std::nth_element(buf.begin(), buf.begin() + (want - 1), buf.end(), ranks_before<scalar_t>);
            buf.resize(want);
            bar = buf[want - 1];
            barred = true;
          }
        }
      }
    }
  });
  std::vector<E> all;
  for (auto& buf : found) all.insert(all.end(), buf.begin(), buf.end());
  if (static_cast<int64_t>(all.size()) > want) {
    std::nth_element(all.begin(), all.begin() + (want - 1), all.end(), ranks_before<scalar_t>);
    all.resize(want);
  }
  std::sort(all.begin(), all.end(), ranks_before<scalar_t>);
  std::vector<int64_t> out(all.size());
  for (size_t i = 0; i < all.size(); ++i) out[i] = all[i].index;
  return out;
}

// verl's clip test: the clipped term -A clamp(rho) exceeds the unclipped -A rho (computed as
// verl computes it, in scalar_t).
template <typename scalar_t>
bool clip_acts(scalar_t a, scalar_t l, scalar_t o, scalar_t low, scalar_t high) {
  const scalar_t rho = std::exp(l - o);
  const scalar_t clamped = rho < low ? low : (rho > high ? high : rho);
  return -a * clamped > -a * rho;
}

template <typename scalar_t, typename mask_t>
std::vector<int64_t> band_kernel(const Inputs<scalar_t, mask_t>& in, const Layout& g, double low, double high,
                                 bool clip_test, double eps_low, double eps_high) {
  // verl's masked means divide by the count + 1e-8 (in scalar_t: it vanishes in float32).
  const Means<scalar_t> mean = means(in, g, 1e-8);
  const scalar_t ma = mean.a, ml = mean.l;
  if (mean.count == 0) return {};
  const scalar_t lo = static_cast<scalar_t>(low), hi = static_cast<scalar_t>(high);
  const scalar_t r_lo = scalar_t(1) - static_cast<scalar_t>(eps_low);
  const scalar_t r_hi = scalar_t(1) + static_cast<scalar_t>(eps_high);
  std::vector<std::vector<int64_t>> found(g.blocks);
  at::parallel_for(0, g.blocks, 1, [&](int64_t b0, int64_t b1) {
    scalar_t cov[kTile];
    uint8_t keep[kTile];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r1 = std::min(g.S, (b + 1) * g.rows_per_block);
      for (int64_t r = b * g.rows_per_block; r < r1; ++r) {
        const scalar_t* a = in.a + r * in.sa;
        const scalar_t* l = in.l + r * in.sl;
        for (int64_t t0 = 0; t0 < g.T; t0 += kTile) {
          const int len = (g.T - t0) < kTile ? static_cast<int>(g.T - t0) : kTile;
          tile_products(a + t0, l + t0, in.m + r * in.sm + t0, len, ma, ml, cov, keep);
          uint8_t any = 0;
          for (int j = 0; j < len; ++j) {  // the band test over the tile first: it vectorises
            keep[j] = static_cast<uint8_t>(keep[j] & (cov[j] > lo) & (cov[j] < hi));
            any |= keep[j];
          }
          if (!any) continue;
          for (int j = 0; j < len; ++j) {
            if (!keep[j]) continue;
            // The exponential only for the tokens in the band (a small share, usually).
            if (clip_test && clip_acts(a[t0 + j], l[t0 + j], in.o[r * in.so + t0 + j], r_lo, r_hi)) continue;
            found[b].push_back(r * g.T + t0 + j);
          }
        }
      }
    }
  });
  std::vector<int64_t> out;
  for (auto& f : found) out.insert(out.end(), f.begin(), f.end());
  return out;
}

struct Prepared {
  at::Tensor a, l, o, m;
  at::ScalarType dt;
};

Prepared prepare(const at::Tensor& advantages, const at::Tensor& logp, const at::Tensor& mask,
                 const std::optional<at::Tensor>& old_logp) {
  check_cpu(logp, "logp");
  check_floating(logp, "logp");
  TORCH_CHECK_VALUE(logp.dim() == 2, "logp must have shape [S, T], got ", logp.sizes());
  check_like_logp(advantages, "advantages", logp);
  if (old_logp.has_value()) check_like_logp(*old_logp, "old_logp", logp);
  check_mask(mask, logp);
  const at::ScalarType dt = logp.scalar_type() == at::kDouble || advantages.scalar_type() == at::kDouble
                                ? at::kDouble
                                : at::kFloat;
  Prepared p{rows_contiguous(advantages.to(dt)), rows_contiguous(logp.to(dt)), at::Tensor(), readable_mask(mask),
             dt};
  if (old_logp.has_value()) p.o = rows_contiguous(old_logp->to(dt));
  return p;
}

template <typename scalar_t, typename mask_t>
Inputs<scalar_t, mask_t> inputs_of(const Prepared& p) {
  const bool has_old = p.o.defined();
  return {static_cast<const scalar_t*>(p.a.const_data_ptr()),
          static_cast<const scalar_t*>(p.l.const_data_ptr()),
          has_old ? static_cast<const scalar_t*>(p.o.const_data_ptr()) : nullptr,
          static_cast<const mask_t*>(p.m.const_data_ptr()),
          p.a.stride(0),
          p.l.stride(0),
          has_old ? p.o.stride(0) : 0,
          p.m.stride(0)};
}

// Runs fn.template operator()<scalar_t, mask_t>() for the prepared dtypes.
template <typename Fn>
std::vector<int64_t> dispatch(const Prepared& p, Fn&& fn) {
  const auto mdt = p.m.scalar_type();
  auto with_mask = [&](auto scalar_tag) -> std::vector<int64_t> {
    using scalar_t = decltype(scalar_tag);
    switch (mdt) {
      case at::kBool:
      case at::kByte:
        return fn(inputs_of<scalar_t, uint8_t>(p));
      case at::kLong:
        return fn(inputs_of<scalar_t, int64_t>(p));
      case at::kDouble:
        return fn(inputs_of<scalar_t, double>(p));
      default:  // float32, or converted to it
        return fn(inputs_of<scalar_t, float>(p));
    }
  };
  return p.dt == at::kDouble ? with_mask(double{}) : with_mask(float{});
}

at::Tensor to_tensor(const std::vector<int64_t>& v, const at::Tensor& like) {
  at::Tensor out = at::empty({static_cast<int64_t>(v.size())}, like.options().dtype(at::kLong));
  if (!v.empty()) std::memcpy(out.mutable_data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
  return out;
}

}  // namespace

at::Tensor covariance_top_k(const at::Tensor& advantages, const at::Tensor& logp, const at::Tensor& mask,
                            int64_t k) {
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  const Prepared p = prepare(advantages, logp, mask, std::nullopt);
  const Layout g = layout_of(logp.size(0), logp.size(1));
  return to_tensor(dispatch(p, [&](const auto& in) { return top_k_kernel(in, g, k); }), logp);
}

at::Tensor covariance_band(const at::Tensor& advantages, const at::Tensor& logp, const at::Tensor& mask,
                           double low, double high, const std::optional<at::Tensor>& old_logp, double eps_low,
                           double eps_high) {
  TORCH_CHECK_VALUE(!std::isnan(low) && !std::isnan(high), "low and high must not be NaN, got ", low, " and ",
                    high);
  const Prepared p = prepare(advantages, logp, mask, old_logp);
  const Layout g = layout_of(logp.size(0), logp.size(1));
  const bool clip_test = old_logp.has_value();
  return to_tensor(dispatch(p, [&](const auto& in) {
                     return band_kernel(in, g, low, high, clip_test, eps_low, eps_high);
                   }),
                   logp);
}

}  // namespace iama::cpu
