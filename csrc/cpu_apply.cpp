// gradstats::cpu_scale_ and gradstats::cpu_clamp_: the in-place updates for CPU tensors.
//
// Reads and writes: fp32/fp64/bf16/fp16 CPU tensors whose elements fill one dense block
// (contiguous, or permuted without gaps: the updates are elementwise and order-free, so
// such a tensor is numel elements from its data_ptr(), its lowest address, since torch
// strides are never negative), at an address that is a multiple of the element size.
// The Python caller (dispatch.py) sends anything else to the reference.
//
// cpu_scale_(tensors, coef): g *= coef, with the same bits as torch's g.mul_(coef): the
// 0-dim coefficient is read once, widened to float64 for float64 gradients and converted
// to float32 for every other dtype (torch's opmath: bf16/fp16 are multiplied in float32
// and rounded to nearest even, never the coefficient rounded to bf16/fp16 first). When the
// coefficient is >= 1 (no clipping needed) nothing is read or written; NaN does scale.
//
// cpu_clamp_(tensors, lo, hi): g = min(max(g, lo), hi) in one read and one write, as
// torch's clamp_(min=lo, max=hi): the bounds converted to the tensor's dtype as torch
// converts a Scalar (an error for a finite bound out of its range), NaN elements and
// zeros of either sign kept as they are, lo > hi giving hi, a NaN bound filling with NaN.
//
// Work split: every tensor is cut into CHUNK-element work items, run in parallel
// (at::parallel_for). A view listed twice (same address, dtype, sizes, strides) is
// updated once; views that share memory without being the same view are each updated in
// turn, one tensor at a time, as torch's loop over the list would.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace gradstats {
namespace {

// Elements per work item, as in cpu_stats.cpp: large enough that scheduling costs little.
constexpr int64_t CHUNK = 16384;
// Work per parallel_for task: at least a few chunks, and at least GRAIN_ELEMENTS elements
// on average (a task of a few small tensors costs more to hand out than to run); less
// than one task's worth runs on the calling thread.
constexpr int64_t GRAIN_ITEMS = 4;
constexpr int64_t GRAIN_ELEMENTS = 4 * CHUNK;
// Elements per inner step: one GCC vector, split by the compiler into the target's
// registers. Same arithmetic on every lane, so every target gives the same bits.
constexpr int LANES = 16;

// Function multiversioning as in cpu_stats.cpp: the element loops are compiled once per
// x86-64 vector width and picked at load time. -ffp-contract=off (setup.py) keeps the
// AVX-512 clone from fusing anything into an FMA (nothing here adds a product anyway).
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define GRADSTATS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GRADSTATS_VECTOR_CLONES
#endif
#define GRADSTATS_INLINE __attribute__((always_inline)) inline

typedef float Floats __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t Words __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef int32_t SignedWords __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint16_t Halves __attribute__((vector_size(LANES * sizeof(uint16_t))));
typedef int16_t SignedHalves __attribute__((vector_size(LANES * sizeof(int16_t))));

// value in every lane. Written as a scalar-vector operation, which GCC expands to one
// broadcast: an initializer list or a loop over the lanes becomes, in GCC 12, a chain of
// per-lane masked moves rebuilt inside the hot loop. value - (+0) is value for every
// input, -0.0 and NaN included, so the subtraction folds away.
template <typename V, typename S>
GRADSTATS_INLINE V splat(S value) {
  return value - V{};
}

// mask ? a : b lane by lane, as bit operations.
template <typename V, typename M>
GRADSTATS_INLINE V select(M mask, V a, V b) {
  return reinterpret_cast<V>((reinterpret_cast<M>(a) & mask) | (reinterpret_cast<M>(b) & ~mask));
}

// bf16 is the top half of a float32: widening is exact.
GRADSTATS_INLINE Floats widen_bf16(Halves h) {
  return reinterpret_cast<Floats>(__builtin_convertvector(h, Words) << 16);
}

// float32 -> bf16, round to nearest even (c10::BFloat16's rounding); NaN stays a quiet
// NaN with its sign and top payload bits (the rounding could carry a NaN into Inf).
GRADSTATS_INLINE Halves narrow_bf16(Floats f) {
  const Words b = reinterpret_cast<Words>(f);
  const Words rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  const Words nan = (b >> 16) | 0x40u;
  return __builtin_convertvector((b & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded, Halves);
}

// fp16 -> float32, exact, in integer lanes (x86-64 has no vector fp16 conversion before
// F16C, and the default clone must not assume it).
GRADSTATS_INLINE Floats widen_fp16(Halves h) {
  const Words bits = __builtin_convertvector(h, Words);
  const Words sign = (bits & 0x8000u) << 16;
  const Words magnitude = bits & 0x7FFFu;
  // Normal: the 5-bit exponent rebiased (15 -> 127) above the mantissa's 10 bits.
  const Words normal = (magnitude << 13) + (112u << 23);
  const Words inf_or_nan = (magnitude << 13) | 0x7F800000u;
  // Subnormal (and zero): m * 2^-24, exact in float32, where it is a normal number.
  const Floats small =
      __builtin_convertvector(reinterpret_cast<SignedWords>(magnitude), Floats) *
      splat<Floats>(0x1p-24f);
  const Words value = magnitude >= 0x7C00u ? inf_or_nan
                      : magnitude >= 0x400u ? normal
                                            : reinterpret_cast<Words>(small);
  return reinterpret_cast<Floats>(value | sign);
}

// float32 -> fp16, round to nearest even, as c10::Half and x86's vcvtps2ph give it; NaN
// stays a quiet NaN with its sign and top payload bits (what vcvtps2ph does).
GRADSTATS_INLINE Halves narrow_fp16(Floats f) {
  const Words b = reinterpret_cast<Words>(f);
  const Words sign = (b >> 16) & 0x8000u;
  const Words a = b & 0x7FFFFFFFu;
  // Normal results: rebias the exponent (127 -> 15) and round the 13 dropped mantissa
  // bits to nearest even; a carry ripples into the exponent, and reaches Inf at 65520.
  const Words normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // Subnormal results (|f| < 2^-14): adding 0.5 puts fp16's subnormal spacing, 2^-24, at
  // float32's last mantissa bit, so the float addition itself rounds to nearest even and
  // the mantissa then holds the fp16 bits (0x400 when it rounds up to the smallest normal).
  const Floats shifted = reinterpret_cast<Floats>(a) + splat<Floats>(0.5f);
  const Words subnormal = reinterpret_cast<Words>(shifted) - 0x3F000000u;
  const Words nan = ((a >> 13) & 0x3FFu) | 0x7E00u;
  const Words value = a > 0x7F800000u   ? nan
                      : a >= 0x477FF000u ? splat<Words>(0x7C00u)  // rounds to Inf
                      : a < 0x38800000u  ? subnormal
                                         : normal;
  return __builtin_convertvector(value | sign, Halves);
}

// The per-dtype constants of one call.
struct Constants {
  float coef_f32 = 0;
  double coef_f64 = 0;
  float lo_f32 = 0, hi_f32 = 0;
  double lo_f64 = 0, hi_f64 = 0;
  uint16_t lo_bf16 = 0, hi_bf16 = 0, lo_fp16 = 0, hi_fp16 = 0;  // the bounds' bits
};

enum class Update { SCALE, CLAMP };

// float32 and float64, one element: the loops over these auto-vectorise (to vmulps, and
// vmaxps/vminps, whose operand order gives exactly these NaN and signed-zero rules).
template <Update U, typename T>
GRADSTATS_INLINE T apply_one(T x, T coef, T lo, T hi) {
  if constexpr (U == Update::SCALE) {
    return x * coef;
  } else {
    x = x < lo ? lo : x;  // a NaN compares false: it stays; so does a zero of either sign
    return x > hi ? hi : x;
  }
}

// bf16 and fp16: products in float32, rounded once; clamping compares the exact float32
// values and stores the element's own bits or the bound's, so nothing is rounded.
template <Update U, bool IsBF16>
GRADSTATS_INLINE Halves apply_16(Halves h, const Constants& k) {
  const Floats x = IsBF16 ? widen_bf16(h) : widen_fp16(h);
  if constexpr (U == Update::SCALE) {
    const Floats y = x * splat<Floats>(k.coef_f32);
    return IsBF16 ? narrow_bf16(y) : narrow_fp16(y);
  } else {
    const uint16_t lo_bits = IsBF16 ? k.lo_bf16 : k.lo_fp16;
    const uint16_t hi_bits = IsBF16 ? k.hi_bf16 : k.hi_fp16;
    const Halves lo_h = splat<Halves>(lo_bits), hi_h = splat<Halves>(hi_bits);
    const Floats lo = IsBF16 ? widen_bf16(lo_h) : widen_fp16(lo_h);
    const Floats hi = IsBF16 ? widen_bf16(hi_h) : widen_fp16(hi_h);
    const SignedWords below = x < lo;
    const SignedWords above = select<Floats, SignedWords>(below, lo, x) > hi;
    const SignedHalves below16 = __builtin_convertvector(below, SignedHalves);
    const SignedHalves above16 = __builtin_convertvector(above, SignedHalves);
    return select<Halves, SignedHalves>(above16, hi_h,
                                        select<Halves, SignedHalves>(below16, lo_h, h));
  }
}

// n elements of a bf16/fp16 tensor from x, read and written through memcpy (GCC vectors
// may be more aligned than the elements); the tail padded to a whole vector with zeros
// that are never stored.
template <Update U, bool IsBF16>
GRADSTATS_INLINE void update_span_16(void* data, int64_t start, int64_t n,
                                     const Constants& constants) {
  // A local copy: the stores below go through char pointers, which may alias anything, so
  // constants read through a reference would be re-read every step.
  const Constants k = constants;
  char* x = static_cast<char*>(data) + start * 2;
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    Halves v;
    std::memcpy(&v, x + i * 2, sizeof v);
    v = apply_16<U, IsBF16>(v, k);
    std::memcpy(x + i * 2, &v, sizeof v);
  }
  if (i < n) {
    Halves v = {};
    const size_t bytes = static_cast<size_t>(n - i) * 2;
    std::memcpy(&v, x + i * 2, bytes);
    v = apply_16<U, IsBF16>(v, k);
    std::memcpy(x + i * 2, &v, bytes);
  }
}

// n elements of a float32/float64 tensor (element-aligned: checked before any work).
template <Update U, typename T>
GRADSTATS_INLINE void update_span_wide(void* data, int64_t start, int64_t n, T coef, T lo,
                                       T hi) {
  T* __restrict x = static_cast<T*>(data) + start;
  for (int64_t i = 0; i < n; ++i) x[i] = apply_one<U>(x[i], coef, lo, hi);
}

// One chunk of one tensor, with what the loop needs of the tensor read once, up front.
struct WorkItem {
  void* data;
  at::ScalarType dtype;
  int64_t start;
  int64_t size;
};

struct Pass {
  const std::vector<WorkItem>& items;
  Constants constants;
};

template <Update U>
GRADSTATS_INLINE void run_item(const Pass& pass, const WorkItem& item) {
  const Constants& k = pass.constants;
  void* data = item.data;
  switch (item.dtype) {
    case at::kFloat:
      update_span_wide<U, float>(data, item.start, item.size, k.coef_f32, k.lo_f32, k.hi_f32);
      break;
    case at::kDouble:
      update_span_wide<U, double>(data, item.start, item.size, k.coef_f64, k.lo_f64,
                                  k.hi_f64);
      break;
    case at::kBFloat16: update_span_16<U, true>(data, item.start, item.size, k); break;
    default: update_span_16<U, false>(data, item.start, item.size, k);  // kHalf: checked
  }
}

// Work items [begin, end) of one parallel_for task.
GRADSTATS_VECTOR_CLONES
void run_scale_items(const Pass& pass, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) run_item<Update::SCALE>(pass, pass.items[i]);
}

GRADSTATS_VECTOR_CLONES
void run_clamp_items(const Pass& pass, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) run_item<Update::CLAMP>(pass, pass.items[i]);
}

void check_tensors(const char* op, at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got one on ", t.device());
    TORCH_CHECK(t.layout() == at::kStrided, op, ": expected strided tensors, got ", t.layout());
    const auto dtype = t.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                    dtype == at::kHalf,
                op, ": expected float32/float64/bfloat16/float16 tensors, got ", dtype);
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op,
                ": expected contiguous or dense permuted tensors, got sizes ", t.sizes(),
                " strides ", t.strides());
    TORCH_CHECK(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) %
                                          t.element_size() == 0,
                op, ": expected element-aligned data, got address ", t.data_ptr());
  }
}

// The same elements in the same order: updating one of them updates the other.
bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() &&
         a.sizes() == b.sizes() && a.strides() == b.strides();
}

// Which tensors to update, split into those that share no memory with any other (updated
// together, in parallel) and those that must be updated one at a time. Each view once.
std::pair<std::vector<int64_t>, std::vector<int64_t>> update_targets(at::TensorList tensors) {
  struct Span {
    uintptr_t start, end;
    int64_t tensor;
  };
  std::vector<Span> spans;
  spans.reserve(tensors.size());
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;  // no memory, nothing to update
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.push_back({start, start + static_cast<uintptr_t>(t.nbytes()), i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return std::tie(a.start, a.tensor) < std::tie(b.start, b.tensor);
  });
  std::vector<int64_t> together, one_at_a_time;
  for (size_t first = 0; first < spans.size();) {
    size_t last = first + 1;  // a cluster: spans that overlap, directly or through others
    uintptr_t cluster_end = spans[first].end;
    while (last < spans.size() && spans[last].start < cluster_end) {
      cluster_end = std::max(cluster_end, spans[last].end);
      ++last;
    }
    std::vector<int64_t> distinct;  // the first position of each different view
    for (size_t s = first; s < last; ++s) {
      const int64_t t = spans[s].tensor;
      auto seen = std::find_if(distinct.begin(), distinct.end(), [&](int64_t d) {
        return same_view(tensors[d], tensors[t]);
      });
      if (seen == distinct.end()) {
        distinct.push_back(t);
      } else if (t < *seen) {
        *seen = t;
      }
    }
    auto& into = distinct.size() == 1 ? together : one_at_a_time;
    into.insert(into.end(), distinct.begin(), distinct.end());
    first = last;
  }
  std::sort(one_at_a_time.begin(), one_at_a_time.end());  // torch's order: the list's
  return {together, one_at_a_time};
}

void append_items(const at::Tensor& tensor, std::vector<WorkItem>& items) {
  const int64_t numel = tensor.numel();
  void* data = tensor.data_ptr();
  for (int64_t start = 0; start < numel; start += CHUNK) {
    items.push_back({data, tensor.scalar_type(), start, std::min(CHUNK, numel - start)});
  }
}

template <Update U>
void run(at::TensorList tensors, const Constants& constants) {
  auto [together, one_at_a_time] = update_targets(tensors);
  auto run_all = [&](const std::vector<WorkItem>& items) {
    const Pass pass{items, constants};
    // Tasks of at least GRAIN_ELEMENTS on average: many small tensors are few tasks.
    int64_t elements = 0;
    for (const WorkItem& item : items) elements += item.size;
    const int64_t n_items = static_cast<int64_t>(items.size());
    const int64_t grain = std::max<int64_t>(
        GRAIN_ITEMS, n_items * GRAIN_ELEMENTS / std::max<int64_t>(elements, 1));
    at::parallel_for(0, n_items, grain,
                     [&](int64_t begin, int64_t end) {
                       if constexpr (U == Update::SCALE) {
                         run_scale_items(pass, begin, end);
                       } else {
                         run_clamp_items(pass, begin, end);
                       }
                     });
  };
  std::vector<WorkItem> items;
  for (int64_t t : together) append_items(tensors[t], items);
  run_all(items);
  for (int64_t t : one_at_a_time) {
    items.clear();
    append_items(tensors[t], items);
    run_all(items);
  }
}

bool has_dtype(at::TensorList tensors, at::ScalarType dtype) {
  return std::any_of(tensors.begin(), tensors.end(),
                     [&](const at::Tensor& t) { return t.scalar_type() == dtype; });
}

void cpu_scale_(at::TensorList tensors, const at::Tensor& coef) {
  check_tensors("gradstats::cpu_scale_", tensors);
  TORCH_CHECK(coef.device().is_cpu() && coef.numel() == 1,
              "gradstats::cpu_scale_: expected a one-element CPU coefficient, got ",
              coef.numel(), " elements on ", coef.device());
  const auto coef_dtype = coef.scalar_type();
  TORCH_CHECK(coef_dtype == at::kFloat || coef_dtype == at::kDouble ||
                  coef_dtype == at::kBFloat16 || coef_dtype == at::kHalf,
              "gradstats::cpu_scale_: expected a floating-point coefficient, got ", coef_dtype);
  // Widening to float64 is exact for every dtype accepted above.
  double value = 0;
  switch (coef_dtype) {
    case at::kFloat: value = *static_cast<const float*>(coef.const_data_ptr()); break;
    case at::kDouble: value = *static_cast<const double*>(coef.const_data_ptr()); break;
    case at::kBFloat16:
      value = static_cast<float>(*static_cast<const c10::BFloat16*>(coef.const_data_ptr()));
      break;
    default: value = static_cast<float>(*static_cast<const c10::Half*>(coef.const_data_ptr()));
  }
  if (!(value < 1.0) && !std::isnan(value)) return;  // no clipping needed: touch nothing
  Constants constants;
  constants.coef_f64 = value;
  // torch converts the coefficient to the multiply's math type: float64 for float64
  // gradients, float32 for the others (bf16/fp16 included, then rounds the product).
  constants.coef_f32 = static_cast<float>(value);
  run<Update::SCALE>(tensors, constants);
}

void fill_nan(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    void* data = t.data_ptr();
    switch (t.scalar_type()) {
      case at::kFloat:
        std::fill_n(static_cast<float*>(data), t.numel(), std::numeric_limits<float>::quiet_NaN());
        break;
      case at::kDouble:
        std::fill_n(static_cast<double*>(data), t.numel(),
                    std::numeric_limits<double>::quiet_NaN());
        break;
      case at::kBFloat16:
        std::fill_n(static_cast<uint16_t*>(data), t.numel(), uint16_t{0x7FC0});
        break;
      default:
        std::fill_n(static_cast<uint16_t*>(data), t.numel(), uint16_t{0x7E00});
    }
  }
}

void cpu_clamp_(at::TensorList tensors, double lo, double hi) {
  check_tensors("gradstats::cpu_clamp_", tensors);
  if (std::isnan(lo) || std::isnan(hi)) {  // torch's clamp: a NaN bound gives all NaN
    fill_nan(tensors);  // the same elements whether updated once or twice
    return;
  }
  Constants constants;
  // Converted as torch's clamp converts a Scalar bound, only for the dtypes present:
  // float64 -> float32 rounds to nearest, bf16/fp16 round from that float32, and a finite
  // bound beyond the dtype's range raises the error torch raises (before any update).
  const c10::Scalar lo_scalar(lo), hi_scalar(hi);
  constants.lo_f64 = lo;
  constants.hi_f64 = hi;
  if (has_dtype(tensors, at::kFloat)) {
    constants.lo_f32 = lo_scalar.to<float>();
    constants.hi_f32 = hi_scalar.to<float>();
  }
  if (has_dtype(tensors, at::kBFloat16)) {
    constants.lo_bf16 = lo_scalar.to<c10::BFloat16>().x;
    constants.hi_bf16 = hi_scalar.to<c10::BFloat16>().x;
  }
  if (has_dtype(tensors, at::kHalf)) {
    constants.lo_fp16 = lo_scalar.to<c10::Half>().x;
    constants.hi_fp16 = hi_scalar.to<c10::Half>().x;
  }
  run<Update::CLAMP>(tensors, constants);
}

}  // namespace

// The schemas join the library cpu_stats.cpp defines (one TORCH_LIBRARY block per library).
TORCH_LIBRARY_FRAGMENT(gradstats, m) {
  m.def("cpu_scale_(Tensor(a!)[] tensors, Tensor coef) -> ()");
  m.def("cpu_clamp_(Tensor(a!)[] tensors, float lo, float hi) -> ()");
}

TORCH_LIBRARY_IMPL(gradstats, CPU, m) {
  m.impl("cpu_scale_", &cpu_scale_);
  m.impl("cpu_clamp_", &cpu_clamp_);
}

}  // namespace gradstats
