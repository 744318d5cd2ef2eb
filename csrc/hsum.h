// The sum of the 8 float lanes of an AVX vector, for kernels of every ISA tier from AVX2 up (a callee's
// target must be a subset of its caller's for GCC to inline it).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace st {

__attribute__((target("avx2"), always_inline)) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // halves
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                          // pairs
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));                         // the last two
}

}  // namespace st
#endif
