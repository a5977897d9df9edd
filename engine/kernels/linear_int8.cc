// y [N, M] = (Q [N, K] * scale [N]) x [K, M]: int8 weights, float32 activations, weight-only (the product runs in
// float32 on the int8 values converted as they are read; the per-row scale is applied to the sums), for XLA:CPU
// through the XLA FFI.
//
// Why: a decode step at a few slots streams every weight once and does little arithmetic per byte, so it runs at
// the memory's speed; int8 weights are a quarter of float32's bytes. Activations stay float32 (no activation
// quantization, so the quality table of int8 weights is the XLA path's: engine.quant).
//
// Layout, packed once at load: panels of kRows = 16 rows interleaved per input feature, wq [panels, K, 16] int8,
// so one input feature's 16 weights are one 16-byte load that converts to one vector of 16 floats (the rows past
// the weight's end are zero); scale [panels * 16] float32. Gated (SwiGLU's first half): each panel holds 8 rows of
// the gate weight then the 8 matching rows of the up weight, and y = silu(gate x) * (up x) has 8 rows per panel.
//
// A tile is 16 rows x up to kTokens tokens: per input feature one weight vector, and per token one broadcast
// activation and one fused multiply-add into that token's accumulator (16 rows). At one token the accumulators
// alternate over 4 input features, so the adds do not wait on each other. Epilogue: scale, then silu * up when
// gated, plus the residual when given (y may alias it), stored through a small transpose buffer (y is [N, M]).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using meshserve::kLanes;
using meshserve::Load;
using meshserve::Vec;

namespace {

constexpr int64_t kRows = 32;    // weight rows per panel: two vectors (engine/kernels/__init__.py must agree)
constexpr int64_t kTokens = 12;  // tokens per tile: 24 accumulators (12 tokens x 2 row vectors)
constexpr int64_t kPrefetch = 1024;  // bytes of weights prefetched ahead (past the 4 KiB hardware prefetch limit)
static_assert(kRows == 2 * kLanes, "a panel's row block is two vectors");

// 16 int8 weights -> 16 floats: a sign-extending load and a convert. Spelled with intrinsics because GCC's
// __builtin_convertvector from an int8 vector compiles to 16 scalar loads (measured: 1.7 GB/s of weights).
inline Vec Weights(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  Vec v;
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#else
  typedef int8_t I8Vec __attribute__((vector_size(kLanes), aligned(1)));
  typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
  return __builtin_convertvector(__builtin_convertvector(*reinterpret_cast<const I8Vec*>(p), IVec), Vec);
#endif
}

inline Vec Silu(Vec x) {
  const Vec e = meshserve::ExpNonPositive(x < 0.0f ? x : -x);
  return x * ((x < 0.0f ? e : Vec{} + 1.0f) / (1.0f + e));
}

struct Epilogue {
  const float* scale = nullptr;     // [panels * 32]
  const float* residual = nullptr;  // [N, M], or null
  bool gated = false;
  int64_t Rows() const { return gated ? kRows / 2 : kRows; }
};

// Writes one tile's accumulators (two 16-row vectors per token) to y rows [r0, r0 + rows) x tokens [m, m + tokens).
inline void Finish(const Vec (*acc)[2], int64_t tokens, const float* scale, const Epilogue& ep, int64_t r0,
                   int64_t rows, float* y, int64_t M, int64_t m) {
  alignas(64) float out[kTokens][kRows];
  const Vec s0 = Load(scale), s1 = Load(scale + kLanes);
  for (int64_t t = 0; t < tokens; ++t) {
    const Vec v0 = acc[t][0] * s0, v1 = acc[t][1] * s1;
    if (ep.gated) {
      meshserve::Store(out[t], Silu(v0) * v1);  // rows 0-15 of the panel are gate rows, 16-31 the matching up rows
    } else {
      meshserve::Store(out[t], v0);
      meshserve::Store(out[t] + kLanes, v1);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* yr = y + (r0 + i) * M + m;
    const float* rr = ep.residual == nullptr ? nullptr : ep.residual + (r0 + i) * M + m;
    for (int64_t t = 0; t < tokens; ++t) yr[t] = out[t][i] + (rr == nullptr ? 0.0f : rr[t]);
  }
}

template <int T>
void Tile(const int8_t* __restrict panel, int64_t K, const float* __restrict x, int64_t M, int64_t m,
          Vec (*out)[2]) {
  Vec acc[T][2] = {};  // local, so the accumulators live in registers for the whole loop
  for (int64_t k = 0; k < K; ++k) {
    if (k % 2 == 0) __builtin_prefetch(panel + k * kRows + kPrefetch, 0, 3);  // one 64-byte line per 2 features
    const Vec w0 = Weights(panel + k * kRows), w1 = Weights(panel + k * kRows + kLanes);
    const float* xk = x + k * M + m;
    for (int t = 0; t < T; ++t) {
      acc[t][0] += w0 * xk[t];
      acc[t][1] += w1 * xk[t];
    }
  }
  for (int t = 0; t < T; ++t) out[t][0] = acc[t][0], out[t][1] = acc[t][1];
}

// One token: two accumulator pairs over alternating input features (a single chain would wait on each add).
void TileOne(const int8_t* __restrict panel, int64_t K, const float* __restrict x, int64_t M, int64_t m,
             Vec (*out)[2]) {
  Vec a[2][2] = {};
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    __builtin_prefetch(panel + k * kRows + kPrefetch, 0, 3);
    for (int j = 0; j < 2; ++j) {
      const float xv = x[(k + j) * M + m];
      a[j][0] += Weights(panel + (k + j) * kRows) * xv;
      a[j][1] += Weights(panel + (k + j) * kRows + kLanes) * xv;
    }
  }
  for (; k < K; ++k) {
    a[0][0] += Weights(panel + k * kRows) * x[k * M + m];
    a[0][1] += Weights(panel + k * kRows + kLanes) * x[k * M + m];
  }
  out[0][0] = a[0][0] + a[1][0];
  out[0][1] = a[0][1] + a[1][1];
}

// Panels [p0, p1) x tokens [m0, m1).
void Run(const int8_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, const Epilogue& ep, int64_t p0,
         int64_t p1, int64_t m0, int64_t m1) {
  const int64_t out = ep.Rows();
  Vec acc[kTokens][2];
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = w + p * K * kRows;
    const int64_t r0 = p * out, rows = std::min(out, N - r0);
    for (int64_t m = m0; m < m1; m += kTokens) {
      const int64_t tokens = std::min(kTokens, m1 - m);
      switch (tokens) {
#define MESHSERVE_TILE(n)            \
  case n:                            \
    Tile<n>(panel, K, x, M, m, acc); \
    break;
        MESHSERVE_TILE(2) MESHSERVE_TILE(3) MESHSERVE_TILE(4) MESHSERVE_TILE(5) MESHSERVE_TILE(6) MESHSERVE_TILE(7)
        MESHSERVE_TILE(8) MESHSERVE_TILE(9) MESHSERVE_TILE(10) MESHSERVE_TILE(11) MESHSERVE_TILE(12)
#undef MESHSERVE_TILE
        default:
          TileOne(panel, K, x, M, m, acc);
      }
      Finish(acc, tokens, ep.scale + p * kRows, ep, r0, rows, y, M, m);
    }
  }
}

ffi::Error LinearInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> wq, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> x, ffi::RemainingArgs rest, ffi::ResultBuffer<ffi::F32> y, bool gated) {
  const auto wd = wq.dimensions(), xd = x.dimensions(), yd = y->dimensions();
  if (wd.size() != 3 || wd[2] != kRows) return ffi::Error::InvalidArgument("the packed weight must be [P, K, 32]");
  if (static_cast<int64_t>(scale.element_count()) != wd[0] * kRows) return ffi::Error::InvalidArgument("the scale must be [P * 32]");
  if (xd.size() != 2 || xd[0] != wd[1]) return ffi::Error::InvalidArgument("x must be [K, M], K as the weight's");
  Epilogue ep;
  ep.gated = gated;
  ep.scale = scale.typed_data();
  if (yd.size() != 2 || yd[1] != xd[1] || (yd[0] + ep.Rows() - 1) / ep.Rows() != wd[0])
    return ffi::Error::InvalidArgument("y must be [N, M] with ceil(N / rows per panel) weight panels");
  if (rest.size() > 1) return ffi::Error::InvalidArgument("expected at most one residual");
  if (rest.size() == 1) {
    auto residual = rest.get<ffi::Buffer<ffi::F32>>(0);
    if (residual.has_error()) return residual.error();
    if (residual->element_count() != y->element_count())
      return ffi::Error::InvalidArgument("the residual must be [N, M], as y");
    ep.residual = residual->typed_data();
  }
  const int64_t N = yd[0], K = xd[0], M = xd[1], panels = wd[0];
  if (N == 0 || M == 0) return ffi::Error::Success();
  const int8_t* w = wq.typed_data();
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  // Token blocks of 64 keep a block's activations in L1/L2 across its panels; runs of panels small enough that every
  // thread gets several (dynamic claiming evens out the tails).
  constexpr int64_t kTokenBlock = 64;
  const int64_t blocks = (M + kTokenBlock - 1) / kTokenBlock;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t run = std::clamp<int64_t>(panels * blocks / (8 * threads), 1, 32);
  const int64_t runs = (panels + run - 1) / run;
  meshserve::ParallelFor(pool, runs * blocks, [=](int64_t item) {
    const int64_t m0 = (item % blocks) * kTokenBlock, m1 = std::min(M, m0 + kTokenBlock);
    const int64_t p0 = (item / blocks) * run, p1 = std::min(panels, p0 + run);
    Run(w, N, K, xs, M, ys, ep, p0, p1, m0, m1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshserveLinearInt8, LinearInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()   // wq [P, K, 32]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [P * 32]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [K, M]
                                  .RemainingArgs()               // the residual [N, M], or nothing
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [N, M]
                                  .Attr<bool>("gated"));
