// Prefill attention with paged context, for XLA:CPU through the XLA FFI (the paged case of engine/attention.py's
// `prefill_attention_xla`, after `write_prefill_kv` has written the pack's K/V into the pools; this reads only).
//
// One packed row of T tokens: query t sees (a) the keys s <= t of the pack with segment_ids[s] == segment_ids[t]
// (padding, segment -1, sees earlier padding) and (b) the first ctx_valid[c] positions of each context page
// ctx_pages[c] whose bit min(segment, 31) is set in ctx_rows[c], for c < min(C, ctx_blocks * block_pages); padding
// sees no context. Arguments: q [T, K, G, H] (pre-scaled), k and v [T, K, H], segment_ids [T] int32, the key pool
// [Np, K, H, P] (transposed), the value pool [Np, K, P, H], ctx_pages, ctx_rows, ctx_valid [C] int32, ctx_blocks []
// int32; attribute block_pages; result out [T, K, G, H]. float32 only. What a query may not see never enters its
// sums, even if it holds NaN/inf: positions past ctx_valid, entries past the count, pages out of range.
//
// Why a kernel: XLA:CPU runs the context loop as gathers of every block's pages and small batched products, at
// ~270 ms per SmolLM2 prefill chunk with 4-5K positions of context (30 layers) against ~65 ms without.
//
// How: queries go in tiles of up to ~120 rows (row = token * G + query head, of one kv head), keys in chunks of
// ~256 positions (whole pages). Per chunk, one online-softmax step: scores [R, H] x [H, S] in register tiles of 6
// rows x 64 positions, a masked row max and exp, then acc [R, H] += weights [R, S] x values [S, H] in tiles of 6 rows
// x 64 head dims; row blocks that see nothing of a chunk are skipped. Context pages are read in place (a page of P
// positions is P / 16 key vectors per head dim, and only its first ctx_valid value rows are read), so each is read
// once per (query tile, kv head) for all the tile's queries, and the next chunk's pages are prefetched during the
// products of this one. Work items are (query tile, kv head); where they are fewer than twice the threads, the
// context is also split: (tile, kv head, split) items keep each row's softmax state (max, sum, acc), and a second
// pass of (tile, kv head) items merges them, attends to the pack's own keys and normalizes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using meshserve::ExpNonPositive;
using meshserve::kLanes;
using meshserve::Load;
using meshserve::Store;
using meshserve::Vec;

namespace {

typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t UVec __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline IVec LoadI(const int32_t* p) {
  IVec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

constexpr float kNegInf = -1e30f;  // engine.attention.NEG_INF: a row's running max before it has seen anything
constexpr int64_t kChunk = 256;    // key positions per online-softmax step (rounded to whole pages)
constexpr int64_t kTileRows = 120;  // query rows (tokens x G) per tile: the score block [R, kChunk] stays in L1/L2
constexpr int kRowBlock = 6;        // query rows per register tile
#if defined(__AVX512F__)
constexpr int kVecBlock = 4;  // vectors per register tile: 64 positions (scores) or 64 head dims (values); 24 of 32 registers
#else
constexpr int kVecBlock = 2;  // AVX2: 16 positions or head dims; 12 of 16 registers
#endif

struct Plan {
  int64_t t, k, g, h, p, np;  // shapes: tokens, kv heads, q per kv, head dim, page size, pool pages
  int64_t tile_tokens, tiles;  // query tiles of up to tile_tokens tokens
  int64_t cp, sc;  // context pages per chunk; positions per chunk buffer (a multiple of kLanes, >= cp * p)
  int64_t Rows() const { return tile_tokens * g; }
};

// Where a chunk's keys and values are: in the pool's pages (read in place when P is a multiple of kLanes) or in
// the worker's dense gather buffers.
struct Chunk {
  std::vector<const float*> keys;    // per kLanes positions: their key at head dim 0; dim h at + h * key_stride
  int64_t key_stride = 0;
  std::vector<const float*> values;  // per run of positions: its value rows [count, H]
  std::vector<int64_t> count, first;  // per run: its positions, and the chunk position of the first
  int64_t runs = 0;
};

// Cache lines to prefetch, issued a few at a time between the register tiles of the chunk before them: pages lie
// anywhere in the pool, so each is a new stream the hardware prefetcher picks up only after its first misses; issued
// all at once, the prefetch loop itself was a hot spot in profiles (it waits for free line fill buffers).
struct Prefetcher {
  std::vector<const float*> lines;
  size_t next = 0;
  void Add(const float* p, int64_t floats) {
    for (int64_t i = 0; i < floats; i += 64 / sizeof(float)) lines.push_back(p + i);
  }
  void Issue(size_t n) {
    for (const size_t end = std::min(lines.size(), next + n); next < end; ++next) __builtin_prefetch(lines[next]);
  }
  void Reset() {
    lines.clear();
    next = 0;
  }
};

// Per-thread buffers, kept across calls (fresh ones per call showed up in profiles as the kernel clearing pages).
struct Scratch {
  std::vector<float> q, s, kc, vc, m, l, acc;
  std::vector<int32_t> a, b, row_t, row_seg, shift;  // a, b: per key position; the rest per query row
  std::vector<char> active;  // per query row: 0 sees nothing of the chunk, 1 some, 2 all of it
  Chunk chunk;
  Prefetcher prefetch;
  void Size(const Plan& d) {
    const int64_t rows = d.Rows();
    q.resize(rows * d.h);
    s.resize(rows * d.sc);
    kc.resize(d.h * d.sc);
    vc.resize(d.sc * d.h);
    m.resize(rows);
    l.resize(rows);
    acc.resize(rows * d.h);
    a.resize(d.sc);
    b.resize(d.sc);
    row_t.resize(rows);
    row_seg.resize(rows);
    shift.resize(rows);
    active.resize(rows);
    chunk.keys.resize(d.sc / kLanes);
    chunk.values.resize(d.sc);
    chunk.count.resize(d.sc);
    chunk.first.resize(d.sc);
  }
};

// s[r][j] = sum_h q[r][h] * key[h][j] for RB rows and NV * kLanes positions (key blocks kb); s has row stride ld.
template <int RB, int NV>
inline void ScoreTile(const float* __restrict q, int64_t H, const float* const* kb, int64_t ks, float* __restrict s,
                      int64_t ld) {
  Vec acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = Vec{};
  for (int64_t h = 0; h < H; ++h) {
    Vec kv[NV];
    for (int j = 0; j < NV; ++j) kv[j] = Load(kb[j] + h * ks);
    for (int r = 0; r < RB; ++r) {
      const float qs = q[r * H + h];
      for (int j = 0; j < NV; ++j) acc[r][j] += qs * kv[j];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NV; ++j) Store(s + r * ld + j * kLanes, acc[r][j]);
}

// The scores of RB rows for the chunk's first `blocks` key blocks.
template <int RB>
void ScoreRows(const float* q, int64_t H, const Chunk& c, int64_t blocks, float* s, int64_t ld, Prefetcher& pf,
               size_t per_tile) {
  const float* const* kb = c.keys.data();
  int64_t b = 0;
  for (; b + kVecBlock <= blocks; b += kVecBlock) {
    pf.Issue(per_tile);
    ScoreTile<RB, kVecBlock>(q, H, kb + b, c.key_stride, s + b * kLanes, ld);
  }
  switch (blocks - b) {
    case 3: ScoreTile<RB, 3>(q, H, kb + b, c.key_stride, s + b * kLanes, ld); break;
    case 2: ScoreTile<RB, 2>(q, H, kb + b, c.key_stride, s + b * kLanes, ld); break;
    case 1: ScoreTile<RB, 1>(q, H, kb + b, c.key_stride, s + b * kLanes, ld); break;
    default: break;
  }
}

// acc[r][h0, h0 + HV * kLanes) += sum_j w[r][j] * value[j][same] over the chunk's runs; w has row stride ldw, acc H.
template <int RB, int HV>
inline void ValueTile(const float* __restrict w, int64_t ldw, const Chunk& c, int64_t H, int64_t h0,
                      float* __restrict acc) {
  Vec a[RB][HV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < HV; ++v) a[r][v] = Load(acc + r * H + h0 + v * kLanes);
  for (int64_t i = 0; i < c.runs; ++i) {
    const float* vp = c.values[i] + h0;
    const float* wr = w + c.first[i];
    for (int64_t j = 0; j < c.count[i]; ++j) {
      Vec vv[HV];
      for (int v = 0; v < HV; ++v) vv[v] = Load(vp + j * H + v * kLanes);
      for (int r = 0; r < RB; ++r) {
        const float ws = wr[r * ldw + j];
        for (int v = 0; v < HV; ++v) a[r][v] += ws * vv[v];
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < HV; ++v) Store(acc + r * H + h0 + v * kLanes, a[r][v]);
}

// acc[r] += w[r] x values for RB rows, over all H head dims (vector tiles, then single dims).
template <int RB>
void ValueRows(const float* w, int64_t ldw, const Chunk& c, int64_t H, float* acc, Prefetcher& pf, size_t per_tile) {
  int64_t h0 = 0;
  for (; h0 + kVecBlock * kLanes <= H; h0 += kVecBlock * kLanes) {
    pf.Issue(per_tile);
    ValueTile<RB, kVecBlock>(w, ldw, c, H, h0, acc);
  }
  switch ((H - h0) / kLanes) {
    case 3: ValueTile<RB, 3>(w, ldw, c, H, h0, acc); break;
    case 2: ValueTile<RB, 2>(w, ldw, c, H, h0, acc); break;
    case 1: ValueTile<RB, 1>(w, ldw, c, H, h0, acc); break;
    default: break;
  }
  for (h0 += (H - h0) / kLanes * kLanes; h0 < H; ++h0)  // head dims that are not a multiple of kLanes
    for (int r = 0; r < RB; ++r) {
      float a = acc[r * H + h0];
      for (int64_t i = 0; i < c.runs; ++i)
        for (int64_t j = 0; j < c.count[i]; ++j) a += w[r * ldw + c.first[i] + j] * c.values[i][j * H + h0];
      acc[r * H + h0] = a;
    }
}

// f(r0, RB) over rows [0, R) in blocks of up to kRowBlock.
template <typename F>
void ForRowBlocks(int64_t R, F&& f) {
  for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
    switch (std::min<int64_t>(kRowBlock, R - r0)) {
      case 1: f(r0, std::integral_constant<int, 1>()); break;
      case 2: f(r0, std::integral_constant<int, 2>()); break;
      case 3: f(r0, std::integral_constant<int, 3>()); break;
      case 4: f(r0, std::integral_constant<int, 4>()); break;
      case 5: f(r0, std::integral_constant<int, 5>()); break;
      default: f(r0, std::integral_constant<int, 6>()); break;
    }
  }
}

// Horizontal max / sum in a tree of halvings, not a serial chain of kLanes - 1 scalar steps.
typedef float V8 __attribute__((vector_size(8 * sizeof(float))));
typedef float V4 __attribute__((vector_size(4 * sizeof(float))));

inline V8 Eight(Vec v, bool max) {
#if defined(__AVX512F__)
  const V8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const V8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return max ? (a > b ? a : b) : a + b;
#else
  static_assert(kLanes == 8, "a vector is 8 floats without AVX-512");
  (void)max;
  return v;
#endif
}

inline float MaxOf(Vec v) {
  const V8 m8 = Eight(v, true);
  const V4 c = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), d = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const V4 m4 = c > d ? c : d;
  return std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
}

inline float SumOf(Vec v) {
  const V8 s8 = Eight(v, false);
  const V4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[1]) + (s4[2] + s4[3]);
}

// Which context positions a row sees: position j carries the ctx_rows bits of its page (0 past ctx_valid and past
// the chunk's end); a row of segment s >= 0 sees the ones with bit min(s, 31) set, padding none.
struct ContextMask {
  const int32_t* bits;   // [sc]
  const int32_t* shift;  // per row: min(segment, 31), or -1 (padding)
  IVec operator()(int64_t r, int64_t j0) const {
    const int32_t sh = shift[r];
    if (sh < 0) return IVec{};
    UVec b;
    std::memcpy(&b, bits + j0, sizeof(b));
    return ((b >> static_cast<uint32_t>(sh)) & 1u) != 0u;
  }
  bool Same(int64_t r, int64_t other) const { return shift[r] == shift[other]; }  // same positions seen
};

// Which of the pack's keys a row sees: key j is token key_t[j] (INT32_MAX past the chunk's end) of segment
// key_seg[j]; a row sees the keys of its own segment up to its own token.
struct CausalMask {
  const int32_t* key_t;    // [sc]
  const int32_t* key_seg;  // [sc]
  const int32_t* row_t;
  const int32_t* row_seg;
  IVec operator()(int64_t r, int64_t j0) const {
    return (LoadI(key_t + j0) <= row_t[r]) & (LoadI(key_seg + j0) == row_seg[r]);
  }
  bool Same(int64_t r, int64_t other) const { return row_t[r] == row_t[other] && row_seg[r] == row_seg[other]; }
};

// Marks which of the rows [0, R) see nothing, some or all of positions [0, npad); returns whether any sees some.
template <typename Mask>
bool MarkActive(int64_t R, int64_t npad, const Mask& mask, char* active) {
  bool any = false;
  for (int64_t r = 0; r < R; ++r) {
    if (r > 0 && mask.Same(r, r - 1)) {  // a token's G query heads (and, for the context, a segment's tokens)
      active[r] = active[r - 1];
      continue;
    }
    IVec some{}, all = IVec{} - 1;
    for (int64_t j0 = 0; j0 < npad; j0 += kLanes) {
      const IVec seen = mask(r, j0);
      some |= seen;
      all &= seen;
    }
    bool row_some = false, row_all = true;
    for (int i = 0; i < kLanes; ++i) {
      row_some |= some[i] != 0;
      row_all &= all[i] != 0;
    }
    active[r] = row_all ? 2 : row_some ? 1 : 0;
    any |= row_some;
  }
  return any;
}

// One online-softmax step of rows [0, R) over the chunk w.chunk of `blocks` key blocks of kLanes positions;
// `active` from MarkActive. Scores of positions a row may not see are never used (they may be NaN: a page's keys
// past ctx_valid), and the chunk's value runs cover only positions that hold real values. Updates each row's running
// max m, sum l and unnormalized output acc [R, H].
template <typename Mask>
void AttendChunk(const Plan& d, int64_t R, int64_t blocks, const Mask& mask, Scratch& w) {
  const int64_t H = d.h, ld = d.sc, npad = blocks * kLanes;
  const char* active = w.active.data();
  auto any_active = [&](int64_t r0, int64_t rb) {
    return std::any_of(active + r0, active + r0 + rb, [](char a) { return a != 0; });
  };
  // the prefetches spread over the chunk's register tiles: a few lines while each runs
  const size_t tiles = (R + kRowBlock - 1) / kRowBlock * (blocks / kVecBlock + H / (kVecBlock * kLanes)) + 1;
  const size_t per_tile = (w.prefetch.lines.size() + tiles - 1) / tiles;
  ForRowBlocks(R, [&](int64_t r0, auto rb) {
    if (any_active(r0, rb))
      ScoreRows<decltype(rb)::value>(w.q.data() + r0 * H, H, w.chunk, blocks, w.s.data() + r0 * ld, ld, w.prefetch,
                                     per_tile);
  });
  for (int64_t r = 0; r < R; ++r) {
    float* s = w.s.data() + r * ld;
    if (!active[r]) {  // in a block that runs: its weights are zeros
      std::fill(s, s + npad, 0.0f);
      continue;
    }
    const bool all = active[r] == 2;
    Vec vmax = Vec{} + kNegInf;
    for (int64_t j0 = 0; j0 < npad; j0 += kLanes) {
      const Vec x = Load(s + j0);
      vmax = (all ? x > vmax : (mask(r, j0) != 0) & (x > vmax)) ? x : vmax;
    }
    const float m_old = w.m[r], m_new = std::max(m_old, MaxOf(vmax));
    const float correction = ExpNonPositive(Vec{} + (m_old - m_new))[0];
    Vec sum{};
    if (all) {
      for (int64_t j0 = 0; j0 < npad; j0 += kLanes) {
        const Vec p = ExpNonPositive(Load(s + j0) - m_new);
        Store(s + j0, p);
        sum += p;
      }
    } else {
      for (int64_t j0 = 0; j0 < npad; j0 += kLanes) {
        const IVec seen = mask(r, j0) != 0;
        const Vec e = ExpNonPositive(seen ? Load(s + j0) - m_new : Vec{} - 100.0f);
        const Vec p = seen ? e : Vec{};
        Store(s + j0, p);
        sum += p;
      }
    }
    w.l[r] = w.l[r] * correction + SumOf(sum);
    w.m[r] = m_new;
    if (correction != 1.0f) {
      float* a = w.acc.data() + r * H;
      for (int64_t h = 0; h < H; ++h) a[h] *= correction;
    }
  }
  ForRowBlocks(R, [&](int64_t r0, auto rb) {
    if (any_active(r0, rb))
      ValueRows<decltype(rb)::value>(w.s.data() + r0 * ld, ld, w.chunk, H, w.acc.data() + r0 * H, w.prefetch, per_tile);
  });
}

Scratch& ThreadScratch(const Plan& d) {
  thread_local Scratch w;
  w.Size(d);
  return w;
}

struct Inputs {
  const float *q, *k, *v, *k_pool, *v_pool;  // the pools: float32 (null for an int8 cache)
  const int8_t *k_int8, *v_int8;              // an int8 cache's values (null for float32 pools)
  const uint16_t *k_scale, *v_scale;          // and their bfloat16 scales [Np, K, P]
  const int32_t* seg;
  const int32_t *ctx_pages, *ctx_rows, *ctx_valid;
  const int32_t* useful;  // the context entries some row of the pack sees, in order
  int64_t n_useful, splits;
};

// A tile's queries into w.q [R, H] (row = token * G + query head) and its rows' tokens and segments; returns R.
int64_t LoadTile(const Plan& d, const Inputs& in, int64_t tile, int64_t kv, Scratch& w) {
  const int64_t t0 = tile * d.tile_tokens, t1 = std::min(d.t, t0 + d.tile_tokens), G = d.g, H = d.h;
  for (int64_t t = t0; t < t1; ++t) {
    std::copy_n(in.q + (t * d.k + kv) * G * H, G * H, w.q.data() + (t - t0) * G * H);
    for (int64_t g = 0; g < G; ++g) {
      w.row_t[(t - t0) * G + g] = static_cast<int32_t>(t);
      w.row_seg[(t - t0) * G + g] = in.seg[t];
    }
  }
  return (t1 - t0) * G;
}

// The segments present in a tile, as ctx_rows bits.
uint32_t TileBits(const Plan& d, const Inputs& in, int64_t tile) {
  uint32_t bits = 0;
  for (int64_t t = tile * d.tile_tokens; t < std::min(d.t, (tile + 1) * d.tile_tokens); ++t)
    if (in.seg[t] >= 0) bits |= 1u << std::min(in.seg[t], 31);
  return bits;
}

// One page of an int8 cache into the gather buffers: keys [H, P] int8 x their per-position scale into rows of kc
// (row stride ld; positions past `valid` zero), the first `valid` value rows [P, H] x theirs into vc.
void DequantizePage(const int8_t* kp, const uint16_t* k_scale, const int8_t* vp, const uint16_t* v_scale, int64_t H,
                    int64_t P, int64_t valid, float* kc, int64_t ld, float* vc) {
  thread_local std::vector<float> scale;
  scale.assign(P + kLanes, 0.0f);  // positions past `valid` scale to 0: their keys come out zero
  for (int64_t p = 0; p < valid; ++p) scale[p] = meshserve::Bf16(k_scale[p]);
  for (int64_t h = 0; h < H; ++h) {
    const int8_t* src = kp + h * P;
    float* row = kc + h * ld;
    int64_t p = 0;
    for (; p + kLanes <= P; p += kLanes) Store(row + p, meshserve::LoadInt8(src + p) * Load(scale.data() + p));
    for (; p < P; ++p) row[p] = static_cast<float>(src[p]) * scale[p];
  }
  for (int64_t p = 0; p < valid; ++p) {
    const float s = meshserve::Bf16(v_scale[p]);
    const int8_t* src = vp + p * H;
    float* row = vc + p * H;
    int64_t h = 0;
    for (; h + kLanes <= H; h += kLanes) Store(row + h, meshserve::LoadInt8(src + h) * s);
    for (; h < H; ++h) row[h] = static_cast<float>(src[h]) * s;
  }
}

// The tile's rows (loaded by LoadTile, state from InitState) against one split of the context entries. Pages whose
// size is a multiple of kLanes are read in place; others are gathered into w.kc / w.vc first.
void ContextPass(const Plan& d, const Inputs& in, int64_t tile, int64_t kv, int64_t split, int64_t R, Scratch& w) {
  const int64_t H = d.h, P = d.p, ld = d.sc;
  const bool int8 = in.k_int8 != nullptr;
  const bool in_place = P % kLanes == 0 && !int8;  // an int8 page is dequantized into the gather buffers
  for (int64_t r = 0; r < R; ++r) w.shift[r] = w.row_seg[r] < 0 ? -1 : std::min(w.row_seg[r], 31);
  const uint32_t tile_bits = TileBits(d, in, tile);
  const ContextMask mask{w.a.data(), w.shift.data()};
  Chunk& chunk = w.chunk;
  chunk.key_stride = in_place ? P : ld;
  if (!in_place)
    for (int64_t b = 0; b < ld / kLanes; ++b) chunk.keys[b] = w.kc.data() + b * kLanes;
  const int64_t begin = split * in.n_useful / in.splits, end = (split + 1) * in.n_useful / in.splits;
  int64_t pages = 0;
  auto flush = [&](int64_t next) {  // attends to the gathered chunk, prefetching the next one's pages meanwhile
    w.prefetch.Reset();
    for (int64_t e = next, found = 0; e < end && found < d.cp; ++e) {
      const int64_t c = in.useful[e];
      if ((static_cast<uint32_t>(in.ctx_rows[c]) & tile_bits) == 0) continue;
      const int64_t base = (in.ctx_pages[c] * d.k + kv) * H * P, valid = std::min<int64_t>(in.ctx_valid[c], P);
      if (int8) {  // bytes, counted in floats
        w.prefetch.Add(reinterpret_cast<const float*>(in.k_int8 + base), (H * P + 3) / 4);
        w.prefetch.Add(reinterpret_cast<const float*>(in.v_int8 + base), (valid * H + 3) / 4);
      } else {
        w.prefetch.Add(in.k_pool + base, H * P);
        w.prefetch.Add(in.v_pool + base, valid * H);
      }
      ++found;
    }
    const int64_t n = pages * P, blocks = (n + kLanes - 1) / kLanes;
    if (!in_place)
      for (int64_t h = 0; h < H; ++h) std::fill(w.kc.data() + h * ld + n, w.kc.data() + h * ld + blocks * kLanes, 0.0f);
    std::fill(w.a.data() + n, w.a.data() + blocks * kLanes, 0);
    chunk.runs = pages;
    if (MarkActive(R, blocks * kLanes, mask, w.active.data())) AttendChunk(d, R, blocks, mask, w);
    w.prefetch.Issue(w.prefetch.lines.size());
    pages = 0;
  };
  for (int64_t e = begin; e < end; ++e) {
    const int64_t c = in.useful[e];
    const uint32_t bits = static_cast<uint32_t>(in.ctx_rows[c]);
    if ((bits & tile_bits) == 0) continue;
    const int64_t page = in.ctx_pages[c], valid = std::min<int64_t>(in.ctx_valid[c], P), at = pages * P;
    const int64_t base = (page * d.k + kv) * H * P;
    if (int8) {
      DequantizePage(in.k_int8 + base, in.k_scale + (page * d.k + kv) * P, in.v_int8 + base,
                     in.v_scale + (page * d.k + kv) * P, H, P, valid, w.kc.data() + at, ld, w.vc.data() + at * H);
      chunk.values[pages] = w.vc.data() + at * H;
    } else if (in_place) {
      const float* kp = in.k_pool + base;  // [H, P]
      const float* vp = in.v_pool + base;  // [P, H]
      for (int64_t b = 0; b < P / kLanes; ++b) chunk.keys[at / kLanes + b] = kp + b * kLanes;
      chunk.values[pages] = vp;
    } else {
      const float* kp = in.k_pool + base;
      const float* vp = in.v_pool + base;
      for (int64_t h = 0; h < H; ++h) {
        float* row = w.kc.data() + h * ld + at;
        std::copy_n(kp + h * P, valid, row);
        std::fill(row + valid, row + P, 0.0f);
      }
      std::copy_n(vp, valid * H, w.vc.data() + at * H);
      chunk.values[pages] = w.vc.data() + at * H;
    }
    chunk.count[pages] = valid;
    chunk.first[pages] = at;
    std::fill(w.a.data() + at, w.a.data() + at + valid, static_cast<int32_t>(bits));
    std::fill(w.a.data() + at + valid, w.a.data() + at + P, 0);
    if (++pages == d.cp) flush(e + 1);
  }
  if (pages > 0) flush(end);
}

// A fresh softmax state for rows [0, R): max, sum and unnormalized output.
void InitState(const Plan& d, int64_t R, Scratch& w) {
  std::fill_n(w.m.data(), R, kNegInf);
  std::fill_n(w.l.data(), R, 0.0f);
  std::fill_n(w.acc.data(), R * d.h, 0.0f);
}

// Where a (tile, kv head, split)'s state is kept between the phases: m, l [splits, K, T * G], acc [.., H].
struct Partials {
  float *m, *l, *acc;
  int64_t Row(const Plan& d, int64_t tile, int64_t kv, int64_t split) const {
    return (split * d.k + kv) * d.t * d.g + tile * d.tile_tokens * d.g;
  }
};

void SaveState(const Plan& d, const Partials& part, int64_t tile, int64_t kv, int64_t split, int64_t R,
               const Scratch& w) {
  const int64_t at = part.Row(d, tile, kv, split);
  std::copy_n(w.m.data(), R, part.m + at);
  std::copy_n(w.l.data(), R, part.l + at);
  std::copy_n(w.acc.data(), R * d.h, part.acc + at * d.h);
}

// The state of the tile's rows over all the context: the splits' states merged.
void MergeStates(const Plan& d, const Partials& part, int64_t splits, int64_t tile, int64_t kv, int64_t R,
                 Scratch& w) {
  const int64_t H = d.h;
  for (int64_t r = 0; r < R; ++r) {
    float m = kNegInf;
    for (int64_t s = 0; s < splits; ++s) m = std::max(m, part.m[part.Row(d, tile, kv, s) + r]);
    float l = 0.0f;
    float* a = w.acc.data() + r * H;
    std::fill_n(a, H, 0.0f);
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t at = part.Row(d, tile, kv, s) + r;
      const float scale = std::exp(part.m[at] - m);
      l += scale * part.l[at];
      for (int64_t h = 0; h < H; ++h) a[h] += scale * part.acc[at * H + h];
    }
    w.m[r] = m;
    w.l[r] = l;
  }
}

// The tile's rows against the pack's own keys (causal, same segment), continuing their state; then the normalized
// output.
void PackPass(const Plan& d, const Inputs& in, int64_t tile, int64_t kv, int64_t R, Scratch& w, float* out) {
  const int64_t H = d.h, G = d.g, ld = d.sc, t1 = std::min(d.t, (tile + 1) * d.tile_tokens);
  Chunk& chunk = w.chunk;
  chunk.key_stride = ld;
  for (int64_t b = 0; b < ld / kLanes; ++b) chunk.keys[b] = w.kc.data() + b * kLanes;
  chunk.values[0] = w.vc.data();
  chunk.first[0] = 0;
  chunk.runs = 1;
  w.prefetch.Reset();
  const CausalMask mask{w.a.data(), w.b.data(), w.row_t.data(), w.row_seg.data()};
  for (int64_t c0 = 0; c0 < t1; c0 += ld) {
    const int64_t n = std::min(ld, t1 - c0), blocks = (n + kLanes - 1) / kLanes;
    for (int64_t j = 0; j < blocks * kLanes; ++j) {
      w.a[j] = j < n ? static_cast<int32_t>(c0 + j) : std::numeric_limits<int32_t>::max();
      w.b[j] = j < n ? in.seg[c0 + j] : 0;
    }
    if (!MarkActive(R, blocks * kLanes, mask, w.active.data())) continue;
    for (int64_t j = 0; j < n; ++j) {
      const float* key = in.k + ((c0 + j) * d.k + kv) * H;
      for (int64_t h = 0; h < H; ++h) w.kc[h * ld + j] = key[h];
      std::copy_n(in.v + ((c0 + j) * d.k + kv) * H, H, w.vc.data() + j * H);
    }
    for (int64_t h = 0; h < H; ++h) std::fill(w.kc.data() + h * ld + n, w.kc.data() + h * ld + blocks * kLanes, 0.0f);
    chunk.count[0] = n;
    AttendChunk(d, R, blocks, mask, w);
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = w.row_t[r], g = r % G;
    const float inv = 1.0f / w.l[r];
    float* o = out + ((t * d.k + kv) * G + g) * H;
    for (int64_t h = 0; h < H; ++h) o[h] = w.acc[r * H + h] * inv;
  }
}

// The pools' shapes ([Np, K, H, P] keys, [Np, K, P, H] values) are checked by the caller; `in` holds their data.
ffi::Error Prefill(ffi::ThreadPool& thread_pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                   ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::S32>& segment_ids, int64_t pool_pages, int64_t P,
                   Inputs in, ffi::Buffer<ffi::S32>& ctx_pages, ffi::Buffer<ffi::S32>& ctx_rows,
                   ffi::Buffer<ffi::S32>& ctx_valid, ffi::Buffer<ffi::S32>& ctx_blocks, ffi::ResultBuffer<ffi::F32>& out,
                   int64_t block_pages) {
  const auto qd = q.dimensions();
  const int64_t T = qd[0], K = qd[1], G = qd[2], H = qd[3];
  const size_t new_count = static_cast<size_t>(T * K * H);
  if (k.element_count() != new_count || v.element_count() != new_count)
    return ffi::Error::InvalidArgument("k and v must be [T, K, H]");
  if (segment_ids.element_count() != static_cast<size_t>(T))
    return ffi::Error::InvalidArgument("segment_ids must be [T]");
  const size_t C = ctx_pages.element_count();
  if (ctx_rows.element_count() != C || ctx_valid.element_count() != C || ctx_blocks.element_count() != 1)
    return ffi::Error::InvalidArgument("ctx_pages, ctx_rows and ctx_valid must be [C], ctx_blocks a scalar");
  if (T == 0 || K == 0 || G == 0 || H == 0) return ffi::Error::Success();

  Plan d{T, K, G, H, P, pool_pages, 0, 0, 0, 0};
  d.cp = std::max<int64_t>(1, kChunk / d.p);
  d.sc = (std::max(d.cp * d.p, kChunk) + kLanes - 1) / kLanes * kLanes;
  d.tiles = (T * G + kTileRows - 1) / kTileRows;
  d.tile_tokens = (T + d.tiles - 1) / d.tiles;
  d.tiles = (T + d.tile_tokens - 1) / d.tile_tokens;

  // the context entries some segment of the pack sees (the rest are never read)
  const int32_t* seg = segment_ids.typed_data();
  uint32_t pack_bits = 0;
  for (int64_t t = 0; t < T; ++t)
    if (seg[t] >= 0) pack_bits |= 1u << std::min(seg[t], 31);
  const int64_t blocks = std::max<int64_t>(0, ctx_blocks.typed_data()[0]);
  const int64_t count = std::min<int64_t>(C, blocks * std::max<int64_t>(block_pages, 1));
  const int32_t *pages = ctx_pages.typed_data(), *rows = ctx_rows.typed_data(), *valid = ctx_valid.typed_data();
  thread_local std::vector<int32_t> useful;
  useful.clear();
  for (int64_t c = 0; c < count; ++c)
    if (valid[c] > 0 && pages[c] >= 0 && pages[c] < d.np && (static_cast<uint32_t>(rows[c]) & pack_bits) != 0)
      useful.push_back(static_cast<int32_t>(c));

  // enough (tile, kv head, split) items to keep every thread busy, each at least a chunk's worth of pages
  const int64_t n_useful = static_cast<int64_t>(useful.size());
  const int64_t threads = std::max<int64_t>(1, thread_pool.num_threads());
  int64_t splits = 0;
  if (n_useful > 0)
    splits = std::clamp<int64_t>((2 * threads + d.tiles * K - 1) / (d.tiles * K), 1, (n_useful + d.cp - 1) / d.cp);
  in.q = q.typed_data();
  in.k = k.typed_data();
  in.v = v.typed_data();
  in.seg = seg;
  in.ctx_pages = pages;
  in.ctx_rows = rows;
  in.ctx_valid = valid;
  in.useful = useful.data();
  in.n_useful = n_useful;
  in.splits = splits;
  float* op = out->typed_data();
  if (splits <= 1) {  // one pass per (tile, kv head)
    meshserve::ParallelFor(thread_pool, d.tiles * K, [=](int64_t i) {
      Scratch& w = ThreadScratch(d);
      const int64_t tile = i % d.tiles, kv = i / d.tiles, R = LoadTile(d, in, tile, kv, w);
      InitState(d, R, w);
      if (splits == 1) ContextPass(d, in, tile, kv, 0, R, w);
      PackPass(d, in, tile, kv, R, w, op);
    });
    return ffi::Error::Success();
  }
  // the context in (tile, kv head, split) items, then the splits merged and the pack's keys per (tile, kv head)
  thread_local std::vector<float> partials;
  const int64_t part_rows = splits * K * T * G;
  partials.resize(part_rows * (H + 2));
  const Partials part{partials.data(), partials.data() + part_rows, partials.data() + 2 * part_rows};
  meshserve::ParallelFor(thread_pool, d.tiles * K * splits, [=](int64_t i) {
    Scratch& w = ThreadScratch(d);
    const int64_t tile = i % d.tiles, kv = (i / d.tiles) % K, split = i / (d.tiles * K);
    const int64_t R = LoadTile(d, in, tile, kv, w);
    InitState(d, R, w);
    ContextPass(d, in, tile, kv, split, R, w);
    SaveState(d, part, tile, kv, split, R, w);
  });
  meshserve::ParallelFor(thread_pool, d.tiles * K, [=](int64_t i) {
    Scratch& w = ThreadScratch(d);
    const int64_t tile = i % d.tiles, kv = i / d.tiles, R = LoadTile(d, in, tile, kv, w);
    MergeStates(d, part, splits, tile, kv, R, w);
    PackPass(d, in, tile, kv, R, w, op);
  });
  return ffi::Error::Success();
}


ffi::Error PrefillAttention(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> segment_ids, ffi::Buffer<ffi::F32> k_pool,
                            ffi::Buffer<ffi::F32> v_pool, ffi::Buffer<ffi::S32> ctx_pages,
                            ffi::Buffer<ffi::S32> ctx_rows, ffi::Buffer<ffi::S32> ctx_valid,
                            ffi::Buffer<ffi::S32> ctx_blocks, ffi::ResultBuffer<ffi::F32> out, int64_t block_pages) {
  const auto qd = q.dimensions(), kd = k_pool.dimensions(), vd = v_pool.dimensions();
  if (qd.size() != 4) return ffi::Error::InvalidArgument("q must be [T, K, G, H]");
  if (!meshserve::PoolShapes(qd, kd, vd))
    return ffi::Error::InvalidArgument("pools must be [Np, K, H, P] (keys) and [Np, K, P, H] (values)");
  Inputs in{};
  in.k_pool = k_pool.typed_data();
  in.v_pool = v_pool.typed_data();
  return Prefill(thread_pool, q, k, v, segment_ids, kd[0], kd[3], in, ctx_pages, ctx_rows, ctx_valid, ctx_blocks, out,
                 block_pages);
}

// An int8 cache (engine.attention.Int8Pages): the pools' int8 values in the same layouts, and one bfloat16 scale per
// (page, kv head, position) for each; context pages are dequantized as they are gathered.
ffi::Error PrefillAttentionInt8(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> segment_ids,
                                ffi::Buffer<ffi::S8> k_values, ffi::Buffer<ffi::BF16> k_scale,
                                ffi::Buffer<ffi::S8> v_values, ffi::Buffer<ffi::BF16> v_scale,
                                ffi::Buffer<ffi::S32> ctx_pages, ffi::Buffer<ffi::S32> ctx_rows,
                                ffi::Buffer<ffi::S32> ctx_valid, ffi::Buffer<ffi::S32> ctx_blocks,
                                ffi::ResultBuffer<ffi::F32> out, int64_t block_pages) {
  const auto qd = q.dimensions(), kd = k_values.dimensions(), vd = v_values.dimensions();
  if (qd.size() != 4) return ffi::Error::InvalidArgument("q must be [T, K, G, H]");
  if (!meshserve::PoolShapes(qd, kd, vd))
    return ffi::Error::InvalidArgument("pools must be [Np, K, H, P] (keys) and [Np, K, P, H] (values)");
  const size_t scales = static_cast<size_t>(kd[0] * kd[1] * kd[3]);
  if (k_scale.element_count() != scales || v_scale.element_count() != scales)
    return ffi::Error::InvalidArgument("the pools' scales must be [Np, K, P]");
  Inputs in{};
  in.k_int8 = k_values.typed_data();
  in.v_int8 = v_values.typed_data();
  in.k_scale = reinterpret_cast<const uint16_t*>(k_scale.untyped_data());
  in.v_scale = reinterpret_cast<const uint16_t*>(v_scale.untyped_data());
  return Prefill(thread_pool, q, k, v, segment_ids, kd[0], kd[3], in, ctx_pages, ctx_rows, ctx_valid, ctx_blocks, out,
                 block_pages);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshservePrefillAttention, PrefillAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // segment_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pool
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ctx_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ctx_rows
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ctx_valid
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ctx_blocks
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int64_t>("block_pages"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshservePrefillAttentionInt8, PrefillAttentionInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::S32>>()   // segment_ids
                                  .Arg<ffi::Buffer<ffi::S8>>()    // key values
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // key scales
                                  .Arg<ffi::Buffer<ffi::S8>>()    // value values
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // value scales
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ctx_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ctx_rows
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ctx_valid
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ctx_blocks
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<int64_t>("block_pages"));
