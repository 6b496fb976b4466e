// The CPU statistics pass (csrc/cpu_stats.cpp), for callers in other files of gradstats._C.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace gradstats {

// gradstats::cpu_stats on grads[0, n): (power float64 [n], nonfinite int64 [n], hist int64
// [n, num_bins]). The tensors are borrowed, not copied: the caller keeps them alive (and
// owned, see csrc/direct_calls.cpp), and no reference count changes here.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_stats_of(
    const at::Tensor* const* grads, int64_t n, double p, int64_t norm_kind, int64_t num_bins,
    int64_t min_exp);

}  // namespace gradstats
