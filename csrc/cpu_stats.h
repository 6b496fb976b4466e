// The CPU statistics pass (csrc/cpu_stats.cpp), for callers in other files of gradstats._C.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <tuple>

namespace gradstats {

// One tensor as the pass reads it: the flat block of numel elements at data (nullptr when
// numel is 0) of one of the four dtypes it reads (see pass_reads).
struct ListedTensor {
  const void* data;
  int64_t numel;
  at::ScalarType dtype;
};

// Whether the pass reads t: a CPU tensor, strided, contiguous or permuted-dense
// (transposed, channels-last: read as the flat block it fills, in memory order, as the
// Triton kernels read it), float32/float64/bfloat16/float16. (Keys such as Negative or
// Conjugate are the caller's to refuse: the pass reads the stored bits.)
bool pass_reads(const at::Tensor& t);

// gradstats::cpu_stats on grads[0, n) in two steps: the constructor reads the tensors'
// metadata (and raises for what the pass cannot read) and allocates the outputs; run()
// then reads only the data they pointed to, through no tensor. So a caller may drop its
// hold on the tensors between the two, keeping only their storages alive (see
// csrc/direct_calls.cpp). The tensors are borrowed: no reference count changes here.
class StatsPass {
 public:
  StatsPass(const at::Tensor* const* grads, int64_t n, double p, int64_t norm_kind,
            int64_t num_bins, int64_t min_exp);
  // The same pass on tensors already listed (each one checked with pass_reads when it was
  // listed: csrc/host_path.cpp lists them while it walks them); touches no tensor.
  StatsPass(const ListedTensor* tensors, int64_t n, double p, int64_t norm_kind,
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
