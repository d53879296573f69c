// The attention side of a decode step over lmref's slot cache (lmref/serving/fused_llama.py's
// layout; lmref/serving/matvec.py builds it with matvec.cpp, which binds it to Python):
//   rope_store  the rotary embedding of q and k, and k and v written into the slot cache;
//   attend      each row's attention over its own slot's columns.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

// One layer of the slot cache as rope_store and attend read and write it (lmref.serving.
// fused_llama's layout): keys (layers, slots, kv, d, columns), values (layers, slots, kv,
// columns, d); rows are slots 0..n-1, row r's new token at positions[r]. Everything is checked
// here, before either kernel writes anything: a bad position fails the call, not its later rows.
struct SlotCache {
  float* keys;
  float* values;
  const int64_t* positions;
  int64_t kv, d, columns, first_slot;  // first_slot: layer * slots

  SlotCache(const char* who, const torch::Tensor& keys_all, const torch::Tensor& values_all,
            int64_t layer, const torch::Tensor& rows_positions, int64_t n, int64_t head_dim) {
    for (const auto* t : {&keys_all, &values_all})
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat && t->is_cpu(), who,
                  ": keys and values must be contiguous fp32 CPU tensors");
    TORCH_CHECK(keys_all.dim() == 5 && values_all.dim() == 5, who, ": keys and values 5-d");
    const int64_t slots = keys_all.size(1);
    kv = keys_all.size(2), d = keys_all.size(3), columns = keys_all.size(4);
    TORCH_CHECK(kv > 0 && d == head_dim && values_all.sizes() ==
                    torch::IntArrayRef({keys_all.size(0), slots, kv, columns, d}) &&
                    n <= slots && 0 <= layer && layer < keys_all.size(0),
                who, ": rows of head_dim ", head_dim, " do not fit keys ", keys_all.sizes(),
                " and values ", values_all.sizes(), " at layer ", layer);
    TORCH_CHECK(rows_positions.dim() == 1 && rows_positions.size(0) == n &&
                    rows_positions.scalar_type() == torch::kLong && rows_positions.is_contiguous(),
                who, ": positions must be a contiguous int64 vector of the rows");
    positions = rows_positions.data_ptr<int64_t>();
    for (int64_t r = 0; r < n; ++r)
      TORCH_CHECK(0 <= positions[r] && positions[r] < columns, who, ": position ", positions[r],
                  " outside the cache's ", columns, " columns");
    keys = keys_all.data_ptr<float>(), values = values_all.data_ptr<float>();
    first_slot = layer * slots;
  }
  float* keys_of(int64_t r, int64_t h) const {  // (d, columns)
    return keys + ((first_slot + r) * kv + h) * d * columns;
  }
  float* values_of(int64_t r, int64_t h) const {  // (columns, d)
    return values + ((first_slot + r) * kv + h) * columns * d;
  }
};

// The rotary embedding of a decode step's q and k heads, and the new key and value of each row
// written into the slot cache: five torch calls a layer (a multiply, a roll, an addcmul and two
// indexed writes) in one, about 12 us of a one-row step's layer. Returns the rotated q heads,
// (n, heads, d).
constexpr int64_t kMaxHeadDim = 1024;

torch::Tensor rope_store(const torch::Tensor& qkv, const torch::Tensor& cos,
                         const torch::Tensor& sin, const torch::Tensor& keys,
                         const torch::Tensor& values, int64_t layer,
                         const torch::Tensor& positions) {
  for (const auto* t : {&qkv, &cos, &sin})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == torch::kFloat && t->is_cpu(),
                "rope_store: qkv, cos and sin must be contiguous fp32 CPU tensors");
  TORCH_CHECK(qkv.dim() == 3, "rope_store: qkv must be (rows, heads + 2 kv, d)");
  const int64_t n = qkv.size(0), d = qkv.size(2), half = d / 2;
  const SlotCache cache("rope_store", keys, values, layer, positions, n, d);
  const int64_t kv = cache.kv, heads = qkv.size(1) - 2 * kv;
  TORCH_CHECK(d % 2 == 0 && d <= kMaxHeadDim && heads > 0, "rope_store: qkv ", qkv.sizes(),
              " does not fit keys ", keys.sizes());
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == n && cos.size(1) == d,
              "rope_store: cos and sin must be (rows, d)");
  auto q = torch::empty({n, heads, d}, qkv.options());
  for (int64_t r = 0; r < n; ++r) {
    const int64_t at = cache.positions[r];
    const float* c = cos.data_ptr<float>() + r * d;
    const float* s = sin.data_ptr<float>() + r * d;
    const float* row = qkv.data_ptr<float>() + r * (heads + 2 * kv) * d;
    for (int64_t h = 0; h < heads + kv; ++h) {  // q heads, then k heads: rotated
      const float* x = row + h * d;
      float rotated[kMaxHeadDim];  // x * cos + roll(x, d / 2) * signed sin
      for (int64_t j = 0; j < half; ++j) rotated[j] = x[j] * c[j] + x[j + half] * s[j];
      for (int64_t j = half; j < d; ++j) rotated[j] = x[j] * c[j] + x[j - half] * s[j];
      if (h < heads) {
        std::copy(rotated, rotated + d, q.data_ptr<float>() + (r * heads + h) * d);
      } else {  // keys[layer, r, h - heads, :, at]: one column, strided
        float* k = cache.keys_of(r, h - heads);
        for (int64_t j = 0; j < d; ++j) k[j * cache.columns + at] = rotated[j];
      }
    }
    for (int64_t h = 0; h < kv; ++h) {  // values[layer, r, h, at, :]: one row, as computed
      const float* v = row + (heads + kv + h) * d;
      std::copy(v, v + d, cache.values_of(r, h) + at * d);
    }
  }
  return q;
}

// attend's two products are one shape: out[offset + b] = sum over i < count of a[i] *
// m[i * stride + offset + b], for a block of B vectors of b, the sums kept in registers over the
// whole of i (as plain loops, each multiply-add loaded and stored its running sum, and torch's
// bmm was as fast). Scores: m the keys (d, columns), i over d, a the q head, b over columns.
// Output: m the values (columns, d), i over the columns, a the softmax weights, b over d.
template <int B>
static inline void weighted_rows(const float* m, int64_t stride, int64_t count, const float* a,
                                 float* out, int64_t offset) {
  Vec acc[B];
  for (int b = 0; b < B; ++b) acc[b] = vzero();
  for (int64_t i = 0; i < count; ++i) {
    const Vec ai = vset(a[i]);
    const float* row = m + i * stride + offset;
    for (int b = 0; b < B; ++b) acc[b] = vfma(ai, vload(row + b * kWidth), acc[b]);
  }
  for (int b = 0; b < B; ++b) vstore(out + offset + b * kWidth, acc[b]);
}

// One decode step's attention for each row over its own slot's columns 0..position (no mask to
// build or add): q (rows, heads, d) against layer's keys and values, heads grouped over the kv
// heads they share. (q k) * scale, softmax, the weighted sum of values: what the torch version
// in fused_llama does in two batched matmuls, an addition and a softmax (20 us a layer for one
// row, mostly the calls' own cost). Returns (rows, heads * d).
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                     int64_t layer, const torch::Tensor& positions, double scale) {
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == torch::kFloat && q.is_cpu() && q.dim() == 3,
              "attend: q must be a contiguous fp32 CPU (rows, heads, d) tensor");
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2);
  const SlotCache cache("attend", keys, values, layer, positions, n, d);
  const int64_t kv = cache.kv, columns = cache.columns;
  TORCH_CHECK(heads % kv == 0, "attend: ", heads, " q heads do not share ", kv, " kv heads");
  auto out = torch::empty({n, heads * d}, q.options());
  const int64_t padded = (columns + kWidth - 1) / kWidth * kWidth;
  const Vec s = vset(static_cast<float>(scale));
  at::parallel_for(0, n * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(padded);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / heads, head = t % heads, width = cache.positions[r] + 1;
      const int64_t kv_head = head / (heads / kv), vectors = (width + kWidth - 1) / kWidth;
      const float* k = cache.keys_of(r, kv_head);
      const float* v = cache.values_of(r, kv_head);
      const float* qh = q.data_ptr<float>() + (r * heads + head) * d;
      float* o = out.data_ptr<float>() + (r * heads + head) * d;
      float* sc = scores.data();
      int64_t c = 0;  // whole vectors of columns; the last few one at a time (none past width)
      for (; c + 4 * kWidth <= width; c += 4 * kWidth) weighted_rows<4>(k, columns, d, qh, sc, c);
      for (; c + kWidth <= width; c += kWidth) weighted_rows<1>(k, columns, d, qh, sc, c);
      for (; c < width; ++c) {
        float a = 0.f;
        for (int64_t j = 0; j < d; ++j) a += qh[j] * k[j * columns + c];
        sc[c] = a;
      }
      for (c = width; c < vectors * kWidth; ++c) sc[c] = -INFINITY;  // not attended
      Vec largest_v = vset(-INFINITY);
      for (c = 0; c < width; c += kWidth) {
        const Vec scaled = vmul(vload(sc + c), s);
        vstore(sc + c, scaled);
        largest_v = vmaxv(largest_v, scaled);
      }
      const Vec minus_largest = vset(-vmax(largest_v));
      Vec total_v = vzero();
      for (c = 0; c < width; c += kWidth) {
        const Vec e = vexp(vadd(vload(sc + c), minus_largest));
        vstore(sc + c, e);
        total_v = vadd(total_v, e);
      }
      const float inverse = 1.f / vsum(total_v);  // the padding's exp(-87)s: 1e-38 each
      for (c = 0; c < width; ++c) sc[c] *= inverse;
      int64_t j = 0;
      for (; j + 4 * kWidth <= d; j += 4 * kWidth) weighted_rows<4>(v, d, width, sc, o, j);
      for (; j + kWidth <= d; j += kWidth) weighted_rows<1>(v, d, width, sc, o, j);
      for (; j < d; ++j) {
        float a = 0.f;
        for (c = 0; c < width; ++c) a += sc[c] * v[c * d + j];
        o[j] = a;
      }
    }
  });
  return out;
}
