// y [N, M] = W [N, K] x [K, M] with W packed ahead of time, for XLA:CPU through the XLA FFI.
//
// The model's products are [out, in] weights times feature-major activations [in, tokens]. The weight arrives
// packed in panels of kRows rows, wp [panels, K, kRows]: a panel's rows interleaved per input feature, so one pass
// over a panel is one contiguous stream (the rows past the weight's end are zero). Arguments: wp, x [K, M], and
// optionally a residual [N, M]; result y [N, M]; all float32. Epilogues, applied as a tile is stored:
// - residual: y = residual + W x (y may alias the residual: the model's residual stream, updated in place);
// - gated (attribute): each panel holds 3 rows of a gate weight then the 3 matching rows of an up weight, and
//   y = silu(gate x) * (up x), [N, M] with N the gate's rows (SwiGLU's first half, without the [2N, M] product
//   ever reaching memory).
//
// Why a kernel: XLA:CPU's library GEMM repacks its operands on every call. At 64 tokens a [3072, 576] product is
// ~0.2 GFLOP, and in a decode step, one after another, those products ran at ~240 GFLOP/s against the ~400 the
// machine does (2-core AVX-512 VM). The weights never change, so they are packed once, at load.
//
// A tile is kRows weight rows x up to 64 tokens: 24 accumulators, and per input feature 4 activation loads and 6
// broadcast weights for 24 fused multiply-adds. Work items are (a run of panels, a block of tokens).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using meshserve::kLanes;
using meshserve::Load;
using meshserve::Store;
using meshserve::Vec;

namespace {

constexpr int64_t kRows = 6;       // weight rows per panel (packed layout; engine/kernels/__init__.py must agree)
constexpr int64_t kVecs = 4;       // token vectors per tile: 64 tokens
constexpr int64_t kTokenBlock = 256;  // tokens per work item: its activations stay in L2 across the item's panels
// Weights are prefetched this many floats (2 KiB) ahead, into the next panel at a panel's end (panels are
// contiguous). The hardware prefetcher stops at 4 KiB page boundaries: measured on the AVX-512 VM, a [3072, 576]
// product at 64 tokens went 348 -> 414 GFLOP/s and a [576, 1536] one 374 -> 410 (the small ones lose ~3%).
constexpr int64_t kPrefetch = 512;

struct Epilogue {
  const float* residual = nullptr;  // added to the product, [N, M] (row stride M)
  bool gated = false;               // rows i < 3 of a tile: silu(acc[i]) * acc[i + 3]
  int64_t Rows() const { return gated ? kRows / 2 : kRows; }  // output rows per panel
};

// silu(x) = x * sigmoid(x), with e = exp(-|x|) <= 1: sigmoid is 1 / (1 + e) for x >= 0 and e / (1 + e) below.
inline Vec Silu(Vec x) {
  const Vec e = meshserve::ExpNonPositive(x < 0.0f ? x : -x);
  return x * ((x < 0.0f ? e : Vec{} + 1.0f) / (1.0f + e));
}

// The first `rows` output rows of one panel for TV * kLanes tokens: y (row stride M) from x (row stride xm);
// `residual` (row stride M) is the residual at the same place, or null.
template <int TV>
void Tile(const float* __restrict panel, int64_t K, const float* __restrict x, int64_t xm, float* y, int64_t M,
          int64_t rows, const float* residual, bool gated) {
  Vec acc[kRows][TV] = {};
  for (int64_t k = 0; k < K; ++k) {
    if (k % 8 == 0) {  // the 3 cache lines of weights 8 features hold, kPrefetch floats ahead (see kPrefetch)
      const char* ahead = reinterpret_cast<const char*>(panel + k * kRows + kPrefetch);
      for (int line = 0; line < 3; ++line) __builtin_prefetch(ahead + 64 * line, 0, 3);
    }
    Vec xv[TV];
    for (int j = 0; j < TV; ++j) xv[j] = Load(x + k * xm + j * kLanes);
    const float* w = panel + k * kRows;
    for (int i = 0; i < kRows; ++i) {
      const float b = w[i];
      for (int j = 0; j < TV; ++j) acc[i][j] += b * xv[j];
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int j = 0; j < TV; ++j) {
      Vec v = gated ? Silu(acc[i][j]) * acc[i + kRows / 2][j] : acc[i][j];
      if (residual != nullptr) v += Load(residual + i * M + j * kLanes);
      Store(y + i * M + j * kLanes, v);
    }
}

// One work item: panels [p0, p1) x tokens [m0, m1) of y [N, M] (rows past N dropped). Tokens go through 64-token
// tiles, then one tile of the 16-48 left; the last < 16 through a zero-padded copy of x (`pad`) made once for all
// of the item's panels.
void Run(const float* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, const Epilogue& ep,
         int64_t p0, int64_t p1, int64_t m0, int64_t m1, std::vector<float>& pad) {
  const int64_t whole = m0 + (m1 - m0) / kLanes * kLanes, tail = m1 - whole, out = ep.Rows();
  float *px = nullptr, *py = nullptr;
  if (tail > 0) {
    pad.assign(K * kLanes + kRows * kLanes, 0.0f);
    px = pad.data();
    py = px + K * kLanes;
    for (int64_t k = 0; k < K; ++k) std::memcpy(px + k * kLanes, x + k * M + whole, tail * sizeof(float));
  }
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * K * kRows;
    float* yp = y + p * out * M;
    const float* rp = ep.residual == nullptr ? nullptr : ep.residual + p * out * M;
    const int64_t rows = std::min(out, N - p * out);
    auto tile = [&](auto tv, int64_t m) {
      Tile<decltype(tv)::value>(panel, K, x + m, M, yp + m, M, rows, rp == nullptr ? nullptr : rp + m, ep.gated);
    };
    int64_t m = m0;
    for (; m + kVecs * kLanes <= whole; m += kVecs * kLanes) tile(std::integral_constant<int, kVecs>(), m);
    switch ((whole - m) / kLanes) {  // the 1-3 whole vectors left: one tile, one pass over the panel
      case 3: tile(std::integral_constant<int, 3>(), m); break;
      case 2: tile(std::integral_constant<int, 2>(), m); break;
      case 1: tile(std::integral_constant<int, 1>(), m); break;
    }
    if (tail > 0) {
      Tile<1>(panel, K, px, kLanes, py, kLanes, rows, nullptr, ep.gated);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t t = 0; t < tail; ++t)
          yp[i * M + whole + t] = py[i * kLanes + t] + (rp == nullptr ? 0.0f : rp[i * M + whole + t]);
    }
  }
}

// One token (M == 1, a decode step at one slot): the tile above would spend 6 broadcast FMAs per input feature on
// one useful lane in 16, which on a 2-core Zen 5 VM held batch-1 decode to 70.9 tok/s against llama.cpp's 100.8.
// Here a panel is read as the flat stream it is (K x 6 floats) and multiplied lane by lane with `xr`, x with each
// feature repeated 6 times (built once per call, shared by every panel): 6/16 FMA per weight, so the product runs
// at the memory's speed. The row of a lane repeats every 48 floats (3 vectors), so 3 accumulators take the vectors
// in turn and their 48 lanes fold into the 6 rows at the panel's end. `xr` is padded to a whole number of 48 floats
// with zeros; the weight's tail past K x 6 is read only up to K x 6 (scalar).
void RunOne(const float* w, int64_t N, int64_t K, const float* xr, float* y, const Epilogue& ep, int64_t p0,
            int64_t p1) {
  constexpr int64_t kPeriod = 3 * kLanes;  // 48 floats: lcm(kRows, kLanes)
  static_assert(kPeriod % kRows == 0, "a period holds whole features");
  const int64_t flat = K * kRows, whole = flat / kPeriod * kPeriod, out = ep.Rows();
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * flat;
    Vec acc[3] = {};
    for (int64_t f = 0; f < whole; f += kPeriod) {
      __builtin_prefetch(panel + f + kPrefetch, 0, 3);
      __builtin_prefetch(panel + f + kPrefetch + kLanes, 0, 3);
      __builtin_prefetch(panel + f + kPrefetch + 2 * kLanes, 0, 3);
      for (int a = 0; a < 3; ++a) acc[a] += Load(panel + f + a * kLanes) * Load(xr + f + a * kLanes);
    }
    alignas(64) float lanes[kPeriod];
    for (int a = 0; a < 3; ++a) Store(lanes + a * kLanes, acc[a]);
    float rows[kRows] = {};
    for (int64_t l = 0; l < kPeriod; ++l) rows[l % kRows] += lanes[l];
    for (int64_t f = whole; f < flat; ++f) rows[f % kRows] += panel[f] * xr[f];
    const int64_t n = std::min(out, N - p * out);
    for (int64_t i = 0; i < n; ++i) {
      float v = rows[i];
      if (ep.gated) {
        const float g = rows[i], e = std::exp(-std::fabs(g));
        v = g * (g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e)) * rows[i + kRows / 2];
      }
      const int64_t r = p * out + i;
      y[r] = v + (ep.residual == nullptr ? 0.0f : ep.residual[r]);
    }
  }
}

ffi::Error Linear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> wp, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs rest,
                  ffi::ResultBuffer<ffi::F32> y, bool gated) {
  const auto wd = wp.dimensions(), xd = x.dimensions(), yd = y->dimensions();
  if (wd.size() != 3 || wd[2] != kRows) return ffi::Error::InvalidArgument("the packed weight must be [P, K, 6]");
  if (xd.size() != 2 || xd[0] != wd[1]) return ffi::Error::InvalidArgument("x must be [K, M], K as the weight's");
  Epilogue ep;
  ep.gated = gated;
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
  const float *w = wp.typed_data(), *xs = x.typed_data();
  float* ys = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (M == 1) {
    std::vector<float> xr((K * kRows + 3 * kLanes - 1) / (3 * kLanes) * (3 * kLanes), 0.0f);
    for (int64_t k = 0; k < K; ++k) std::fill_n(xr.data() + k * kRows, kRows, xs[k]);
    const int64_t run = std::clamp<int64_t>(panels / (8 * threads), 1, 256);
    const float* xrp = xr.data();
    meshserve::ParallelFor(pool, (panels + run - 1) / run, [=](int64_t item) {
      RunOne(w, N, K, xrp, ys, ep, item * run, std::min(panels, (item + 1) * run));
    });
    return ffi::Error::Success();
  }
  const int64_t blocks = (M + kTokenBlock - 1) / kTokenBlock;
  // Runs of panels small enough that every thread gets several (dynamic claiming evens out the tails).
  const int64_t run = std::clamp<int64_t>(panels * blocks / (8 * threads), 1, 64);
  const int64_t runs = (panels + run - 1) / run;
  meshserve::ParallelFor(pool, runs * blocks, [=, pad = std::vector<float>()](int64_t item) mutable {
    const int64_t m0 = (item % blocks) * kTokenBlock, m1 = std::min(M, m0 + kTokenBlock);
    const int64_t p0 = (item / blocks) * run, p1 = std::min(panels, p0 + run);
    Run(w, N, K, xs, M, ys, ep, p0, p1, m0, m1, pad);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshserveLinear, Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wp [P, K, 6]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [K, M]
                                  .RemainingArgs()               // the residual [N, M], or nothing
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [N, M]
                                  .Attr<bool>("gated"));
