// The hand-vectorised row's log16 and DPPO-KL's k, binary_kl16 (csrc/cpu/token_row_byte_avx512.h),
// against hand_math_scalar.cpp's log_acc and k, bit for bit, on random, special and arbitrary-bit
// inputs.
// DPPO's k only enters the row through compares with its bounds, so the row test rarely sees its
// last bits: this check does. Built and run by tests/test_cpu_backend.py on an AVX-512 CPU; prints
// one line per check and exits non-zero on a mismatch.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

extern "C" void scalar_log(const float* x, float* out, int64_t n);
extern "C" void scalar_dppo_k(const float* lp, const float* old, float* out, int64_t n);

#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define IAMA_ISA_NAMESPACE avx512
#include "token_row_byte_avx512.h"

namespace {
using namespace iama::cpu::avx512;

int64_t mismatches(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t bad = 0;
  for (size_t i = 0; i < a.size(); ++i) bad += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  return bad;
}

const float kSpecial[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 1.41421356f, 1.17549435e-38f, 1e-40f, 1e-45f,
                          3e38f, INFINITY, -INFINITY, NAN, -NAN, 1e-8f, -20.0f, 20.0f, -104.0f, 89.0f};
constexpr int kSpecials = sizeof(kSpecial) / sizeof(float);
}  // namespace

int main() {
  const int64_t n = int64_t(1) << 20;  // a multiple of 16
  std::mt19937 g(7);
  std::vector<float> x(n), lp(n), old(n), want(n), got(n);
  std::uniform_real_distribution<float> u(0.0f, 4.0f), lps(-8.0f, 0.0f), delta(-1.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    if (i < kSpecials) {
      x[i] = kSpecial[i];
    } else if (i < n / 4) {  // any bit pattern: denormals, negatives, NaN payloads, infinities
      const uint32_t bits = g();
      std::memcpy(&x[i], &bits, sizeof(float));
    } else {
      x[i] = u(g);
    }
    lp[i] = lps(g);
    old[i] = lp[i] + 0.5f * delta(g);
  }
  for (int a = 0; a < kSpecials; ++a) {  // every pair of specials as (logp, old)
    for (int b = 0; b < kSpecials; ++b) {
      lp[a * kSpecials + b] = kSpecial[a];
      old[a * kSpecials + b] = kSpecial[b];
    }
  }
  scalar_log(x.data(), want.data(), n);
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(got.data() + i, log16(_mm512_loadu_ps(x.data() + i)));
  const int64_t bad_log = mismatches(want, got);
  scalar_dppo_k(lp.data(), old.data(), want.data(), n);
  for (int64_t i = 0; i < n; i += 16) {  // token_terms16's DPPO-KL k
    const __m512 l = _mm512_loadu_ps(lp.data() + i), o = _mm512_loadu_ps(old.data() + i);
    _mm512_storeu_ps(got.data() + i, binary_kl16(l, o, exp16(l), exp16(o)));
  }
  const int64_t bad_k = mismatches(want, got);
  std::printf("log16: %lld of %lld differ\ndppo_kl k: %lld of %lld differ\n", static_cast<long long>(bad_log),
              static_cast<long long>(n), static_cast<long long>(bad_k), static_cast<long long>(n));
  return bad_log == 0 && bad_k == 0 ? 0 : 1;
}
