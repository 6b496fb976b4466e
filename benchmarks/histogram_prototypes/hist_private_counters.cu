// A measured data point behind benchmarks/results/stats-sass.md, not built or used by the
// library:
//   nvcc -O3 -arch=sm_90a -cubin -Xptxas -v -o hist.cubin hist_private_counters.cu
//   cuobjdump -sass hist.cubin
// Data point only: stats + 64-bin log2 histogram with per-thread private shared counters,
// [bin pair][thread] layout, 16-bit counters two to a word. One chunk per block.
#include <cuda_bf16.h>
#include <stdint.h>
constexpr int THREADS = 256, BINS = 64, C = 127 - 40 - 1;


__device__ __forceinline__ void body(uint32_t bits, float v, float& power, int& nonfinite,
                                     uint32_t* mine) {
  power = fmaf(v, v, power);
  uint32_t mag = bits & 0x7fffffffu;
  int biased = mag >> 23;
  nonfinite += biased == 255;
  int column = max(biased - C, (int)min(mag, 1u));
  column = min(column, BINS - 1);
  // 16-bit halves: bins 2k and 2k+1 share word k.
  mine[(column >> 1) * THREADS] += 1u << ((column & 1) << 4);
}

__global__ void __launch_bounds__(THREADS) stats_fp32(const float4* __restrict__ x, int64_t n4,
    float* power_out, int* nonfinite_out, unsigned long long* hist) {
  __shared__ uint32_t counters[BINS / 2 * THREADS];
  for (int i = 0; i < BINS / 2; ++i) counters[i * THREADS + threadIdx.x] = 0;
  uint32_t* mine = counters + threadIdx.x;
  float power = 0.f; int nonfinite = 0;
  int64_t begin = (int64_t)blockIdx.x * 4096, end = min(begin + 4096, n4);
  for (int64_t i = begin + threadIdx.x; i < end; i += THREADS) {
    float4 v = x[i];
    body(__float_as_uint(v.x), v.x, power, nonfinite, mine);
    body(__float_as_uint(v.y), v.y, power, nonfinite, mine);
    body(__float_as_uint(v.z), v.z, power, nonfinite, mine);
    body(__float_as_uint(v.w), v.w, power, nonfinite, mine);
  }
  __syncthreads();
  if (threadIdx.x < BINS) {
    int pair = threadIdx.x >> 1, half = threadIdx.x & 1;
    unsigned long long total = 0;
    for (int t = 0; t < THREADS; ++t) total += (counters[pair * THREADS + t] >> (16 * half)) & 0xffff;
    atomicAdd(hist + threadIdx.x, total);
  }
  atomicAdd(power_out, power); atomicAdd(nonfinite_out, nonfinite);
}

__global__ void __launch_bounds__(THREADS) stats_bf16(const uint4* __restrict__ x, int64_t n8,
    float* power_out, int* nonfinite_out, unsigned long long* hist) {
  __shared__ uint32_t counters[BINS / 2 * THREADS];
  for (int i = 0; i < BINS / 2; ++i) counters[i * THREADS + threadIdx.x] = 0;
  uint32_t* mine = counters + threadIdx.x;
  float power = 0.f; int nonfinite = 0;
  int64_t begin = (int64_t)blockIdx.x * 4096, end = min(begin + 4096, n8);
  for (int64_t i = begin + threadIdx.x; i < end; i += THREADS) {
    uint4 v = x[i];
    uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      uint32_t lo = w[k] << 16, hi = w[k] & 0xffff0000u;
      body(lo, __uint_as_float(lo), power, nonfinite, mine);
      body(hi, __uint_as_float(hi), power, nonfinite, mine);
    }
  }
  __syncthreads();
  if (threadIdx.x < BINS) {
    int pair = threadIdx.x >> 1, half = threadIdx.x & 1;
    unsigned long long total = 0;
    for (int t = 0; t < THREADS; ++t) total += (counters[pair * THREADS + t] >> (16 * half)) & 0xffff;
    atomicAdd(hist + threadIdx.x, total);
  }
  atomicAdd(power_out, power); atomicAdd(nonfinite_out, nonfinite);
}
