// What the CPU kernels share: one AVX-512 register of floats as a GCC/Clang vector type, and work spread over as
// many threads as the XLA intra-op pool that the FFI hands each call has (helper threads of their own that spin
// between calls, else that pool's).
#pragma once

#include <immintrin.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace meshserve {

// One register of floats: 16 with AVX-512, else 8 (AVX2); vector extensions, so the compiler picks the ISA. Never
// wider than the machine's registers: GCC compiles 16-float vectors for an AVX2 machine through memory and general
// registers (on a 2-core AMD EPYC Zen 3 VM the kernels ran 5-26x slower than XLA's ops that way).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }

// kLanes int8 values -> kLanes floats: a sign-extending load and a convert (intrinsics: GCC's
// __builtin_convertvector from an int8 vector compiles to scalar loads).
inline Vec LoadInt8(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<Vec>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  return reinterpret_cast<Vec>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
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
// degree-6 polynomial, 2^k through the exponent bits. Inputs below -87 give ~0 instead of denormals. For any float
// vector type (Vec, or a kernel's native-width one).
template <typename V>
inline V ExpNonPositive(V x) {
  typedef int32_t IV __attribute__((vector_size(sizeof(V))));
  x = x < -87.0f ? V{} - 87.0f : x;
  const V k = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, IV), V);
  const V r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // ln2 in two parts keeps r exact
  V e = 1.0f / 120 + r * (1.0f / 720);
  e = 1.0f / 24 + r * e;
  e = 1.0f / 6 + r * e;
  e = 0.5f + r * e;
  e = 1.0f + r * e;
  e = 1.0f + r * e;
  const IV bits = (__builtin_convertvector(k, IV) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// Helper threads of the kernels' own, which wait for work spinning (for spin_micros() after their last job, then
// asleep on a condition variable). Handing work to the XLA pool instead costs a thread's wake-up per call, and a
// batch-1 decode step makes ~150 calls of 10-150 us each. One caller at a time: a second one (two computations at
// once) is told no and uses the XLA pool.
class SpinPool {
 public:
  static SpinPool& Get() {
    static SpinPool* pool = Create();
    if (forked().load(std::memory_order_relaxed)) {  // a child process: the parent's threads are not here
      std::lock_guard<std::mutex> lock(fork_mu());
      if (forked().load()) {
        pool = new SpinPool();  // the copied one is left alone: its mutexes may be held
        forked().store(false);
      }
    }
    return *pool;
  }

  static std::atomic<int64_t>& spin_micros() {
    static std::atomic<int64_t> micros{200};
    return micros;
  }

  // Runs job(ctx, 0) on the caller and job(ctx, i) on helpers i = 1..helpers, returning when the caller's has
  // returned and so has every helper's that started: a helper that had not started by then never will. False,
  // having run nothing, when another caller holds the pool.
  bool Run(int64_t helpers, void (*job)(void*, int64_t), void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    for (; threads_ < helpers; ++threads_) std::thread([this, index = threads_ + 1] { Loop(index); }).detach();
    job_ = job;
    ctx_ = ctx;
    helpers_ = helpers;
    finished_.store(0, std::memory_order_relaxed);
    const uint64_t epoch = (state_.load(std::memory_order_relaxed) >> kEpochShift) + 1;
    state_.store(epoch << kEpochShift);  // open, nobody joined; seq_cst, against a helper about to sleep:
    if (sleepers_.load() > 0) {        // either it sees the new epoch or this sees it counted
      std::lock_guard<std::mutex> lock(sleep_mu_);
      wake_.notify_all();
    }
    job(ctx, 0);
    const uint64_t joined = state_.fetch_or(kClosed, std::memory_order_acq_rel) & kJoined;
    while (finished_.load(std::memory_order_acquire) < static_cast<int64_t>(joined)) _mm_pause();
    return true;
  }

 private:
  // state_: the job's epoch, whether it is closed to helpers, and how many joined it.
  static constexpr int kEpochShift = 32;
  static constexpr uint64_t kClosed = uint64_t{1} << 31, kJoined = kClosed - 1;

  static std::atomic<bool>& forked() {
    static std::atomic<bool> flag{false};
    return flag;
  }
  static std::mutex& fork_mu() {
    static std::mutex mu;
    return mu;
  }
  static SpinPool* Create() {
    pthread_atfork(nullptr, nullptr, [] { forked().store(true); });
    return new SpinPool();  // never deleted: detached threads use it until the process ends
  }

  void Loop(int64_t index) {
    uint64_t seen = 0;  // the last epoch this thread saw
    for (;;) {
      uint64_t state = state_.load(std::memory_order_acquire);
      if (state >> kEpochShift == seen) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_micros().load());
        for (int spins = 1; (state = state_.load(std::memory_order_acquire)) >> kEpochShift == seen; ++spins) {
          _mm_pause();
          if (spins % 64 == 0 && std::chrono::steady_clock::now() > until) break;
        }
      }
      if (state >> kEpochShift == seen) {
        std::unique_lock<std::mutex> lock(sleep_mu_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return (state = state_.load()) >> kEpochShift != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = state >> kEpochShift;
      // join unless closed (or a newer job came meanwhile: then the next turn of the loop takes it)
      while (!(state & kClosed) && state >> kEpochShift == seen &&
             !state_.compare_exchange_weak(state, state + 1, std::memory_order_acquire)) {
      }
      if ((state & kClosed) || state >> kEpochShift != seen) continue;
      if (index <= helpers_) job_(ctx_, index);
      finished_.fetch_add(1, std::memory_order_release);
    }
  }

  std::mutex busy_;  // held by the one caller
  int64_t threads_ = 0;  // helpers started (detached; they live as long as the process)
  alignas(64) std::atomic<uint64_t> state_{0};  // with the job, one cache line: what a helper reads to start
  void (*job_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t helpers_ = 0;
  alignas(64) std::atomic<int64_t> finished_{0};
  std::mutex sleep_mu_;
  std::condition_variable wake_;
  std::atomic<int64_t> sleepers_{0};
};

// Runs body(i) for i in [0, items < 2^32) on the caller and up to pool.num_threads() - 1 helpers. Each worker owns
// an equal contiguous share, which it takes item by item from the front; one that runs out takes items from the
// back of the others' shares. A claim is one uncontended compare-and-swap on the worker's own cache
// line until someone steals (one shared counter costs a cross-core transfer per claim), and the contiguous shares
// keep each worker's weight stream sequential. The helpers are SpinPool's when it is free and spinning is on,
// else tasks on the XLA pool: tasks that start after every item is claimed touch nothing but the shared state (kept
// alive by its shared_ptr), so the caller never waits for a task that has not started. body must be copyable;
// each worker gets its own copy (its own scratch, if it keeps one).
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Body body) {
  if (items <= 0) return;
  struct alignas(64) Share {
    std::atomic<uint64_t> span;  // front << 32 | back
  };
  struct Work {
    Work(int64_t items, int64_t workers) : workers(workers), shares(new Share[workers]) {
      for (int64_t t = 0; t < workers; ++t)
        shares[t].span.store(static_cast<uint64_t>(items * t / workers) << 32 |
                             static_cast<uint64_t>(items * (t + 1) / workers));
    }
    const int64_t workers;
    std::unique_ptr<Share[]> shares;
    std::atomic<int64_t> started{1};  // the caller is worker 0
    alignas(64) std::atomic<int64_t> done{0};
  };
  // an item off share s, from its front or its back; false when the share is empty
  auto claim = [](Share& s, bool front, int64_t& item) {
    uint64_t span = s.span.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = span >> 32, hi = span & 0xffffffffu;
      if (lo >= hi) return false;
      if (s.span.compare_exchange_weak(span, front ? (lo + 1) << 32 | hi : lo << 32 | (hi - 1),
                                       std::memory_order_relaxed)) {
        item = front ? lo : hi - 1;
        return true;
      }
    }
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), items));
  auto work = std::make_shared<Work>(items, workers);
  auto run = [body, claim](Work& w, int64_t self) mutable {
    int64_t count = 0, item;
    for (; self < w.workers && claim(w.shares[self], true, item); ++count) body(item);
    for (int64_t k = 1; k < w.workers; ++k)
      for (Share& s = w.shares[(self + k) % w.workers]; claim(s, false, item); ++count) body(item);
    w.done.fetch_add(count, std::memory_order_release);
  };
  const int64_t helpers = workers - 1;
  if (helpers > 0 && SpinPool::spin_micros().load(std::memory_order_relaxed) > 0) {
    struct Ctx {
      decltype(run) worker;
      Work* work;
    } ctx{run, work.get()};
    auto job = [](void* p, int64_t self) {
      auto& c = *static_cast<Ctx*>(p);
      auto own = c.worker;  // each thread its own copy of the body
      own(*c.work, self);
    };
    if (SpinPool::Get().Run(helpers, job, &ctx)) return;
  }
  for (int64_t t = 0; t < helpers; ++t)
    pool.Schedule([work, run]() mutable { run(*work, work->started.fetch_add(1)); });
  run(*work, 0);
  while (work->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// ----- the prefetch probe (MeshserveProbePrefetch in linear.cc, MeshserveProbePrefetchInt8 in linear_int8.cc) -----
// Whether a one-token product (a batch-1 decode step's) should prefetch its weights in software depends on the CPU
// and on the products' shapes, so engine/kernels/__init__.py measures it per machine and model: the model's products
// in a step's order, both ways, on every thread.

// One product of the probe's sequence: `panels` panels of K features at `offset` elements into its weights.
struct ProbeProduct {
  int64_t offset, panels, K;
};

// The probe's sequence from n triples (panels, K, count): a step's products in order, each run `count` times (a
// layer's products and the layer count, then the head's once). Where a step holds more than `bytes` of weights
// (`panel_bytes` bytes per panel and feature), it is scaled down to fit: each count by the same factor, and a
// product whose scaled count falls below 1 runs once with its panels scaled instead (a big model's head), so the
// probe reads about `bytes`, in the step's proportions. The products interleave as a step's layers do, and every
// product gets its own weights. Returns the elements the weights span (a panel and feature hold panel_bytes /
// element size of them: `panel_elements`), or -1 for empty or bad shapes.
inline int64_t PlanProbe(const int64_t* shapes, int64_t n, int64_t bytes, int64_t panel_bytes, int64_t panel_elements,
                         std::vector<ProbeProduct>& products) {
  if (n < 1) return -1;
  double step = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (shapes[3 * i] < 1 || shapes[3 * i + 1] < 1 || shapes[3 * i + 2] < 1) return -1;
    step += static_cast<double>(shapes[3 * i] * shapes[3 * i + 1] * panel_bytes) * shapes[3 * i + 2];
  }
  const double scale = std::min(1.0, static_cast<double>(bytes) / step);
  std::vector<int64_t> counts(n), panels(n);
  int64_t most = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double count = shapes[3 * i + 2] * scale;
    counts[i] = count >= 1.0 ? std::llround(count) : 1;
    panels[i] = count >= 1.0 ? shapes[3 * i] : std::max<int64_t>(1, std::llround(shapes[3 * i] * count));
    most = std::max(most, counts[i]);
  }
  int64_t elements = 0;
  for (int64_t r = 0; r < most; ++r)  // round r runs every product whose count exceeds r, in the given order
    for (int64_t i = 0; i < n; ++i)
      if (r < counts[i]) {
        products.push_back({elements, panels[i], shapes[3 * i + 1]});
        elements += panels[i] * shapes[3 * i + 1] * panel_elements;
      }
  return elements;
}

// `bytes` rounded up to 2 MiB pages, aligned to them and advised MADV_HUGEPAGE as the engine's weights are
// (EngineConfig.huge_pages), filled with `value`; null if the memory cannot be had.
template <typename T>
std::unique_ptr<T, decltype(&std::free)> ProbeWeights(int64_t bytes, T value) {
  constexpr int64_t kHuge = int64_t{1} << 21;
  const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
  std::unique_ptr<T, decltype(&std::free)> w(static_cast<T*>(std::aligned_alloc(kHuge, size)), &std::free);
  if (w != nullptr) {
    madvise(w.get(), size, MADV_HUGEPAGE);
    std::fill_n(w.get(), size / sizeof(T), value);
  }
  return w;
}

// Spins until `count` reaches `target` (a barrier across the probe's threads), yielding now and then in case the
// machine has fewer cores free than threads; false if `abort` was set meanwhile.
inline bool ProbeWait(const std::atomic<int64_t>& count, int64_t target, const std::atomic<bool>& abort) {
  for (int spins = 1; count.load() < target; ++spins) {
    if (abort.load()) return false;
    _mm_pause();
    if (spins % 256 == 0) std::this_thread::yield();
  }
  return true;
}

// GB/s of one pass over the probe's products, one after another as a decode step runs them: every thread runs
// product(p, p0, p1), its equal share of panels [p0, p1), and all wait for the slowest before the next (the ends of
// calls are where a prefetch overshoots). The clock runs from when every thread has started to when the last product
// is done: thread start-up is not timed. `bytes`: the weights' bytes over all products.
template <typename Product>
double ProbeRound(const std::vector<ProbeProduct>& products, int64_t threads, double bytes, const Product& product) {
  std::atomic<int64_t> arrived{0};
  std::atomic<bool> abort{false};
  std::chrono::steady_clock::time_point start, end;
  auto worker = [&](int64_t t) {
    arrived.fetch_add(1);
    if (!ProbeWait(arrived, threads, abort)) return;
    if (t == 0) start = std::chrono::steady_clock::now();
    int64_t call = 2;
    for (const ProbeProduct& p : products) {
      product(p, p.panels * t / threads, p.panels * (t + 1) / threads);
      arrived.fetch_add(1);
      ProbeWait(arrived, call++ * threads, abort);
    }
    if (t == 0) end = std::chrono::steady_clock::now();
  };
  std::vector<std::thread> helpers;
  try {
    helpers.reserve(threads - 1);
    for (int64_t t = 1; t < threads; ++t) helpers.emplace_back(worker, t);
  } catch (...) {  // the helpers started wait for the rest at the first barrier: release them, then give up
    abort.store(true);
    for (auto& h : helpers) h.join();
    throw;
  }
  worker(0);
  for (auto& h : helpers) h.join();
  return bytes / std::chrono::duration<double>(end - start).count() / 1e9;
}

// The probe proper: `rounds` passes each way (without(p, p0, p1) and with(p, p0, p1): the same product compiled
// without and with prefetches) in alternating order after one warm-up pass each (pages, code); gb_s[0] / gb_s[1]
// the median GB/s without / with. Leaves them 0 if threads or memory could not be had: no exception may cross into
// the caller (ctypes).
template <typename Without, typename With>
void ProbeBothWays(const std::vector<ProbeProduct>& products, int64_t threads, int64_t rounds, double bytes,
                   const Without& without, const With& with, double* gb_s) {
  try {
    auto run = [&](int v) {
      return v == 0 ? ProbeRound(products, threads, bytes, without) : ProbeRound(products, threads, bytes, with);
    };
    std::vector<double> runs[2];
    run(0), run(1);
    for (int64_t r = 0; r < std::max<int64_t>(1, rounds); ++r)
      for (int i = 0; i < 2; ++i) {
        const int v = r % 2 == 0 ? i : 1 - i;
        runs[v].push_back(run(v));
      }
    for (int v = 0; v < 2; ++v) {
      std::sort(runs[v].begin(), runs[v].end());
      gb_s[v] = runs[v][runs[v].size() / 2];
    }
  } catch (...) {
    gb_s[0] = gb_s[1] = 0.0;
  }
}

// The threads a probe runs on: as asked, at least 1, at most the machine's.
inline int64_t ProbeThreads(int64_t threads) {
  return std::clamp<int64_t>(threads, 1, std::max<int64_t>(1, std::thread::hardware_concurrency()));
}

}  // namespace meshserve
