// The CPU kernels of a few-row decode step (lmref/serving/matvec.py builds them and says why
// they exist; lmref/serving/fused_llama.py calls them):
//   matvec      y = rms_norm(x) W^T (+ residual), the norm only when asked, at the memory's
//               speed; W fp32, or int8 with a scale per output row (x then rounded to int16 a
//               row at a time, products summed exactly in int32);
//   rope_store  the rotary embedding of q and k, and k and v written into the slot cache;
//   attend      each row's attention over its own slot's columns.
//
// A matvec reads each weight once and does one multiply-add with it, so its speed is how fast
// it streams W. Each thread takes a block of rows and reads its part of W front to back; four
// rows of W at a time share each load of x (x stays in L1: 576 to 1536 floats). With several
// rows of x, each block of 4 rows of W (a few KB, in L1) meets every group of up to 4 rows of
// x before the next block is read; a row's sum is formed the same way whatever the other rows
// are, so its result does not depend on its batch.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kWidth = 16;
static inline Vec vzero() { return _mm512_setzero_ps(); }
static inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
using IVec = __m512i;  // 32 int16, or 16 int32 sums of pairs of their products
constexpr int64_t kPairs = 32;
static inline IVec izero() { return _mm512_setzero_si512(); }
static inline IVec iload(const int8_t* p) {  // 32 int8 widened to int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p));
}
static inline IVec iload(const int16_t* p) { return _mm512_loadu_si512(p); }
static inline IVec idot(IVec a, IVec b, IVec acc) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);  // VNNI: the two below in one instruction
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
static inline float isum(IVec v) { return vsum(_mm512_cvtepi32_ps(v)); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int64_t kWidth = 8;
static inline Vec vzero() { return _mm256_setzero_ps(); }
static inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
using IVec = __m256i;  // 16 int16, or 8 int32 sums of pairs of their products
constexpr int64_t kPairs = 16;
static inline IVec izero() { return _mm256_setzero_si256(); }
static inline IVec iload(const int8_t* p) {  // 16 int8 widened to int16
  return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));
}
static inline IVec iload(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline IVec idot(IVec a, IVec b, IVec acc) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}
static inline float isum(IVec v) { return vsum(_mm256_cvtepi32_ps(v)); }
#else
#error "built with -mavx512f or -mavx2 -mfma (lmref/serving/matvec.py picks the flags)"
#endif

// The two kinds of W: fp32 against fp32 x, and int8 against x quantized to int16 (integer
// products summed exactly in int32, then scaled: both scales applied once per sum).
struct Fp32 {
  using W = float;
  using X = float;
  using Acc = Vec;
  static constexpr int64_t kStep = kWidth;
  static Acc zero() { return vzero(); }
  static Acc load(const float* p) { return vload(p); }
  static Acc dot(Acc w, Acc x, Acc acc) { return vfma(w, x, acc); }
  static float sum(Acc a) { return vsum(a); }
};
struct Int8 {
  using W = int8_t;
  using X = int16_t;
  using Acc = IVec;
  static constexpr int64_t kStep = kPairs;
  static Acc zero() { return izero(); }
  static Acc load(const int8_t* p) { return iload(p); }
  static Acc load(const int16_t* p) { return iload(p); }
  static Acc dot(Acc w, Acc x, Acc acc) { return idot(w, x, acc); }
  static float sum(Acc a) { return isum(a); }
};

// How far ahead of its reads a thread asks for W. Without it, the int8 matrices of one
// SmolLM2 step (134.6 MB, most under 2 MB) were read at 26 GB/s, where the fp32 ones (4x the
// bytes, the same rows) reached 63: a small matrix ends before the hardware prefetcher has
// ramped up. Measured on the AVX-512 EPYC, one row, cold (ms for the int8 set): 1 KB ahead 4.2,
// 2.3 KB 3.7, 4.5 KB 3.1, 9 KB 2.4-2.5, 16 KB 2.8, 32 KB 2.9, 64 KB 3.3, none 5.0; fp32
// 8.7-8.8 at 9 KB against 9.5-9.7 with none in one run (the VM's speed drifted in the next).
constexpr int64_t kAhead = 9216;

struct Problem {  // y (m, out) = x (m, in) W^T (out, in), scaled, + residual
  const void* w;
  const void* x;
  const float* w_scale;  // per row of W, or null (fp32)
  const float* x_scale;  // per row of x, or null (fp32)
  const float* residual;  // (m, out) or null
  float* y;
  int64_t in, out, m;
};

// Rows of W [first, first + R) (R: 4, or 1 for the rows left over) against rows of x
// [row, row + G) (G: 1 to 4): every W vector loaded (and widened) once for the G rows of x.
template <typename K, int R, int G>
static inline void tile(const Problem& p, int64_t first, int64_t row) {
  using W = typename K::W;
  using X = typename K::X;
  const int64_t body = p.in - p.in % K::kStep;
  const W* wr[R];
  const X* xr[G];
  for (int k = 0; k < R; ++k) wr[k] = static_cast<const W*>(p.w) + (first + k) * p.in;
  for (int g = 0; g < G; ++g) xr[g] = static_cast<const X*>(p.x) + (row + g) * p.in;
  typename K::Acc a[G][R];
  for (int g = 0; g < G; ++g)
    for (int k = 0; k < R; ++k) a[g][k] = K::zero();
  for (int64_t i = 0; i < body; i += K::kStep) {
    typename K::Acc wk[R];
    for (int k = 0; k < R; ++k) _mm_prefetch((const char*)(wr[k] + i) + kAhead, _MM_HINT_T0);
    for (int k = 0; k < R; ++k) wk[k] = K::load(wr[k] + i);
    for (int g = 0; g < G; ++g) {
      const auto xi = K::load(xr[g] + i);
      for (int k = 0; k < R; ++k) a[g][k] = K::dot(wk[k], xi, a[g][k]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int k = 0; k < R; ++k) {
      float s = K::sum(a[g][k]);
      for (int64_t i = body; i < p.in; ++i) s += float(wr[k][i]) * float(xr[g][i]);
      if (p.w_scale) s *= p.w_scale[first + k] * p.x_scale[row + g];
      const int64_t at = (row + g) * p.out + first + k;
      p.y[at] = p.residual ? s + p.residual[at] : s;
    }
}

// Rows of W [first, first + R) against every row of x, in groups of up to 4 rows of x.
template <typename K, int R>
static inline void rows_of_w(const Problem& p, int64_t first) {
  int64_t row = 0;
  for (; row + 4 <= p.m; row += 4) tile<K, R, 4>(p, first, row);
  switch (p.m - row) {
    case 3: tile<K, R, 3>(p, first, row); break;
    case 2: tile<K, R, 2>(p, first, row); break;
    case 1: tile<K, R, 1>(p, first, row); break;
  }
}

template <typename K>
static void run(const Problem& p) {
  const int64_t blocks = p.out / 4;
  // Blocks of 4 rows, at least 16 blocks a task so that small matrices are not split finely.
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) rows_of_w<K, 4>(p, b * 4);
  });
  for (int64_t k = blocks * 4; k < p.out; ++k) rows_of_w<K, 1>(p, k);  // at most 3 rows left
}

// Each row of x to int16 with its own scale, max |x| / 32767: 15 significant bits against the
// row's largest value (a row's result does not depend on the other rows).
static void quantize_rows(const float* x, int64_t m, int64_t in, int16_t* q, float* scale) {
  for (int64_t row = 0; row < m; ++row, x += in, q += in) {
    float largest = 0.f;
    for (int64_t i = 0; i < in; ++i) largest = std::max(largest, std::fabs(x[i]));
    scale[row] = largest / 32767.f;
    const float inverse = largest > 0.f ? 32767.f / largest : 0.f;
    for (int64_t i = 0; i < in; ++i) q[i] = static_cast<int16_t>(std::nearbyint(x[i] * inverse));
  }
}

// RMSNorm of each row of x, as torch.rms_norm computes it: x * rsqrt(mean(x^2) + eps) * gain.
// A step's norms feed its matmuls only, so the kernel takes them on: one call instead of two,
// where torch.rms_norm alone took 6.7 us for one row of 576 (0.4 ms of a one-row step).
static torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& gain, double eps) {
  const int64_t m = x.size(0), in = x.size(1);
  TORCH_CHECK(gain.dim() == 1 && gain.size(0) == in && gain.is_contiguous() &&
                  gain.scalar_type() == torch::kFloat,
              "matvec: norm must be a contiguous fp32 vector of ", in, " values");
  auto normed = torch::empty_like(x);
  const float* g = gain.data_ptr<float>();
  for (int64_t row = 0; row < m; ++row) {
    const float* xr = x.data_ptr<float>() + row * in;
    float* out = normed.data_ptr<float>() + row * in;
    float squares = 0.f;
    for (int64_t i = 0; i < in; ++i) squares += xr[i] * xr[i];
    const float r = 1.f / std::sqrt(squares / in + static_cast<float>(eps));
    for (int64_t i = 0; i < in; ++i) out[i] = xr[i] * r * g[i];
  }
  return normed;
}

torch::Tensor matvec(const torch::Tensor& x_in, const torch::Tensor& weight,
                     const c10::optional<torch::Tensor>& residual,
                     const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& norm, double eps) {
  const bool int8 = weight.scalar_type() == torch::kChar;
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() &&
                  (int8 || weight.scalar_type() == torch::kFloat),
              "matvec: weight must be a contiguous fp32 or int8 (out, in) matrix");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == in && x_in.is_contiguous() &&
                  x_in.scalar_type() == torch::kFloat,
              "matvec: x must be contiguous fp32 rows of ", in, " values, got ", x_in.sizes());
  const torch::Tensor x = norm.has_value() ? rms_norm(x_in, *norm, eps) : x_in;
  const int64_t m = x.size(0);
  auto y = torch::empty({m, out}, x.options());
  Problem p{weight.data_ptr(), x.data_ptr(), nullptr, nullptr, nullptr, y.data_ptr<float>(),
            in, out, m};
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == torch::kFloat,
                "matvec: residual must be contiguous fp32 of shape ", y.sizes());
    p.residual = residual->data_ptr<float>();
  }
  TORCH_CHECK(int8 == scale.has_value(), "matvec: an int8 weight needs its scale, fp32 none");
  if (!int8) {
    run<Fp32>(p);
    return y;
  }
  TORCH_CHECK(scale->dim() == 1 && scale->size(0) == out && scale->is_contiguous() &&
                  scale->scalar_type() == torch::kFloat,
              "matvec: scale must be a contiguous fp32 vector of ", out, " values");
  auto quantized = torch::empty({m, in}, x.options().dtype(torch::kShort));
  auto x_scale = torch::empty({m}, x.options());
  quantize_rows(x.data_ptr<float>(), m, in, quantized.data_ptr<int16_t>(),
                x_scale.data_ptr<float>());
  p.x = quantized.data_ptr();
  p.w_scale = scale->data_ptr<float>();
  p.x_scale = x_scale.data_ptr<float>();
  run<Int8>(p);
  return y;
}

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

// One decode step's attention for each row over its own slot's columns 0..position (no mask to
// build or add): q (rows, heads, d) against layer's keys and values, heads grouped over the kv
// heads they share. (q k) * scale, softmax, the weighted sum of values: what the torch version
// in fused_llama does in two batched matmuls, an addition and a softmax, about 20 us a layer
// for one row, mostly the calls' own cost. Returns (rows, heads * d).
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                     int64_t layer, const torch::Tensor& positions, double scale) {
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == torch::kFloat && q.is_cpu() && q.dim() == 3,
              "attend: q must be a contiguous fp32 CPU (rows, heads, d) tensor");
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2);
  const SlotCache cache("attend", keys, values, layer, positions, n, d);
  const int64_t kv = cache.kv, columns = cache.columns;
  TORCH_CHECK(heads % kv == 0, "attend: ", heads, " q heads do not share ", kv, " kv heads");
  auto out = torch::empty({n, heads * d}, q.options());
  const int64_t groups = heads / kv;
  const float s = static_cast<float>(scale);
  at::parallel_for(0, n * kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(columns);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / kv, h = t % kv, width = cache.positions[r] + 1;
      const float* k = cache.keys_of(r, h);
      const float* v = cache.values_of(r, h);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t head = h * groups + g;
        const float* qh = q.data_ptr<float>() + (r * heads + head) * d;
        float* o = out.data_ptr<float>() + (r * heads + head) * d;
        float* sc = scores.data();
        std::fill(sc, sc + width, 0.f);
        for (int64_t j = 0; j < d; ++j) {  // keys lie (d, columns): a row of them per q value
          const float qj = qh[j];
          const float* kj = k + j * columns;
          for (int64_t c = 0; c < width; ++c) sc[c] += qj * kj[c];
        }
        float largest = -INFINITY;
        for (int64_t c = 0; c < width; ++c) largest = std::max(largest, sc[c] *= s);
        float total = 0.f;
        for (int64_t c = 0; c < width; ++c) total += (sc[c] = std::exp(sc[c] - largest));
        std::fill(o, o + d, 0.f);
        for (int64_t c = 0; c < width; ++c) {
          const float p = sc[c] / total;
          const float* vc = v + c * d;
          for (int64_t j = 0; j < d; ++j) o[j] += p * vc[j];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "each row's attention over its slot's columns 0..position",
        py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("layer"), py::arg("positions"),
        py::arg("scale"));
  m.def("rope_store", &rope_store,
        "rotate a decode step's q and k heads, write k and v into the cache at each row's "
        "position; returns q",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"),
        py::arg("layer"), py::arg("positions"));
  m.def("matvec", &matvec,
        "y = rms_norm(x) W^T (+ residual): fp32 rows; fp32 W, or int8 W with its scale; the "
        "norm (its gain and eps) only when given",
        py::arg("x"), py::arg("weight"), py::arg("residual") = py::none(),
        py::arg("scale") = py::none(), py::arg("norm") = py::none(), py::arg("eps") = 1e-6);
}
