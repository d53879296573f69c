// One row against a weight matrix, y = x W^T (+ residual), fp32, at the memory's speed: the
// matvec of single-stream decode. lmref/serving/matvec.py builds it and says why it exists.
//
// A matvec reads each weight once and does one multiply-add with it, so its speed is how fast
// it streams W. Each thread takes a block of rows and reads its part of W front to back; four
// rows at a time share each load of x (x stays in L1: 576 to 1536 floats).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kWidth = 16;
static inline Vec vzero() { return _mm512_setzero_ps(); }
static inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
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
#else
#error "built with -mavx512f or -mavx2 -mfma (lmref/serving/matvec.py picks the flags)"
#endif

// One row of w (in columns) against x: the rows left over when out is not a multiple of 4.
static inline float row_dot(const float* w, const float* x, int64_t in) {
  const int64_t body = in - in % kWidth;
  Vec a = vzero();
  for (int64_t i = 0; i < body; i += kWidth) a = vfma(vload(w + i), vload(x + i), a);
  float s = vsum(a);
  for (int64_t i = body; i < in; ++i) s += w[i] * x[i];
  return s;
}

torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& weight,
                     const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == torch::kFloat,
              "matvec: weight must be a contiguous fp32 (out, in) matrix");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.size(1) == in && x.is_contiguous() &&
                  x.scalar_type() == torch::kFloat,
              "matvec: x must be one contiguous fp32 row of ", in, " values, got ", x.sizes());
  auto y = torch::empty({1, out}, x.options());
  const float* r = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == torch::kFloat,
                "matvec: residual must be a contiguous fp32 (1, ", out, ") row");
    r = residual->data_ptr<float>();
  }
  const float* w = weight.data_ptr<float>();
  const float* xv = x.data_ptr<float>();
  float* yv = y.data_ptr<float>();
  const int64_t body = in - in % kWidth, blocks = out / 4;
  // Blocks of 4 rows, at least 16 blocks a task so that small matrices are not split finely.
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin * 4; first < end * 4; first += 4) {
      const float *w0 = w + first * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
      Vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
      for (int64_t i = 0; i < body; i += kWidth) {
        const Vec xi = vload(xv + i);
        a0 = vfma(vload(w0 + i), xi, a0);
        a1 = vfma(vload(w1 + i), xi, a1);
        a2 = vfma(vload(w2 + i), xi, a2);
        a3 = vfma(vload(w3 + i), xi, a3);
      }
      float s[4] = {vsum(a0), vsum(a1), vsum(a2), vsum(a3)};
      for (int64_t k = 0; k < 4; ++k) {
        for (int64_t i = body; i < in; ++i) s[k] += w[(first + k) * in + i] * xv[i];
        yv[first + k] = r ? s[k] + r[first + k] : s[k];
      }
    }
  });
  for (int64_t k = blocks * 4; k < out; ++k) {  // at most 3 rows left
    const float s = row_dot(w + k * in, xv, in);
    yv[k] = r ? s + r[k] : s;
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matvec", &matvec, "y = x W^T (+ residual) for one fp32 row", py::arg("x"),
        py::arg("weight"), py::arg("residual") = py::none());
}
