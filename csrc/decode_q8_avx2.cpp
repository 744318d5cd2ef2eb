// int8 weights x int8 activations on AVX2 (CPUs without AVX-512 VNNI): the same QuantX activations as the VNNI
// kernel (sign + 8-bit magnitude, a scale per QX_GROUP columns) as signed 16-bit codes, and the same exact int32
// sums per segment, so both ISAs give the same outputs. Per 16-column mask word: its kept int8 values placed at
// their columns by one pshufb (control bytes from a 256-entry table per mask byte; 0x80 lanes come out zero),
// widened to 16 bits and multiplied with the codes by vpmaddwd (16-bit products: no saturation, unlike
// vpmaddubsw with 8-bit magnitudes). The fp32-activation kernel spends ~a third more instructions per word
// widening each value to fp32.
#include <algorithm>
#include <cstring>

#include "decode.h"
#include "hsum.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ST_Q8 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))

namespace st {
namespace q8avx2 {
namespace {

// idx[m][l]: for mask byte m, the index among the byte's kept values of column l, 0x80 (zero) when l is pruned
struct ShuffleTable {
  alignas(8) uint8_t idx[256][8];
  constexpr ShuffleTable() : idx{} {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int l = 0; l < 8; ++l) idx[m][l] = (m >> l) & 1 ? (uint8_t)k++ : (uint8_t)0x80;
    }
  }
};
constexpr ShuffleTable kShuffle{};

constexpr int PREFETCH_BYTES = 1024;

// The 16 weights of mask word m from the kept values at v, as 16-bit lanes; reads 16 bytes at v.
ST_Q8 inline __m256i weights16(const int8_t* v, unsigned m) {
  const unsigned lo = m & 255u, hi = m >> 8;
  const __m128i clo = _mm_loadl_epi64((const __m128i*)kShuffle.idx[lo]);
  // the high byte's values follow the low byte's: its indices moved by their count (0x80 + count stays >= 0x80)
  const __m128i chi = _mm_add_epi8(_mm_loadl_epi64((const __m128i*)kShuffle.idx[hi]),
                                   _mm_set1_epi8((char)__builtin_popcount(lo)));
  return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)v), _mm_unpacklo_epi64(clo, chi)));
}

// The same, reading only the popcount(m) values there are (the last words of the call's values)
ST_Q8 inline __m256i weights16_tail(const int8_t* v, unsigned m) {
  alignas(16) int8_t w[16] = {};
  int k = 0;
  for (int l = 0; l < 16; ++l)
    if ((m >> l) & 1) w[l] = v[k++];
  return _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i*)w));
}

// Rows [r0, r1) for one batch row (x16: its signed codes, padded with zeros to whole words). Segments end at a
// weight group's or an activation group's end, where their exact int32 sums are scaled.
ST_Q8 void rows1(const Bitmask& w, const int16_t* x16, const float* xscale, const float* bias, float* y, int64_t r0,
                 int64_t r1) {
  const int64_t W = w.words, gw = w.group / 16, ng = (W + gw - 1) / gw, xw = QX_GROUP / 16;
  const int64_t vend = w.row_start[r1] - 16;
  const int8_t* val = (const int8_t*)w.values;
  for (int64_t o = r0; o < r1; ++o) {
    int64_t p = w.row_start[o];
    __m256 tot = _mm256_setzero_ps();
    for (int64_t c = 0; c < W;) {
      const int64_t e = std::min(W, std::min((c / gw + 1) * gw, (c / xw + 1) * xw));
      const float s = w.scales[o * ng + c / gw] * xscale[c / xw];
      __m256i a0 = _mm256_setzero_si256(), a1 = a0;
      for (; c + 2 <= e && p + 16 <= vend; c += 2) {  // two words per step: two independent sums
        if ((c & 3) == 0) _mm_prefetch((const char*)(val + p) + PREFETCH_BYTES, _MM_HINT_T0);
        const unsigned m0 = word_at(w, o, c), m1 = word_at(w, o, c + 1);
        const int n0 = __builtin_popcount(m0);
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(weights16(val + p, m0),
                                                    _mm256_loadu_si256((const __m256i*)(x16 + 16 * c))));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(weights16(val + p + n0, m1),
                                                    _mm256_loadu_si256((const __m256i*)(x16 + 16 * c + 16))));
        p += n0 + __builtin_popcount(m1);
      }
      for (; c < e; ++c) {
        const unsigned m = word_at(w, o, c);
        const __m256i wv = p <= vend ? weights16(val + p, m) : weights16_tail(val + p, m);
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i*)(x16 + 16 * c))));
        p += __builtin_popcount(m);
      }
      tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)), _mm256_set1_ps(s), tot);
    }
    y[o] = (bias ? bias[o] : 0.f) + hsum8(tot);
  }
}

}  // namespace

void signed_codes(const QuantX& qx, int64_t nb, int16_t* x16) {
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = 0; i < qx.ld; ++i) {
      const int16_t code = qx.codes[b * qx.ld + i];
      x16[b * qx.ld + i] = (qx.signs[b * (qx.ld / 64) + i / 64] >> (i % 64)) & 1 ? (int16_t)-code : code;
    }
}

void bitmask_rows_q8(const Bitmask& w, const QuantX& qx, const int16_t* x16, int64_t nb, const float* bias, float* y,
                     int64_t ys, int64_t r0, int64_t r1) {
  for (int64_t b = 0; b < nb; ++b) rows1(w, x16 + b * qx.ld, qx.scale + b * qx.groups, bias, y + b * ys, r0, r1);
}

}  // namespace q8avx2
}  // namespace st
#else
namespace st {
namespace q8avx2 {
void signed_codes(const QuantX&, int64_t, int16_t*) {}
void bitmask_rows_q8(const Bitmask&, const QuantX&, const int16_t*, int64_t, const float*, float*, int64_t, int64_t,
                     int64_t) {}
}  // namespace q8avx2
}  // namespace st
#endif
