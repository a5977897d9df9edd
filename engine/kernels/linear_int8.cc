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
//
// Many tokens (M >= kVnniMinTokens) on a CPU with AVX-512 VNNI and VBMI: integer products. At a decode step of 64
// slots or a prefill the products are compute bound, and converting every weight to float32 before its FMA makes
// int8 slower than float32 (W2 on a Zen 5 VM: 977 tok/s against 1098). Here each token's activations are quantized
// once per call to 16-bit integers with a per-token scale (s_t = max_k |x[k, t]| / 32767, u = round(x / s_t) +
// 32768 in [1, 65535]) and split into two bytes, u = 256 hi + lo; vpdpbusd multiplies 4 unsigned activation bytes
// by 4 signed weights and adds them into each 32-bit lane, so a tile sums hi and lo separately, exactly, in int32:
//
//     sum_k w[n, k] (u[k] - 32768) = 256 (sum_k w hi - 128 W[n]) + sum_k w lo,   W[n] = sum_k w[n, k]
//
// (|sum_k w hi - 128 W[n]| <= 127 * 128 * K fits int32 for K < 132,000; -128 W[n] comes from the pass that
// regroups the panel, and is added to each tile's hi sums). y = scale_w[n] * s_t * that. Two vpdpbusd per 4 features (64 products
// each) against 4 FMAs of 16: twice the products per instruction, and no conversion. The only rounding beyond
// float32's is the activation's to 16 bits, at most s_t / 2 per element (tests/test_int8.py checks that bound and
// the quality gate runs through this path). The panel's [K, 32] bytes are regrouped in registers to [32 rows, 4
// features] (one vpermt2b per 16 rows), so the packed layout is the same for both paths.
//
// Many tokens on a CPU with AVX2 but not VNNI: the same 16-bit activations, and vpmaddwd on the weights widened to
// 16 bits per work item (see MESHSERVE_INT8_MADD below). Same rounding as the VNNI path, so one quality table.
#include <immintrin.h>

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
using meshserve::LoadInt8;
using meshserve::Vec;

namespace {

constexpr int64_t kRows = 32;    // weight rows per panel (engine/kernels/__init__.py must agree)
constexpr int64_t kRowVecs = kRows / kLanes;  // vectors per panel row block: 2 (AVX-512) or 4 (AVX2)
// tokens per tile: 24 accumulators of 32 registers (AVX-512: 12 tokens x 2 row vectors), 12 of 16 (AVX2: 3 x 4)
constexpr int64_t kTokens = 24 / kRowVecs / (kLanes == 16 ? 1 : 2);
constexpr int64_t kMaxTileTokens = 12;  // the most tokens of any path's tile (Finish's buffer)
static_assert(kTokens <= kMaxTileTokens, "Finish's buffer holds a tile");
constexpr int64_t kPrefetch = 1024;  // bytes of weights prefetched ahead (past the 4 KiB hardware prefetch limit)
// The same at one token (TileOne), which streams a panel at the memory's speed with little work per byte: 1 KiB ahead
// was too short there. On a 2-core Zen 5 VM, the one-token products of a SmolLM2 step chained alone, 3 runs of 12
// alternating rounds: 4 KiB ahead 1.04-1.12x the speed of 1 KiB, 2 KiB 1.03-1.11x, none 1.01-1.08x; W1 decode with
// int8 weights in one process, alternating passes: 267.6 against 247.6 tok/s (1.102x, median of 12; none 0.985x),
// and 2 / 8 KiB ahead 0.979x / 1.002x of 4 KiB. (Measured with AVX-512 only.)
constexpr int64_t kPrefetchOne = 4096;
static_assert(kRows % kLanes == 0 && kRowVecs % 2 == 0, "a panel's row block is whole vectors, gate and up halves");

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

// Writes one tile's accumulators (kRowVecs row vectors per token) to y rows [r0, r0 + rows) x tokens [m, m + tokens).
inline void Finish(const Vec (*acc)[kRowVecs], int64_t tokens, const float* scale, const Epilogue& ep, int64_t r0,
                   int64_t rows, float* y, int64_t M, int64_t m) {
  alignas(64) float out[kMaxTileTokens][kRows];
  Vec s[kRowVecs];
  for (int v = 0; v < kRowVecs; ++v) s[v] = Load(scale + v * kLanes);
  for (int64_t t = 0; t < tokens; ++t) {
    if (ep.gated) {  // rows 0-15 of the panel are gate rows, 16-31 the matching up rows
      for (int v = 0; v < kRowVecs / 2; ++v)
        meshserve::Store(out[t] + v * kLanes,
                         Silu(acc[t][v] * s[v]) * (acc[t][v + kRowVecs / 2] * s[v + kRowVecs / 2]));
    } else {
      for (int v = 0; v < kRowVecs; ++v) meshserve::Store(out[t] + v * kLanes, acc[t][v] * s[v]);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* yr = y + (r0 + i) * M + m;
    const float* rr = ep.residual == nullptr ? nullptr : ep.residual + (r0 + i) * M + m;
    for (int64_t t = 0; t < tokens; ++t) yr[t] = out[t][i] + (rr == nullptr ? 0.0f : rr[t]);
  }
}

inline Vec Row(const int8_t* p) { return LoadInt8(p); }
inline Vec Row(const float* p) { return meshserve::Load(p); }

// T tokens of one panel: the int8 panel itself, or its values already widened to floats (Run), read the same way.
template <int T, typename W>
void Tile(const W* __restrict panel, int64_t K, const float* __restrict x, int64_t M, int64_t m,
          Vec (*out)[kRowVecs]) {
  Vec acc[T][kRowVecs] = {};  // local, so the accumulators live in registers for the whole loop
  for (int64_t k = 0; k < K; ++k) {
    if (std::is_same_v<W, int8_t> && k % 2 == 0)  // one 64-byte line per 2 features (a widened panel is in L2)
      __builtin_prefetch(panel + k * kRows + kPrefetch, 0, 3);
    Vec w[kRowVecs];
    for (int v = 0; v < kRowVecs; ++v) w[v] = Row(panel + k * kRows + v * kLanes);
    const float* xk = x + k * M + m;
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < kRowVecs; ++v) acc[t][v] += w[v] * xk[t];
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < kRowVecs; ++v) out[t][v] = acc[t][v];
}

// One token: two accumulator pairs over alternating input features (a single chain would wait on each add). PF:
// prefetch kPrefetchOne ahead (the engine's choice per model and machine: MeshserveProbePrefetchInt8 below).
template <bool PF>
void TileOne(const int8_t* __restrict panel, int64_t K, const float* __restrict x, int64_t M, int64_t m,
             Vec (*out)[kRowVecs]) {
  Vec a[2][kRowVecs] = {};
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    if constexpr (PF) __builtin_prefetch(panel + k * kRows + kPrefetchOne, 0, 3);
    for (int j = 0; j < 2; ++j) {
      const float xv = x[(k + j) * M + m];
      for (int v = 0; v < kRowVecs; ++v) a[j][v] += LoadInt8(panel + (k + j) * kRows + v * kLanes) * xv;
    }
  }
  for (; k < K; ++k)
    for (int v = 0; v < kRowVecs; ++v) a[0][v] += LoadInt8(panel + k * kRows + v * kLanes) * x[k * M + m];
  for (int v = 0; v < kRowVecs; ++v) out[0][v] = a[0][v] + a[1][v];
}

// Panels [p0, p1) x tokens [m0, m1). A panel that more than one tile of tokens reads is widened to floats once
// (`wide`, K x 32 floats: in L2) and the tiles read that, rather than converting every weight again for every
// kTokens tokens (3 with AVX2); the values and sums are the same either way. (Used below the integer paths' fewest
// tokens; before the AVX2 integer path, at 64 tokens on a 2-core Zen 3 VM: a [3072, 576] product 79 -> 90 GFLOP/s.)
void Run(const int8_t* w, int64_t N, int64_t K, const float* x, int64_t M, float* y, const Epilogue& ep, int64_t p0,
         int64_t p1, int64_t m0, int64_t m1, std::vector<float>& wide, bool prefetch_one) {
  const int64_t out = ep.Rows();
  const bool widen = m1 - m0 > kTokens;
  if (widen) wide.resize(K * kRows);
  Vec acc[kTokens][kRowVecs];
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = w + p * K * kRows;
    const int64_t r0 = p * out, rows = std::min(out, N - r0);
    if (widen)
      for (int64_t i = 0; i < K * kRows; i += kLanes) meshserve::Store(wide.data() + i, LoadInt8(panel + i));
    for (int64_t m = m0; m < m1; m += kTokens) {
      const int64_t tokens = std::min(kTokens, m1 - m);
      switch (tokens) {
#define MESHSERVE_TILE(n)                                                       \
  case n:                                                                       \
    if constexpr (n <= kTokens) {                                               \
      if (widen)                                                                \
        Tile<n>(static_cast<const float*>(wide.data()), K, x, M, m, acc);      \
      else                                                                      \
        Tile<n>(panel, K, x, M, m, acc);                                        \
    }                                                                           \
    break;
        MESHSERVE_TILE(2) MESHSERVE_TILE(3) MESHSERVE_TILE(4) MESHSERVE_TILE(5) MESHSERVE_TILE(6) MESHSERVE_TILE(7)
        MESHSERVE_TILE(8) MESHSERVE_TILE(9) MESHSERVE_TILE(10) MESHSERVE_TILE(11) MESHSERVE_TILE(12)
#undef MESHSERVE_TILE
        default:
          if (prefetch_one)
            TileOne<true>(panel, K, x, M, m, acc);
          else
            TileOne<false>(panel, K, x, M, m, acc);
      }
      Finish(acc, tokens, ep.scale + p * kRows, ep, r0, rows, y, M, m);
    }
  }
}

// x [K, M] float32 -> s_t [M] and its inverse (0 where x's column is all zero, s_t then 1). A NaN or inf in a
// token makes its s_t NaN or inf, so its outputs come out NaN as the float product's would, never finite garbage.
void TokenScales(const float* x, int64_t K, int64_t M, float* scale, float* inverse) {
  std::fill_n(inverse, M, 0.0f);  // max |x| first (rows of x are contiguous in M: vectorizes over tokens)
  for (int64_t k = 0; k < K; ++k)
    for (int64_t m = 0; m < M; ++m) {
      const float a = std::fabs(x[k * M + m]);
      inverse[m] = (a > inverse[m] || a != a) ? a : inverse[m];  // NaN-propagating max
    }
  for (int64_t m = 0; m < M; ++m) {
    const float amax = inverse[m];
    const bool zero = amax == 0.0f;  // false for NaN
    scale[m] = zero ? 1.0f : amax / 32767.0f;
    inverse[m] = zero ? 0.0f : 32767.0f / amax;
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#define MESHSERVE_INT8_VNNI 1

constexpr int64_t kVnniMinTokens = 8;  // fewer tokens: the float path (memory bound there, and no quantizing pass)
constexpr int64_t kVnniTokens = 6;     // tokens per tile: 24 int32 accumulators (6 tokens x 2 row vectors x hi, lo)

// Features [4 g0, 4 g1) of x [K, M] -> the hi and lo bytes of u (see the top) as one dword per 4 features and token,
// hi / lo [ceil(K / 4), M] (features past K: 0, their weights are zero). x / s_t is in [-32767, 32767]; adding
// 32768.5 and truncating rounds half up into [1, 65535].
void QuantizeGroups(const float* x, int64_t K, int64_t M, const float* inverse, int64_t g0, int64_t g1, uint32_t* hi,
                    uint32_t* lo) {
  const __m512 half = _mm512_set1_ps(32768.5f);
  const __m512i bytes = _mm512_set1_epi32(255);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t features = std::min<int64_t>(4, K - 4 * g);
    int64_t m = 0;
    for (; m + kLanes <= M; m += kLanes) {
      const __m512 inv = _mm512_loadu_ps(inverse + m);
      __m512i h = _mm512_setzero_si512(), l = _mm512_setzero_si512();
      for (int64_t b = 0; b < features; ++b) {
        const __m512i u = _mm512_cvttps_epi32(_mm512_fmadd_ps(_mm512_loadu_ps(x + (4 * g + b) * M + m), inv, half));
        h = _mm512_or_si512(h, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 8), bytes), 8 * b));
        l = _mm512_or_si512(l, _mm512_slli_epi32(_mm512_and_si512(u, bytes), 8 * b));
      }
      _mm512_storeu_si512(hi + g * M + m, h);
      _mm512_storeu_si512(lo + g * M + m, l);
    }
    for (; m < M; ++m) {
      uint32_t h = 0, l = 0;
      for (int64_t b = 0; b < features; ++b) {
        const float f = x[(4 * g + b) * M + m] * inverse[m] + 32768.5f;  // NaN / inf only in a NaN-scaled token
        const uint32_t u = std::isfinite(f) ? static_cast<uint32_t>(static_cast<int32_t>(f)) : 0u;
        h |= ((u >> 8) & 255u) << (8 * b);
        l |= (u & 255u) << (8 * b);
      }
      hi[g * M + m] = h;
      lo[g * M + m] = l;
    }
  }
}

// 16 int32 lanes. Accumulators are arrays of this type, not of __m512i: __m512i is declared may_alias, and GCC
// 12 then kept an array of them in memory, loading and storing every accumulator on every step (measured: 330
// against 600+ GFLOP/s of integer products at 64 tokens).
typedef int32_t IVec __attribute__((vector_size(64)));

// acc += per 32-bit lane, 4 unsigned bytes of a times the 4 signed bytes of w
inline IVec Dot(IVec acc, __m512i a, __m512i w) {
  return reinterpret_cast<IVec>(_mm512_dpbusd_epi32(reinterpret_cast<__m512i>(acc), a, w));
}

// One step of 4 features: the panel's 128 bytes [4 features, 32 rows] -> two vectors [16 rows, 4 features].
struct Regroup {
  __m512i lo_rows, hi_rows;  // vpermt2b indices: byte 4 i + f of the result is row i (+ 16) of feature f
  Regroup() {
    alignas(64) uint8_t a[64], b[64];
    for (int j = 0; j < 64; ++j) a[j] = static_cast<uint8_t>((j % 4) * 32 + j / 4), b[j] = a[j] + 16;
    lo_rows = _mm512_load_si512(a);
    hi_rows = _mm512_load_si512(b);
  }
  void operator()(const int8_t* p, __m512i& w0, __m512i& w1) const {
    const __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 64);
    w0 = _mm512_permutex2var_epi8(a, lo_rows, b);
    w1 = _mm512_permutex2var_epi8(a, hi_rows, b);
  }
};

// A panel regrouped for the integer tiles: [ceil(K / 4), 2 row vectors, 16 rows, 4 features] (features past K
// zero), written once per panel and work item (K x 32 bytes: in L1/L2 while the item's token tiles read it), and
// -128 W[n] for its two row vectors (the hi sums' starting point).
void RegroupPanel(const int8_t* panel, int64_t K, const Regroup& regroup, int8_t* grouped, __m512i* start) {
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512(), w0, w1;
  const int64_t whole = K / 4;
  auto put = [&](int64_t g) {
    _mm512_store_si512(grouped + g * 4 * kRows, w0);
    _mm512_store_si512(grouped + g * 4 * kRows + 64, w1);
    s0 = _mm512_dpbusd_epi32(s0, u128, w0);
    s1 = _mm512_dpbusd_epi32(s1, u128, w1);
  };
  for (int64_t g = 0; g < whole; ++g) {
    __builtin_prefetch(panel + g * 4 * kRows + kPrefetch, 0, 3);
    __builtin_prefetch(panel + g * 4 * kRows + kPrefetch + 64, 0, 3);
    regroup(panel + g * 4 * kRows, w0, w1);
    put(g);
  }
  if (K % 4 != 0) {  // the bytes past the panel's K x 32 belong to the next panel, or to nothing
    alignas(64) int8_t tail[4 * kRows] = {};
    std::memcpy(tail, panel + whole * 4 * kRows, (K % 4) * kRows);
    regroup(tail, w0, w1);
    put(whole);
  }
  start[0] = _mm512_sub_epi32(_mm512_setzero_si512(), s0);
  start[1] = _mm512_sub_epi32(_mm512_setzero_si512(), s1);
}

template <int T>
__attribute__((noinline)) void TileVnni(const int8_t* __restrict grouped, int64_t K4, const uint32_t* __restrict hi,
              const uint32_t* __restrict lo, const float* tscale, int64_t M, int64_t m, const __m512i* start,
              Vec (*out)[2]) {
  IVec acc[4 * T] = {};  // per token: hi rows 0-15, hi rows 16-31, lo rows 0-15, lo rows 16-31
  for (int64_t g = 0; g < K4; ++g) {
    const __m512i w0 = _mm512_load_si512(grouped + g * 4 * kRows), w1 = _mm512_load_si512(grouped + g * 4 * kRows + 64);
    const uint32_t* hg = hi + g * M + m;
    const uint32_t* lg = lo + g * M + m;
    for (int t = 0; t < T; ++t) {
      const __m512i h = _mm512_set1_epi32(static_cast<int>(hg[t]));
      acc[4 * t] = Dot(acc[4 * t], h, w0);
      acc[4 * t + 1] = Dot(acc[4 * t + 1], h, w1);
      const __m512i l = _mm512_set1_epi32(static_cast<int>(lg[t]));
      acc[4 * t + 2] = Dot(acc[4 * t + 2], l, w0);
      acc[4 * t + 3] = Dot(acc[4 * t + 3], l, w1);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < 2; ++v) {
      const __m512i h = _mm512_add_epi32(reinterpret_cast<__m512i>(acc[4 * t + v]), start[v]);
      const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_set1_ps(256.0f),
                                         _mm512_cvtepi32_ps(reinterpret_cast<__m512i>(acc[4 * t + 2 + v])));
      out[t][v] = reinterpret_cast<const Vec&>(sum) * tscale[m + t];
    }
}

// Panels [p0, p1) x tokens [m0, m1) on quantized activations; `grouped` holds ceil(K / 4) x 128 bytes, 64-aligned.
void RunVnni(const int8_t* w, int64_t N, int64_t K, const uint32_t* hi, const uint32_t* lo, const float* tscale,
             int64_t M, float* y, const Epilogue& ep, int64_t p0, int64_t p1, int64_t m0, int64_t m1,
             int8_t* grouped) {
  static const Regroup regroup;
  const int64_t out = ep.Rows(), K4 = (K + 3) / 4;
  Vec acc[kTokens][kRowVecs];
  __m512i start[2];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t r0 = p * out, rows = std::min(out, N - r0);
    RegroupPanel(w + p * K * kRows, K, regroup, grouped, start);
    for (int64_t m = m0; m < m1; m += kVnniTokens) {
      const int64_t tokens = std::min(kVnniTokens, m1 - m);
      switch (tokens) {
#define MESHSERVE_TILE(n)                                           \
  case n:                                                           \
    TileVnni<n>(grouped, K4, hi, lo, tscale, M, m, start, acc);      \
    break;
        MESHSERVE_TILE(1) MESHSERVE_TILE(2) MESHSERVE_TILE(3) MESHSERVE_TILE(4) MESHSERVE_TILE(5) MESHSERVE_TILE(6)
#undef MESHSERVE_TILE
      }
      Finish(acc, tokens, ep.scale + p * kRows, ep, r0, rows, y, M, m);
    }
  }
}
static_assert(kVnniTokens <= kMaxTileTokens, "Finish's buffer holds a tile");
#endif  // AVX-512 VNNI and VBMI

#if !defined(MESHSERVE_INT8_VNNI) && defined(__AVX2__)
#define MESHSERVE_INT8_MADD 1

// Integer products without VNNI (AVX2): the same 16-bit activations as the VNNI path (q = u - 32768, in [-32767,
// 32767]), multiplied by the weights widened to 16 bits with vpmaddwd, which sums two products of 16-bit integers
// into each 32-bit lane, exactly. vpmaddwd + vpaddd do 16 products in two instructions where a float32 FMA does 8
// in one, and a 2-core AMD EPYC Zen 3 VM (AVX2, no VNNI) issues ~1.6 of those pairs a cycle against 2 FMAs: 80
// against 51 GMAC/s per core, measured in a register-only loop. A lane's pair of products reaches 2 * 128 * 32767,
// so int32 holds kMaddPairs = 128 pairs (256 features) exactly before the tile adds them into float32 sums.
constexpr int64_t kMaddMinTokens = 4;  // fewer tokens: the float path (see Run; measured faster there)
constexpr int64_t kMaddTokens = 6;     // tokens per tile: 12 int32 accumulators of 16 registers (6 x 2 row vectors)
constexpr int64_t kMaddPairs = 128;    // feature pairs summed in int32 per block: 128 * 2 * 128 * 32767 < 2^31

typedef int32_t IVec8 __attribute__((vector_size(32)));  // not __m256i: see IVec above (may_alias keeps it in memory)

// x [K, M] -> token-major dwords q [M, K2], K2 = ceil(K / 2), of feature pairs [2 g0, 2 g1): the low half is
// feature 2 g's 16-bit activation, the high half feature 2 g + 1's (0 past K). Rounded as the VNNI path rounds
// (x / s_t + 32768.5, truncated, minus 32768).
void QuantizePairs(const float* x, int64_t K, int64_t M, const float* inverse, int64_t g0, int64_t g1, uint32_t* q) {
  const int64_t K2 = (K + 1) / 2;
  const __m256 half = _mm256_set1_ps(32768.5f);
  const __m256i bias = _mm256_set1_epi32(32768), low = _mm256_set1_epi32(0xffff);
  auto quantize = [](float v, float inv) {
    const float f = std::fma(v, inv, 32768.5f);  // NaN / inf only in a NaN- or inf-scaled token
    return std::isfinite(f) ? static_cast<uint32_t>(static_cast<int32_t>(f) - 32768) & 0xffffu : 0u;
  };
  alignas(32) uint32_t lanes[8];
  for (int64_t g = g0; g < g1; ++g) {
    const float* a = x + 2 * g * M;
    const float* b = 2 * g + 1 < K ? a + M : nullptr;
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) {
      const __m256 inv = _mm256_loadu_ps(inverse + m);
      auto round = [&](const float* p) {
        return _mm256_sub_epi32(_mm256_cvttps_epi32(_mm256_fmadd_ps(_mm256_loadu_ps(p + m), inv, half)), bias);
      };
      __m256i d = _mm256_and_si256(round(a), low);
      if (b != nullptr) d = _mm256_or_si256(d, _mm256_slli_epi32(round(b), 16));
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), d);
      for (int j = 0; j < 8; ++j) q[(m + j) * K2 + g] = lanes[j];
    }
    for (; m < M; ++m)
      q[m * K2 + g] = quantize(a[m], inverse[m]) | (b == nullptr ? 0u : quantize(b[m], inverse[m]) << 16);
  }
}

// A panel [K, 32] int8 -> 16-bit pairs for vpmaddwd, [2 halves of 16 rows, K2, 16 rows, 2 features] (features
// past K: 0; the bytes past the panel's K x 32 belong to the next panel, or to nothing), once per panel and work
// item (K x 64 bytes: in L2 while the item's token tiles read it).
void WidenPairs(const int8_t* panel, int64_t K, int16_t* grouped) {
  const int64_t K2 = (K + 1) / 2;
  int16_t* top = grouped;
  int16_t* bottom = grouped + K2 * kRows;
  for (int64_t g = 0; g < K2; ++g) {
    __builtin_prefetch(panel + 2 * g * kRows + kPrefetch, 0, 3);
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + 2 * g * kRows));
    const __m256i b = 2 * g + 1 < K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (2 * g + 1) * kRows))
                                    : _mm256_setzero_si256();
    // per 128-bit lane, rows interleaved with their pair: lo = rows 0-7 | 16-23, hi = rows 8-15 | 24-31
    const __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);
    auto put = [](int16_t* p, __m128i bytes) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(p), _mm256_cvtepi8_epi16(bytes));
    };
    put(top + g * 16 * 2, _mm256_castsi256_si128(lo));
    put(top + g * 16 * 2 + 16, _mm256_castsi256_si128(hi));
    put(bottom + g * 16 * 2, _mm256_extracti128_si256(lo, 1));
    put(bottom + g * 16 * 2 + 16, _mm256_extracti128_si256(hi, 1));
  }
}

// T tokens x 16 rows (one half of a panel): out[t][r0 + i] = s_t * sum_k w[r0 + i, k] q[k, m + t].
template <int T>
__attribute__((noinline)) void TileMadd(const int16_t* __restrict half, int64_t K2, const uint32_t* __restrict q,
                                        const float* tscale, int64_t m, float (*out)[kRows], int64_t r0) {
  const uint32_t* qt[T];
  for (int t = 0; t < T; ++t) qt[t] = q + (m + t) * K2;
  __m256 sum[T][2];
  for (int t = 0; t < T; ++t) sum[t][0] = sum[t][1] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < K2; g0 += kMaddPairs) {
    const int64_t g1 = std::min(K2, g0 + kMaddPairs);
    IVec8 acc[T][2] = {};
    for (int64_t g = g0; g < g1; ++g) {
      __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(half + g * 32));
      __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(half + g * 32 + 16));
      // in registers: GCC would fold each load into every token's vpmaddwd (15 loads per step instead of 7)
      asm("" : "+x"(w0), "+x"(w1));
      for (int t = 0; t < T; ++t) {
        const __m256i b = _mm256_set1_epi32(static_cast<int>(qt[t][g]));
        acc[t][0] += reinterpret_cast<IVec8>(_mm256_madd_epi16(b, w0));
        acc[t][1] += reinterpret_cast<IVec8>(_mm256_madd_epi16(b, w1));
      }
    }
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < 2; ++v)
        sum[t][v] = _mm256_add_ps(sum[t][v], _mm256_cvtepi32_ps(reinterpret_cast<__m256i>(acc[t][v])));
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < 2; ++v)
      _mm256_store_ps(out[t] + r0 + 8 * v, _mm256_mul_ps(sum[t][v], _mm256_set1_ps(tscale[m + t])));
}

// Panels [p0, p1) x tokens [m0, m1) on quantized activations; `grouped` holds K2 x 64 int16, 32-aligned.
void RunMadd(const int8_t* w, int64_t N, int64_t K, const uint32_t* q, const float* tscale, float* y,
             int64_t M, const Epilogue& ep, int64_t p0, int64_t p1, int64_t m0, int64_t m1, int16_t* grouped) {
  const int64_t out = ep.Rows(), K2 = (K + 1) / 2;
  alignas(64) Vec acc[kMaddTokens][kRowVecs];
  auto* sums = reinterpret_cast<float (*)[kRows]>(acc);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t r0 = p * out, rows = std::min(out, N - r0);
    WidenPairs(w + p * K * kRows, K, grouped);
    for (int64_t m = m0; m < m1; m += kMaddTokens) {
      const int64_t tokens = std::min(kMaddTokens, m1 - m);
      for (int64_t h = 0; h < 2; ++h) {
        const int16_t* half = grouped + h * K2 * 16 * 2;
        switch (tokens) {
#define MESHSERVE_TILE(n)                                        \
  case n:                                                        \
    TileMadd<n>(half, K2, q, tscale, m, sums, 16 * h);           \
    break;
          MESHSERVE_TILE(1) MESHSERVE_TILE(2) MESHSERVE_TILE(3) MESHSERVE_TILE(4) MESHSERVE_TILE(5) MESHSERVE_TILE(6)
#undef MESHSERVE_TILE
        }
      }
      Finish(acc, tokens, ep.scale + p * kRows, ep, r0, rows, y, M, m);
    }
  }
}
static_assert(kMaddTokens <= kMaxTileTokens, "Finish's buffer holds a tile");
#endif  // AVX2 without VNNI

ffi::Error LinearInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> wq, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> x, ffi::RemainingArgs rest, ffi::ResultBuffer<ffi::F32> y, bool gated,
                      bool prefetch) {
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
#ifdef MESHSERVE_INT8_VNNI
  if (M >= kVnniMinTokens) {
    const int64_t K4 = (K + 3) / 4;
    std::vector<uint32_t> quantized(2 * K4 * M);
    std::vector<float> tscale(2 * M);
    const uint32_t *hi = quantized.data(), *lo = hi + K4 * M;
    TokenScales(xs, K, M, tscale.data(), tscale.data() + M);
    const float *ts = tscale.data(), *inverse = ts + M;
    uint32_t *qh = quantized.data(), *ql = qh + K4 * M;
    constexpr int64_t kGroups = 16;  // 64 features of activations per work item
    meshserve::ParallelFor(pool, (K4 + kGroups - 1) / kGroups, [=](int64_t item) {
      QuantizeGroups(xs, K, M, inverse, item * kGroups, std::min(K4, (item + 1) * kGroups), qh, ql);
    });
    // each worker's regrouped panel (its copy of the lambda's vector), 64-aligned inside
    meshserve::ParallelFor(pool, runs * blocks, [=, grouped = std::vector<int8_t>()](int64_t item) mutable {
      if (grouped.empty()) grouped.resize(K4 * 4 * kRows + 64);
      int8_t* g = grouped.data() + (64 - reinterpret_cast<uintptr_t>(grouped.data()) % 64) % 64;
      const int64_t m0 = (item % blocks) * kTokenBlock, m1 = std::min(M, m0 + kTokenBlock);
      const int64_t p0 = (item / blocks) * run, p1 = std::min(panels, p0 + run);
      RunVnni(w, N, K, hi, lo, ts, M, ys, ep, p0, p1, m0, m1, g);
    });
    return ffi::Error::Success();
  }
#elif defined(MESHSERVE_INT8_MADD)
  if (M >= kMaddMinTokens) {
    const int64_t K2 = (K + 1) / 2;
    std::vector<uint32_t> quantized(K2 * M);
    std::vector<float> tscale(2 * M);
    TokenScales(xs, K, M, tscale.data(), tscale.data() + M);
    const float *ts = tscale.data(), *inverse = ts + M;
    uint32_t* q = quantized.data();
    constexpr int64_t kPairs = 32;  // 64 features of activations per work item
    meshserve::ParallelFor(pool, (K2 + kPairs - 1) / kPairs, [=](int64_t item) {
      QuantizePairs(xs, K, M, inverse, item * kPairs, std::min(K2, (item + 1) * kPairs), q);
    });
    // each worker's widened panel (its copy of the lambda's vector), 32-aligned inside
    meshserve::ParallelFor(pool, runs * blocks, [=, grouped = std::vector<int16_t>()](int64_t item) mutable {
      if (grouped.empty()) grouped.resize(K2 * kRows * 2 + 16);
      int16_t* g = grouped.data() + (32 - reinterpret_cast<uintptr_t>(grouped.data()) % 32) % 32 / 2;
      const int64_t m0 = (item % blocks) * kTokenBlock, m1 = std::min(M, m0 + kTokenBlock);
      const int64_t p0 = (item / blocks) * run, p1 = std::min(panels, p0 + run);
      RunMadd(w, N, K, q, ts, ys, M, ep, p0, p1, m0, m1, g);
    });
    return ffi::Error::Success();
  }
#endif
  // each worker's widened panel (its copy of the lambda's vector)
  meshserve::ParallelFor(pool, runs * blocks, [=, wide = std::vector<float>()](int64_t item) mutable {
    const int64_t m0 = (item % blocks) * kTokenBlock, m1 = std::min(M, m0 + kTokenBlock);
    const int64_t p0 = (item / blocks) * run, p1 = std::min(panels, p0 + run);
    Run(w, N, K, xs, M, ys, ep, p0, p1, m0, m1, wide, prefetch);
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
                                  .Attr<bool>("gated")
                                  .Attr<bool>("prefetch"));  // at one token (see TileOne)

// The int8 products of a batch-1 decode step (Run at one token: TileOne), without and with prefetches, as
// MeshserveProbePrefetch in linear.cc measures the float32 ones: `shapes` holds n (panels of 32 rows, K, count)
// triples. gb_s[0] / gb_s[1]: the median GB/s of int8 weights without / with; both 0 if the memory or the threads
// could not be had, or the shapes are empty or bad.
extern "C" void MeshserveProbePrefetchInt8(int64_t threads, int64_t bytes, int64_t rounds, const int64_t* shapes,
                                           int64_t n, double* gb_s) {
  gb_s[0] = gb_s[1] = 0.0;
  try {  // no exception may cross into the caller (ctypes)
    std::vector<meshserve::ProbeProduct> products;
    const int64_t values = meshserve::PlanProbe(shapes, n, bytes, kRows, kRows, products);
    if (values < 0) return;
    auto w = meshserve::ProbeWeights<int8_t>(values, 1);
    if (w == nullptr) return;
    int64_t widest = 1, out = 1;
    for (const auto& p : products) widest = std::max(widest, p.K), out = std::max(out, p.panels * kRows);
    std::vector<float> x(widest, 1.0f), y(out), scale(out, 1e-3f);
    Epilogue ep;
    ep.scale = scale.data();
    const int8_t* weights = w.get();
    auto product = [&](bool pf) {
      return [&, pf](const meshserve::ProbeProduct& p, int64_t p0, int64_t p1) {
        std::vector<float> wide;  // unused at one token
        Run(weights + p.offset, p.panels * kRows, p.K, x.data(), 1, y.data(), ep, p0, p1, 0, 1, wide, pf);
      };
    };
    meshserve::ProbeBothWays(products, meshserve::ProbeThreads(threads), rounds, static_cast<double>(values),
                             product(false), product(true), gb_s);
  } catch (...) {
    gb_s[0] = gb_s[1] = 0.0;
  }
}

// The fewest tokens for which this build multiplies int8 activations (see the top), or 0 when it has no such path
// (no AVX-512 VNNI / VBMI): tests compute their expected rounding from it.
extern "C" int64_t MeshserveInt8IntegerMinTokens() {
#if defined(MESHSERVE_INT8_VNNI)
  return kVnniMinTokens;
#elif defined(MESHSERVE_INT8_MADD)
  return kMaddMinTokens;
#else
  return 0;
#endif
}

// Which integer path this build has: "vnni" (AVX-512 VNNI and VBMI), "avx2" (vpmaddwd), or "" (none).
extern "C" const char* MeshserveInt8IntegerPath() {
#if defined(MESHSERVE_INT8_VNNI)
  return "vnni";
#elif defined(MESHSERVE_INT8_MADD)
  return "avx2";
#else
  return "";
#endif
}
