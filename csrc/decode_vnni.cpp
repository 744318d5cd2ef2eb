// int8 weights x int8 activations with AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products per instruction) and VBMI2
// (vpexpandb: 64 kept int8 values placed at their mask bits). Only called when has_vnni() says the CPU has both.
// Activations come as sign and magnitude (QuantX): each expanded weight vector is negated where its inputs are
// negative (one masked subtract) and multiplied with the magnitudes, so no offset needs correcting afterwards.
#include <algorithm>
#include <cstring>

#include "decode.h"
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ST_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi2,bmi,bmi2,popcnt")))
#endif

namespace st {

bool has_vnni() {
#if defined(__x86_64__) && defined(__GNUC__)
  return st_isa::detect() == 2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
namespace vnni {
namespace {

// Mask bits of row o for columns [64 c, 64 c + 64) (four 16-bit words; the row's last chunk may have fewer).
ST_VNNI inline uint64_t mask64(const Bitmask& w, int64_t o, int64_t c) {
  if (!w.mask) {
    const int64_t left = w.in - 64 * c;
    return left >= 64 ? ~0ull : (1ull << left) - 1ull;
  }
  uint64_t m = 0;
  const uint16_t* src = w.mask + o * w.words + 4 * c;
  if (4 * c + 4 <= w.words) {  // constant-size copy: one 8-byte load (a variable size became a memcpy call per chunk)
    std::memcpy(&m, src, 8);
    return m;
  }
  for (int64_t k = 0; k < w.words - 4 * c; ++k) m |= (uint64_t)src[k] << (16 * k);
  return m;
}

// The 64 weights of a chunk with mask m, zeros at the pruned positions: one expanding load of the kept values at
// v. It reads only as many bytes as m has set bits, so never past the array: no tail-safe variant is needed
// (a separate 64-byte load + vpexpandb measured the same speed).
template <bool DENSE>
ST_VNNI inline __m512i weights64(const int8_t* v, uint64_t m) {
  if constexpr (DENSE) return _mm512_maskz_loadu_epi8((__mmask64)m, v);
  else return _mm512_maskz_expandloadu_epi8((__mmask64)m, v);
}

// Prefetch distance in bytes of the weight streams (see decode_impl.inc: ~1.8x on one core's DRAM stream).
constexpr int PREFETCH_BYTES = 2048;

ST_VNNI inline void prefetch(const void* p) { _mm_prefetch((const char*)p + PREFETCH_BYTES, _MM_HINT_T0); }

// w with the signs of its 64 inputs applied (bit set: input negative, weight negated). Weight codes lie in
// [-127, 127], so the negation cannot overflow. This masked subtract per chunk and row costs 10-20% against
// code + 128 activations with a per-row correction (70% of 5632 x 2048 from DRAM, Zen 4, 1-2 threads), for
// twice the levels, a scale per 256 columns and no correction to store.
ST_VNNI inline __m512i signed64(__m512i w, uint64_t negative) {
  return _mm512_mask_sub_epi8(w, (__mmask64)negative, _mm512_setzero_si512(), w);
}

// Chunks come in segments that share one weight scale (gc chunks per weight group) and one activation scale
// (XC chunks per QX_GROUP columns): each segment's int32 sums are scaled once, at its end. The weight group is
// tracked incrementally: a division per segment (gc is not a constant) cost more than the segment's dot products.
constexpr int64_t XC = QX_GROUP / 64;

struct Segments {
  int64_t gc, chunks, g = 0, g_end;  // current weight group g ends at chunk g_end
  ST_VNNI Segments(int64_t gc_, int64_t chunks_) : gc(gc_), chunks(chunks_), g_end(gc_) {}
  ST_VNNI int64_t end(int64_t c) const { return std::min(std::min(g_end, (c / XC + 1) * XC), chunks); }
  ST_VNNI void advance(int64_t c) {  // c: the end of the segment just done
    if (c == g_end) ++g, g_end += gc;
  }
};

template <int NB, bool DENSE>
ST_VNNI void rows(const Bitmask& w, const QuantX& qx, const float* bias, float* y, int64_t ys, int64_t r0,
                  int64_t r1) {
  const int64_t chunks = (w.in + 63) / 64, gc = w.group / 64, ng = (chunks + gc - 1) / gc, sw = qx.ld / 64;
  const int8_t* val = (const int8_t*)w.values;
  for (int64_t o = r0; o < r1; ++o) {
    int64_t p = w.row_start[o];
    __m512 tot[NB];
    for (int b = 0; b < NB; ++b) tot[b] = _mm512_setzero_ps();
    Segments seg(gc, chunks);
    for (int64_t c = 0; c < chunks;) {
      const int64_t e = seg.end(c);
      __m512i a0[NB], a1[NB];
      for (int b = 0; b < NB; ++b) a0[b] = a1[b] = _mm512_setzero_si512();
      for (; c + 2 <= e; c += 2) {  // two chunks per step: independent loads and accumulators
        prefetch(val + p);
        if (DENSE) prefetch(val + p + 64);
        const uint64_t m0 = mask64(w, o, c), m1 = mask64(w, o, c + 1);
        const int64_t n0 = __builtin_popcountll(m0);
        const __m512i w0 = weights64<DENSE>(val + p, m0), w1 = weights64<DENSE>(val + p + n0, m1);
        p += n0 + __builtin_popcountll(m1);
        for (int b = 0; b < NB; ++b) {
          const uint8_t* xb = qx.codes + b * qx.ld + 64 * c;
          a0[b] = _mm512_dpbusd_epi32(a0[b], _mm512_loadu_si512(xb), signed64(w0, qx.signs[b * sw + c]));
          a1[b] = _mm512_dpbusd_epi32(a1[b], _mm512_loadu_si512(xb + 64), signed64(w1, qx.signs[b * sw + c + 1]));
        }
      }
      if (c < e) {
        const uint64_t m0 = mask64(w, o, c);
        const int64_t n0 = __builtin_popcountll(m0);
        const __m512i w0 = weights64<DENSE>(val + p, m0);
        p += n0;
        for (int b = 0; b < NB; ++b)
          a0[b] = _mm512_dpbusd_epi32(a0[b], _mm512_loadu_si512(qx.codes + b * qx.ld + 64 * c),
                                      signed64(w0, qx.signs[b * sw + c]));
        ++c;
      }
      const float s = w.scales[o * ng + seg.g];
      const int64_t xg = (c - 1) / XC;
      for (int b = 0; b < NB; ++b)
        tot[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[b], a1[b])),
                                 _mm512_set1_ps(s * qx.scale[b * qx.groups + xg]), tot[b]);
      seg.advance(c);
    }
    const float bo = bias ? bias[o] : 0.f;
    for (int b = 0; b < NB; ++b) y[b * ys + o] = _mm512_reduce_add_ps(tot[b]) + bo;
  }
}

// Sparse weight rows o and o + 1 for one batch row: twice the independent dot-product chains (vpdpbusd latency, not
// throughput, bounded one row's loop) and each activation chunk loaded once for both rows. Chunks whose 64
// mask bits lie inside the row take the short path: one 8-byte mask load, no per-chunk bounds logic.
ST_VNNI void row_pair(const Bitmask& w, const QuantX& qx, const float* bias, float* y, int64_t o) {
  const int64_t chunks = (w.in + 63) / 64, gc = w.group / 64, ng = (chunks + gc - 1) / gc;
  const int64_t full = w.words / 4;
  const int8_t* val = (const int8_t*)w.values;
  const int8_t *v0 = val + w.row_start[o], *v1 = val + w.row_start[o + 1];
  const uint16_t *k0 = w.mask + o * w.words, *k1 = k0 + w.words;
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
  Segments seg(gc, chunks);
  for (int64_t c = 0; c < chunks;) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0;
    const int64_t e = seg.end(c), ef = std::min(e, full);
    for (; c + 2 <= ef; c += 2) {
      const __m512i x0 = _mm512_loadu_si512(qx.codes + 64 * c), x1 = _mm512_loadu_si512(qx.codes + 64 * c + 64);
      const uint64_t s0 = qx.signs[c], s1 = qx.signs[c + 1];
      prefetch(v0);
      prefetch(v1);
      uint64_t m0, m1, m2, m3;
      std::memcpy(&m0, k0 + 4 * c, 8);
      std::memcpy(&m1, k1 + 4 * c, 8);
      std::memcpy(&m2, k0 + 4 * c + 4, 8);
      std::memcpy(&m3, k1 + 4 * c + 4, 8);
      if ((c & 7) == 0) {  // each row's mask: 64 bytes of it per 8 chunks
        prefetch(k0 + 4 * c);
        prefetch(k1 + 4 * c);
      }
      const int64_t n0 = _mm_popcnt_u64(m0), n1 = _mm_popcnt_u64(m1), n2 = _mm_popcnt_u64(m2), n3 = _mm_popcnt_u64(m3);
      a0 = _mm512_dpbusd_epi32(a0, x0, signed64(weights64<false>(v0, m0), s0));
      b0 = _mm512_dpbusd_epi32(b0, x0, signed64(weights64<false>(v1, m1), s0));
      a1 = _mm512_dpbusd_epi32(a1, x1, signed64(weights64<false>(v0 + n0, m2), s1));
      b1 = _mm512_dpbusd_epi32(b1, x1, signed64(weights64<false>(v1 + n1, m3), s1));
      v0 += n0 + n2;
      v1 += n1 + n3;
    }
    for (; c < e; ++c) {  // an odd chunk or the row's last, partial one
      const uint64_t m0 = mask64(w, o, c), m1 = mask64(w, o + 1, c);
      const int64_t n0 = _mm_popcnt_u64(m0), n1 = _mm_popcnt_u64(m1);
      const __m512i x0 = _mm512_loadu_si512(qx.codes + 64 * c);
      a0 = _mm512_dpbusd_epi32(a0, x0, signed64(weights64<false>(v0, m0), qx.signs[c]));
      b0 = _mm512_dpbusd_epi32(b0, x0, signed64(weights64<false>(v1, m1), qx.signs[c]));
      v0 += n0;
      v1 += n1;
    }
    const float sx = qx.scale[(c - 1) / XC];
    t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)), _mm512_set1_ps(w.scales[o * ng + seg.g] * sx), t0);
    t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(b0, b1)), _mm512_set1_ps(w.scales[(o + 1) * ng + seg.g] * sx), t1);
    seg.advance(c);
  }
  y[o] = _mm512_reduce_add_ps(t0) + (bias ? bias[o] : 0.f);
  y[o + 1] = _mm512_reduce_add_ps(t1) + (bias ? bias[o + 1] : 0.f);
}

// Batch 1 over sparse rows [r0, r1) in pairs.
ST_VNNI void row_pairs(const Bitmask& w, const QuantX& qx, const float* bias, float* y, int64_t r0, int64_t r1) {
  int64_t o = r0;
  for (; o + 2 <= r1; o += 2) row_pair(w, qx, bias, y, o);
  if (o < r1) rows<1, false>(w, qx, bias, y, 0, o, r1);
}

template <bool DENSE>
ST_VNNI void rows_nb(const Bitmask& w, const QuantX& qx, int64_t nb, const float* bias, float* y, int64_t ys,
                     int64_t r0, int64_t r1) {
  int64_t b = 0;
  auto shifted = [&](int64_t b0) {
    return QuantX{qx.codes + b0 * qx.ld, qx.signs + b0 * (qx.ld / 64), qx.ld, qx.scale + b0 * qx.groups, qx.groups};
  };
  // Batch 1: sparse rows in pairs, dense rows one at a time through rows<1>: dense rows read in pairs (two
  // interleaved streams) ran at half the speed from DRAM (5632 x 2048 int8, Zen 4 VM, 2 threads: 0.63-0.70 ms
  // against 0.30-0.42 ms one at a time).
  if (nb == 1 && !DENSE) return row_pairs(w, qx, bias, y, r0, r1);
  for (; b + 4 <= nb; b += 4) rows<4, DENSE>(w, shifted(b), bias, y + b * ys, ys, r0, r1);
  for (; b + 2 <= nb; b += 2) rows<2, DENSE>(w, shifted(b), bias, y + b * ys, ys, r0, r1);
  if (b < nb) rows<1, DENSE>(w, shifted(b), bias, y + b * ys, ys, r0, r1);
}

}  // namespace

void bitmask_rows_q8(const Bitmask& w, const QuantX& qx, int64_t nb, const float* bias, float* y, int64_t ys,
                     int64_t r0, int64_t r1) {
  if (w.mask) rows_nb<false>(w, qx, nb, bias, y, ys, r0, r1);
  else rows_nb<true>(w, qx, nb, bias, y, ys, r0, r1);
}

}  // namespace vnni
#else
namespace vnni {
void bitmask_rows_q8(const Bitmask&, const QuantX&, int64_t, const float*, float*, int64_t, int64_t, int64_t) {}
}  // namespace vnni
#endif

}  // namespace st
