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
// (at::parallel_for). float32/float64 loops are auto-vectorised per x86-64 vector width;
// bf16/fp16 run 16 elements per step with AVX-512 intrinsics where the CPU has them (bf16
// scaling 32, with AVX-512BW, rounding with AVX512_BF16's conversion where there is one),
// and the auto-vectorised loops elsewhere and for the last few elements (same bits).
// GRADSTATS_NATIVE_ISA=avx512 leaves AVX512_BF16 out, baseline or avx2 every intrinsic, so
// bf16/fp16 take the auto-vectorised loops (in the clone the CPU picked at load time: unlike
// cpu_stats.cpp's, these clones are not chosen by the variable). Read once a call: tests
// run every version. A view listed twice (same address, dtype, sizes, strides) is updated
// once; views that share memory without being the same view are each updated in turn, one
// tensor at a time, as torch's loop over the list would.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "stream_prefetch.h"

namespace gradstats {
namespace {

// Elements per work item, as in cpu_stats.cpp: large enough that scheduling costs little.
constexpr int64_t CHUNK = 16384;
// Work per parallel_for task: at least a few chunks, and at least GRAIN_ELEMENTS elements
// on average (a task of a few small tensors costs more to hand out than to run); less
// than one task's worth runs on the calling thread.
constexpr int64_t GRAIN_ITEMS = 4;
constexpr int64_t GRAIN_ELEMENTS = 4 * CHUNK;
// Function multiversioning as in cpu_stats.cpp: the element loops are compiled once per
// x86-64 vector width and picked at load time. -ffp-contract=off (setup.py) keeps the
// AVX-512 clone from fusing anything into an FMA (nothing here adds a product anyway).
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define GRADSTATS_X86_64 1
#define GRADSTATS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GRADSTATS_VECTOR_CLONES
#endif
#define GRADSTATS_INLINE __attribute__((always_inline)) inline

// The portable loops below are written one element at a time, branch-free, and left to
// GCC's auto-vectoriser (-O3), which turns the selects into blends. Hand-written GCC vector
// code fared worse with GCC 12: it rebuilt broadcast constants lane by lane inside the
// hot loop, several times slower. bf16/fp16 also have AVX-512 versions (further down).

// bf16 is the top half of a float32: widening is exact.
GRADSTATS_INLINE float widen_bf16(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}

// float32 -> bf16, round to nearest even (c10::BFloat16's rounding); NaN stays a quiet
// NaN with its sign and top payload bits (the rounding could carry a NaN into Inf).
GRADSTATS_INLINE uint16_t narrow_bf16(float f) {
  const uint32_t b = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  const uint32_t nan = (b >> 16) | 0x40u;
  return static_cast<uint16_t>((b & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// fp16 -> float32, exact, in integer arithmetic (x86-64 has no vector fp16 conversion
// before F16C, and the default clone must not assume it).
GRADSTATS_INLINE float widen_fp16(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7FFFu;
  // Normal: the 5-bit exponent rebiased (15 -> 127) above the mantissa's 10 bits.
  const uint32_t normal = (magnitude << 13) + (112u << 23);
  const uint32_t inf_or_nan = (magnitude << 13) | 0x7F800000u;
  // Subnormal (and zero): m * 2^-24, exact in float32, where it is a normal number.
  const uint32_t small =
      std::bit_cast<uint32_t>(static_cast<float>(static_cast<int32_t>(magnitude)) * 0x1p-24f);
  const uint32_t value = magnitude >= 0x7C00u ? inf_or_nan
                         : magnitude >= 0x400u ? normal
                                               : small;
  return std::bit_cast<float>(value | sign);
}

// float32 -> fp16, round to nearest even, as c10::Half and x86's vcvtps2ph give it; NaN
// stays a quiet NaN with its sign and top payload bits (what vcvtps2ph does).
GRADSTATS_INLINE uint16_t narrow_fp16(float f) {
  const uint32_t b = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7FFFFFFFu;
  // Normal results: rebias the exponent (127 -> 15) and round the 13 dropped mantissa
  // bits to nearest even; a carry ripples into the exponent, and reaches Inf at 65520.
  const uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // Subnormal results (|f| < 2^-14): adding 0.5 puts fp16's subnormal spacing, 2^-24, at
  // float32's last mantissa bit, so the float addition itself rounds to nearest even and
  // the mantissa then holds the fp16 bits (0x400 when it rounds up to the smallest normal).
  const uint32_t subnormal = std::bit_cast<uint32_t>(std::bit_cast<float>(a) + 0.5f) -
                             0x3F000000u;
  const uint32_t nan = ((a >> 13) & 0x3FFu) | 0x7E00u;
  const uint32_t value = a > 0x7F800000u   ? nan
                         : a >= 0x477FF000u ? 0x7C00u  // rounds to Inf
                         : a < 0x38800000u  ? subnormal
                                            : normal;
  return static_cast<uint16_t>(value | sign);
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

// bf16 and fp16, one element (as its bits): products in float32, rounded once; clamping
// compares the exact float32 values and stores the element's own bits or the bound's, so
// nothing is rounded and a NaN keeps its bits.
template <Update U, bool IsBF16>
GRADSTATS_INLINE uint16_t apply_16(uint16_t h, float coef, float lo, float hi,
                                   uint16_t lo_bits, uint16_t hi_bits) {
  const float x = IsBF16 ? widen_bf16(h) : widen_fp16(h);
  if constexpr (U == Update::SCALE) {
    const float y = x * coef;
    return IsBF16 ? narrow_bf16(y) : narrow_fp16(y);
  } else {
    const bool below = x < lo;
    const bool above = (below ? lo : x) > hi;
    return above ? hi_bits : below ? lo_bits : h;
  }
}

// n elements of a bf16/fp16 tensor (element-aligned: checked before any work).
template <Update U, bool IsBF16>
GRADSTATS_INLINE void update_span_16(void* data, int64_t start, int64_t n, const Constants& k) {
  uint16_t* __restrict x = static_cast<uint16_t*>(data) + start;
  const float coef = k.coef_f32;
  const uint16_t lo_bits = IsBF16 ? k.lo_bf16 : k.lo_fp16;
  const uint16_t hi_bits = IsBF16 ? k.hi_bf16 : k.hi_fp16;
  const float lo = IsBF16 ? widen_bf16(lo_bits) : widen_fp16(lo_bits);
  const float hi = IsBF16 ? widen_bf16(hi_bits) : widen_fp16(hi_bits);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = apply_16<U, IsBF16>(x[i], coef, lo, hi, lo_bits, hi_bits);
  }
}

// n elements of a float32/float64 tensor (element-aligned: checked before any work).
// (No fetching ahead here: the float32 scale already read and wrote at 27-30 GB/s on the
// Xeon, one thread, and fetching ahead slowed it to 19-24 GB/s.)
template <Update U, typename T>
GRADSTATS_INLINE void update_span_wide(void* data, int64_t start, int64_t n, T coef, T lo,
                                       T hi) {
  T* __restrict x = static_cast<T*>(data) + start;
  for (int64_t i = 0; i < n; ++i) x[i] = apply_one<U>(x[i], coef, lo, hi);
}

#ifdef GRADSTATS_X86_64
// bf16/fp16 with AVX-512 intrinsics, picked at run time: GCC 12's auto-vectorised 16-bit
// loops above spend most of their time repacking 16- and 32-bit lanes (fp16 scaling ran
// at a tenth of torch's speed). 16 elements per step, widened to float32 lanes; the tail
// goes through the loops above, which give the same bits. fp16 converts with
// vcvtph2ps/vcvtps2ph (round to nearest even, NaN kept quiet with its top payload bits,
// exactly what narrow_fp16 computes); bf16 rounds with narrow_bf16's integer steps.
template <bool IsBF16>
__attribute__((target("avx512f"))) inline __m512 widen_16_avx512(__m512i bits) {
  if constexpr (IsBF16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
  } else {
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(bits));
  }
}

// narrow_bf16 on 16 lanes; the result in the low half of each 32-bit lane.
GRADSTATS_INLINE __attribute__((target("avx512f"))) __m512i round_to_bf16_avx512(__m512 y) {
  const __m512i b = _mm512_castps_si512(y);
  const __m512i top = _mm512_srli_epi32(b, 16);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)),
                       _mm512_and_si512(top, _mm512_set1_epi32(1))),
      16);
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(top, _mm512_set1_epi32(0x40)));
}

template <Update U, bool IsBF16>
__attribute__((target("avx512f"))) void update_span_16_avx512(void* data, int64_t start,
                                                              int64_t n, const Constants& k,
                                                              bool ahead) {
  uint16_t* x = static_cast<uint16_t*>(data) + start;
  const __m512 coef = _mm512_set1_ps(k.coef_f32);
  const __m512i lo_bits = _mm512_set1_epi32(IsBF16 ? k.lo_bf16 : k.lo_fp16);
  const __m512i hi_bits = _mm512_set1_epi32(IsBF16 ? k.hi_bf16 : k.hi_fp16);
  const __m512 lo = widen_16_avx512<IsBF16>(lo_bits), hi = widen_16_avx512<IsBF16>(hi_bits);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    if (ahead) fetch_ahead<64>(x + i);  // each line twice: the second costs little
    const __m512i h =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<__m256i*>(x + i)));
    const __m512 f = widen_16_avx512<IsBF16>(h);
    __m512i out;
    if constexpr (U == Update::SCALE) {
      const __m512 y = _mm512_mul_ps(f, coef);
      if constexpr (IsBF16) {
        out = round_to_bf16_avx512(y);
      } else {
        const __m256i half = _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i), half);
        continue;
      }
    } else {
      // Compare in float32, store the element's bits or the bound's (as apply_16).
      const __mmask16 below = _mm512_cmp_ps_mask(f, lo, _CMP_LT_OQ);
      const __m512 raised = _mm512_mask_blend_ps(below, f, lo);
      const __mmask16 above = _mm512_cmp_ps_mask(raised, hi, _CMP_GT_OQ);
      out = _mm512_mask_blend_epi32(above, _mm512_mask_blend_epi32(below, h, lo_bits), hi_bits);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i), _mm512_cvtepi32_epi16(out));
  }
  update_span_16<U, IsBF16>(data, start + i, n - i, k);
}

// bf16 scaling, 32 elements per step with AVX-512BW: unpacking 16-bit lanes against zeros
// gives float32 lanes directly, and packing the rounded results undoes the same in-lane
// interleave, so no cross-lane widening or narrowing is needed (the step above spends
// most of its time there, and the multiply has twice as many bytes per element to keep
// up with as with fp32).
__attribute__((target("avx512f,avx512bw"))) void scale_bf16_avx512bw(void* data, int64_t start,
                                                                     int64_t n,
                                                                     const Constants& k,
                                                                     bool ahead) {
  uint16_t* x = static_cast<uint16_t*>(data) + start;
  const __m512 coef = _mm512_set1_ps(k.coef_f32);
  const __m512i zero = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    if (ahead) fetch_ahead<64>(x + i);
    const __m512i v = _mm512_loadu_si512(x + i);
    const __m512 low = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
    const __m512 high = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
    _mm512_storeu_si512(x + i,
                        _mm512_packus_epi32(round_to_bf16_avx512(_mm512_mul_ps(low, coef)),
                                            round_to_bf16_avx512(_mm512_mul_ps(high, coef))));
  }
  update_span_16<Update::SCALE, true>(data, start + i, n - i, k);
}

// 16 bf16 elements from memory, widened to float32 lanes in element order.
GRADSTATS_INLINE __attribute__((target("avx512f"))) __m512 load_bf16_avx512(const uint16_t* at) {
  return widen_16_avx512<true>(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at))));
}

// bf16 scaling with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later), 32
// elements per step: vcvtne2ps2bf16 rounds 32 products to nearest even in one instruction,
// with narrow_bf16's bits for normal numbers, infinities and NaN (truncated, quiet bit set),
// in element order. It flushes float32 subnormals to zero, though, where torch rounds them
// to bf16 subnormals: a step with a subnormal product is rounded the integer way instead
// (gradients seldom have one). Rounding in integer steps was most of the AVX-512BW loop's
// work: cached bf16 gradients were scaled at ~0.8x fp32's speed per byte.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16"))) void scale_bf16_avx512bf16(
    void* data, int64_t start, int64_t n, const Constants& k, bool ahead) {
  uint16_t* x = static_cast<uint16_t*>(data) + start;
  const __m512 coef = _mm512_set1_ps(k.coef_f32);
  constexpr int kSubnormal = 0x20;  // vfpclassps category
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    if (ahead) fetch_ahead<64>(x + i);
    const __m512 low = _mm512_mul_ps(load_bf16_avx512(x + i), coef);
    const __m512 high = _mm512_mul_ps(load_bf16_avx512(x + i + 16), coef);
    if (_mm512_fpclass_ps_mask(low, kSubnormal) | _mm512_fpclass_ps_mask(high, kSubnormal)) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i),
                          _mm512_cvtepi32_epi16(round_to_bf16_avx512(low)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + i + 16),
                          _mm512_cvtepi32_epi16(round_to_bf16_avx512(high)));
    } else {
      _mm512_storeu_si512(x + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low)));
    }
  }
  update_span_16<Update::SCALE, true>(data, start + i, n - i, k);
}
#endif

// Which intrinsic loops a call may use: what the CPU has, narrowed by GRADSTATS_NATIVE_ISA.
struct Intrinsics {
  bool avx512 = false;      // bf16/fp16 updates, 16 elements a step
  bool avx512bw = false;    // bf16 scaling, 32 a step
  bool avx512bf16 = false;  // bf16 scaling rounded by vcvtne2ps2bf16
};

Intrinsics intrinsics_for_this_call() {
  Intrinsics use;
#ifdef GRADSTATS_X86_64
  // Set on the first call; __builtin_cpu_init is harmless if libgcc's ran already.
  static const bool avx512 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
  static const bool avx512bw = avx512 && __builtin_cpu_supports("avx512bw");
  static const bool avx512bf16 = avx512bw && __builtin_cpu_supports("avx512dq") &&
                                 __builtin_cpu_supports("avx512bf16");
  const char* choice = std::getenv("GRADSTATS_NATIVE_ISA");
  const bool narrower = choice && (std::strcmp(choice, "baseline") == 0 ||
                                   std::strcmp(choice, "avx2") == 0);
  if (narrower) return use;
  use.avx512 = avx512;
  use.avx512bw = avx512bw;
  use.avx512bf16 = avx512bf16 && !(choice && std::strcmp(choice, "avx512") == 0);
#endif
  return use;
}

// One chunk of one tensor, with what the loop needs of the tensor read once, up front.
struct WorkItem {
  void* data;
  at::ScalarType dtype;
  int64_t start;
  int64_t size;
};

int64_t bytes_of(const WorkItem& item) {
  return item.size * static_cast<int64_t>(c10::elementSize(item.dtype));
}

struct Pass {
  const std::vector<WorkItem>& items;
  Constants constants;
  bool stream_prefetch;  // fetch ahead within larger items (csrc/stream_prefetch.h)
  Intrinsics intrinsics;
};

template <Update U>
GRADSTATS_INLINE void run_item(const Pass& pass, const WorkItem& item) {
  const Constants& k = pass.constants;
  [[maybe_unused]] const Intrinsics& use = pass.intrinsics;
  void* data = item.data;
  const bool ahead = pass.stream_prefetch && bytes_of(item) > STREAM_PREFETCH_MIN_ITEM_BYTES;
  switch (item.dtype) {
    case at::kFloat:
      update_span_wide<U, float>(data, item.start, item.size, k.coef_f32, k.lo_f32, k.hi_f32);
      break;
    case at::kDouble:
      update_span_wide<U, double>(data, item.start, item.size, k.coef_f64, k.lo_f64,
                                  k.hi_f64);
      break;
    case at::kBFloat16:
#ifdef GRADSTATS_X86_64
      if constexpr (U == Update::SCALE) {
        if (use.avx512bf16) {
          return scale_bf16_avx512bf16(data, item.start, item.size, k, ahead);
        }
        if (use.avx512bw) return scale_bf16_avx512bw(data, item.start, item.size, k, ahead);
      }
      if (use.avx512) {
        return update_span_16_avx512<U, true>(data, item.start, item.size, k, ahead);
      }
#endif
      update_span_16<U, true>(data, item.start, item.size, k);
      break;
    default:  // kHalf: checked before any work
#ifdef GRADSTATS_X86_64
      if (use.avx512) {
        return update_span_16_avx512<U, false>(data, item.start, item.size, k, ahead);
      }
#endif
      update_span_16<U, false>(data, item.start, item.size, k);
  }
}

// Work items [begin, end) of one parallel_for task; the next item's start is fetched while
// a small one is updated (fetch_next_item).
template <Update U>
GRADSTATS_INLINE void run_items(const Pass& pass, int64_t begin, int64_t end) {
  const int64_t n_items = static_cast<int64_t>(pass.items.size());
  for (int64_t i = begin; i < end; ++i) {
    const WorkItem& item = pass.items[i];
    if (bytes_of(item) <= STREAM_PREFETCH_MIN_ITEM_BYTES && i + 1 < n_items) {
      const WorkItem& next = pass.items[i + 1];
      fetch_next_item(static_cast<const char*>(next.data) +
                          next.start * static_cast<int64_t>(c10::elementSize(next.dtype)),
                      bytes_of(next));
    }
    run_item<U>(pass, item);
  }
}

GRADSTATS_VECTOR_CLONES
void run_scale_items(const Pass& pass, int64_t begin, int64_t end) {
  run_items<Update::SCALE>(pass, begin, end);
}

GRADSTATS_VECTOR_CLONES
void run_clamp_items(const Pass& pass, int64_t begin, int64_t end) {
  run_items<Update::CLAMP>(pass, begin, end);
}

// Every refusal of the two ops comes from here, before anything is written: the Python
// caller reads an error as "nothing changed" and sends the list another way.
void check_tensors(const char* op, at::TensorList tensors) {
  const bool inference_mode = c10::InferenceMode::is_enabled();
  for (const at::Tensor& t : tensors) {
    // Bumping an inference tensor's version counter outside inference mode throws: refused
    // here, or the error would come after the write.
    TORCH_CHECK(inference_mode || !t.is_inference(), op,
                ": an inference tensor can only be updated in place under inference mode");
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

// What torch's in-place ops do (its ADInplaceOrView kernel, which a C++ op registered
// for CPU alone does not get): autograd then knows the values it may have saved changed.
void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
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
  const Intrinsics intrinsics = intrinsics_for_this_call();
  auto run_all = [&](const std::vector<WorkItem>& items) {
    const Pass pass{items, constants, stream_prefetch(), intrinsics};
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
  bump_versions(tensors);
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
    bump_versions(tensors);
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
