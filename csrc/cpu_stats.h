// The CPU statistics pass (csrc/cpu_stats.cpp), for callers in other files of gradstats._C.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <tuple>

namespace gradstats {

// gradstats::cpu_stats on grads[0, n) in two steps: the constructor reads the tensors'
// metadata (and raises for what the pass cannot read) and allocates the outputs; run()
// then reads only the data they pointed to, through no tensor. So a caller may drop its
// hold on the tensors between the two, keeping only their storages alive (see
// csrc/direct_calls.cpp). The tensors are borrowed: no reference count changes here.
class StatsPass {
 public:
  StatsPass(const at::Tensor* const* grads, int64_t n, double p, int64_t norm_kind,
            int64_t num_bins, int64_t min_exp);
  ~StatsPass();
  void run();
  // (power float64 [n], nonfinite int64 [n], hist int64 [n, num_bins]), after run().
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {power_, nonfinite_, hist_};
  }

 private:
  struct Plan;  // the work list (csrc/cpu_stats.cpp)
  std::unique_ptr<Plan> plan_;
  at::Tensor power_, nonfinite_, hist_;
};

// Both steps at once, for callers that hold the tensors throughout (the registered op).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_stats_of(
    const at::Tensor* const* grads, int64_t n, double p, int64_t norm_kind, int64_t num_bins,
    int64_t min_exp);

}  // namespace gradstats
