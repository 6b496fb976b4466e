// Fetching ahead in the streaming loops of cpu_stats.cpp (the statistics pass) and of
// cpu_apply.cpp's bf16/fp16 updates (the float32/float64 ones read and write at the
// memory's speed already: fetching ahead slowed them), and fetching the next small work item
// in both (fetch_next_item, at the end).
//
// Each step of those loops feeds its load to several dependent instructions (the power
// and the non-finite count; the widening, multiply and rounding of bf16), and while they
// wait on memory they fill the scheduler, so fewer loads are in flight than in a plain
// sum's loop and the pass reads below the memory's speed. Fetching the line this many
// bytes ahead from every step lets the misses overlap again. Measured on a 2-core Intel
// Xeon, one thread, GPT-2 small (124M elements): the statistics pass 9.6 -> 13.5 GB/s in
// fp32 and 7.7 -> 12.6-14 GB/s in bf16 (torch's per-tensor sums: 12.5 and 8.0), the bf16
// scale 13.5-14.6 -> 23.8-24.7 GB/s read + written (fp32: 26-28; torch's _foreach_mul_ on
// bf16: 10-11); 2 KB and 8 KB ahead measured within noise of 4 KB. Off on AMD, where it
// was not measured: the hardware prefetcher there streamed the statistics loop at a plain
// sum's speed, and fetching the next work item's start after a large one slowed the pass
// by 6-20%.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gradstats {

constexpr int64_t STREAM_PREFETCH_BYTES = 4096;
// Work items of at most this many bytes fetch nothing ahead: in thousands of small tensors
// the line 4 KB on belongs to some other allocation (fetch_next_item fetches the next item's
// start instead).
constexpr int64_t STREAM_PREFETCH_MIN_ITEM_BYTES = 16384;
// Bytes of the next work item fetched while a small one runs (see fetch_next_item).
constexpr int64_t NEXT_ITEM_PREFETCH_BYTES = 2048;

// Whether the streaming loops fetch ahead: on Intel CPUs (decided once).
bool stream_prefetch();

// Fetches the `bytes` (a multiple of 64, at most a few lines) that lie STREAM_PREFETCH_BYTES
// past `at`. Into the outer caches (locality 1: prefetcht2 on x86), not L1: the demand loads
// keep L1's few miss buffers (bf16 statistics, one thread: 13.6-14.1 GB/s, where fetching
// into L1 gave 11.2-13.2; float32 and the bf16 scale the same either way). A read fetch for
// the updates too: the line is read before it is written. The address is formed as an
// integer: near a tensor's end it lies past the allocation, harmless for a prefetch, which
// never faults, but not a pointer C++ lets one form.
template <size_t bytes>
__attribute__((always_inline)) inline void fetch_ahead(const void* at) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(at) + STREAM_PREFETCH_BYTES;
  for (size_t line = 0; line < bytes; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + line), 0, 1);
  }
}

// Fetches the first NEXT_ITEM_PREFETCH_BYTES of the next work item (all of it, when it is
// smaller), `first` its first byte: the passes call it while an item of at most
// STREAM_PREFETCH_MIN_ITEM_BYTES runs, on every CPU. Thousands of small tensors lie in
// separate allocations, and without it each one starts with misses the loop waits for:
// 10-20% of a statistics pass at 4,500 tensors; a bf16 scale call there 0.93x, float32's
// loop, which keeps more loads in flight, 1.0x. Not after a larger item: the hardware
// prefetcher is streaming there, and the extra requests slowed GPT-2 small's statistics
// pass by 6-20% (AMD EPYC, one thread). Forced inline: g++ 12 counts a prefetch as no side
// effect, finds a plain inline function that only prefetches "looping const" and deletes
// its calls before inlining it (no prefetch was left in the statistics pass; see also
// host_path.cpp's read_ahead).
__attribute__((always_inline)) inline void fetch_next_item(const void* first, int64_t bytes) {
  const char* start = static_cast<const char*>(first);
  const int64_t length = bytes < NEXT_ITEM_PREFETCH_BYTES ? bytes : NEXT_ITEM_PREFETCH_BYTES;
  for (int64_t offset = 0; offset < length; offset += 64) __builtin_prefetch(start + offset);
}

}  // namespace gradstats
