// The vectors of lmref's decode kernels (matvec.cpp, attend.cpp): one set of small inline
// functions over AVX-512 or AVX2 registers, so that the kernels are written once for both
// (lmref/serving/matvec.py picks the compiler flags for the CPU).
#pragma once

#include <immintrin.h>

#include <cstdint>

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kWidth = 16;
static inline Vec vzero() { return _mm512_setzero_ps(); }
static inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
static inline Vec vset(float a) { return _mm512_set1_ps(a); }
static inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
static inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
static inline Vec vmaxv(Vec a, Vec b) { return _mm512_max_ps(a, b); }
static inline Vec vabsmax(Vec a, Vec largest) { return _mm512_max_ps(_mm512_abs_ps(a), largest); }
static inline float vmax(Vec v) { return _mm512_reduce_max_ps(v); }
static inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
static inline Vec vround(Vec v) {
  return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline Vec vpow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
static inline void vstore(int16_t* p, Vec v) {  // rounded to nearest (even), as std::nearbyint
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(v)));
}
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
static inline Vec vset(float a) { return _mm256_set1_ps(a); }
static inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
static inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
static inline Vec vmaxv(Vec a, Vec b) { return _mm256_max_ps(a, b); }
static inline Vec vabsmax(Vec a, Vec largest) {
  return _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), a), largest);
}
static inline float vmax(Vec v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
static inline Vec vround(Vec v) {
  return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline Vec vpow2(Vec p, Vec n) {  // p * 2^n, n an integer in [-126, 127]
  const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256i bits = _mm256_slli_epi32(exponent, 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
static inline void vstore(int16_t* p, Vec v) {  // rounded to nearest (even), as std::nearbyint
  const __m256i i = _mm256_cvtps_epi32(v);
  _mm_storeu_si128((__m128i*)p,
                   _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
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

// exp of kWidth floats at once, for the softmax of attend (its arguments are <= 0): std::exp
// one at a time was most of attend's time at 64 rows, where torch's bmm + softmax (its exp in
// vectors) were faster. Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7
// polynomial, times 2^n: within 1 ulp of std::exp on [-87, 0] (checked at steps of 1e-4, both
// widths). Arguments below -87 give exp(-87) (1.6e-38).
static inline Vec vexp(Vec x) {
  x = vmaxv(x, vset(-87.f));
  const Vec n = vround(vmul(x, vset(1.44269504088896341f)));
  Vec r = vfma(n, vset(-0.693359375f), x);  // ln 2 in two parts: r exact to float precision
  r = vfma(n, vset(2.12194440e-4f), r);
  Vec y = vset(1.9875691500e-4f);
  y = vfma(y, r, vset(1.3981999507e-3f));
  y = vfma(y, r, vset(8.3334519073e-3f));
  y = vfma(y, r, vset(4.1665795894e-2f));
  y = vfma(y, r, vset(1.6666665459e-1f));
  y = vfma(y, r, vset(5.0000001201e-1f));
  y = vfma(y, vmul(r, r), r);
  return vpow2(vadd(y, vset(1.f)), n);
}
