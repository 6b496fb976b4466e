// gradstats::cpu_stats: the fused statistics pass for CPU tensors.
//
// Reads: fp32/fp64/bf16/fp16 CPU tensors that are contiguous or permuted-dense (transposed,
// channels-last: each is read as the flat block it fills, in memory order, as the Triton
// kernels read it); the Python caller sends anything else to the reference path. Every
// size and index is int64: tensors may exceed 2^31 elements. Writes, per tensor: the norm
// power (sum |x|^p, or the NaN-propagating max |x| for the inf-norm) as float64, the NaN/Inf
// count as int64, and when num_bins > 0 the log2-magnitude histogram as int64
// [n, num_bins]. Same contracts and numerics as gradstats/reference.py and the Triton
// kernels (gradstats/kernels/stats.py).
//
// Work split: every tensor is cut into CHUNK-element work items, as the kernels do.
// Consecutive items are grouped into tasks of about TASK_ELEMENTS elements (thousands of
// small tensors make a few tasks, each of many items), and the tasks run in parallel
// (at::parallel_for), so threads get equal shares of memory to read whatever the tensor
// sizes. Each item writes its power into its own slot (float32 sum
// per chunk, float64 for float64 input), and the slots are summed per tensor in float64 in
// index order afterwards. So the result is bit-identical whatever the thread count.
// Histogram and non-finite counts are integers: exact in any order, added atomically (or
// plainly, for a tensor of one chunk). The histogram counts exponent fields while each
// 4096-element sub-block is still in L1 (see chunk_histogram): in AVX-512 lanes where the
// CPU has AVX-512BW, GFNI and BITALG, into a small scalar table elsewhere; the same counts.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <Python.h>

#include "cpu_stats.h"
#include "stream_prefetch.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace gradstats {
namespace {

// Must equal launch_config.INTERPRETER_CONFIG.chunk: the reference sums per kernel chunk,
// so the same chunking gives the same float32 rounding. Checked from Python.
constexpr int64_t CHUNK = 16384;
// Elements per parallel_for task: a few chunks, so scheduling costs little next to the
// ~10 us one chunk takes.
constexpr int64_t TASK_ELEMENTS = 4 * CHUNK;
// What an item costs beyond its elements (its setup, its histogram's merge), counted as
// this many elements when tasks are cut: a task of tiny tensors holds fewer of them.
constexpr int64_t ITEM_OVERHEAD_ELEMENTS = 256;
// Elements per inner step: one accumulator per lane (a GCC vector, see Vec). The lanes
// fix the summation order within a chunk, so vector code needs no -ffast-math.
constexpr int LANES = 16;
// Scalar exponent counts go to several interleaved copies: gradients crowd into a few
// exponents, and one copy would chain every increment of one slot through memory.
constexpr int HIST_COPIES = 4;

// The per-element code is compiled once per x86-64 vector width (AVX-512F, AVX2, the
// baseline) and picked at run time (see run_items_for_this_cpu): a build for the baseline
// CPU still runs AVX-512 loops where the CPU has them. Everything below run_items is
// forced inline into each version, so each gets its own vector code. AVX-512F brings its
// own FMA instructions, and g++ contracts a*b+c into them by default in C++: setup.py
// passes -ffp-contract=off, so with the lanes fixing the summation order every version
// gives the same bits (tests/test_native.py runs each one).
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define GRADSTATS_X86_VERSIONS 1
#endif
#define GRADSTATS_INLINE __attribute__((always_inline)) inline

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define GRADSTATS_AVX512_HISTOGRAM 1
#endif

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

// LANES elements widened exactly to the accumulation type (bf16 has its own step, see
// accumulate_step).
template <typename T>
GRADSTATS_INLINE typename Vec<typename Widen<T>::Acc>::Values load_lanes(const T* x) {
  using V = typename Vec<typename Widen<T>::Acc>::Values;
  if constexpr (std::is_same_v<T, c10::Half>) {
    V values;
    for (int lane = 0; lane < LANES; ++lane) values[lane] = static_cast<float>(x[lane]);
    return values;
  } else {
    V values;
    std::memcpy(&values, x, sizeof values);
    return values;
  }
}

// Vectors of lanes per step: bfloat16 reads 2 * LANES elements at once (see accumulate_step).
template <typename T>
constexpr int kParts = std::is_same_v<T, c10::BFloat16> ? 2 : 1;

// One chunk's running sums are one per lane (and part: `high` holds bf16's odd elements);
// the lanes fix the order. Separate local vectors, not a struct: g++ keeps a struct of
// 64-byte vectors in memory where they are wider than the registers (the AVX2 version),
// copying it through the stack on every step.

// |v|^p added to sum. The inf-norm keeps the largest magnitude as its bits: for
// non-negative floats integer order is float order, and every NaN's bits exceed Inf's, so
// an integer max propagates NaN as torch's inf-norm does, and vectorises.
template <int64_t Kind, typename Acc, typename V = typename Vec<Acc>::Values,
          typename B = typename Vec<Acc>::Bits>
GRADSTATS_INLINE void add_power(V v, B magnitude, V& sum, B& max_bits, Acc p) {
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
}

// LANES * kParts<T> elements into the sums. No NaN/Inf count here: see chunk_power.
template <int64_t Kind, typename T, typename Acc = typename Widen<T>::Acc,
          typename V = typename Vec<Acc>::Values, typename B = typename Vec<Acc>::Bits>
GRADSTATS_INLINE void accumulate_step(const T* x, V& sum, V& sum_high, B& max_bits,
                                      B& max_bits_high, Acc p) {
  using L = Layout<Acc>;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // 2 * LANES bf16 read as LANES 32-bit words: element 2k is the low half of word k,
    // element 2k + 1 the high half, and each is the top half of its float32. No widening
    // shuffles: one shift or mask per half.
    B words;
    std::memcpy(&words, x, sizeof words);
    const B magnitudes = words & 0x7FFF7FFFu;
    add_power<Kind>(reinterpret_cast<V>(words << 16), magnitudes << 16, sum, max_bits, p);
    add_power<Kind>(reinterpret_cast<V>(words & 0xFFFF0000u), magnitudes & 0xFFFF0000u,
                    sum_high, max_bits_high, p);
  } else {
    constexpr typename L::Bits kSign = typename L::Bits{1}
                                       << (sizeof(typename L::Bits) * 8 - 1);
    const V v = load_lanes(x);
    const B magnitude = reinterpret_cast<B>(v) & ~kSign;
    add_power<Kind>(v, magnitude, sum, max_bits, p);
  }
}

// The bit layout of each stored dtype, for counting by exponent field.
template <typename T>
struct Stored;
template <>
struct Stored<float> {
  using Bits = uint32_t;
  static constexpr int kMantissa = 23, kExponentBits = 8, kBias = 127;
};
template <>
struct Stored<double> {
  using Bits = uint64_t;
  static constexpr int kMantissa = 52, kExponentBits = 11, kBias = 1023;
};
template <>
struct Stored<c10::BFloat16> {
  using Bits = uint16_t;
  static constexpr int kMantissa = 7, kExponentBits = 8, kBias = 127;
};
template <>
struct Stored<c10::Half> {
  using Bits = uint16_t;
  static constexpr int kMantissa = 10, kExponentBits = 5, kBias = 15;
};

// NaN/Inf among x[0, n): the all-ones exponent field, counted from the stored bits.
// Only for chunks whose power came out non-finite (see chunk_power).
template <typename T>
GRADSTATS_INLINE int64_t count_nonfinite(const T* x, int64_t n) {
  using S = Stored<T>;
  using Bits = typename S::Bits;
  constexpr Bits kMagnitude = static_cast<Bits>(~(Bits{1} << (sizeof(Bits) * 8 - 1)));
  constexpr Bits kInf = static_cast<Bits>(((Bits{1} << S::kExponentBits) - 1) << S::kMantissa);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    Bits bits;
    std::memcpy(&bits, x + i, sizeof bits);
    count += (bits & kMagnitude) >= kInf;
  }
  return count;
}

// Elements per sub-block of a chunk: the histogram counts each sub-block right after the
// power loop has read it (still in L1), so reading memory and counting alternate finely
// and the hardware prefetchers keep streaming. A multiple of every step: the lanes run
// through the sub-blocks as through one loop, in the same order.
constexpr int64_t SUB_BLOCK = 4096;

// The sum of a chunk's lanes, pairwise (lane i plus lane i + LANES / 2, and so on down to
// one): a fixed order, so the same bits on every run and thread count, in log2(LANES)
// vector additions, and no less accurate than a sequential sum. Adding them one after the
// other was a chain of 2 * LANES dependent scalar additions per bf16 chunk (whose CHUNK
// elements hold half an fp32 chunk's bytes), most of the 2.9% of a bf16 pass's samples
// outside its inner loop (fp32: 1.2%; perf, GPT-2 small, one thread); whole calls did not
// measurably change.
template <typename Acc, typename V = typename Vec<Acc>::Values>
GRADSTATS_INLINE Acc sum_lanes(V lanes) {
  Acc values[LANES];
  std::memcpy(values, &lanes, sizeof values);
  for (int width = LANES / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) values[lane] += values[lane + width];
  }
  return values[0];
}

// The power and non-finite count of one chunk; visit(begin, end) is called on every
// sub-block [begin, end) once the power loop has read it.
//
// NaN/Inf are counted only when the chunk's power is not finite: every term of the power
// is >= 0 (|x|^p, or the largest magnitude), so a NaN or Inf element makes it NaN or Inf,
// and a finite power means there is none. A non-finite power from finite elements (squares
// beyond the float range) only costs a recount that finds none. The loop then does the
// power alone: counting in it was a third of its instructions (a compute-bound CPU gains;
// on the Xeon, fetching ahead, the loop waits on memory and timings did not move).
template <typename T, int64_t Kind, typename Visit>
GRADSTATS_INLINE ChunkResult chunk_power(const T* x, int64_t n, typename Widen<T>::Acc p,
                                         bool stream_prefetch, Visit&& visit) {
  using Acc = typename Widen<T>::Acc;
  constexpr int64_t kStep = LANES * kParts<T>;
  typename Vec<Acc>::Values sum = {}, sum_high = {};
  typename Vec<Acc>::Bits max_bits = {}, max_bits_high = {};
  int64_t i = 0;
  for (int64_t begin = 0; begin < n; begin += SUB_BLOCK) {
    const int64_t end = std::min(n, begin + SUB_BLOCK);
    // Two steps an iteration (the same order, so the same bits): half the loop's counter
    // and branch instructions. With no clipping needed, one thread, bf16 calls 0.986x on
    // 4,500 small tensors and 0.994x on GPT-2 small, fp32 unchanged (both ways in one
    // process, alternating per call).
    _Pragma("GCC unroll 2")
    for (; i + kStep <= end; i += kStep) {
      if (stream_prefetch) fetch_ahead<kStep * sizeof(T)>(x + i);
      accumulate_step<Kind>(x + i, sum, sum_high, max_bits, max_bits_high, p);
    }
    visit(begin, end);
  }
  if (i < n) {  // the tail, padded with zeros: they add nothing to any statistic
    T padded[kStep];
    std::fill(padded, padded + kStep, T(0));
    std::copy(x + i, x + n, padded);
    accumulate_step<Kind>(padded, sum, sum_high, max_bits, max_bits_high, p);
  }
  if constexpr (kParts<T> == 2) sum += sum_high;
  Acc total = sum_lanes<Acc>(sum);
  if constexpr (Kind == INF) {
    typename Layout<Acc>::Bits largest = 0;
    for (int lane = 0; lane < LANES; ++lane) {
      largest = std::max({largest, max_bits[lane], max_bits_high[lane]});
    }
    total = std::bit_cast<Acc>(largest);
  }
  // (A p too small for the accumulation type is 0 there, and NaN^0 = 1: always counted.)
  const bool shows_nonfinite = Kind != LP || p > Acc(0);
  const int64_t nonfinite = shows_nonfinite && std::isfinite(total) ? 0 : count_nonfinite(x, n);
  return {static_cast<double>(total), nonfinite};
}

// Biased exponent fields: one table slot each (the all-ones field is NaN/Inf).
template <typename T>
constexpr int64_t kExponents = int64_t{1} << Stored<T>::kExponentBits;

template <typename T>
GRADSTATS_INLINE uint32_t exponent_field(const T* x) {
  using S = Stored<T>;
  typename S::Bits bits;
  std::memcpy(&bits, x, sizeof bits);
  return static_cast<uint32_t>(bits >> S::kMantissa) & (kExponents<T> - 1);
}

// Counts the exponent fields of x[0, n) into table's HIST_COPIES interleaved copies of
// kExponents<T> 16-bit slots (a chunk fits): gradients crowd into a few exponents, and one
// copy would chain every increment of one slot through memory.
template <typename T>
GRADSTATS_INLINE void count_exponents(const T* x, int64_t n, uint16_t* table) {
  constexpr int64_t kSlots = kExponents<T>;
  int64_t i = 0;
  for (; i + HIST_COPIES <= n; i += HIST_COPIES) {
    for (int copy = 0; copy < HIST_COPIES; ++copy) {
      ++table[copy * kSlots + exponent_field(x + i + copy)];
    }
  }
  for (; i < n; ++i) ++table[exponent_field(x + i)];
}

#ifdef GRADSTATS_AVX512_HISTOGRAM
// Exponents counted in vector lanes at once: the WINDOW exponents ending at a chunk's
// largest finite one.
constexpr int WINDOW = 16;
// Byte lanes gain at most 8 a group: they are widened into 16-bit lanes every this many
// groups, before they can overflow (31 * 8 < 256).
constexpr int64_t FLUSH_GROUPS = 31;

// The largest of 64 unsigned bytes, by halving (a small item pays this once per call).
__attribute__((target("avx512f,avx512bw"))) inline int max_byte(__m512i bytes) {
  const __m256i m256 = _mm256_max_epu8(_mm512_castsi512_si256(bytes),
                                       _mm512_extracti64x4_epi64(bytes, 1));
  __m128i m = _mm_max_epu8(_mm256_castsi256_si128(m256), _mm256_extracti128_si256(m256, 1));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
  return _mm_cvtsi128_si32(m) & 0xFF;
}

// The four 128-bit quarters of 32 16-bit lanes, added lane by lane.
__attribute__((target("avx512f,avx512bw"))) inline __m128i sum_quarters(__m512i words) {
  const __m256i halves = _mm256_add_epi16(_mm512_castsi512_si256(words),
                                          _mm512_extracti64x4_epi64(words, 1));
  return _mm_add_epi16(_mm256_castsi256_si128(halves), _mm256_extracti128_si256(halves, 1));
}

__attribute__((target("avx512f,avx512bw"))) inline void add_slots(uint16_t* slots,
                                                                 __m128i counts) {
  auto* where = reinterpret_cast<__m128i*>(slots);
  _mm_storeu_si128(where, _mm_add_epi16(_mm_loadu_si128(where), counts));
}

// count_exponents for float32 and bfloat16 (8-bit exponent fields) with AVX-512BW, GFNI and
// BITALG, into table's first copy; the same counts, exactly. Gradients crowd into a few
// octaves below their largest magnitude, so the WINDOW exponents ending at the chunk's
// largest finite one are counted in vector lanes, 64 elements a step: each element's
// exponent becomes a one-hot byte (1 << offset in the window's low or high half), one
// GF(2) affine transform per half transposes every 8 x 8 bit block (8 elements x 8 window
// slots), and a byte popcount then gives per 8 elements how many sit in each slot. The
// few elements outside the window (the far low tail, zeros and subnormals when it does not
// reach them, NaN/Inf) are counted one by one.
template <typename T>
__attribute__((target("avx512f,avx512bw,gfni,avx512bitalg"))) void count_exponents_avx512(
    const T* x, int64_t n, uint16_t* table) {
  constexpr int64_t kGroup = 64;
  alignas(64) uint8_t exponents[SUB_BLOCK];  // one byte per element, in packus lane order
  const int64_t groups = std::min(n, SUB_BLOCK) / kGroup;
  const __m512i one = _mm512_set1_epi8(1);
  // The largest finite exponent, kept as (exponent + 1) mod 256 so NaN/Inf (255) count as 0.
  __m512i top = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i fields;
    if constexpr (std::is_same_v<T, float>) {
      __m512i quarter[4];
      for (int q = 0; q < 4; ++q) {  // shift out the sign, then the mantissa
        const __m512i bits = _mm512_loadu_si512(x + g * kGroup + q * 16);
        quarter[q] = _mm512_srli_epi32(_mm512_slli_epi32(bits, 1), 24);
      }
      fields = _mm512_packus_epi16(_mm512_packus_epi32(quarter[0], quarter[1]),
                                   _mm512_packus_epi32(quarter[2], quarter[3]));
    } else {
      __m512i half[2];
      for (int h = 0; h < 2; ++h) {
        const __m512i bits = _mm512_loadu_si512(x + g * kGroup + h * 32);
        half[h] = _mm512_srli_epi16(_mm512_slli_epi16(bits, 1), 8);
      }
      fields = _mm512_packus_epi16(half[0], half[1]);
    }
    _mm512_store_si512(exponents + g * kGroup, fields);
    top = _mm512_max_epu8(top, _mm512_add_epi8(fields, one));
  }
  const int largest = max_byte(top) - 1;  // -1: none
  const int base = std::max(largest - WINDOW + 1, 0);  // base + WINDOW - 1 <= 254

  const __m512i window_base = _mm512_set1_epi8(static_cast<char>(base));
  const __m512i window = _mm512_set1_epi8(WINDOW);
  // Byte k of each 16: 1 << k (low half) or 1 << (k - 8) (high half); vpshufb picks byte
  // `offset` (its low 4 bits: in-window offsets are below 16).
  const __m512i low_one_hot = _mm512_broadcast_i32x4(
      _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m512i high_one_hot = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 64, -128));
  // As gf2p8affine's data operand, byte j = 1 << j: result byte j of each qword gathers
  // bit j of the matrix operand's 8 bytes (the transpose).
  const __m512i transpose = _mm512_set1_epi64(0x8040201008040201);
  const __m512i zero = _mm512_setzero_si512();
  // Byte/word lane i counts window slot i % 8 of its half.
  __m512i low_bytes = zero, high_bytes = zero, low_words = zero, high_words = zero;
  for (int64_t g = 0, flush_at = std::min(groups, FLUSH_GROUPS) - 1; g < groups; ++g) {
    const __m512i offset =
        _mm512_sub_epi8(_mm512_load_si512(exponents + g * kGroup), window_base);
    const __mmask64 inside = _mm512_cmplt_epu8_mask(offset, window);
    const __m512i low = _mm512_maskz_shuffle_epi8(inside, low_one_hot, offset);
    const __m512i high = _mm512_maskz_shuffle_epi8(inside, high_one_hot, offset);
    low_bytes = _mm512_add_epi8(
        low_bytes, _mm512_popcnt_epi8(_mm512_gf2p8affine_epi64_epi8(transpose, low, 0)));
    high_bytes = _mm512_add_epi8(
        high_bytes, _mm512_popcnt_epi8(_mm512_gf2p8affine_epi64_epi8(transpose, high, 0)));
    for (__mmask64 outside = ~inside; outside; outside &= outside - 1) {
      ++table[exponents[g * kGroup + __builtin_ctzll(outside)]];
    }
    if (g == flush_at) {  // every FLUSH_GROUPS groups, and after the last one
      // Bytes k and 8 + k of each 16 land in word k of each 8: slot k % 8 either way.
      low_words = _mm512_add_epi16(low_words, _mm512_add_epi16(
          _mm512_unpacklo_epi8(low_bytes, zero), _mm512_unpackhi_epi8(low_bytes, zero)));
      high_words = _mm512_add_epi16(high_words, _mm512_add_epi16(
          _mm512_unpacklo_epi8(high_bytes, zero), _mm512_unpackhi_epi8(high_bytes, zero)));
      low_bytes = high_bytes = zero;
      flush_at = std::min(groups, g + 1 + FLUSH_GROUPS) - 1;
    }
  }
  // Word lane i counts slot i % 8 of its half: the four 128-bit quarters add up to the
  // half's 8 slots, added to the table in one 16-byte step each (a chunk's counts fit).
  add_slots(table + base, sum_quarters(low_words));
  add_slots(table + base + 8, sum_quarters(high_words));
  for (int64_t i = groups * kGroup; i < n; ++i) ++table[exponent_field(x + i)];
}
#endif

// Whether count_block counts T's exponents in AVX-512 lanes, into the table's first copy
// only (see count_exponents_avx512); otherwise into all HIST_COPIES copies.
template <typename T>
GRADSTATS_INLINE bool counts_in_lanes(bool vector_counting) {
#ifdef GRADSTATS_AVX512_HISTOGRAM
  return vector_counting && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>);
#else
  return false;
#endif
}

// count_exponents, in AVX-512 lanes where vector_counting allows (see vector_counting).
template <typename T>
GRADSTATS_INLINE void count_block(const T* x, int64_t n, bool vector_counting,
                                  uint16_t* table) {
#ifdef GRADSTATS_AVX512_HISTOGRAM
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (vector_counting) return count_exponents_avx512(x, n, table);
  }
#endif
  count_exponents(x, n, table);
}

// Adds one chunk's log2-magnitude histogram to hist_row (column 0 exact zeros, column
// k >= 1 floor(log2|x|) == min_exp + k - 1 clamped into [1, num_bins - 1], NaN/Inf not
// counted), from `table`, its exponent fields counted by count_block. The column depends
// on the exponent field alone, except in the exponent-0 slot: zeros, and subnormals, whose
// columns come from their mantissas; both are counted by rescanning the chunk, only when
// the slot is not empty. `table` (its `copies` copies) and `chunk_row` (num_bins) are zero
// again on return. `exclusive`: the chunk is its tensor's only one, so its counts go
// straight into hist_row, which no other thread writes and nothing zeroed before (it is
// zeroed here, while its lines are being written anyway: a separate zero fill of every row
// was 5% of a call on 4,500 small tensors). Thousands of small tensors are
// one chunk each, and what is done per chunk here is most of their histogram's cost
// (with the counting, ~100 ns a chunk at 256 float32 elements, on an Intel Xeon).
template <typename T>
GRADSTATS_INLINE void chunk_histogram(const T* x, int64_t n, int64_t num_bins,
                                      int64_t min_exp, uint16_t* table, int copies,
                                      int64_t* chunk_row, int64_t* hist_row, bool exclusive) {
  using S = Stored<T>;
  constexpr int64_t kSlots = kExponents<T>;
  // The copies merged (a chunk's counts fit 16 bits), the table cleared for the next chunk;
  // a single copy is read where it is, and cleared at the end.
  uint16_t merged_copies[kSlots];
  const uint16_t* merged = table;
  if (copies > 1) {
    for (int64_t e = 0; e < kSlots; ++e) {
      uint16_t count = 0;
      for (int copy = 0; copy < copies; ++copy) count += table[copy * kSlots + e];
      merged_copies[e] = count;
    }
    std::memset(table, 0, copies * kSlots * sizeof *table);
    merged = merged_copies;
  }
  int64_t* row = exclusive ? hist_row : chunk_row;
  if (exclusive) std::memset(row, 0, num_bins * sizeof *row);

  // Finite exponents e in [1, kSlots - 2]: column e - shift, clamped into [1, last]. Three
  // runs of slots (clamped low, one to one, clamped high), each a plain loop that vectorises.
  const int64_t last = num_bins - 1, shift = S::kBias + min_exp - 1;
  const int64_t low_end = std::clamp(shift + 2, int64_t{1}, kSlots - 1);  // first unclamped
  const int64_t high_begin = std::clamp(shift + last, low_end, kSlots - 1);  // first at last
  int64_t below = 0, above = 0;
  for (int64_t e = 1; e < low_end; ++e) below += merged[e];
  for (int64_t e = low_end; e < high_begin; ++e) row[e - shift] += merged[e];
  for (int64_t e = high_begin; e < kSlots - 1; ++e) above += merged[e];
  row[1] += below;
  row[last] += above;
  if (merged[0]) {  // zeros and subnormals share the exponent-0 slot: look at the bits
    using Bits = typename S::Bits;
    int64_t zeros = 0;
    for (int64_t j = 0; j < n; ++j) {
      Bits bits;
      std::memcpy(&bits, x + j, sizeof bits);
      zeros += static_cast<Bits>(bits << 1) == 0;
    }
    row[0] += zeros;
    if (merged[0] > zeros) {  // subnormals, placed from their stored bits alone
      // A subnormal is m * 2^(1 - bias - mantissa bits), m its field: floor(log2|x|) is
      // bit_width(m) - bias - mantissa bits. So one branch-free pass counts bit widths
      // (normals and zeros in slot 0), in integers only: flush-to-zero (DAZ) modes change
      // nothing, and no element is widened (an out-of-line call for float16).
      int64_t widths[S::kMantissa + 1] = {};
      for (int64_t j = 0; j < n; ++j) {
        Bits bits;
        std::memcpy(&bits, x + j, sizeof bits);
        const Bits magnitude = static_cast<Bits>(static_cast<Bits>(bits << 1) >> 1);
        const bool subnormal = (magnitude >> S::kMantissa) == 0;
        ++widths[subnormal ? std::bit_width(magnitude) : 0];
      }
      for (int64_t width = 1; width <= S::kMantissa; ++width) {
        const int64_t exponent = width - S::kBias - S::kMantissa;
        row[std::clamp(exponent - min_exp + 1, int64_t{1}, last)] += widths[width];
      }
    }
  }
  if (copies == 1) std::memset(table, 0, kSlots * sizeof *table);
  if (exclusive) return;  // counted into hist_row itself
  for (int64_t column = 0; column < num_bins; ++column) {
    if (row[column]) std::atomic_ref<int64_t>(hist_row[column]).fetch_add(row[column]);
  }
  std::memset(row, 0, num_bins * sizeof *row);
}

// One chunk of one tensor, with what run_items needs of the tensor read once, when the
// list is built: the items then touch no TensorImpl.
struct WorkItem {
  int64_t tensor;
  const void* data;  // the chunk's first element
  int64_t size;      // elements
  at::ScalarType dtype;
  bool exclusive;    // the tensor's only chunk: its outputs need no atomic adds
};

int64_t bytes_of(const WorkItem& item) {
  return item.size * static_cast<int64_t>(c10::elementSize(item.dtype));
}

template <typename T, typename Visit>
GRADSTATS_INLINE ChunkResult dispatch_power(const T* x, int64_t n, int64_t kind, double p,
                                            bool stream_prefetch, Visit&& visit) {
  using Acc = typename Widen<T>::Acc;
  const auto q = static_cast<Acc>(p);
  switch (kind) {
    case INF: return chunk_power<T, INF>(x, n, q, stream_prefetch, visit);
    case L1: return chunk_power<T, L1>(x, n, q, stream_prefetch, visit);
    case L2: return chunk_power<T, L2>(x, n, q, stream_prefetch, visit);
    default: return chunk_power<T, LP>(x, n, q, stream_prefetch, visit);
  }
}

// Statistics of one work item: its power into its slot, counts added to the tensor's row.
template <typename T>
GRADSTATS_INLINE void item_stats(const WorkItem& item, int64_t kind,
                                 double p, int64_t num_bins, int64_t min_exp,
                                 double* partial_power, int64_t* nonfinite, int64_t* hist_row,
                                 bool vector_counting, bool stream_prefetch, uint16_t* table,
                                 int64_t* row) {
  const T* x = static_cast<const T*>(item.data);
  const ChunkResult result =
      num_bins == 0
          ? dispatch_power(x, item.size, kind, p, stream_prefetch, [](int64_t, int64_t) {})
          : dispatch_power(x, item.size, kind, p, stream_prefetch,
                           [&](int64_t begin, int64_t end) {
                             count_block(x + begin, end - begin, vector_counting, table);
                           });
  *partial_power = result.power;
  // A tensor of one chunk (most of them, in number) has its outputs to itself.
  const bool exclusive = item.exclusive;
  if (exclusive) {
    *nonfinite += result.nonfinite;
  } else if (result.nonfinite) {
    std::atomic_ref<int64_t>(*nonfinite).fetch_add(result.nonfinite);
  }
  if (num_bins) {
    const int copies = counts_in_lanes<T>(vector_counting) ? 1 : HIST_COPIES;
    chunk_histogram(x, item.size, num_bins, min_exp, table, copies, row, hist_row, exclusive);
  }
}

// What every work item of one call reads and writes.
struct Pass {
  const std::vector<WorkItem>& items;
  int64_t norm_kind;
  double p;
  int64_t num_bins;
  int64_t min_exp;
  bool vector_counting;  // count histogram exponents in AVX-512 lanes (see chunk_histogram)
  bool stream_prefetch;  // fetch ahead within larger items (csrc/stream_prefetch.h)
  double* partial_power;  // one slot per work item
  int64_t* nonfinite;     // one per tensor
  int64_t* hist;          // [tensors, num_bins]
};

// Work items [begin, end) of one parallel_for task (inlined into each version below).
GRADSTATS_INLINE void run_items(const Pass& pass, int64_t begin, int64_t end) {
  // The exponent table of chunk_histogram, large enough for float64's 11-bit exponents
  // (16 KB, zeroed): none without a histogram.
  std::vector<uint16_t> table(pass.num_bins ? HIST_COPIES * kExponents<double> : 0);
  std::vector<int64_t> chunk_row(pass.num_bins);  // one chunk's histogram
  const int64_t n_items = static_cast<int64_t>(pass.items.size());
  for (int64_t k = begin; k < end; ++k) {
    const WorkItem& item = pass.items[k];
    const int64_t item_bytes = bytes_of(item);
    if (item_bytes <= STREAM_PREFETCH_MIN_ITEM_BYTES && k + 1 < n_items) {
      fetch_next_item(pass.items[k + 1].data, bytes_of(pass.items[k + 1]));
    }
    int64_t* row = pass.hist + item.tensor * pass.num_bins;
    int64_t* count = pass.nonfinite + item.tensor;
    double* slot = pass.partial_power + k;
    const int64_t kind = pass.norm_kind, num_bins = pass.num_bins, min_exp = pass.min_exp;
    const bool stream = pass.stream_prefetch && item_bytes > STREAM_PREFETCH_MIN_ITEM_BYTES;
    switch (item.dtype) {
      case at::kFloat:
        item_stats<float>(item, kind, pass.p, num_bins, min_exp, slot, count, row,
                              pass.vector_counting, stream, table.data(), chunk_row.data());
        break;
      case at::kDouble:
        item_stats<double>(item, kind, pass.p, num_bins, min_exp, slot, count, row,
                              pass.vector_counting, stream, table.data(), chunk_row.data());
        break;
      case at::kBFloat16:
        item_stats<c10::BFloat16>(item, kind, pass.p, num_bins, min_exp, slot, count, row,
                                  pass.vector_counting, stream, table.data(), chunk_row.data());
        break;
      default:
        item_stats<c10::Half>(item, kind, pass.p, num_bins, min_exp, slot, count, row,
                              pass.vector_counting, stream, table.data(), chunk_row.data());
    }
  }
}

using RunItems = void (*)(const Pass&, int64_t, int64_t);

#ifdef GRADSTATS_X86_VERSIONS
__attribute__((target("avx512f"))) void run_items_avx512(const Pass& pass, int64_t begin,
                                                          int64_t end) {
  run_items(pass, begin, end);
}
__attribute__((target("avx2"))) void run_items_avx2(const Pass& pass, int64_t begin,
                                                     int64_t end) {
  run_items(pass, begin, end);
}
#endif
void run_items_baseline(const Pass& pass, int64_t begin, int64_t end) {
  run_items(pass, begin, end);
}

// The AVX-512F version where the CPU has it, the baseline one elsewhere. Not the AVX2 one
// by default: g++ 12 keeps the 64-byte lane vectors in memory when they are wider than the
// registers, and that version ran 2x slower than the baseline one (85 vs 45 ms, float32
// GPT-2 small statistics, one thread; the target_clones build before it did the same).
// GRADSTATS_NATIVE_ISA=avx2 or baseline picks that version (read on every call: tests
// check that every version gives the same bits).
RunItems run_items_for_this_cpu() {
#ifdef GRADSTATS_X86_VERSIONS
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2");
  const char* choice = std::getenv("GRADSTATS_NATIVE_ISA");
  if (choice && std::strcmp(choice, "baseline") == 0) return run_items_baseline;
  if (choice && std::strcmp(choice, "avx2") == 0 && avx2) return run_items_avx2;
  if (avx512) return run_items_avx512;
#endif
  return run_items_baseline;
}

// Whether histograms count exponents in AVX-512 lanes: where the CPU has AVX-512BW, GFNI
// and BITALG (Ice Lake, Zen 4 and later), unless
// GRADSTATS_NATIVE_HISTOGRAM=scalar (read on every call: tests compare both ways).
bool vector_counting() {
#ifdef GRADSTATS_AVX512_HISTOGRAM
  static const bool supported = __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("gfni") &&
                                __builtin_cpu_supports("avx512bitalg");
  const char* choice = std::getenv("GRADSTATS_NATIVE_HISTOGRAM");
  return supported && !(choice && std::strcmp(choice, "scalar") == 0);
#else
  return false;
#endif
}

}  // namespace

bool stream_prefetch() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool intel = (__builtin_cpu_init(), __builtin_cpu_is("intel"));
  return intel;
#else
  return false;
#endif
}

// What StatsPass::run reads and writes: the work list built from the tensors' metadata.
struct StatsPass::Plan {
  std::vector<WorkItem> items;
  std::vector<int64_t> first_item;          // tensor t's items: [first_item[t], first_item[t + 1])
  std::vector<int64_t> first_item_of_task;  // task k runs items [its entry, the next)
  int64_t norm_kind = 0, num_bins = 0, min_exp = 0;
  double p = 0;
};

namespace {

bool readable_layout(const at::Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided &&
         (t.is_contiguous() || t.is_non_overlapping_and_dense());
}

bool readable_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
         dtype == at::kHalf;
}

// grads as the pass reads them, or an error naming what it cannot read.
std::vector<ListedTensor> listed_for_pass(const at::Tensor* const* grads, int64_t n) {
  std::vector<ListedTensor> listed(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& g = *grads[t];
    TORCH_CHECK(readable_layout(g),
                "gradstats::cpu_stats reads CPU tensors that are contiguous or permuted-dense "
                "(non-overlapping and dense)");
    const auto dtype = g.scalar_type();
    TORCH_CHECK(readable_dtype(dtype),
                "gradstats::cpu_stats reads float32/float64/bfloat16/float16, got ", dtype);
    const int64_t numel = g.numel();
    // A permuted-dense tensor fills numel slots from its data_ptr, its lowest address.
    listed[t] = {numel == 0 ? nullptr : g.const_data_ptr(), numel, dtype};
  }
  return listed;
}

}  // namespace

bool pass_reads(const at::Tensor& t) {
  return readable_dtype(t.scalar_type()) && readable_layout(t);
}

StatsPass::StatsPass(const at::Tensor* const* grads, int64_t n, double p, int64_t norm_kind,
                     int64_t num_bins, int64_t min_exp)
    : StatsPass(listed_for_pass(grads, n).data(), n, p, norm_kind, num_bins, min_exp) {}

StatsPass::StatsPass(const ListedTensor* tensors, int64_t n, double p, int64_t norm_kind,
                     int64_t num_bins, int64_t min_exp)
    : plan_(std::make_unique<Plan>()) {
  TORCH_CHECK(norm_kind >= INF && norm_kind <= LP, "gradstats::cpu_stats: bad norm_kind ",
              norm_kind);
  // gradstats' own checks (checks.py) keep to these ranges; a direct caller of the op gets
  // an error instead of truncated int32 column arithmetic or a huge allocation.
  TORCH_CHECK(num_bins == 0 || (num_bins >= 2 && num_bins <= 1024),
              "gradstats::cpu_stats: num_bins must be 0 or in [2, 1024], got ", num_bins);
  TORCH_CHECK(min_exp >= -1100 && min_exp <= 1100,
              "gradstats::cpu_stats: min_exp must be in [-1100, 1100], got ", min_exp);
  Plan& plan = *plan_;
  plan.norm_kind = norm_kind;
  plan.p = p;
  plan.num_bins = num_bins;
  plan.min_exp = min_exp;
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto i64 = at::TensorOptions().dtype(at::kLong);
  power_ = at::zeros({n}, f64);
  nonfinite_ = at::zeros({n}, i64);
  // Rows of one-chunk tensors are zeroed by the chunk that fills them (chunk_histogram);
  // the others (no chunk, or several adding to the row) here.
  hist_ = at::empty({n, num_bins}, i64);
  int64_t* hist_rows = hist_.data_ptr<int64_t>();

  // The work list: every tensor's chunks in order, so each tensor's slots are adjacent. A
  // permuted-dense tensor's chunks are those of the flat block it fills, as the Triton
  // kernels' (and the reference's).
  plan.first_item.resize(n + 1);
  plan.first_item_of_task.push_back(0);
  int64_t task_load = 0;
  for (int64_t t = 0; t < n; ++t) {
    const auto [data, numel, dtype] = tensors[t];
    plan.first_item[t] = static_cast<int64_t>(plan.items.size());
    if (num_bins > 0 && (numel == 0 || numel > CHUNK)) {
      std::memset(hist_rows + t * num_bins, 0, num_bins * sizeof *hist_rows);
    }
    if (numel == 0) continue;
    const auto* bytes = static_cast<const char*>(data);
    const auto element_size = static_cast<int64_t>(c10::elementSize(dtype));
    for (int64_t start = 0; start < numel; start += CHUNK) {
      plan.items.push_back({t, bytes + start * element_size, std::min(CHUNK, numel - start),
                            dtype, numel <= CHUNK});
      // Tasks: consecutive items, cut once they hold TASK_ELEMENTS (see the header).
      task_load += plan.items.back().size + ITEM_OVERHEAD_ELEMENTS;
      if (task_load >= TASK_ELEMENTS) {
        plan.first_item_of_task.push_back(static_cast<int64_t>(plan.items.size()));
        task_load = 0;
      }
    }
  }
  plan.first_item[n] = static_cast<int64_t>(plan.items.size());
  if (task_load > 0) {
    plan.first_item_of_task.push_back(static_cast<int64_t>(plan.items.size()));
  }
}

StatsPass::~StatsPass() = default;

void StatsPass::run() {
  const Plan& plan = *plan_;
  std::vector<double> partial_power(plan.items.size());
  const Pass pass{plan.items, plan.norm_kind, plan.p, plan.num_bins, plan.min_exp,
                  vector_counting(), stream_prefetch(), partial_power.data(),
                  nonfinite_.data_ptr<int64_t>(), hist_.data_ptr<int64_t>()};
  const RunItems run = run_items_for_this_cpu();
  const auto& tasks = plan.first_item_of_task;
  const auto n_tasks = static_cast<int64_t>(tasks.size()) - 1;
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    run(pass, tasks[begin], tasks[end]);
  });

  // Chunk partials summed per tensor in index order (the max for the inf-norm, NaN first).
  double* power_out = power_.data_ptr<double>();
  const int64_t n = power_.numel();
  for (int64_t t = 0; t < n; ++t) {
    double total = 0;
    for (int64_t k = plan.first_item[t]; k < plan.first_item[t + 1]; ++k) {
      double part = partial_power[k];
      if (plan.norm_kind == INF) {
        total = (part > total || std::isnan(part)) && !std::isnan(total) ? part : total;
      } else {
        total += part;
      }
    }
    power_out[t] = total;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_stats_of(
    const at::Tensor* const* grads, int64_t n, double p, int64_t norm_kind, int64_t num_bins,
    int64_t min_exp) {
  StatsPass pass(grads, n, p, norm_kind, num_bins, min_exp);
  pass.run();
  return pass.outputs();
}

namespace {

// The registered op: cpu_stats_of on the list the dispatcher unboxed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_stats(
    at::TensorList grads, double p, int64_t norm_kind, int64_t num_bins, int64_t min_exp) {
  std::vector<const at::Tensor*> pointers(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) pointers[t] = &grads[t];
  return cpu_stats_of(pointers.data(), static_cast<int64_t>(pointers.size()), p, norm_kind,
                      num_bins, min_exp);
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
PyMethodDef* direct_call_methods();  // csrc/direct_calls.cpp
}  // namespace gradstats

// Importing gradstats._C loads this library, whose static initialisers register the
// operator above; the module's functions are the host path's (csrc/host_path.cpp) and the
// direct calls' (csrc/direct_calls.cpp).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                               gradstats::host_path_methods()};
  PyObject* created = PyModule_Create(&module);
  if (created != nullptr && PyModule_AddFunctions(created, gradstats::direct_call_methods()) < 0) {
    Py_DECREF(created);
    return nullptr;
  }
  return created;
}
