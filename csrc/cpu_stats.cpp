// gradstats::cpu_stats: the fused statistics pass for CPU tensors.
//
// Reads: contiguous fp32/fp64/bf16/fp16 tensors (the Python caller sends anything else to
// the reference path). Writes, per tensor: the norm power (sum |x|^p, or the NaN-propagating
// max |x| for the inf-norm) as float64, the NaN/Inf count as int64, and when num_bins > 0 the
// log2-magnitude histogram as int64 [n, num_bins]. Same contracts and numerics as
// gradstats/reference.py and the Triton kernels (gradstats/kernels/stats.py).
//
// Work split: every tensor is cut into CHUNK-element work items, as the kernels do. Items
// run in parallel (at::parallel_for); each writes its power into its own slot (float32 sum
// per chunk, float64 for float64 input), and the slots are summed per tensor in float64 in
// index order afterwards. So the result is bit-identical whatever the thread count.
// Histogram and non-finite counts are integers: exact in any order, added atomically.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace gradstats {
namespace {

// Must equal launch_config.INTERPRETER_CONFIG.chunk: the reference sums per kernel chunk,
// so the same chunking gives the same float32 rounding. Checked from Python.
constexpr int64_t CHUNK = 16384;
// Work items per parallel_for task: a few chunks, so scheduling costs little next to the
// ~10 us one chunk takes.
constexpr int64_t GRAIN_ITEMS = 4;
// Elements per inner step: one accumulator per lane (a GCC vector, see Vec). The lanes
// fix the summation order within a chunk, so vector code needs no -ffast-math.
constexpr int LANES = 16;
// Histogram counts go to several interleaved copies: gradients crowd into a few columns,
// and one copy would chain every increment on the last one through memory.
constexpr int HIST_COPIES = 4;

// The per-element code is compiled once per x86-64 vector width and picked at load time
// (function multiversioning): a build for the baseline CPU still runs AVX2/AVX-512 loops
// where the CPU has them. Everything below the cloned function is forced inline into it,
// so each clone gets its own vector code. AVX-512F brings its own FMA instructions, and g++
// contracts a*b+c into them by default in C++: setup.py passes -ffp-contract=off, so with
// the lanes fixing the summation order every clone gives the same bits.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define GRADSTATS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GRADSTATS_VECTOR_CLONES
#endif
#define GRADSTATS_INLINE __attribute__((always_inline)) inline

// Must match gradstats.norms.NormKind.
enum NormKind : int64_t { INF = 0, L1 = 1, L2 = 2, LP = 3 };

// IEEE layout of the type a value is widened to (float or double).
template <typename Acc>
struct Layout;
template <>
struct Layout<float> {
  using Bits = uint32_t;
  static constexpr int kMantissa = 23;
  static constexpr int kBias = 127;
  static constexpr Bits kAllOnes = 0xFF;
};
template <>
struct Layout<double> {
  using Bits = uint64_t;
  static constexpr int kMantissa = 52;
  static constexpr int kBias = 1023;
  static constexpr Bits kAllOnes = 0x7FF;
};

// Each input dtype widened exactly to its accumulation type. bf16 and fp16 are read as
// their bits (bf16 is the top half of a float32), so subnormals survive.
template <typename T>
struct Widen;
template <>
struct Widen<float> {
  using Acc = float;
  GRADSTATS_INLINE static float to_acc(float x) { return x; }
};
template <>
struct Widen<double> {
  using Acc = double;
  GRADSTATS_INLINE static double to_acc(double x) { return x; }
};
template <>
struct Widen<c10::BFloat16> {
  using Acc = float;
  GRADSTATS_INLINE static float to_acc(c10::BFloat16 x) {
    return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16);
  }
};
template <>
struct Widen<c10::Half> {
  using Acc = float;
  GRADSTATS_INLINE static float to_acc(c10::Half x) { return static_cast<float>(x); }
};

// Power and non-finite count of one chunk.
struct ChunkResult {
  double power;
  int64_t nonfinite;
};

// LANES values of the accumulation type as one GCC vector: the compiler splits it into
// whatever registers the target has (4 SSE, 2 AVX2, 1 AVX-512 for float), so the lanes,
// and the order each is summed in, are the same for every target.
template <typename Acc>
struct Vec;
template <>
struct Vec<float> {
  typedef float Values __attribute__((vector_size(LANES * sizeof(float))));
  typedef uint32_t Bits __attribute__((vector_size(LANES * sizeof(float))));
};
template <>
struct Vec<double> {
  typedef double Values __attribute__((vector_size(LANES * sizeof(double))));
  typedef uint64_t Bits __attribute__((vector_size(LANES * sizeof(double))));
};

// LANES elements widened exactly to the accumulation type.
template <typename T>
GRADSTATS_INLINE typename Vec<typename Widen<T>::Acc>::Values load_lanes(const T* x) {
  using V = typename Vec<typename Widen<T>::Acc>::Values;
  using B = typename Vec<typename Widen<T>::Acc>::Bits;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 is the top half of a float32
    typedef uint16_t Halves __attribute__((vector_size(LANES * sizeof(uint16_t))));
    Halves halves;
    std::memcpy(&halves, x, sizeof halves);
    return reinterpret_cast<V>(__builtin_convertvector(halves, B) << 16);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    V values;
    for (int lane = 0; lane < LANES; ++lane) values[lane] = static_cast<float>(x[lane]);
    return values;
  } else {
    V values;
    std::memcpy(&values, x, sizeof values);
    return values;
  }
}

// One chunk's running sums, one per lane. The inf-norm keeps the largest magnitude as its
// bits: for non-negative floats integer order is float order, and every NaN's bits exceed
// Inf's, so an integer max propagates NaN as torch's inf-norm does, and vectorises.
template <int64_t Kind, typename T, typename Acc = typename Widen<T>::Acc>
GRADSTATS_INLINE void accumulate_lanes(const T* x, typename Vec<Acc>::Values& sum,
                                       typename Vec<Acc>::Bits& max_bits,
                                       typename Vec<Acc>::Bits& nonfinite, Acc p) {
  using L = Layout<Acc>;
  using V = typename Vec<Acc>::Values;
  using B = typename Vec<Acc>::Bits;
  constexpr typename L::Bits kSign = typename L::Bits{1} << (sizeof(typename L::Bits) * 8 - 1);
  const V v = load_lanes(x);
  const B magnitude = reinterpret_cast<B>(v) & ~kSign;
  if constexpr (Kind == INF) {
    max_bits = magnitude > max_bits ? magnitude : max_bits;
  } else if constexpr (Kind == L1) {
    sum += reinterpret_cast<V>(magnitude);
  } else if constexpr (Kind == L2) {
    sum += v * v;
  } else {
    const V a = reinterpret_cast<V>(magnitude);
    for (int lane = 0; lane < LANES; ++lane) sum[lane] += std::pow(a[lane], p);
  }
  // With the sign cleared, adding one to the exponent field carries into the top bit
  // exactly when the field is all ones (NaN, Inf): integer-only, so it vectorises.
  nonfinite += (magnitude + (typename L::Bits{1} << L::kMantissa)) >>
               (sizeof(typename L::Bits) * 8 - 1);
}

template <typename T, int64_t Kind>
GRADSTATS_INLINE ChunkResult chunk_power(const T* x, int64_t n, typename Widen<T>::Acc p) {
  using Acc = typename Widen<T>::Acc;
  typename Vec<Acc>::Values sum = {};
  typename Vec<Acc>::Bits max_bits = {}, nonfinite_lanes = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    accumulate_lanes<Kind>(x + i, sum, max_bits, nonfinite_lanes, p);
  }
  if (i < n) {  // the tail, padded with zeros: they add nothing to any statistic
    T padded[LANES];
    std::fill(padded, padded + LANES, T(0));
    std::copy(x + i, x + n, padded);
    accumulate_lanes<Kind>(padded, sum, max_bits, nonfinite_lanes, p);
  }
  Acc total = 0;
  typename Layout<Acc>::Bits largest = 0;
  int64_t nonfinite = 0;
  for (int lane = 0; lane < LANES; ++lane) {
    total += sum[lane];
    largest = std::max(largest, max_bits[lane]);
    nonfinite += static_cast<int64_t>(nonfinite_lanes[lane]);
  }
  if constexpr (Kind == INF) total = std::bit_cast<Acc>(largest);
  return {static_cast<double>(total), nonfinite};
}

// Elements whose histogram columns are computed together (vectorised) before counting.
constexpr int64_t COLUMN_BLOCK = 256;

// Adds one chunk's histogram to counts[HIST_COPIES][num_bins + 1]: column 0 exact zeros,
// column k >= 1 floor(log2|x|) == min_exp + k - 1 clamped into [1, num_bins - 1]; NaN and
// Inf go to the extra column num_bins, which is never read.
template <typename T>
GRADSTATS_INLINE void chunk_histogram(const T* x, int64_t n, int64_t num_bins,
                                      int64_t min_exp, uint32_t* counts) {
  using Acc = typename Widen<T>::Acc;
  using L = Layout<Acc>;
  using Bits = typename L::Bits;
  using SBits = std::make_signed_t<Bits>;
  const SBits offset = L::kBias + min_exp - 1;  // biased exponent -> column
  const SBits last = num_bins - 1;
  const int64_t stride = num_bins + 1;
  SBits columns[COLUMN_BLOCK];
  for (int64_t begin = 0; begin < n; begin += COLUMN_BLOCK) {
    const int64_t size = std::min(COLUMN_BLOCK, n - begin);
    for (int64_t j = 0; j < size; ++j) {  // branch-free: the compiler vectorises it
      Acc a = std::abs(Widen<T>::to_acc(x[begin + j]));
      Bits bits = std::bit_cast<Bits>(a);
      SBits biased = static_cast<SBits>(bits >> L::kMantissa);
      // A subnormal is m * 2^(1 - bias - mantissa bits) with m = its bits: converting m
      // (exact, and a normal number) gives floor(log2 m) from its exponent. No float
      // arithmetic on the subnormal itself, so flush-to-zero modes change nothing.
      SBits from_mantissa = static_cast<SBits>(
          std::bit_cast<Bits>(static_cast<Acc>(static_cast<SBits>(bits))) >> L::kMantissa);
      SBits exponent =
          biased == 0 ? from_mantissa - L::kBias + 1 - L::kMantissa : biased;
      SBits column = std::min(std::max(exponent - offset, SBits{1}), last);
      column = bits == 0 ? SBits{0} : column;
      columns[j] = biased == static_cast<SBits>(L::kAllOnes) ? last + 1 : column;
    }
    // Consecutive elements to different copies: increments of one column do not queue.
    int64_t j = 0;
    for (; j + HIST_COPIES <= size; j += HIST_COPIES) {
      for (int copy = 0; copy < HIST_COPIES; ++copy) ++counts[copy * stride + columns[j + copy]];
    }
    for (; j < size; ++j) ++counts[columns[j]];
  }
}

struct WorkItem {
  int64_t tensor;
  int64_t start;
  int64_t size;
};

template <typename T>
GRADSTATS_INLINE ChunkResult dispatch_power(const T* x, int64_t n, int64_t kind, double p) {
  using Acc = typename Widen<T>::Acc;
  switch (kind) {
    case INF: return chunk_power<T, INF>(x, n, static_cast<Acc>(p));
    case L1: return chunk_power<T, L1>(x, n, static_cast<Acc>(p));
    case L2: return chunk_power<T, L2>(x, n, static_cast<Acc>(p));
    default: return chunk_power<T, LP>(x, n, static_cast<Acc>(p));
  }
}

// Statistics of one work item: its power into its slot, counts added to the tensor's row.
template <typename T>
GRADSTATS_INLINE void item_stats(const at::Tensor& tensor, const WorkItem& item, int64_t kind,
                                 double p, int64_t num_bins, int64_t min_exp,
                                 double* partial_power, int64_t* nonfinite, int64_t* hist_row,
                                 std::vector<uint32_t>& counts) {
  const T* x = static_cast<const T*>(tensor.const_data_ptr()) + item.start;
  ChunkResult result = dispatch_power(x, item.size, kind, p);
  *partial_power = result.power;
  if (result.nonfinite) std::atomic_ref<int64_t>(*nonfinite).fetch_add(result.nonfinite);
  if (num_bins == 0) return;
  std::fill(counts.begin(), counts.end(), 0u);
  chunk_histogram(x, item.size, num_bins, min_exp, counts.data());
  for (int64_t column = 0; column < num_bins; ++column) {
    int64_t count = 0;
    for (int copy = 0; copy < HIST_COPIES; ++copy) count += counts[copy * (num_bins + 1) + column];
    if (count) std::atomic_ref<int64_t>(hist_row[column]).fetch_add(count);
  }
}

// What every work item of one call reads and writes.
struct Pass {
  at::TensorList grads;
  const std::vector<WorkItem>& items;
  int64_t norm_kind;
  double p;
  int64_t num_bins;
  int64_t min_exp;
  double* partial_power;  // one slot per work item
  int64_t* nonfinite;     // one per tensor
  int64_t* hist;          // [tensors, num_bins]
};

// Work items [begin, end) of one parallel_for task.
GRADSTATS_VECTOR_CLONES
void run_items(const Pass& pass, int64_t begin, int64_t end) {
  std::vector<uint32_t> counts(HIST_COPIES * (pass.num_bins + 1));
  for (int64_t k = begin; k < end; ++k) {
    const WorkItem& item = pass.items[k];
    const at::Tensor& g = pass.grads[item.tensor];
    int64_t* row = pass.hist + item.tensor * pass.num_bins;
    int64_t* count = pass.nonfinite + item.tensor;
    double* slot = pass.partial_power + k;
    const int64_t kind = pass.norm_kind, num_bins = pass.num_bins, min_exp = pass.min_exp;
    switch (g.scalar_type()) {
      case at::kFloat:
        item_stats<float>(g, item, kind, pass.p, num_bins, min_exp, slot, count, row, counts);
        break;
      case at::kDouble:
        item_stats<double>(g, item, kind, pass.p, num_bins, min_exp, slot, count, row, counts);
        break;
      case at::kBFloat16:
        item_stats<c10::BFloat16>(g, item, kind, pass.p, num_bins, min_exp, slot, count, row,
                                  counts);
        break;
      default:
        item_stats<c10::Half>(g, item, kind, pass.p, num_bins, min_exp, slot, count, row,
                              counts);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_stats(
    at::TensorList grads, double p, int64_t norm_kind, int64_t num_bins, int64_t min_exp) {
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK(norm_kind >= INF && norm_kind <= LP, "gradstats::cpu_stats: bad norm_kind ",
              norm_kind);
  // gradstats' own checks (checks.py) keep to these ranges; a direct caller of the op gets
  // an error instead of truncated int32 column arithmetic or a huge allocation.
  TORCH_CHECK(num_bins == 0 || (num_bins >= 2 && num_bins <= 1024),
              "gradstats::cpu_stats: num_bins must be 0 or in [2, 1024], got ", num_bins);
  TORCH_CHECK(min_exp >= -1100 && min_exp <= 1100,
              "gradstats::cpu_stats: min_exp must be in [-1100, 1100], got ", min_exp);
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor power = at::zeros({n}, f64);
  at::Tensor nonfinite = at::zeros({n}, i64);
  at::Tensor hist = at::zeros({n, num_bins}, i64);

  // The work list: every tensor's chunks in order, so each tensor's slots are adjacent.
  std::vector<WorkItem> items;
  std::vector<int64_t> first_item(n + 1);
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& g = grads[t];
    TORCH_CHECK(g.device().is_cpu() && g.layout() == at::kStrided && g.is_contiguous(),
                "gradstats::cpu_stats reads contiguous CPU tensors");
    auto dtype = g.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                    dtype == at::kHalf,
                "gradstats::cpu_stats reads float32/float64/bfloat16/float16, got ", dtype);
    first_item[t] = static_cast<int64_t>(items.size());
    for (int64_t start = 0; start < g.numel(); start += CHUNK) {
      items.push_back({t, start, std::min(CHUNK, g.numel() - start)});
    }
  }
  first_item[n] = static_cast<int64_t>(items.size());

  std::vector<double> partial_power(items.size());
  const Pass pass{grads, items, norm_kind, p, num_bins, min_exp, partial_power.data(),
                  nonfinite.data_ptr<int64_t>(), hist.data_ptr<int64_t>()};
  at::parallel_for(0, static_cast<int64_t>(items.size()), GRAIN_ITEMS,
                   [&](int64_t begin, int64_t end) { run_items(pass, begin, end); });

  // Chunk partials summed per tensor in index order (the max for the inf-norm, NaN first).
  double* power_out = power.data_ptr<double>();
  for (int64_t t = 0; t < n; ++t) {
    double total = 0;
    for (int64_t k = first_item[t]; k < first_item[t + 1]; ++k) {
      double part = partial_power[k];
      if (norm_kind == INF) {
        total = (part > total || std::isnan(part)) && !std::isnan(total) ? part : total;
      } else {
        total += part;
      }
    }
    power_out[t] = total;
  }
  return {power, nonfinite, hist};
}

}  // namespace

TORCH_LIBRARY(gradstats, m) {
  m.def("cpu_stats(Tensor[] grads, float p, int norm_kind, int num_bins, int min_exp) "
        "-> (Tensor power, Tensor nonfinite, Tensor hist)");
}

TORCH_LIBRARY_IMPL(gradstats, CPU, m) {
  m.impl("cpu_stats", &cpu_stats);
}

}  // namespace gradstats

namespace gradstats {
PyMethodDef* host_path_methods();  // csrc/host_path.cpp
}  // namespace gradstats

// Importing gradstats._C loads this library, whose static initialisers register the
// operator above; the module's functions are the host path's (csrc/host_path.cpp).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                               gradstats::host_path_methods()};
  return PyModule_Create(&module);
}
