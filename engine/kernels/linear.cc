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
// A tile is kRows weight rows x kVecs native vectors of tokens: with AVX-512, 6 x 64 tokens, 24 accumulators of 32
// registers, per input feature 4 activation loads and 6 broadcast weights for 24 fused multiply-adds; with AVX2,
// 6 x 16 tokens, 12 accumulators of 16 registers (BLIS's Haswell shape). (With 16-float vectors on an AVX2 machine,
// which GCC compiles through memory, a [1536, 576] product at 41 tokens took 17.7 ms on a 2-core AMD EPYC Zen 3 VM,
// 26x XLA's dot.) Work items are (a run of panels, a block of tokens).
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using meshserve::Load;
using meshserve::Store;
using NVec = meshserve::Vec;

namespace {

constexpr int64_t kL = meshserve::kLanes;  // floats per vector: the machine's register (common.h)
constexpr int64_t kVecs = kL == 16 ? 4 : 2;  // token vectors per tile: 64 tokens (AVX-512) or 16 (AVX2)

constexpr int64_t kRows = 6;       // weight rows per panel (packed layout; engine/kernels/__init__.py must agree)
constexpr int64_t kTokenBlock = 256;  // tokens per work item: its activations stay in L2 across the item's panels
static_assert(kTokenBlock % (kVecs * kL) == 0, "only the last token block ends in a partial tile");
// Weights are prefetched this many floats (2 KiB) ahead, into the next panel at a panel's end (panels are
// contiguous). The hardware prefetcher stops at 4 KiB page boundaries: measured on the AVX-512 VM, a [3072, 576]
// product at 64 tokens went 348 -> 414 GFLOP/s and a [576, 1536] one 374 -> 410 (the small ones lose ~3%).
constexpr int64_t kPrefetch = 512;
// Whether the one-token product (RunOne) prefetches too is the caller's choice, per call (the `prefetch` attribute):
// its loop spends few instructions per byte, so the out-of-order core and the hardware prefetcher may keep enough
// lines in flight alone, and which way is faster depends on the CPU and on the products' shapes. On a 2-core AMD
// Zen 3 VM the prefetches made W1 decode 2-6% slower; on a 2-core Zen 5 VM 3.3% faster (alternating rounds in one
// process). The engine decides per model from a probe of its own one-token products (MeshserveProbePrefetch below;
// engine/kernels/__init__.py). (The tiles spend ~14 instructions per 24 bytes of weights, and there prefetching paid
// on the Zen 3 VM: a [49152, 576] product at 8 tokens took 25% longer without.)

struct Epilogue {
  const float* residual = nullptr;  // added to the product, [N, M] (row stride M)
  bool gated = false;               // rows i < 3 of a tile: silu(acc[i]) * acc[i + 3]
  int64_t Rows() const { return gated ? kRows / 2 : kRows; }  // output rows per panel
};

// silu(x) = x * sigmoid(x), with e = exp(-|x|) <= 1: sigmoid is 1 / (1 + e) for x >= 0 and e / (1 + e) below.
inline NVec Silu(NVec x) {
  const NVec e = meshserve::ExpNonPositive(x < 0.0f ? x : -x);
  return x * ((x < 0.0f ? e : NVec{} + 1.0f) / (1.0f + e));
}

// The first `rows` output rows of one panel for TV * kL tokens: y (row stride M) from x (row stride xm);
// `residual` (row stride M) is the residual at the same place, or null.
template <int TV>
void Tile(const float* __restrict panel, int64_t K, const float* __restrict x, int64_t xm, float* y, int64_t M,
          int64_t rows, const float* residual, bool gated) {
  NVec acc[kRows][TV] = {};
  for (int64_t k = 0; k < K; ++k) {
    if (k % 8 == 0) {  // the 3 cache lines of weights 8 features hold, kPrefetch floats ahead (see kPrefetch)
      const char* ahead = reinterpret_cast<const char*>(panel + k * kRows + kPrefetch);
      for (int line = 0; line < 3; ++line) __builtin_prefetch(ahead + 64 * line, 0, 3);
    }
    NVec xv[TV];
    for (int j = 0; j < TV; ++j) xv[j] = Load(x + k * xm + j * kL);
    const float* w = panel + k * kRows;
    for (int i = 0; i < kRows; ++i) {
      const float b = w[i];
      for (int j = 0; j < TV; ++j) acc[i][j] += b * xv[j];
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int j = 0; j < TV; ++j) {
      NVec v = gated ? Silu(acc[i][j]) * acc[i + kRows / 2][j] : acc[i][j];
      if (residual != nullptr) v += Load(residual + i * M + j * kL);
      Store(y + i * M + j * kL, v);
    }
}

// The last tokens of x [K, M] when they do not fill whole vectors: [K, xm] with xm = M % (kVecs * kL) rounded up to
// whole vectors, zero past M, made once per call (K x 16 floats or fewer on AVX2, K x 64 with AVX-512).
struct Tail {
  const float* x = nullptr;  // null: the last tile reads x itself
  int64_t xm = 0;
};

// One work item: panels [p0, p1) x tokens [m0, m1) of y [N, M] (rows past N dropped). Tokens go through tiles of
// kVecs vectors, then one tile of the vectors left, from `tail` where the last of them is partly zeros (then
// written to a buffer and its tokens to y): 41 tokens on AVX2 take 3 passes over a panel (2 + 2 + 2 vectors),
// where a tile of the 1 whole vector left and another of the last token took 4.
void Run(const float* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, const Epilogue& ep,
         const Tail& tail, int64_t p0, int64_t p1, int64_t m0, int64_t m1) {
  const int64_t out = ep.Rows();
  constexpr int64_t kTileTokens = kVecs * kL;
  alignas(64) float buffer[kRows * kTileTokens];
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * K * kRows;
    float* yp = y + p * out * M;
    const float* rp = ep.residual == nullptr ? nullptr : ep.residual + p * out * M;
    const int64_t rows = std::min(out, N - p * out);
    int64_t m = m0;
    for (; m + kTileTokens <= m1; m += kTileTokens)
      Tile<kVecs>(panel, K, x + m, M, yp + m, M, rows, rp == nullptr ? nullptr : rp + m, ep.gated);
    const int64_t rest = m1 - m;
    if (rest == 0) continue;
    const bool padded = rest % kL != 0;  // then m1 == M, and the tile reads `tail` and writes the buffer
    const float* from = padded ? tail.x : x + m;
    float* to = padded ? buffer : yp + m;
    const int64_t xm = padded ? tail.xm : M, ym = padded ? kTileTokens : M;
    const float* residual = padded || rp == nullptr ? nullptr : rp + m;
    auto tile = [&](auto tv) { Tile<decltype(tv)::value>(panel, K, from, xm, to, ym, rows, residual, ep.gated); };
    switch ((rest + kL - 1) / kL) {
      case 4: if constexpr (kVecs >= 4) tile(std::integral_constant<int, 4>()); break;
      case 3: if constexpr (kVecs >= 3) tile(std::integral_constant<int, 3>()); break;
      case 2: if constexpr (kVecs >= 2) tile(std::integral_constant<int, 2>()); break;
      case 1: tile(std::integral_constant<int, 1>()); break;
    }
    if (padded)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t t = 0; t < rest; ++t)
          yp[i * M + m + t] = buffer[i * kTileTokens + t] + (rp == nullptr ? 0.0f : rp[i * M + m + t]);
  }
}

// One token (M == 1, a decode step at one slot): the tile above would spend 6 broadcast FMAs per input feature on
// one useful lane in 16, which on a 2-core Zen 5 VM held batch-1 decode to 70.9 tok/s against llama.cpp's 100.8.
// Here a panel is read as the flat stream it is (K x 6 floats) and multiplied lane by lane with x's features, each
// repeated 6 times: 6/16 FMA per weight, so the product runs at the memory's speed. 48 floats (3 vectors) of the
// panel hold 8 features; their x, loaded once, is spread over the 3 vectors by shuffles, and 3 accumulators take
// the vectors in turn, their 48 lanes folding into the 6 rows at the panel's end (the lane of a row repeats every
// 6). The features past the last whole 8 go scalar. With AVX2 the same with 8-float vectors: 24 floats, 4 features. (Spreading x into a 6x copy once per call, as this did before,
// cost ~1 us per call before the helpers could start, and a second stream of loads: W1 2.7% slower.)
template <bool PF>
void RunOne(const float* w, int64_t N, int64_t K, const float* x, float* y, const Epilogue& ep, int64_t p0,
            int64_t p1) {
  constexpr int64_t kPeriod = 3 * kL;  // lcm(kRows, kL) floats: 48 (AVX-512) or 24 (AVX2)
  constexpr int64_t kFeatures = kPeriod / kRows;  // 8 or 4
  typedef float XVec __attribute__((vector_size(kFeatures * sizeof(float)), aligned(sizeof(float))));
  const int64_t flat = K * kRows, whole = K / kFeatures * kPeriod, out = ep.Rows();
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = w + p * flat;
    NVec acc[3] = {};
    for (int64_t f = 0, k = 0; f < whole; f += kPeriod, k += kFeatures) {
      if constexpr (PF)
        for (int64_t line = 0; line < kPeriod; line += 16) __builtin_prefetch(panel + f + kPrefetch + line, 0, 3);
      const XVec xs = *reinterpret_cast<const XVec*>(x + k);
#if defined(__AVX512F__)
      acc[0] += Load(panel + f) * __builtin_shufflevector(xs, xs, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2);
      acc[1] += Load(panel + f + kL) * __builtin_shufflevector(xs, xs, 2, 2, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 5, 5);
      acc[2] += Load(panel + f + 2 * kL) * __builtin_shufflevector(xs, xs, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7);
#else
      acc[0] += Load(panel + f) * __builtin_shufflevector(xs, xs, 0, 0, 0, 0, 0, 0, 1, 1);
      acc[1] += Load(panel + f + kL) * __builtin_shufflevector(xs, xs, 1, 1, 1, 1, 2, 2, 2, 2);
      acc[2] += Load(panel + f + 2 * kL) * __builtin_shufflevector(xs, xs, 2, 2, 3, 3, 3, 3, 3, 3);
#endif
    }
    alignas(64) float lanes[kPeriod];
    for (int a = 0; a < 3; ++a) Store(lanes + a * kL, acc[a]);
    float rows[kRows] = {};
    for (int64_t l = 0; l < kPeriod; ++l) rows[l % kRows] += lanes[l];
    for (int64_t f = whole; f < flat; ++f) rows[f % kRows] += panel[f] * x[f / kRows];
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
                  ffi::ResultBuffer<ffi::F32> y, bool gated, bool prefetch) {
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
    const int64_t run = std::clamp<int64_t>(panels / (8 * threads), 1, 256);
    auto one = [&](auto pf) {  // compiled both ways: no branch per cache line
      meshserve::ParallelFor(pool, (panels + run - 1) / run, [=](int64_t item) {
        RunOne<decltype(pf)::value>(w, N, K, xs, ys, ep, item * run, std::min(panels, (item + 1) * run));
      });
    };
    if (prefetch)
      one(std::true_type{});
    else
      one(std::false_type{});
    return ffi::Error::Success();
  }
  // Kernel alone on a 2-core Zen 3 VM (AVX2), medians of 3 alternating runs (best of 25 each), GFLOP/s, one last
  // tile over the vectors left (Run) against a tile of the whole ones and another of the padded last < 8: at 41
  // tokens [576, 576] 90 -> 112, gated [3072, 576] 121 -> 145, [576, 1536] 93 -> 140; at 47 tokens 92 -> 122,
  // 135 -> 164, 101 -> 159; 40 and 48 tokens (no partial vector) run the same code as before.
  Tail tail;
  std::vector<float> tail_copy;
  if (const int64_t rest = M % (kVecs * kL); rest % kL != 0) {
    tail.xm = (rest + kL - 1) / kL * kL;
    tail_copy.assign(K * tail.xm, 0.0f);
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(tail_copy.data() + k * tail.xm, xs + (k + 1) * M - rest, rest * sizeof(float));
    tail.x = tail_copy.data();
  }
  const int64_t blocks = (M + kTokenBlock - 1) / kTokenBlock;
  // Runs of panels small enough that every thread gets several (dynamic claiming evens out the tails).
  const int64_t run = std::clamp<int64_t>(panels * blocks / (8 * threads), 1, 64);
  const int64_t runs = (panels + run - 1) / run;
  meshserve::ParallelFor(pool, runs * blocks, [=](int64_t item) {
    const int64_t m0 = (item % blocks) * kTokenBlock, m1 = std::min(M, m0 + kTokenBlock);
    const int64_t p0 = (item / blocks) * run, p1 = std::min(panels, p0 + run);
    Run(w, N, K, xs, M, ys, ep, tail, p0, p1, m0, m1);
  });
  return ffi::Error::Success();
}

}  // namespace

// The float32 products of a batch-1 decode step (RunOne), without and with prefetches, on `threads` threads,
// `rounds` times each (common.h: ProbeBothWays): `shapes` holds n (panels, K, count) triples, a step's products in
// order scaled to `bytes` (PlanProbe). (Panel length matters: on a 2-core Zen 5 VM prefetching measured 1.01-1.06x
// over 96-panel products of K = 576, SmolLM2's, and level over 128-panel ones of K = 1024.) gb_s[0] / gb_s[1]: the
// median GB/s without / with; both 0 if the memory or the threads could not be had, or the shapes are empty or bad.
// (engine/kernels/__init__.py runs it once per machine, thread count and shapes.)
extern "C" void MeshserveProbePrefetch(int64_t threads, int64_t bytes, int64_t rounds, const int64_t* shapes,
                                       int64_t n, double* gb_s) {
  gb_s[0] = gb_s[1] = 0.0;
  try {  // no exception may cross into the caller (ctypes)
    std::vector<meshserve::ProbeProduct> products;
    const int64_t floats = meshserve::PlanProbe(shapes, n, bytes, kRows * sizeof(float), kRows, products);
    if (floats < 0) return;
    auto w = meshserve::ProbeWeights<float>(floats * sizeof(float), 1e-3f);
    if (w == nullptr) return;
    int64_t widest = 1, out = 1;
    for (const auto& p : products) widest = std::max(widest, p.K), out = std::max(out, p.panels * kRows);
    std::vector<float> x(widest, 1.0f), y(out);
    const Epilogue ep;
    const float* weights = w.get();
    auto product = [&](auto pf) {
      return [&, pf](const meshserve::ProbeProduct& p, int64_t p0, int64_t p1) {
        RunOne<decltype(pf)::value>(weights + p.offset, p.panels * kRows, p.K, x.data(), y.data(), ep, p0, p1);
      };
    };
    meshserve::ProbeBothWays(products, meshserve::ProbeThreads(threads), rounds,
                             static_cast<double>(floats) * sizeof(float), product(std::false_type{}),
                             product(std::true_type{}), gb_s);
  } catch (...) {
    gb_s[0] = gb_s[1] = 0.0;
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshserveLinear, Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wp [P, K, 6]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [K, M]
                                  .RemainingArgs()               // the residual [N, M], or nothing
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [N, M]
                                  .Attr<bool>("gated")
                                  .Attr<bool>("prefetch"));

// How long the kernels' helper threads wait for the next call spinning before they sleep (process-wide); 0 hands
// the work of every call to the XLA pool instead.
extern "C" void MeshserveSetSpinMicros(int64_t micros) { meshserve::SpinPool::spin_micros().store(micros); }

// For tests: runs a job on the caller and `helpers` SpinPool threads in which the caller claims nothing until every
// helper has joined (or 10 s have passed), then all claim the items 0..items-1 from one counter. Returns the sum of
// the items (each claimed once), or -1 if the pool was busy, -2 if a helper never joined.
extern "C" int64_t MeshserveSpinPoolSelfTest(int64_t helpers, int64_t items) {
  struct Ctx {
    std::atomic<int64_t> next{0}, sum{0}, joined{0};
    int64_t items = 0, helpers = 0;
    bool late = false;
  } ctx;
  ctx.items = items;
  ctx.helpers = helpers;
  auto job = [](void* p, int64_t self) {
    auto& c = *static_cast<Ctx*>(p);
    if (self > 0) {
      c.joined.fetch_add(1);
    } else {
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (c.joined.load() < c.helpers && std::chrono::steady_clock::now() < until) std::this_thread::yield();
      c.late = c.joined.load() < c.helpers;
    }
    for (int64_t i; (i = c.next.fetch_add(1)) < c.items;) c.sum.fetch_add(i);
  };
  if (!meshserve::SpinPool::Get().Run(helpers, job, &ctx)) return -1;
  return ctx.late ? -2 : ctx.sum.load();
}
