// CPU glue for the group ops: iama::group_stats and iama::group_advantages.
//
// Groups are independent, so both ops run at::parallel_for over groups; each task owns its
// scratch memory. Every reduction inside a group runs in a canonical (sorted) order and
// cross-group reductions (the "batch" scale) add per-group partials in group order, so results
// do not depend on the number of threads. group_advantages sends batches without a valid mask
// whose G is 4, 8, 16, 32 or 64 to the fixed-size pass (group_fast.h: compile-time G, and for
// G = 16 float32 a fused AVX-512 kernel), which rounds exactly as the general path below.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "group_fast.h"
#include "iama/group.h"
#include "ops.h"

// No floating-point contraction in the group arithmetic, as in the fixed-size pass (on targets
// with fused multiply-add, GCC would otherwise fuse here and not there).
#pragma GCC optimize("fp-contract=off")

namespace iama::cpu {
namespace {

// Groups per parallel task: enough work per task to amortise the scheduling.
int64_t group_grain(int64_t G, int64_t m) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, G * m)); }

struct Tables {
  std::vector<double> data;
  std::vector<int64_t> offset;
  TableIndex index(int G) const { return TableIndex{data.data(), offset.data(), G}; }
};

// One BestOfN table per (criterion, valid count present in the batch).
Tables build_tables(const std::vector<CriterionSpec>& specs, int estimator, int G, const std::vector<char>& present) {
  const int m = static_cast<int>(specs.size());
  Tables t;
  t.offset.assign(static_cast<size_t>(m) * (G + 1), -1);
  int64_t total = 0;
  for (int i = 0; i < m; ++i) {
    if (specs[i].kind != kBestOfN || specs[i].n <= 1) continue;
    for (int g = 1; g <= G; ++g) {
      if (!present[g]) continue;
      TORCH_CHECK_VALUE(estimator != kUnbiased || g >= specs[i].n, "estimator='unbiased' needs at least n=",
                        specs[i].n, " valid samples per group, but a group has ", g, "; use estimator='plugin'");
      t.offset[static_cast<size_t>(i) * (G + 1) + g] = total;
      total += 3 * g;
    }
  }
  t.data.resize(static_cast<size_t>(total));
  for (int i = 0; i < m; ++i) {
    for (int g = 1; g <= G; ++g) {
      const int64_t o = t.offset[static_cast<size_t>(i) * (G + 1) + g];
      if (o >= 0) fill_bestofn_table(g, specs[i].n, estimator, t.data.data() + o);
    }
  }
  return t;
}

template <typename scalar_t>
void group_stats_kernel(const at::Tensor& r, const bool* valid, int64_t vb, int64_t vg,
                        const std::vector<CriterionSpec>& specs, int estimator, const Tables& tables, at::Tensor& s,
                        at::Tensor& values) {
  const int64_t B = r.size(0), G = r.size(1), m = r.size(2);
  const int64_t rb = r.stride(0), rg = r.stride(1), rc = r.stride(2);
  const scalar_t* rp = r.const_data_ptr<scalar_t>();
  scalar_t* sp = s.mutable_data_ptr<scalar_t>();
  scalar_t* vp = values.mutable_data_ptr<scalar_t>();
  const TableIndex index = tables.index(static_cast<int>(G));
  at::parallel_for(0, B, group_grain(G, m), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> keys(G);
    std::vector<int32_t> ints(3 * G);
    std::vector<double> work(2 * G);
    std::vector<KeyIndex<double>> pairs(G > kRankSortMax ? 2 * G : 0);
    GroupScratch<scalar_t, double> scratch{keys.data(), ints.data(),     ints.data() + G, ints.data() + 2 * G,
                                           work.data(), work.data() + G, pairs.data()};
    for (int64_t b = begin; b < end; ++b) {
      group_first_variation<scalar_t, scalar_t, double>(
          rp + b * rb, rg, rc, valid == nullptr ? nullptr : valid + b * vb, vg, static_cast<int>(G),
          static_cast<int>(m), specs.data(), estimator, index, scratch, sp + b * G * m, vp + b * m);
    }
  });
}

// Per-task scratch of the advantages kernel.
template <typename scalar_t>
struct AdvantageScratch {
  std::vector<scalar_t> keys;
  std::vector<int32_t> ints;
  std::vector<double> work;
  std::vector<KeyIndex<double>> pairs;
  GroupScratch<scalar_t, double> group;
  double *s_all, *values;
  AdvantageScratch(int64_t G, int64_t m)
      : keys(G), ints(3 * G), work(2 * G + G * m + m), pairs(G > kRankSortMax ? 2 * G : 0) {
    group = GroupScratch<scalar_t, double>{keys.data(),  ints.data(),     ints.data() + G, ints.data() + 2 * G,
                                           work.data(), work.data() + G, pairs.data()};
    s_all = work.data() + 2 * G;
    values = s_all + G * m;
  }
};

// One group: centred first variations of every criterion (kept in double), values, then the
// lambda-combination; returns the valid count, with shaped [G] and canonical [count] filled.
template <typename scalar_t>
int shaped_group(const scalar_t* r, int64_t rg, int64_t rc, const bool* valid, int64_t vg, int64_t G, int64_t m,
                 const std::vector<CriterionSpec>& specs, int estimator, const TableIndex& index,
                 const std::vector<double>& lam, AdvantageScratch<scalar_t>& w, scalar_t* values_out,
                 double* shaped, double* canonical) {
  group_first_variation<scalar_t, double, double>(r, rg, rc, valid, vg, static_cast<int>(G), static_cast<int>(m),
                                                  specs.data(), estimator, index, w.group, w.s_all, w.values);
  for (int64_t i = 0; i < m; ++i) values_out[i] = static_cast<scalar_t>(w.values[i]);
  // The scratch still holds the last criterion's sorted rewards and order: the canonical order.
  return combine_group<double, double>(w.s_all, lam.data(), valid, vg, static_cast<int>(G), static_cast<int>(m),
                                       w.group.order, w.group.xs, shaped, canonical);
}

// The fixed-size group pass (group_fast.h) applies: no valid mask, G in its sizes, m <= kFixedMaxM.
template <typename scalar_t>
struct FixedPlan {
  bool on = false;
  std::vector<FixedSpec> specs;
  std::vector<const double*> tables;
  FixedGroups<scalar_t> groups;
};

template <typename scalar_t>
FixedPlan<scalar_t> fixed_plan(const at::Tensor& r, const bool* valid, const std::vector<CriterionSpec>& specs,
                               int estimator, const TableIndex& index, const std::vector<double>& lam,
                               at::Tensor& values) {
  const int64_t G = r.size(1), m = r.size(2);
  FixedPlan<scalar_t> plan;
  // (the AVX-512 build gathers a criterion's rewards with 32-bit offsets j * stride(1))
  plan.on = valid == nullptr && fixed_group_size(G) && m <= kFixedMaxM && r.stride(1) * G < (int64_t{1} << 31);
  if (!plan.on) return plan;
  for (int64_t i = 0; i < m; ++i) {
    plan.specs.push_back(FixedSpec{specs[i].kind, specs[i].n, specs[i].tau});
    plan.tables.push_back(index.get(static_cast<int>(i), static_cast<int>(G)));
  }
  FixedGroups<scalar_t>& g = plan.groups;
  g.r = r.const_data_ptr<scalar_t>();
  g.rb = r.stride(0);
  g.rg = r.stride(1);
  g.rc = r.stride(2);
  g.G = static_cast<int>(G);
  g.m = static_cast<int>(m);
  g.specs = plan.specs.data();
  g.estimator = estimator;
  g.tables = plan.tables.data();
  g.lam = lam.data();
  g.values = values.mutable_data_ptr<scalar_t>();
  return plan;
}

template <typename scalar_t>
void advantages_kernel(const at::Tensor& r, const bool* valid, int64_t vb, int64_t vg,
                       const std::vector<CriterionSpec>& specs, int estimator, const Tables& tables,
                       const std::vector<double>& lam, int scale, double eps, at::Tensor& adv, at::Tensor& shaped_out,
                       at::Tensor& values) {
  const int64_t B = r.size(0), G = r.size(1), m = r.size(2);
  const int64_t rb = r.stride(0), rg = r.stride(1), rc = r.stride(2);
  const scalar_t* rp = r.const_data_ptr<scalar_t>();
  scalar_t* ap = adv.mutable_data_ptr<scalar_t>();
  scalar_t* hp = shaped_out.mutable_data_ptr<scalar_t>();
  scalar_t* vp = values.mutable_data_ptr<scalar_t>();
  const TableIndex index = tables.index(static_cast<int>(G));
  const int64_t grain = group_grain(G, m);
  const FixedPlan<scalar_t> fixed = fixed_plan<scalar_t>(r, valid, specs, estimator, index, lam, values);
  auto valid_of = [&](int64_t b) { return valid == nullptr ? nullptr : valid + b * vb; };
  if (scale != kScaleBatch) {
    // Scale and write one group from its combined values and their canonical copy.
    auto finish = [&](int64_t b, const double* shaped, const double* canonical, int count) {
      double denom = 1.0;
      if (scale == kScaleGroup) {
        const double mean = sum_of(canonical, count) / std::max(count, 1);
        denom = scale_denominator<double>(count, sum_of_squared_deviations(canonical, count, mean), eps);
      }
      scale_group<double, scalar_t>(shaped, valid_of(b), vg, static_cast<int>(G), denom, ap + b * G, hp + b * G);
    };
    bool fused = false;
    if constexpr (std::is_same_v<scalar_t, float>) fused = fixed.on && fused16_applies(fixed.groups, scale);
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (fused) return fused16_groups_avx512(fixed.groups, scale, eps, ap, hp, begin, end);
      }
      if (fixed.on) {
        // Chunks of groups: one call of the fixed-size pass each, then the scale of each group.
        constexpr int64_t kChunk = 64;
        std::vector<double> shaped(kChunk * G), canonical(kChunk * G);
        for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
          const int64_t c1 = std::min(end, c0 + kChunk);
          fixed_groups(fixed.groups, c0, c1, shaped.data(), canonical.data());
          for (int64_t b = c0; b < c1; ++b) {
            finish(b, shaped.data() + (b - c0) * G, canonical.data() + (b - c0) * G, static_cast<int>(G));
          }
        }
        return;
      }
      AdvantageScratch<scalar_t> w(G, m);
      std::vector<double> shaped(G), canonical(G);
      for (int64_t b = begin; b < end; ++b) {
        const int count = shaped_group<scalar_t>(rp + b * rb, rg, rc, valid_of(b), vg, G, m, specs, estimator, index,
                                                 lam, w, vp + b * m, shaped.data(), canonical.data());
        finish(b, shaped.data(), canonical.data(), count);
      }
    });
    return;
  }
  // "batch": combined values of every group first (with their canonical copies), then the batch
  // mean, the batch sum of squared deviations (per-group partials added in group order), then
  // the division.
  std::vector<double> shaped(B * G), canonical(B * G), part(B);
  std::vector<int> counts(B);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    if (fixed.on) {
      fixed_groups(fixed.groups, begin, end, shaped.data() + begin * G, canonical.data() + begin * G);
      for (int64_t b = begin; b < end; ++b) {
        counts[b] = static_cast<int>(G);
        part[b] = sum_of(canonical.data() + b * G, counts[b]);
      }
      return;
    }
    AdvantageScratch<scalar_t> w(G, m);
    for (int64_t b = begin; b < end; ++b) {
      counts[b] = shaped_group<scalar_t>(rp + b * rb, rg, rc, valid_of(b), vg, G, m, specs, estimator, index, lam, w,
                                         vp + b * m, shaped.data() + b * G, canonical.data() + b * G);
      part[b] = sum_of(canonical.data() + b * G, counts[b]);
    }
  });
  double total = 0.0, count = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    total += part[b];
    count += counts[b];
  }
  const double mean = total / std::max(count, 1.0);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      part[b] = sum_of_squared_deviations(canonical.data() + b * G, counts[b], mean);
    }
  });
  double m2 = 0.0;
  for (int64_t b = 0; b < B; ++b) m2 += part[b];
  const double denom = scale_denominator<double>(count, m2, eps);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scale_group<double, scalar_t>(shaped.data() + b * G, valid_of(b), vg, static_cast<int>(G), denom, ap + b * G,
                                    hp + b * G);
    }
  });
}

// valid [B, G] bool on the CPU; returns its data pointer and strides (nullptr when absent).
const bool* valid_pointer(const std::optional<at::Tensor>& valid, int64_t B, int64_t G, int64_t& vb, int64_t& vg) {
  vb = vg = 0;
  if (!valid.has_value()) return nullptr;
  const at::Tensor& v = *valid;
  check_cpu(v, "valid");
  TORCH_CHECK_TYPE(v.scalar_type() == at::kBool, "valid must be a bool tensor, got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() == 2 && v.size(0) == B && v.size(1) == G, "valid must have shape [B, G] = [", B, ", ",
                    G, "], got ", v.sizes());
  vb = v.stride(0);
  vg = v.stride(1);
  return v.const_data_ptr<bool>();
}

// Shared front half of group_stats and group_advantages: checks, the widened rewards, the
// valid pointer and the BestOfN tables of the valid counts present in the batch.
struct GroupProblem {
  at::Tensor r;
  std::vector<CriterionSpec> specs;
  int estimator = kPlugin;
  const bool* valid = nullptr;
  int64_t vb = 0, vg = 0;
  Tables tables;
};

GroupProblem prepare_groups(const at::Tensor& rewards, const std::optional<at::Tensor>& valid, at::IntArrayRef kinds,
                            at::IntArrayRef ns, at::ArrayRef<double> taus, c10::string_view estimator) {
  check_cpu(rewards, "rewards");
  check_floating(rewards, "rewards");
  TORCH_CHECK_VALUE(rewards.dim() == 3, "rewards must have shape [B, G, m], got ", rewards.sizes());
  const int64_t B = rewards.size(0), G = rewards.size(1), m = rewards.size(2);
  TORCH_CHECK_VALUE(G >= 1 && G <= (int64_t{1} << 24), "rewards must have 1 <= G <= 2^24 samples per group, got ",
                    rewards.sizes());
  GroupProblem p;
  p.specs = parse_specs(kinds, ns, taus, m);
  p.estimator = parse_estimator(estimator);
  p.valid = valid_pointer(valid, B, G, p.vb, p.vg);
  const at::ScalarType ct = compute_dtype(rewards.scalar_type());
  // Half-precision rewards are widened once; float32/float64 are read in place, with any strides.
  p.r = rewards.scalar_type() == ct ? rewards : rewards.to(ct);
  std::vector<char> present(G + 1, 0);
  if (p.valid == nullptr) {
    present[G] = 1;
  } else {
    for (int64_t b = 0; b < B; ++b) {
      int64_t c = 0;
      for (int64_t j = 0; j < G; ++j) c += p.valid[b * p.vb + j * p.vg] ? 1 : 0;
      present[c] = 1;
    }
  }
  p.tables = build_tables(p.specs, p.estimator, static_cast<int>(G), present);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> group_stats(const at::Tensor& rewards, const std::optional<at::Tensor>& valid,
                                               at::IntArrayRef kinds, at::IntArrayRef ns,
                                               at::ArrayRef<double> taus, c10::string_view estimator) {
  const GroupProblem p = prepare_groups(rewards, valid, kinds, ns, taus, estimator);
  const int64_t B = p.r.size(0), G = p.r.size(1), m = p.r.size(2);
  at::Tensor s = at::empty({B, G, m}, p.r.options());
  at::Tensor values = at::empty({B, m}, p.r.options());
  if (B == 0 || m == 0) return {s, values};
  if (p.r.scalar_type() == at::kDouble) {
    group_stats_kernel<double>(p.r, p.valid, p.vb, p.vg, p.specs, p.estimator, p.tables, s, values);
  } else {
    group_stats_kernel<float>(p.r, p.valid, p.vb, p.vg, p.specs, p.estimator, p.tables, s, values);
  }
  return {s, values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_advantages(
    const at::Tensor& rewards, const std::optional<at::Tensor>& valid, const at::Tensor& lam, at::IntArrayRef kinds,
    at::IntArrayRef ns, at::ArrayRef<double> taus, c10::string_view estimator, c10::string_view scale, double eps) {
  const GroupProblem p = prepare_groups(rewards, valid, kinds, ns, taus, estimator);
  const int64_t B = p.r.size(0), G = p.r.size(1), m = p.r.size(2);
  check_cpu(lam, "lam");
  check_floating(lam, "lam");
  TORCH_CHECK_VALUE(lam.dim() == 1 && lam.size(0) == m, "lam must have shape [m] = [", m, "], got ", lam.sizes());
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
  const int sc = parse_scale(scale);
  // lambda as the compute dtype rounds it (as the reference multiplies in that dtype), then double.
  const at::Tensor lam64 = lam.to(p.r.scalar_type()).to(at::kDouble).contiguous();
  const std::vector<double> lam_vec(lam64.const_data_ptr<double>(), lam64.const_data_ptr<double>() + m);
  at::Tensor adv = at::empty({B, G}, p.r.options());
  at::Tensor shaped = at::empty({B, G}, p.r.options());
  at::Tensor values = at::empty({B, m}, p.r.options());
  if (B == 0 || m == 0) return {adv, shaped, values};
  if (p.r.scalar_type() == at::kDouble) {
    advantages_kernel<double>(p.r, p.valid, p.vb, p.vg, p.specs, p.estimator, p.tables, lam_vec, sc, eps, adv, shaped,
                              values);
  } else {
    advantages_kernel<float>(p.r, p.valid, p.vb, p.vg, p.specs, p.estimator, p.tables, lam_vec, sc, eps, adv, shaped,
                             values);
  }
  return {adv, shaped, values};
}

}  // namespace iama::cpu
