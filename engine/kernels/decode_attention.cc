// Decode attention over the paged KV pool, for XLA:CPU through the XLA FFI (engine/attention.py's contract).
//
// Each slot's new key and value are written at its position lengths[b] (nowhere if that lies outside its W pages),
// then its one query attends to positions [0, lengths[b]], position pos living at offset pos % P of page
// table[b, pos / P]. Arguments: q [B, K, G, H] (pre-scaled), k_new and v_new [B, K, H], lengths [B] int32, table
// [B, W] int32, the key pool [Np, K, H, P] (transposed) and the value pool [Np, K, P, H]. Results: out [B, K, G, H],
// then the pools, which must alias the pool arguments (the write happens in place; XLA copies an argument first
// where it cannot give up the buffer). float32 only.
//
// An int8 KV cache (engine.attention.Int8Pages, kv_dtype='int8'): `MeshserveDecodeAttentionInt8` only reads, the
// new K/V being written (quantized) by XLA before it: the pools as int8 values in the same layouts plus one
// bfloat16 scale per (page, kv head, position), [Np, K, P] each. Scores are the int8 keys' products times each
// position's key scale; the softmax weights are multiplied by each position's value scale before the int8 values'
// weighted sum. A quarter of float32's bytes per cached position.
//
// Why a kernel: XLA:CPU runs the per-page batched products of this computation as B*K tiny [G, H] x [H, P] GEMMs,
// and those streamed the cache at a third of the machine's read bandwidth. Here each (slot, kv head) is one task
// that reads only the positions the slot has, once, with the exact softmax over all of them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using meshserve::kLanes;
using meshserve::Load;
using meshserve::Store;
using meshserve::ExpNonPositive;
using meshserve::Vec;

namespace {

struct Shape {
  int64_t b, k, g, h, p, window;
};

// scores[g][p] = sum_h q[g][h] * kp[h][p] for GB query heads and positions [0, np) of one key page [H, P].
// Blocks of kBlock * kLanes positions are accumulated in registers across all of H: the page is read in order, once.
constexpr int64_t kBlock = 4;  // vectors per register block: GB x kBlock accumulators (<= 16 of 32 AVX-512 registers)

inline Vec Row(const float* p) { return Load(p); }
inline Vec Row(const int8_t* p) { return meshserve::LoadInt8(p); }

template <int GB, typename T>
void Scores(const float* __restrict q, int64_t H, int64_t P, int64_t np, const T* __restrict kp,
            float* __restrict scores, int64_t stride) {
  int64_t p0 = 0;
  for (; p0 + kBlock * kLanes <= P && p0 < np; p0 += kBlock * kLanes) {
    Vec acc[GB][kBlock] = {};
    for (int64_t h = 0; h < H; ++h) {
      const T* row = kp + h * P + p0;
      for (int j = 0; j < kBlock; ++j) {
        const Vec k = Row(row + j * kLanes);
        for (int g = 0; g < GB; ++g) acc[g][j] += q[g * H + h] * k;
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < kBlock; ++j) Store(scores + g * stride + p0 + j * kLanes, acc[g][j]);
  }
  for (; p0 + kLanes <= P && p0 < np; p0 += kLanes) {  // pages of 16..48 positions: one vector at a time
    Vec acc[GB] = {};
    for (int64_t h = 0; h < H; ++h) {
      const Vec k = Row(kp + h * P + p0);
      for (int g = 0; g < GB; ++g) acc[g] += q[g * H + h] * k;
    }
    for (int g = 0; g < GB; ++g) Store(scores + g * stride + p0, acc[g]);
  }
  for (; p0 < np; ++p0)  // page sizes that are not a multiple of kLanes
    for (int g = 0; g < GB; ++g) {
      float acc = 0.0f;
      for (int64_t h = 0; h < H; ++h) acc += q[g * H + h] * static_cast<float>(kp[h * P + p0]);
      scores[g * stride + p0] = acc;
    }
}

// out[g][h] += sum_p w[g][p] * vp[p][h] over positions [0, np) of one value page [P, H]; rows are read in order
// (all of a row's head dims at once when H <= kBlock * kLanes).
template <int GB, typename T>
void Values(const float* __restrict w, int64_t stride, int64_t H, int64_t np, const T* __restrict vp,
            float* __restrict out) {
  int64_t h0 = 0;
  for (; h0 + kBlock * kLanes <= H; h0 += kBlock * kLanes) {
    Vec acc[GB][kBlock];
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < kBlock; ++j) acc[g][j] = Load(out + g * H + h0 + j * kLanes);
    for (int64_t p = 0; p < np; ++p) {
      const T* row = vp + p * H + h0;
      for (int j = 0; j < kBlock; ++j) {
        const Vec v = Row(row + j * kLanes);
        for (int g = 0; g < GB; ++g) acc[g][j] += w[g * stride + p] * v;
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int j = 0; j < kBlock; ++j) Store(out + g * H + h0 + j * kLanes, acc[g][j]);
  }
  for (; h0 < H; ++h0)  // head dims that are not a multiple of kBlock * kLanes
    for (int g = 0; g < GB; ++g) {
      float acc = out[g * H + h0];
      for (int64_t p = 0; p < np; ++p) acc += w[g * stride + p] * static_cast<float>(vp[p * H + h0]);
      out[g * H + h0] = acc;
    }
}

// Query heads go through in blocks of up to 4 (G = 3 for SmolLM2, 4 or 8 for Llama 3).
template <typename F>
void ForBlocks(int64_t G, F&& f) {
  for (int64_t g = 0; g < G; g += 4) {
    switch (std::min<int64_t>(4, G - g)) {
      case 1: f(g, std::integral_constant<int, 1>()); break;
      case 2: f(g, std::integral_constant<int, 2>()); break;
      case 3: f(g, std::integral_constant<int, 3>()); break;
      default: f(g, std::integral_constant<int, 4>()); break;
    }
  }
}

// In-place softmax over x[0, n).
inline void Softmax(float* x, int64_t n) {
  Vec vmax = Vec{} + x[0];
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    const Vec v = Load(x + t);
    vmax = v > vmax ? v : vmax;
  }
  float m = x[0];
  for (int i = 0; i < kLanes; ++i) m = std::max(m, vmax[i]);
  for (; t < n; ++t) m = std::max(m, x[t]);
  Vec sum{};
  t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    const Vec e = ExpNonPositive(Load(x + t) - m);
    Store(x + t, e);
    sum += e;
  }
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += sum[i];
  for (; t < n; ++t) total += (x[t] = std::exp(x[t] - m));
  const float inv = 1.0f / total;
  for (t = 0; t < n; ++t) x[t] *= inv;
}

template <typename T>
struct Pool {
  T* k;  // [Np, K, H, P]
  T* v;  // [Np, K, P, H]
  const int32_t* table;  // [B, W]
  int64_t pages;
  const uint16_t* k_scale = nullptr;  // int8 pools: bfloat16 [Np, K, P]
  const uint16_t* v_scale = nullptr;
};

// Writes one (slot, kv head)'s new key and value at position `length` through the slot's page table.
void WriteOne(const Shape& s, const Pool<float>& pool, int64_t item, int64_t length, const float* k_new, const float* v_new) {
  const int64_t H = s.h, P = s.p, b = item / s.k, kv = item % s.k;
  if (length < 0 || length >= s.window * P) return;
  const int64_t page = pool.table[b * s.window + length / P];
  if (page < 0 || page >= pool.pages) return;
  const int64_t base = (page * s.k + kv) * H * P;
  float* kp = pool.k + base;  // [H, P]
  float* vp = pool.v + base + (length % P) * H;  // row [H]
  for (int64_t h = 0; h < H; ++h) kp[h * P + length % P] = k_new[item * H + h];
  std::copy_n(v_new + item * H, H, vp);
}

// One (slot, kv head): scores, softmax and the weighted sum of values; `scratch` holds G * window * P floats, and for
// int8 pools G * P more (a page's softmax weights times its value scales).
template <typename T>
void AttendOne(const Shape& s, const Pool<T>& pool, int64_t item, const float* q, int64_t length, float* out,
               float* scratch) {
  constexpr bool kInt8 = std::is_same<T, int8_t>::value;
  const int64_t G = s.g, H = s.h, P = s.p, S = s.window * P, b = item / s.k, kv = item % s.k;
  const int64_t n = std::clamp<int64_t>(length + 1, 0, S);
  float* o = out + item * G * H;
  std::fill(o, o + G * H, 0.0f);
  if (n == 0) return;
  const float* qh = q + item * G * H;
  auto page_of = [&](int64_t c) {
    return (std::clamp<int64_t>(pool.table[b * s.window + c], 0, pool.pages - 1) * s.k + kv);
  };
  for (int64_t c = 0; c * P < n; ++c) {
    const int64_t np = std::min(P, n - c * P), page = page_of(c);
    const T* kp = pool.k + page * H * P;
    ForBlocks(G, [&](int64_t g, auto gb) {
      Scores<decltype(gb)::value>(qh + g * H, H, P, np, kp, scratch + g * S + c * P, S);
    });
    if constexpr (kInt8) {
      const uint16_t* scale = pool.k_scale + page * P;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t p = 0; p < np; ++p) scratch[g * S + c * P + p] *= meshserve::Bf16(scale[p]);
    }
  }
  for (int64_t g = 0; g < G; ++g) Softmax(scratch + g * S, n);
  float* scaled = scratch + G * S;  // int8: [G, P]
  for (int64_t c = 0; c * P < n; ++c) {
    const int64_t np = std::min(P, n - c * P), page = page_of(c);
    const T* vp = pool.v + page * P * H;
    const float* w = scratch + c * P;
    int64_t stride = S;
    if constexpr (kInt8) {
      const uint16_t* scale = pool.v_scale + page * P;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t p = 0; p < np; ++p) scaled[g * P + p] = w[g * S + p] * meshserve::Bf16(scale[p]);
      w = scaled;
      stride = P;
    }
    ForBlocks(G, [&](int64_t g, auto gb) {
      Values<decltype(gb)::value>(w + g * stride, stride, H, np, vp, o + g * H);
    });
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                           ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> table,
                           ffi::Buffer<ffi::F32> k_pool, ffi::Buffer<ffi::F32> v_pool, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out) {
  const auto qd = q.dimensions(), td = table.dimensions(), kd = k_pool.dimensions(), vd = v_pool.dimensions();
  if (qd.size() != 4) return ffi::Error::InvalidArgument("q must be [B, K, G, H]");
  if (td.size() != 2 || td[0] != qd[0]) return ffi::Error::InvalidArgument("table must be [B, W]");
  if (!meshserve::PoolShapes(qd, kd, vd))
    return ffi::Error::InvalidArgument("pools must be [Np, K, H, P] (keys) and [Np, K, P, H] (values)");
  Shape s{qd[0], qd[1], qd[2], qd[3], kd[3], td[1]};
  if (lengths.element_count() != static_cast<size_t>(s.b))
    return ffi::Error::InvalidArgument("lengths must be [B]");
  const size_t new_count = static_cast<size_t>(s.b * s.k * s.h);
  if (k_new.element_count() != new_count || v_new.element_count() != new_count)
    return ffi::Error::InvalidArgument("k_new and v_new must be [B, K, H]");
  if (k_out->untyped_data() != k_pool.untyped_data() || v_out->untyped_data() != v_pool.untyped_data())
    return ffi::Error::InvalidArgument("the pool results must alias the pool arguments (input_output_aliases)");
  const Pool<float> pool{k_out->typed_data(), v_out->typed_data(), table.typed_data(), kd[0]};

  const float *qp = q.typed_data(), *kn = k_new.typed_data(), *vn = v_new.typed_data();
  const int32_t* lp = lengths.typed_data();
  float* op = out->typed_data();
  const int64_t items = s.b * s.k;
  meshserve::ParallelFor(thread_pool, items, [=, scratch = std::vector<float>()](int64_t i) mutable {
    if (scratch.empty()) scratch.resize(s.g * s.window * s.p + kLanes);
    const int64_t length = lp[i / s.k];
    WriteOne(s, pool, i, length, kn, vn);
    AttendOne(s, pool, i, qp, length, op, scratch.data());
  });
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionInt8(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> lengths,
                               ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S8> k_values, ffi::Buffer<ffi::BF16> k_scale,
                               ffi::Buffer<ffi::S8> v_values, ffi::Buffer<ffi::BF16> v_scale,
                               ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), td = table.dimensions(), kd = k_values.dimensions(), vd = v_values.dimensions();
  if (qd.size() != 4) return ffi::Error::InvalidArgument("q must be [B, K, G, H]");
  if (td.size() != 2 || td[0] != qd[0]) return ffi::Error::InvalidArgument("table must be [B, W]");
  if (!meshserve::PoolShapes(qd, kd, vd))
    return ffi::Error::InvalidArgument("pools must be [Np, K, H, P] (keys) and [Np, K, P, H] (values)");
  const size_t scales = static_cast<size_t>(kd[0] * kd[1] * kd[3]);
  if (k_scale.element_count() != scales || v_scale.element_count() != scales)
    return ffi::Error::InvalidArgument("the pools' scales must be [Np, K, P]");
  Shape s{qd[0], qd[1], qd[2], qd[3], kd[3], td[1]};
  if (lengths.element_count() != static_cast<size_t>(s.b))
    return ffi::Error::InvalidArgument("lengths must be [B]");
  Pool<int8_t> pool{k_values.typed_data(), v_values.typed_data(), table.typed_data(), kd[0]};
  pool.k_scale = reinterpret_cast<const uint16_t*>(k_scale.untyped_data());
  pool.v_scale = reinterpret_cast<const uint16_t*>(v_scale.untyped_data());
  const float* qp = q.typed_data();
  const int32_t* lp = lengths.typed_data();
  float* op = out->typed_data();
  meshserve::ParallelFor(thread_pool, s.b * s.k, [=, scratch = std::vector<float>()](int64_t i) mutable {
    if (scratch.empty()) scratch.resize(s.g * (s.window + 1) * s.p + kLanes);
    AttendOne(s, pool, i, qp, lp[i / s.k], op, scratch.data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshserveDecodeAttentionInt8, DecodeAttentionInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::S32>>()   // lengths
                                  .Arg<ffi::Buffer<ffi::S32>>()   // table
                                  .Arg<ffi::Buffer<ffi::S8>>()    // key values
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // key scales
                                  .Arg<ffi::Buffer<ffi::S8>>()    // value values
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // value scales
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshserveDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths
                                  .Arg<ffi::Buffer<ffi::S32>>()  // table
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pool
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k_pool, written
                                  .Ret<ffi::Buffer<ffi::F32>>());  // v_pool, written
