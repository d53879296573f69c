// The matmuls of a few-row decode step (lmref/serving/matvec.py builds them with attend.cpp, and
// says why they exist; lmref/serving/fused_llama.py calls them):
//   matvec      y = rms_norm(x) W^T (+ residual), the norm only when asked, at the memory's
//               speed; W fp32, or int8 with a scale per output row (x then rounded to int16 a
//               row at a time, products summed exactly in int32).
// This file also binds attend.cpp's rope_store and attend to Python.
//
// A matvec reads each weight once and does one multiply-add with it, so its speed is how fast
// it streams W. Each thread takes a block of rows and reads its part of W front to back; four
// rows of W at a time share each load of x (x stays in L1: 576 to 1536 floats). With several
// rows of x, each block of 4 rows of W (a few KB, in L1) meets every group of up to 4 rows of
// x before the next block is read; a row's sum is formed the same way whatever the other rows
// are, so its result does not depend on its batch.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "simd.h"

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

// The per-row work before a matmul (the norm, int16 rounding) in vectors, rows split over the
// threads when there are many: written as plain loops, their sums and maxima ran one element at
// a time (a float reduction is not reordered without -ffast-math), and on one thread: at 64
// rows, 0.1 ms a matmul, several ms a step. A row's result is the same whatever the other rows.
static void for_rows(int64_t m, int64_t in, const std::function<void(int64_t)>& body) {
  at::parallel_for(0, m, std::max<int64_t>(1, 32768 / in), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) body(row);
  });
}

// Each row of x to int16 with its own scale, max |x| / 32767: 15 significant bits against the
// row's largest value (a row's result does not depend on the other rows).
static void quantize_rows(const float* x, int64_t m, int64_t in, int16_t* q, float* scale) {
  const int64_t body = in - in % kWidth;
  for_rows(m, in, [&](int64_t row) {
    const float* xr = x + row * in;
    int16_t* qr = q + row * in;
    Vec largest_v = vzero();
    for (int64_t i = 0; i < body; i += kWidth) largest_v = vabsmax(vload(xr + i), largest_v);
    float largest = vmax(largest_v);
    for (int64_t i = body; i < in; ++i) largest = std::max(largest, std::fabs(xr[i]));
    scale[row] = largest / 32767.f;
    const float inverse = largest > 0.f ? 32767.f / largest : 0.f;
    const Vec inverse_v = vset(inverse);
    for (int64_t i = 0; i < body; i += kWidth) vstore(qr + i, vmul(vload(xr + i), inverse_v));
    for (int64_t i = body; i < in; ++i)
      qr[i] = static_cast<int16_t>(std::nearbyint(xr[i] * inverse));
  });
}

// RMSNorm of each row of x, as torch.rms_norm computes it: x * rsqrt(mean(x^2) + eps) * gain.
// A step's norms feed its matmuls only, so the kernel takes them on: one call instead of two,
// where torch.rms_norm alone took 6.7 us for one row of 576 (0.4 ms of a one-row step).
static torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& gain, double eps) {
  const int64_t m = x.size(0), in = x.size(1), body = in - in % kWidth;
  TORCH_CHECK(gain.dim() == 1 && gain.size(0) == in && gain.is_contiguous() &&
                  gain.scalar_type() == torch::kFloat,
              "matvec: norm must be a contiguous fp32 vector of ", in, " values");
  auto normed = torch::empty_like(x);
  const float* g = gain.data_ptr<float>();
  for_rows(m, in, [&](int64_t row) {
    const float* xr = x.data_ptr<float>() + row * in;
    float* out = normed.data_ptr<float>() + row * in;
    Vec squares_v = vzero();
    for (int64_t i = 0; i < body; i += kWidth) {
      const Vec v = vload(xr + i);
      squares_v = vfma(v, v, squares_v);
    }
    float squares = vsum(squares_v);
    for (int64_t i = body; i < in; ++i) squares += xr[i] * xr[i];
    const float r = 1.f / std::sqrt(squares / in + static_cast<float>(eps));
    const Vec r_v = vset(r);
    for (int64_t i = 0; i < body; i += kWidth)
      vstore(out + i, vmul(vmul(vload(xr + i), r_v), vload(g + i)));
    for (int64_t i = body; i < in; ++i) out[i] = xr[i] * r * g[i];
  });
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

torch::Tensor rope_store(const torch::Tensor& qkv, const torch::Tensor& cos,
                         const torch::Tensor& sin, const torch::Tensor& keys,
                         const torch::Tensor& values, int64_t layer,
                         const torch::Tensor& positions);  // attend.cpp
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                     int64_t layer, const torch::Tensor& positions, double scale);  // attend.cpp

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
