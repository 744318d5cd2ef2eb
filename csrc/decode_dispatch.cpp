// Threaded drivers of the bitmask kernels: rows split into chunks of about equal kept values (row_start is the
// prefix of work), taken from a shared counter; each chunk runs every batch row so its weights stream once.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "decode.h"
#include "dispatch.h"
#include "parallel.h"

namespace st {

namespace {

using RowsFn = decltype(&generic::bitmask_rows);
using UnpackFn = decltype(&generic::bitmask_unpack);
const RowsFn kRows[3] = {generic::bitmask_rows, avx2::bitmask_rows, avx512::bitmask_rows};
const UnpackFn kUnpack[3] = {generic::bitmask_unpack, avx2::bitmask_unpack, avx512::bitmask_unpack};
using BitmaskSpmmFn = decltype(&generic::bitmask_spmm);
const BitmaskSpmmFn kSpmm[3] = {generic::bitmask_spmm, avx2::bitmask_spmm, avx512::bitmask_spmm};
using ColFn = decltype(&generic::colmask_tiles);
using ColUnpackFn = decltype(&generic::colmask_unpack_t);
const ColFn kCol[3] = {generic::colmask_tiles, avx2::colmask_tiles, avx512::colmask_tiles};
using ColDenseFn = decltype(&generic::coldense_columns);
const ColDenseFn kColDense[3] = {generic::coldense_columns, avx2::coldense_columns, avx512::coldense_columns};
const ColUnpackFn kColUnpack[3] = {generic::colmask_unpack_t, avx2::colmask_unpack_t, avx512::colmask_unpack_t};
using AttentionFn = decltype(&generic::attention_head);
const AttentionFn kAttention[3] = {generic::attention_head, avx2::attention_head, avx512::attention_head};

struct NoSetup {
  void operator()(int, int) const {}
};

// run(r0, r1) over the rows of w on up to `threads` threads (one when the call is too small to split); each
// thread first runs setup(t, n), all of them before any run (a barrier, only when there is a setup)
template <class Run, class Setup = NoSetup>
void over_rows(int threads, const Bitmask& w, int64_t out, int64_t nb, Run run, Setup setup = {}) {
  const int64_t work = (w.row_start[out] - w.row_start[0]) * nb;
  int nt = work < MIN_SPLIT_WORK ? 1 : (int)std::min<int64_t>(std::max(1, threads), std::max<int64_t>(out, 1));
  const int K = chunk_count(nt, out);
  const std::vector<int64_t> bounds = chunk_bounds(w.row_start, out, K);
  std::atomic<int64_t> next{0};
  parallel(nt, [&](int t, int n) {
    if constexpr (!std::is_same_v<Setup, NoSetup>) {
      setup(t, n);
      barrier(n);
    }
    take_chunks(next, K, [&](int64_t c) {
      if (bounds[c + 1] > bounds[c]) run(bounds[c], bounds[c + 1]);
    });
  });
}

// run(t0, t1) over the output tiles of a column weight, split by kept values; `work` multiply-adds in all
template <class Run>
void over_tiles(int threads, const ColBitmask& w, int64_t work, Run run) {
  const int nt = work < MIN_SPLIT_WORK ? 1 : (int)std::min<int64_t>(std::max(1, threads), w.tiles);
  const int K = chunk_count(nt, w.tiles);
  std::vector<int64_t> prefix((size_t)w.tiles + 1);
  for (int64_t t = 0; t <= w.tiles; ++t) prefix[t] = w.start[t * w.in];
  const std::vector<int64_t> bounds = chunk_bounds(prefix.data(), w.tiles, K);
  std::atomic<int64_t> next{0};
  parallel(nt, [&](int, int) {
    take_chunks(next, K, [&](int64_t c) {
      if (bounds[c + 1] > bounds[c]) run(bounds[c], bounds[c + 1]);
    });
  });
}

// Dense columns: each thread sums its share of the active columns (whole columns: sequential reads, and the
// skipped ones gaps too large for the prefetchers to fill) over every output into its own part; then each
// thread adds up the parts for its share of the outputs, scaled and biased.
void coldense_linear(ColDenseFn columns, int threads, const ColBitmask& w, const int32_t* active, const float* xa,
                     int64_t na, int nb, const float* bias, float* y) {
  const int nt = w.out * na * nb < MIN_SPLIT_WORK ? 1 : (int)std::min<int64_t>(std::max(1, threads), std::max<int64_t>(na / 16, 1));
  float* parts = scratch<COLUMN_SCRATCH>((size_t)(nt * nb * w.out));
  parallel(nt, [&](int t, int m) {
    const int64_t a0 = na * t / m, a1 = na * (t + 1) / m;
    columns(w, active + a0, xa + a0 * nb, a1 - a0, nb, parts + t * nb * w.out);
    barrier(m);
    const int64_t n = nb * w.out, i0 = n * t / m, i1 = n * (t + 1) / m;
    for (int64_t i = i0; i < i1; ++i) {
      float sum = 0.f;
      for (int p = 0; p < m; ++p) sum += parts[p * n + i];
      const int64_t o = i % w.out;
      y[i] = sum * (w.scales ? w.scales[o] : 1.f) + (bias ? bias[o] : 0.f);
    }
  });
}

}  // namespace

void colmask_linear(int isa, int threads, const ColBitmask& w, const float* x, int64_t nb, int64_t xs,
                    float threshold, bool skip, const float* bias, float* y) {
  const ColFn tiles = kCol[isa];
  int32_t* active = scratch<LAYER_SCRATCH, int32_t>((size_t)w.in);
  float* xa = scratch<LAYER_SCRATCH, float>((size_t)(w.in * 8));
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {  // 8 batch rows per pass: the inputs any of them keeps
    const int n = (int)std::min<int64_t>(8, nb - b0);
    const float* xb = x + b0 * xs;
    int64_t na = 0;
    for (int64_t j = 0; j < w.in; ++j) {
      bool any = false;
      for (int k = 0; k < n; ++k) any |= std::fabs(xb[k * xs + j]) > threshold;
      if (!any && skip) continue;
      for (int k = 0; k < n; ++k) {
        const float v = xb[k * xs + j];
        xa[na * n + k] = std::fabs(v) > threshold ? v : 0.f;
      }
      active[na++] = (int32_t)j;
    }
    float* yb = y + b0 * w.out;
    if (!w.mask) {
      coldense_linear(kColDense[isa], threads, w, active, xa, na, n, bias, yb);
      continue;
    }
    const int64_t work = w.start[w.tiles * w.in] / std::max<int64_t>(w.in, 1) * na * n;
    over_tiles(threads, w, work, [&](int64_t t0, int64_t t1) { tiles(w, active, xa, na, n, bias, yb, w.out, t0, t1); });
  }
}

void colmask_to_dense_t(int isa, int threads, const ColBitmask& w, float* dense_t) {
  const ColUnpackFn unpack = kColUnpack[isa];
  over_tiles(threads, w, w.out * w.in, [&](int64_t t0, int64_t t1) { unpack(w, dense_t, t0, t1); });
}

// Threads over (batch row, key/value head) units; each unit's scores live in the thread's scratch.
void decode_attention(int isa, int threads, const DecodeAttention& a) {
  const AttentionFn head = kAttention[isa];
  std::vector<int32_t> keep((size_t)(a.batch * a.L));
  std::vector<int64_t> kept((size_t)a.batch);
  for (int64_t b = 0; b < a.batch; ++b) {
    int64_t n = 0;
    for (int64_t l = 0; l < a.L; ++l)
      if (!a.keep || a.keep[b * a.keep_bs + l]) keep[b * a.L + n++] = (int32_t)l;
    kept[b] = n;
  }
  const int64_t units = a.batch * a.kv_heads;
  const int64_t work = units * a.group * a.L * (a.d + a.dv);
  const int nt = work < MIN_SPLIT_WORK ? 1 : (int)std::min<int64_t>(std::max(1, threads), units);
  std::atomic<int64_t> next{0};
  parallel(nt, [&](int, int) {
    float* p = scratch<LAYER_SCRATCH>((size_t)(a.group * a.L));
    take_chunks(next, units, [&](int64_t u) {
      const int64_t b = u / a.kv_heads, h = u % a.kv_heads;
      head(a.q + u * a.group * a.d, a.k + b * a.k_bs + h * a.k_hs, a.k_ls, a.v + b * a.v_bs + h * a.v_hs, a.v_ls,
           keep.data() + b * a.L, kept[b], a.group, a.d, a.dv, a.scale, p, a.out + u * a.group * a.dv);
    });
  });
}

// Batch rows up to which a dense int8 layer on AVX2 runs on 16-bit activation codes (decode_impl.inc,
// rows_dense_i16_t): the decode steps, batch 1 to a few sequences.
constexpr int64_t I16_ROWS = 8;

void bitmask_linear(int isa, int threads, const Bitmask& w, int64_t out, const float* x, int64_t nb, int64_t xs,
                    const float* bias, float* y) {
  const RowsFn rows = kRows[isa];
  if (isa == 1 && !w.mask && w.vtype == VALUES_I8 && nb <= I16_ROWS) {  // dense int8 decode on AVX2: 16-bit codes
    const int64_t ld = (w.in + 15) / 16 * 16, groups = (w.in + I16_GROUP - 1) / I16_GROUP;
    int16_t* codes = scratch<LAYER_SCRATCH, int16_t>((size_t)(nb * ld));
    float* scale = scratch<LAYER_SCRATCH, float>((size_t)(nb * groups));
    avx2::int16_codes(x, xs, nb, w.in, codes, ld, scale, groups);
    over_rows(threads, w, out, nb, [&](int64_t r0, int64_t r1) {
      avx2::dense_rows_i16(w, codes, ld, scale, groups, nb, bias, y, out, r0, r1);
    });
    return;
  }
  over_rows(threads, w, out, nb, [&](int64_t r0, int64_t r1) { rows(w, x, xs, nb, bias, y, out, r0, r1); });
}

void bitmask_linear_q8(int isa, int threads, const Bitmask& w, int64_t out, const float* x, int64_t nb, int64_t xs,
                       const float* bias, float* y) {
  const int64_t ld = (w.in + 63) / 64 * 64;
  const int64_t groups = (w.in + QX_GROUP - 1) / QX_GROUP;
  const bool vnni = isa == 2 && has_vnni();
  std::vector<uint8_t> codes((size_t)(nb * ld));
  std::vector<uint64_t> signs((size_t)(nb * ld / 64));
  std::vector<float> scale((size_t)(nb * groups));
  (vnni ? avx512::quantize_rows : avx2::quantize_rows)(x, xs, nb, w.in, codes.data(), signs.data(), ld, scale.data());
  const QuantX qx{codes.data(), signs.data(), ld, scale.data(), groups};
  if (vnni) {
    over_rows(threads, w, out, nb, [&](int64_t r0, int64_t r1) { vnni::bitmask_rows_q8(w, qx, nb, bias, y, out, r0, r1); });
    return;
  }
  std::vector<int16_t> x16((size_t)(nb * ld));
  q8avx2::signed_codes(qx, nb, x16.data());
  over_rows(threads, w, out, nb,
            [&](int64_t r0, int64_t r1) { q8avx2::bitmask_rows_q8(w, qx, x16.data(), nb, bias, y, out, r0, r1); });
}

// X^T in panels of PW batch rows (zero-padded), threads over chunks of output rows; each chunk runs
// every panel (one decode of its weights for all of them), then writes its rows of Y back from Y^T.
void bitmask_linear_many(int isa, int threads, const Bitmask& w, int64_t out, const float* x, int64_t nb,
                         int64_t xs, const float* bias, float* y) {
  if (nb == 1) return bitmask_linear(isa, threads, w, out, x, nb, xs, bias, y);
  const BitmaskSpmmFn spmm = kSpmm[isa];
  const auto transpose = table(isa).transpose;
  const int64_t PW = nb > SPMM_PANEL_MIN ? SPMM_PANEL_MAX : SPMM_PANEL_MIN;
  const int64_t in = w.in, P = (nb + PW - 1) / PW;
  const int last_nv = (int)((nb - (P - 1) * PW + 15) / 16);
  float* xt = scratch<LAYER_SCRATCH>((size_t)(P * (in + out) * PW));
  float* yt = xt + P * in * PW;
  auto panels_of_x = [&](int t, int n) {  // this thread's inputs, in every panel
    const int64_t i0 = in * t / n, i1 = in * (t + 1) / n;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t rows = std::min(PW, nb - p * PW);
      float* dst = xt + p * in * PW;
      transpose(x + p * PW * xs + i0, xs, dst + i0 * PW, PW, rows, i1 - i0);
      if (rows < PW)
        for (int64_t i = i0; i < i1; ++i) std::fill(dst + i * PW + rows, dst + (i + 1) * PW, 0.f);
    }
  };
  over_rows(
      threads, w, out, nb,
      [&](int64_t r0, int64_t r1) {
        spmm(w, xt, P, PW, last_nv, out, bias, yt, r0, r1);
        for (int64_t p = 0; p < P; ++p)
          transpose(yt + (p * out + r0) * PW, PW, y + p * PW * out + r0, out, r1 - r0, std::min(PW, nb - p * PW));
      },
      panels_of_x);
}

void bitmask_to_dense(int isa, int threads, const Bitmask& w, int64_t out, float* dense) {
  const UnpackFn unpack = kUnpack[isa];
  over_rows(threads, w, out, 1, [&](int64_t r0, int64_t r1) { unpack(w, dense, r0, r1); });
}

}  // namespace st
