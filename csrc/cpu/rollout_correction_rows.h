// The row loop shared by the instruction-set builds of the train/rollout correction
// (rollout_correction_avx2.cpp, rollout_correction_avx512.cpp). Each includes it after defining
// IAMA_ISA_NAMESPACE and its target pragma, so its copy lives in iama::cpu::<isa> and is compiled
// for that build's instruction set.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "iama/correction.h"
#include "rollout_correction.h"

#ifndef IAMA_ISA_NAMESPACE
#error "define IAMA_ISA_NAMESPACE before including rollout_correction_rows.h"
#endif

namespace iama::cpu::IAMA_ISA_NAMESPACE {

template <typename T>
struct TypeTag {
  using type = T;
};

// Rows [begin, end) of p: row(old, rollout, mask, weights) returns a row's CorrectionRow, called
// with the row's pointers typed as p says (log-probs float, c10::BFloat16 or c10::Half; mask
// uint8_t or float), and its four fields go to p.rows.
template <typename RowFn>
void correction_rows(const CorrectionProblem& p, int64_t begin, int64_t end, const RowFn& row) {
  const auto typed = [&](auto in_tag, auto mask_tag) {
    using in_t = typename decltype(in_tag)::type;
    using mask_t = typename decltype(mask_tag)::type;
    const in_t* old = static_cast<const in_t*>(p.old);
    const in_t* rollout = static_cast<const in_t*>(p.rollout);
    const mask_t* mask = static_cast<const mask_t*>(p.mask);
    for (int64_t r = begin; r < end; ++r) {
      store_correction_row(row(old + r * p.s_old, rollout + r * p.s_rollout, mask + r * p.s_mask, p.weights + r * p.T),
                           p.rows + r * kCorrectionFields);
    }
  };
  const auto by_mask = [&](auto in_tag) {
    if (p.byte_mask) {
      typed(in_tag, TypeTag<uint8_t>{});
    } else {
      typed(in_tag, TypeTag<float>{});
    }
  };
  if (p.dtype == 0) {
    by_mask(TypeTag<float>{});
  } else if (p.dtype == 1) {
    by_mask(TypeTag<c10::BFloat16>{});
  } else {
    by_mask(TypeTag<c10::Half>{});
  }
}

}  // namespace iama::cpu::IAMA_ISA_NAMESPACE
