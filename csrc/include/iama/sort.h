// Ascending sorts for one group, usable on host and device.
//
// * rank_positions: the sorted position of every element by counting (O(G^2) branch-free
//   comparisons that vectorise, and what one thread per element does on a GPU); the fastest
//   for the usual group sizes (G <= 64).
// * sort_ascending: insertion sort for short runs and a bottom-up merge for longer ones,
//   O(G log G), no recursion, no allocation (the caller passes a scratch array).
// Both are stable, although nothing downstream depends on the order of equal keys: tied rewards
// get the value computed at the end of their run, which is the same whatever order they arrive in.
#pragma once

#include "common.h"

IAMA_NAMESPACE_BEGIN

// A reward and the sample it came from.
template <typename T>
struct KeyIndex {
  T key;
  int32_t index;
};

template <typename T>
IAMA_HD inline T sort_key(const KeyIndex<T>& e) { return e.key; }
IAMA_HD inline double sort_key(double v) { return v; }
IAMA_HD inline float sort_key(float v) { return v; }

template <typename E>
IAMA_HD inline void insertion_sort(E* a, int n) {
  for (int i = 1; i < n; ++i) {
    const E e = a[i];
    int j = i - 1;
    while (j >= 0 && sort_key(e) < sort_key(a[j])) {
      a[j + 1] = a[j];
      --j;
    }
    a[j + 1] = e;
  }
}

// Sorts a[0..n) ascending by sort_key; tmp must hold n elements. Keys must not be NaN.
template <typename E>
IAMA_HD inline void sort_ascending(E* a, E* tmp, int n) {
  constexpr int kRun = 16;
  for (int lo = 0; lo < n; lo += kRun) insertion_sort(a + lo, (n - lo) < kRun ? (n - lo) : kRun);
  if (n <= kRun) return;
  E* src = a;
  E* dst = tmp;
  for (int width = kRun; width < n; width *= 2) {
    for (int lo = 0; lo < n; lo += 2 * width) {
      const int mid = (lo + width) < n ? (lo + width) : n;
      const int hi = (lo + 2 * width) < n ? (lo + 2 * width) : n;
      int i = lo, j = mid, k = lo;
      while (i < mid && j < hi) dst[k++] = (sort_key(src[j]) < sort_key(src[i])) ? src[j++] : src[i++];
      while (i < mid) dst[k++] = src[i++];
      while (j < hi) dst[k++] = src[j++];
    }
    E* t = src;
    src = dst;
    dst = t;
  }
  if (src != a) {
    for (int i = 0; i < n; ++i) a[i] = src[i];
  }
}

// Groups up to this size are ordered by rank_positions, larger ones by sort_ascending.
constexpr int kRankSortMax = 64;

// pos[i] = the sorted position of keys[i]: #{j : k_j < k_i} + #{j < i : k_j == k_i}.
// One fixed-length loop of plain comparisons per element (it vectorises, and is what one thread
// per element does on a GPU), which also counts equal keys; only when some keys tie does a
// second loop add #{j < i : k_j == k_i}, giving tied keys consecutive positions in input order.
// Keys must not be NaN.
template <typename T>
IAMA_HD inline void rank_positions(const T* keys, int n, int32_t* pos) {
  int32_t equal_pairs = 0;
  for (int i = 0; i < n; ++i) {
    const T ki = keys[i];
    int32_t less = 0, equal = 0;
    for (int j = 0; j < n; ++j) {
      less += static_cast<int32_t>(keys[j] < ki);
      equal += static_cast<int32_t>(keys[j] == ki);
    }
    pos[i] = less;
    equal_pairs += equal;
  }
  if (equal_pairs == n) return;  // every key equals only itself
  for (int i = 1; i < n; ++i) {
    const T ki = keys[i];
    int32_t before = 0;
    for (int j = 0; j < i; ++j) before += static_cast<int32_t>(keys[j] == ki);
    pos[i] += before;
  }
}

IAMA_NAMESPACE_END  // namespace iama
