// Order-statistic weight tables of the BestOfN estimators (SPEC section 3), in double.
//
// Why computed here and not passed in from Python: a table depends only on (g, n, estimator),
// where g is a group's number of valid samples, which varies from group to group once a `valid`
// mask is given; computing it in the kernel layer keeps the op signatures free of tables and lets
// a CUDA build fill one table per (criterion, g) in shared memory with the same function.
//
// How G up to 1024 with any 1 <= n <= G stays finite and accurate: no binomial coefficient is
// ever formed. The plug-in weights are powers of k/g (computed exactly as iama_kernels/_weights.py
// does, with pow in double). The unbiased weights are ratios of binomials, obtained by a ratio
// recurrence that starts at the largest weight (a closed form of moderate size, e.g.
// a_{g-1} = n (n-1) / (g-1)) and walks down multiplying by (k - n + 1) / (k - 1) <= 1: values
// only shrink (towards harmless underflow far below any relevant weight), and the relative error
// of a weight is at most one rounding per step (< 1e-13 at g = 1024, ~1e-15 typically).
//
// Table layout for one (g, n, estimator), 3 g doubles:
//   t[k - 1]          k = 1..g-1  plug-in: c_k = n (k/g)^(n-1);  unbiased: a_k = n C(k-1, n-2) / C(g-1, n-1)
//   t[g + j]          j = 0..g-1  unbiased: A_j = n C(j, n-1) / C(g-1, n-1)  (plug-in: unused, 0)
//   t[2 g + k - 1]    k = 1..g    value weights: plug-in (k/g)^n - ((k-1)/g)^n; unbiased C(k-1, n-1) / C(g, n)
#pragma once

#include "common.h"

IAMA_NAMESPACE_BEGIN

// Fills the 3 g doubles of the table of BestOfN(n), n >= 2, for groups of g >= 1 valid samples.
// The unbiased estimator needs g >= n (checked by the callers).
IAMA_HD inline void fill_bestofn_table(int g, int n, int estimator, double* t) {
  for (int i = 0; i < 3 * g; ++i) t[i] = 0.0;
  double* inc = t;
  double* prefix = t + g;
  double* value = t + 2 * g;
  const double G = static_cast<double>(g);
  if (estimator == kPlugin) {
    for (int k = 1; k < g; ++k) inc[k - 1] = n * ::pow(k / G, static_cast<double>(n - 1));
    for (int k = 1; k <= g; ++k) {
      value[k - 1] = ::pow(k / G, static_cast<double>(n)) - ::pow((k - 1) / G, static_cast<double>(n));
    }
    return;
  }
  // Unbiased. a_{g-1} = n C(g-2, n-2) / C(g-1, n-1) = n (n-1) / (g-1);
  // a_{k-1} = a_k (k-n+1) / (k-1): C(k-2, n-2) / C(k-1, n-2) = (k-n+1) / (k-1), 0 once k-2 < n-2.
  if (g >= 2) {
    double a = static_cast<double>(n) * (n - 1) / (g - 1);
    for (int k = g - 1; k >= 1; --k) {
      inc[k - 1] = a;
      if (k >= 2) {
        const int num = k - n + 1;
        a = num > 0 ? a * (static_cast<double>(num) / (k - 1)) : 0.0;
      }
    }
  }
  // A_{g-1} = n; A_{j-1} = A_j (j-n+1) / j, 0 once j-1 < n-1.
  double A = static_cast<double>(n);
  for (int j = g - 1; j >= 0; --j) {
    prefix[j] = A;
    const int num = j - n + 1;
    A = (j >= 1 && num > 0) ? A * (static_cast<double>(num) / j) : 0.0;
  }
  // v_g = C(g-1, n-1) / C(g, n) = n / g; v_{k-1} = v_k (k-n) / (k-1), 0 once k-1 < n.
  double v = static_cast<double>(n) / g;
  for (int k = g; k >= 1; --k) {
    value[k - 1] = v;
    const int num = k - n;
    v = (k >= 2 && num > 0) ? v * (static_cast<double>(num) / (k - 1)) : 0.0;
  }
}

IAMA_NAMESPACE_END  // namespace iama
