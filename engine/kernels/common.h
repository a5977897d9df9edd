// What the CPU kernels share: one AVX-512 register of floats as a GCC/Clang vector type, and work spread over the
// XLA intra-op thread pool that the FFI hands each call.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace meshserve {

// 16 floats: one AVX-512 register (two AVX2 ones); vector extensions, so the compiler picks the ISA.
constexpr int64_t kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }

// 16 int8 values -> 16 floats: a sign-extending load and a convert (intrinsics: GCC's __builtin_convertvector from
// an int8 vector compiles to 16 scalar loads).
inline Vec LoadInt8(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  Vec v;
  __builtin_memcpy(&v, &lo, sizeof(lo));
  __builtin_memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#else
  typedef int8_t I8Vec __attribute__((vector_size(kLanes), aligned(1)));
  typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
  return __builtin_convertvector(__builtin_convertvector(*reinterpret_cast<const I8Vec*>(p), IVec), Vec);
#endif
}

// A bfloat16 (its bits) as a float: the float's upper half.
inline float Bf16(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &wide, sizeof(f));
  return f;
}

// Whether the KV pools fit the queries q [., K, G, H]: keys [Np, K, H, P] (transposed), values [Np, K, P, H].
inline bool PoolShapes(xla::ffi::Span<const int64_t> qd, xla::ffi::Span<const int64_t> kd,
                       xla::ffi::Span<const int64_t> vd) {
  return qd.size() == 4 && kd.size() == 4 && vd.size() == 4 && kd[0] == vd[0] && kd[1] == qd[1] && vd[1] == qd[1] &&
         kd[2] == qd[3] && vd[3] == qd[3] && kd[3] == vd[2];
}

// exp(x) for x <= 0 (softmax inputs minus their max), ~1 ulp: x = k ln2 + r with |r| <= ln2 / 2, e^r by a
// degree-6 polynomial, 2^k through the exponent bits. Inputs below -87 give ~0 instead of denormals.
inline Vec ExpNonPositive(Vec x) {
  typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
  x = x < -87.0f ? Vec{} - 87.0f : x;
  const Vec k = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, IVec), Vec);
  const Vec r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // ln2 in two parts keeps r exact
  Vec e = 1.0f / 120 + r * (1.0f / 720);
  e = 1.0f / 24 + r * e;
  e = 1.0f / 6 + r * e;
  e = 0.5f + r * e;
  e = 1.0f + r * e;
  e = 1.0f + r * e;
  const IVec bits = (__builtin_convertvector(k, IVec) + 127) << 23;
  Vec scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// Runs body(i) for i in [0, items) on the caller and up to pool.num_threads() - 1 pool tasks, claiming items from a
// shared counter; returns when all are done. Tasks that start after every item is claimed touch nothing but the
// shared counters (kept alive by their shared_ptr), so the caller never waits for a task that has not started.
// body must be copyable; each worker gets its own copy (its own scratch, if it keeps one).
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Body body) {
  struct Work {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto work = std::make_shared<Work>();
  auto run = [items, body](Work& w) mutable {
    for (int64_t i; (i = w.next.fetch_add(1)) < items;) {
      body(i);
      w.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work, run]() mutable { run(*work); });
  run(*work);
  while (work->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace meshserve
