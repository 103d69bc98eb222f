// The train/rollout correction's row pass: interface between the torch glue
// (rollout_correction.cpp, which also holds the baseline build) and its AVX-512 and AVX2 builds
// (rollout_correction_avx512.cpp, rollout_correction_avx2.cpp), chosen at run time.
#pragma once

#include <cstdint>

namespace iama::cpu {

// Fields of each row's results in rows[r * kCorrectionFields + q]: sum of m d, sum of m, the
// dropped share and the row's statistic (iama::CorrectionRow).
constexpr int kCorrectionFields = 4;

// Writes a row's iama::CorrectionRow to its kCorrectionFields (a template: each instruction-set
// build has its own CorrectionRow type, in its own namespace).
template <typename Row>
inline void store_correction_row(const Row& row, double* out) {
  out[0] = row.log_ratio_sum;
  out[1] = row.mask_sum;
  out[2] = row.dropped;
  out[3] = row.statistic;
}

struct CorrectionProblem {
  int64_t S = 0, T = 0;
  int dtype = 0;                   // 0 float32, 1 bfloat16, 2 float16 (old and rollout alike)
  bool byte_mask = true;           // bool/uint8 mask, else float32 weights
  const void* old = nullptr;       // [S, T], rows contiguous
  const void* rollout = nullptr;
  const void* mask = nullptr;
  int64_t s_old = 0, s_rollout = 0, s_mask = 0;  // row strides (elements)
  float* weights = nullptr;        // [S, T] contiguous
  double* rows = nullptr;          // [S, kCorrectionFields]
  bool sequence = false;
  int gate = 0;                    // iama::CorrectionGate
  bool clip = false;
  double low = 0.0, high = 0.0;    // the threshold (rounded to the compute dtype per token)
};

// Run the AVX-512 or the AVX2 build over rows [begin, end); false when it is not compiled in
// (non-x86).
bool rollout_correction_avx512(const CorrectionProblem& p, int64_t begin, int64_t end);
bool rollout_correction_avx2(const CorrectionProblem& p, int64_t begin, int64_t end);

}  // namespace iama::cpu
