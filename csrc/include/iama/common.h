// Shared definitions of the iama kernel headers: no torch headers, usable from C++ and CUDA.
//
// Every kernel function is marked IAMA_HD, which expands to `__host__ __device__` under nvcc so
// that the CPU glue (csrc/cpu) and a CUDA build include the very same mathematics.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define IAMA_HD __host__ __device__
#else
#define IAMA_HD
#endif

// IAMA_INLINE: always inline on the host (a caller that knows a group's size at compile time, as
// the CPU glue's fixed-size pass does, then gets loops with constant trip counts).
#if defined(__GNUC__) && !defined(__CUDA_ARCH__)
#define IAMA_INLINE __attribute__((always_inline)) inline
#else
#define IAMA_INLINE inline
#endif

#if !defined(__CUDA_ARCH__)
#include <string.h>  // memcpy for the host float exp below
#endif

// Every kernel lives in iama::<IAMA_ISA_NAMESPACE> (an inline namespace, so code says iama::...).
// A translation unit that compiles the kernels for another instruction set (the CPU glue builds
// the token loop twice, for AVX2+FMA and for the baseline, and picks one at run time) defines
// IAMA_ISA_NAMESPACE first, which gives its copies of these inline functions distinct symbols:
// the linker can then never substitute one copy for the other.
#ifndef IAMA_ISA_NAMESPACE
#define IAMA_ISA_NAMESPACE generic
#endif
#define IAMA_NAMESPACE_BEGIN \
  namespace iama {           \
  inline namespace IAMA_ISA_NAMESPACE {
#define IAMA_NAMESPACE_END \
  }                        \
  }

IAMA_NAMESPACE_BEGIN

// Codes shared with the Python side (iama_kernels/_cpu_ops.py); keep the numbers in sync.
enum TransformKind : int { kMean = 0, kBestOfN = 1, kSoftBestOfN = 2 };
enum EstimatorKind : int { kPlugin = 0, kUnbiased = 1 };
enum ScaleKind : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };
enum LossKind : int { kLossGrpo = 0, kLossToken = 1, kLossDrGrpo = 2 };
// The policy term of the token loss: PPO's clipped ratio, CISPO's clipped importance weight,
// SAPO's soft gate, VESPO's sequence weight times REINFORCE, DPPO's trust-region masks (total
// variation, binary KL) on a truncated weight, GMPO's geometric mean of the clipped ratios (loss.h).
enum SurrogateKind : int {
  kSurrClip = 0,
  kSurrCispo = 1,
  kSurrSapo = 2,
  kSurrVespo = 3,
  kSurrDppoTv = 4,
  kSurrDppoKl = 5,
  kSurrGmpo = 6
};
// The KL term's estimator of KL(pi || pi_ref), with x = logp - ref (loss.h): k3 = exp(-x) + x - 1,
// TRL's ratio * k3 (the ratio not detached), k2 = x^2 / 2, k1 = x, |x|. kKlStraight (a flag
// added to k3, k1 or |x|): that estimator's value with k2's gradient x (verl's "k3+" straight
// through; k2's gradient is the unbiased one of the KL).
enum KlForm : int { kKlK3 = 0, kKlRatioK3 = 1, kKlK2 = 2, kKlK1 = 3, kKlAbs = 4, kKlStraight = 8 };

// One criterion's inference-time transform: Mean, BestOfN(n) or SoftBestOfN(tau).
struct CriterionSpec {
  int kind;
  int n;
  double tau;
};

// exp in double: the libm / CUDA libdevice one.
IAMA_HD inline double exp_acc(double x) { return ::exp(x); }

// exp in float. On the device this is expf. On the host a branch-free version (Cody-Waite range
// reduction, degree-7 Taylor polynomial, two-step scaling by 2^k so that the denormal range and
// overflow to inf come out right) so that the token loop vectorises: glibc's expf is a call the
// compiler cannot vectorise without -ffast-math, which would also break NaN handling. Accuracy
// is about 1 ulp; exp(0) is exactly 1 (so a ratio of identical log-probs is exactly 1).
IAMA_HD inline float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  // The clamps keep a NaN (a comparison with NaN is false), which then runs through the
  // polynomial and comes out as NaN: no separate NaN test is needed.
  float xc = x < -104.0f ? -104.0f : x;  // exp(-104) is below the smallest denormal
  xc = xc > 89.0f ? 89.0f : xc;           // exp(89) overflows to inf below
  // k = round(x / ln 2) by the 1.5 * 2^23 trick (no libm call, vectorises): the low bits of
  // k_shifted hold k as an integer, read as bits rather than by a float-to-int conversion (which
  // a NaN would make undefined). Whatever the bits, |k| < 2^31 and the sums below cannot overflow.
  const float shifter = 12582912.0f;
  const float k_shifted = xc * 1.44269504088896341f + shifter;
  const float kf = k_shifted - shifter;
  const float r = (xc - kf * 0.693145751953125f) - kf * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t kbits, sbits;
  memcpy(&kbits, &k_shifted, sizeof(float));
  memcpy(&sbits, &shifter, sizeof(float));
  const int32_t k = static_cast<int32_t>(kbits - sbits);
  const int32_t k1 = k >> 1;  // k = k1 + k2 with both halves in the normal exponent range
  const int32_t k2 = k - k1;
  const uint32_t b1 = static_cast<uint32_t>(k1 + 127) << 23;
  const uint32_t b2 = static_cast<uint32_t>(k2 + 127) << 23;
  float s1, s2;
  memcpy(&s1, &b1, sizeof(float));
  memcpy(&s2, &b2, sizeof(float));
  return p * s1 * s2;
#endif
}

// log in double: the libm / CUDA libdevice one.
IAMA_HD inline double log_acc(double x) { return ::log(x); }

// log in float. On the device this is logf. On the host a branch-free version, for the same
// reason as exp_acc (DPPO's binary-KL region takes one log per token; a logf call keeps the token
// loop scalar: 13x slower): x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s) with
// s = (m - 1) / (m + 1), |s| < 0.172, by its odd series to s^11 (truncation below 1e-10
// relative), plus e ln 2 in two parts; within 2.5 ulp of the correctly rounded log. Denormals are
// scaled by 2^23 first; 0 gives -inf, +inf gives +inf, a negative x or NaN gives NaN, as logf.
IAMA_HD inline float log_acc(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  const bool tiny = x < 1.17549435e-38f;  // a denormal (zero and negatives are set below)
  const float xs = tiny ? x * 8388608.0f : x;
  uint32_t bits;
  memcpy(&bits, &xs, sizeof(float));
  const int32_t biased = static_cast<int32_t>((bits >> 23) & 0xffu);
  const uint32_t mbits = (bits & 0x7fffffu) | 0x3f800000u;  // the mantissa as a float in [1, 2)
  float m;
  memcpy(&m, &mbits, sizeof(float));
  const bool upper = m > 1.41421356f;
  m = upper ? m * 0.5f : m;
  const int32_t e = biased - 127 + (upper ? 1 : 0) - (tiny ? 23 : 0);
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const float ef = static_cast<float>(e);
  float r = ef * 0.693145751953125f + (2.0f * s * p + ef * 1.42860682030941723212e-6f);
  r = x == 0.0f ? -INFINITY : r;
  r = x < 0.0f ? NAN : r;
  r = x == INFINITY ? x : r;
  return x != x ? x : r;  // NaN stays NaN
#endif
}

// The k3 KL estimate exp(d) - d - 1 given ed = exp(d). For |d| < 1/2 the direct formula cancels
// (it is d^2/2 + ...), so a Taylor series (to d^9, truncation < 1e-9 relative) is used there.
template <typename acc_t>
IAMA_HD inline acc_t k3_from_exp(acc_t d, acc_t ed) {
  acc_t q = acc_t(1) / acc_t(362880);
  q = q * d + acc_t(1) / acc_t(40320);
  q = q * d + acc_t(1) / acc_t(5040);
  q = q * d + acc_t(1) / acc_t(720);
  q = q * d + acc_t(1) / acc_t(120);
  q = q * d + acc_t(1) / acc_t(24);
  q = q * d + acc_t(1) / acc_t(6);
  q = q * d + acc_t(0.5);
  const acc_t series = q * d * d;
  const acc_t direct = ed - d - acc_t(1);
  const acc_t ad = d < acc_t(0) ? -d : d;
  return ad < acc_t(0.5) ? series : direct;
}

IAMA_NAMESPACE_END  // namespace iama
