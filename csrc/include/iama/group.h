// Per-group first variations, group values, lambda-combination and centring/scaling
// (SPEC sections 2-4), one group at a time, on raw pointers.
//
// Conventions shared with the float64 reference (iama_kernels/advantages/reference.py):
// * a criterion's valid rewards are sorted ascending and shifted by their minimum, x = r - r_min
//   (exact zeros for the minimum and for constant groups; large offsets lose no precision);
// * every member of a run of tied rewards takes the value computed at the run's last sorted
//   position, so ties are bit-identical whatever order they arrive in;
// * every reduction over a group runs in a canonical order (sorted rewards; for the scale, the
//   sorted order of one criterion with ties on it ordered by value), so permuting a group
//   permutes its outputs bit for bit;
// * accumulation is in acc_t (double on the CPU) and results are rounded once at the end.
#pragma once

#include "common.h"
#include "sort.h"
#include "weights.h"

IAMA_NAMESPACE_BEGIN

// Sum of x and of (x - centre)^2 over an array in a canonical order. Four interleaved partial
// sums (a fixed order, so still deterministic) keep the additions from waiting on each other.
template <typename acc_t>
IAMA_HD IAMA_INLINE acc_t sum_of(const acc_t* x, int n) {
  acc_t part[4] = {0, 0, 0, 0};
  int k = 0;
  for (; k + 4 <= n; k += 4) {
    for (int l = 0; l < 4; ++l) part[l] += x[k + l];
  }
  for (; k < n; ++k) part[0] += x[k];
  return (part[0] + part[1]) + (part[2] + part[3]);
}
template <typename acc_t>
IAMA_HD IAMA_INLINE acc_t sum_of_squared_deviations(const acc_t* x, int n, acc_t centre) {
  acc_t part[4] = {0, 0, 0, 0};
  int k = 0;
  for (; k + 4 <= n; k += 4) {
    for (int l = 0; l < 4; ++l) part[l] += (x[k + l] - centre) * (x[k + l] - centre);
  }
  for (; k < n; ++k) part[0] += (x[k] - centre) * (x[k] - centre);
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// Uncentred first variation at each sorted position of one criterion, ties resolved, then
// centred; returns the group value (with the minimum added back).
//   xs:    [g] valid rewards sorted ascending (g >= 1)
//   table: the BestOfN table of (g, n, estimator) (see weights.h); unused for other transforms
//   s:     [g] output, centred first variation at each sorted position
template <typename acc_t>
IAMA_HD IAMA_INLINE acc_t sorted_first_variation(const acc_t* xs, int g, const CriterionSpec& c, int estimator,
                                     const double* table, acc_t* s) {
  const acc_t shift = xs[0];
  acc_t value = 0;
  if (c.kind == kBestOfN && c.n > 1) {
    const double* inc = table;
    const double* prefix = table + g;
    const double* vw = table + 2 * g;
    {
      acc_t part[4] = {0, 0, 0, 0};
      int k = 0;
      for (; k + 4 <= g; k += 4) {
        for (int l = 0; l < 4; ++l) part[l] += static_cast<acc_t>(vw[k + l]) * (xs[k + l] - shift);
      }
      for (; k < g; ++k) part[0] += static_cast<acc_t>(vw[k]) * (xs[k] - shift);
      value = (part[0] + part[1]) + (part[2] + part[3]);
    }
    if (estimator == kPlugin) {
      // s_(1) = 0, s_(k+1) = s_(k) + c_k (x_{k+1} - x_k)
      s[0] = 0;
      for (int k = 1; k < g; ++k) {
        s[k] = s[k - 1] + static_cast<acc_t>(inc[k - 1]) * ((xs[k] - shift) - (xs[k - 1] - shift));
      }
    } else {
      // s_(p) = x_p A_(p-1) + sum_{q > p} a_(q-1) x_q, the sum as a suffix sum from the top.
      acc_t suffix = 0;
      for (int p = g - 1; p >= 0; --p) {
        const acc_t x = xs[p] - shift;
        s[p] = x * static_cast<acc_t>(prefix[p]) + suffix;
        if (p >= 1) suffix += static_cast<acc_t>(inc[p - 1]) * x;
      }
    }
  } else if (c.kind == kSoftBestOfN) {
    // w = exp((x - x_max) / tau) (exactly 1 at the maximum), R = sum w x / sum w,
    // s = w / mean(w) (x - R).
    const acc_t top = xs[g - 1] - shift;
    const acc_t tau = static_cast<acc_t>(c.tau);
    acc_t sw = 0, swx = 0;
    for (int k = 0; k < g; ++k) {
      const acc_t x = xs[k] - shift;
      const acc_t d = x - top;
      const acc_t w = d == acc_t(0) ? acc_t(1) : exp_acc(d / tau);
      s[k] = w;
      sw += w;
      swx += w * x;
    }
    const acc_t r_hat = swx / sw;
    const acc_t mean_w = sw / static_cast<acc_t>(g);
    for (int k = 0; k < g; ++k) s[k] = s[k] / mean_w * ((xs[k] - shift) - r_hat);
    value = r_hat;
  } else {
    // Mean, and BestOfN(1) (plain GRPO for both estimators): s = x.
    for (int k = 0; k < g; ++k) s[k] = xs[k] - shift;
    value = sum_of(s, g) / static_cast<acc_t>(g);
  }
  // Tied runs take the value at their last position (walk down from the top of each run).
  for (int p = g - 2; p >= 0; --p) {
    if (xs[p] == xs[p + 1]) s[p] = s[p + 1];
  }
  const acc_t mean = sum_of(s, g) / static_cast<acc_t>(g);
  for (int k = 0; k < g; ++k) s[k] -= mean;
  return value + shift;
}

// Where to find the BestOfN table of criterion i for groups of g valid samples.
struct TableIndex {
  const double* tables;  // all tables, concatenated
  const int64_t* offset;  // [m, G + 1]: offset[i * (G + 1) + g] into tables (-1 if absent)
  int G;
  IAMA_HD const double* get(int i, int g) const {
    const int64_t o = offset[i * (G + 1) + g];
    return o < 0 ? nullptr : tables + o;
  }
};

// Scratch memory for one group of G samples (see group_scratch_bytes).
template <typename in_t, typename acc_t>
struct GroupScratch {
  in_t* keys;             // [G] valid rewards of one criterion, in input order
  int32_t* index;         // [G] their sample indices
  int32_t* pos;           // [G] their sorted positions
  int32_t* order;         // [G] sample index at each sorted position
  acc_t* xs;              // [G] sorted rewards
  acc_t* s;               // [G] first variation at each sorted position
  KeyIndex<acc_t>* pairs;  // [2 G] for groups larger than kRankSortMax
};

// Sorts the g valid rewards of scratch.keys into scratch.xs (ascending) and scratch.order.
template <typename in_t, typename acc_t>
IAMA_HD inline void sort_group(int g, GroupScratch<in_t, acc_t>& w) {
  if (g <= kRankSortMax) {
    rank_positions(w.keys, g, w.pos);
    for (int k = 0; k < g; ++k) {
      w.xs[w.pos[k]] = static_cast<acc_t>(w.keys[k]);
      w.order[w.pos[k]] = w.index[k];
    }
    return;
  }
  for (int k = 0; k < g; ++k) {
    w.pairs[k].key = static_cast<acc_t>(w.keys[k]);
    w.pairs[k].index = w.index[k];
  }
  sort_ascending(w.pairs, w.pairs + g, g);
  for (int k = 0; k < g; ++k) {
    w.xs[k] = w.pairs[k].key;
    w.order[k] = w.pairs[k].index;
  }
}

// Centred first variations [G, m] and values [m] of one group (all m criteria).
//   r[j * sg + i * sc]: reward of sample j, criterion i;  valid[j * sv] (nullptr: all valid)
//   s_out[j * m + i]:   centred first variation (0 for invalid samples)
//   values_out[i]:      group value (0 when the group has no valid sample)
template <typename in_t, typename out_t, typename acc_t>
IAMA_HD void group_first_variation(const in_t* r, int64_t sg, int64_t sc, const bool* valid, int64_t sv,
                                   int G, int m, const CriterionSpec* specs, int estimator,
                                   const TableIndex& tables, GroupScratch<in_t, acc_t> w, out_t* s_out,
                                   out_t* values_out) {
  for (int i = 0; i < m; ++i) {
    int g = 0;
    for (int j = 0; j < G; ++j) {
      if (valid == nullptr || valid[j * sv]) {
        w.keys[g] = r[j * sg + i * sc];
        w.index[g] = j;
        ++g;
      } else {
        s_out[j * m + i] = out_t(0);
      }
    }
    if (g == 0) {
      values_out[i] = out_t(0);
      continue;
    }
    sort_group(g, w);
    const acc_t value = sorted_first_variation(w.xs, g, specs[i], estimator, tables.get(i, g), w.s);
    for (int k = 0; k < g; ++k) s_out[w.order[k] * m + i] = static_cast<out_t>(w.s[k]);
    values_out[i] = static_cast<out_t>(value);
  }
}

// shaped_j = sum_i lambda_i s_ij for the valid samples of one group (0 for invalid ones).
// The valid values are also written to `canonical` in an order that does not depend on the order
// of the samples, so that the group's sums are permutation-invariant bit for bit: the sorted
// order of one criterion's rewards (order[k] is the sample at sorted position k, xs[k] its
// reward), with the samples that tie on that reward ordered by value (runs are short: an
// insertion sort restricted to each run costs count - 1 comparisons when nothing ties).
//   s[j * m + i] (centred first variations), lam[m], valid[j * sv] (nullptr: all valid)
template <typename s_t, typename acc_t>
IAMA_HD IAMA_INLINE int combine_group(const s_t* s, const acc_t* lam, const bool* valid, int64_t sv, int G, int m,
                          const int32_t* order, const acc_t* xs, acc_t* shaped, acc_t* canonical) {
  int count = 0;
  for (int j = 0; j < G; ++j) {
    acc_t v = 0;
    if (valid == nullptr || valid[j * sv]) {
      for (int i = 0; i < m; ++i) v += lam[i] * static_cast<acc_t>(s[j * m + i]);
      ++count;
    }
    shaped[j] = v;
  }
  for (int k = 0; k < count; ++k) canonical[k] = shaped[order[k]];
  for (int k = 1; k < count; ++k) {
    if (!(xs[k] == xs[k - 1])) continue;
    const acc_t v = canonical[k];
    int j = k - 1;
    while (j >= 0 && xs[j] == xs[k] && v < canonical[j]) {
      canonical[j + 1] = canonical[j];
      --j;
    }
    canonical[j + 1] = v;
  }
  return count;
}

// The scale's denominator from a count, a sum and a sum of squared deviations around sum/count:
// Bessel-corrected std + eps (with max(1, count - 1), so fewer than 2 samples give eps).
template <typename acc_t>
IAMA_HD inline acc_t scale_denominator(acc_t count, acc_t m2, acc_t eps) {
  const acc_t dof = count - acc_t(1) > acc_t(1) ? count - acc_t(1) : acc_t(1);
  return ::sqrt(m2 / dof) + eps;
}

// advantage = shaped / denominator, 0 where the denominator is 0 (eps = 0 and a constant group,
// where shaped is exactly 0) and for invalid samples.
template <typename acc_t, typename out_t>
IAMA_HD inline void scale_group(const acc_t* shaped, const bool* valid, int64_t sv, int G, acc_t denom,
                                out_t* adv_out, out_t* shaped_out) {
  for (int j = 0; j < G; ++j) {
    const bool ok = valid == nullptr || valid[j * sv];
    shaped_out[j] = static_cast<out_t>(ok ? shaped[j] : acc_t(0));
    adv_out[j] = static_cast<out_t>(ok && denom > acc_t(0) ? shaped[j] / denom : acc_t(0));
  }
}

IAMA_NAMESPACE_END  // namespace iama
