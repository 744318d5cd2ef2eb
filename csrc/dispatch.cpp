// Runtime ISA choice, threading and the batch transposes around the single-threaded kernels.
#include "dispatch.h"

#include "isa.h"

#include <algorithm>
#include <atomic>
#include <vector>

namespace st {

int best_isa() { return st_isa::detect(); }  // same values as the ISA_* enum

namespace {

const Table kTables[3] = {
    {generic::csr_gemv, generic::csr_spmm, generic::nm_gemv, generic::nm_spmm, generic::bsr_gemv, generic::bsr_spmm,
     generic::dense_gemv, generic::dense_spmm, generic::transpose, generic::activate},
    {avx2::csr_gemv, avx2::csr_spmm, avx2::nm_gemv, avx2::nm_spmm, avx2::bsr_gemv, avx2::bsr_spmm, avx2::dense_gemv,
     avx2::dense_spmm, avx2::transpose, avx2::activate},
    // batch-1 CSR: the 8-lane gather loop of the AVX2 build measured ~5% faster than the same loop built for
    // AVX-512 on Zen 4 (bench: /tmp-free A/B in benchmarks/bench_kernels.py), so AVX-512 CPUs use it too
    {avx2::csr_gemv, avx512::csr_spmm, avx512::nm_gemv, avx512::nm_spmm, avx512::bsr_gemv, avx512::bsr_spmm,
     avx512::dense_gemv, avx512::dense_spmm, avx512::transpose,
     avx512::activate},
};

}  // namespace

const Table& table(int isa) { return kTables[isa]; }

void linear(const Problem& p, const GemvFn& gemv, const SpmmFn& spmm, TransposeFn transpose) {
  int nt = std::max(1, p.threads);
  if (p.work * std::max<int64_t>(p.batch, 1) < MIN_SPLIT_WORK) nt = 1;
  nt = (int)std::min<int64_t>(nt, std::max<int64_t>(p.units, 1));
  const int K = chunk_count(nt, p.units);
  const std::vector<int64_t> bounds = chunk_bounds(p.prefix, p.units, K);
  std::atomic<int64_t> next{0};
  if (p.batch == 1) {
    parallel(nt, [&](int, int) {
      take_chunks(next, K, [&](int64_t c) {
        if (bounds[c + 1] > bounds[c]) gemv(p.x, p.y, bounds[c], bounds[c + 1]);
      });
    });
    return;
  }
  // Batched: X is transposed into panels of TW = 16 * tile batch columns, each panel a contiguous
  // [in, w] block (w = TW, or less for the last panel; the batch is zero-padded to whole 16-lane vectors).
  // Contiguous panels matter: a row stride of the whole padded batch maps panel rows onto few cache sets.
  const int64_t B = p.batch, in = p.in, out = p.out;
  const int64_t ld = (B + 15) / 16 * 16;
  const int64_t TW = 16 * std::max(1, std::min(4, p.tile_vectors));
  const int P = (int)((ld + TW - 1) / TW);  // panels
  float* xt = scratch<LAYER_SCRATCH>((size_t)(in + out) * ld);
  float* yt = xt + in * ld;
  auto width = [&](int64_t b0) { return std::min(TW, ld - b0); };
  parallel(nt, [&](int t, int n) {
    const int64_t i0 = in * t / n, i1 = in * (t + 1) / n;  // this thread's rows of X^T
    for (int64_t b0 = 0; b0 < ld; b0 += TW) {
      const int64_t w = width(b0), nb = std::min(w, B - b0);
      float* dst = xt + b0 * in;
      transpose(p.x + b0 * p.x_stride + i0, p.x_stride, dst + i0 * w, w, nb, i1 - i0);
      if (nb < w)  // zero batch padding
        for (int64_t i = i0; i < i1; ++i) std::fill(dst + i * w + nb, dst + (i + 1) * w, 0.f);
    }
    barrier(n);
    // items in panel-major order, so threads share one X^T panel at a time
    take_chunks(next, (int64_t)P * K, [&](int64_t item) {
      const int c = (int)(item % K);
      const int64_t b0 = (int64_t)(item / K) * TW, w = width(b0);
      const int64_t u0 = bounds[c], u1 = bounds[c + 1];
      if (u1 <= u0) return;
      spmm(xt + b0 * in, w, 0, (int)(w / 16), yt + b0 * out, u0, u1);
      const int64_t o0 = u0 * p.unit_rows, o1 = std::min(u1 * p.unit_rows, out);  // Y^T block -> Y
      transpose(yt + b0 * out + o0 * w, w, p.y + b0 * out + o0, out, o1 - o0, std::min(w, B - b0));
    });
  });
}

// One sparse format's pair of kernels (batch-1 gemv, transposed-batch spmm) run through `linear`.
template <class W, class Gemv, class Spmm>
void format_linear(int isa, const Problem& p, const W& w, const float* bias, Gemv gemv, Spmm spmm) {
  linear(
      p, [&](const float* x, float* y, int64_t u0, int64_t u1) { gemv(w, x, bias, y, u0, u1); },
      [&](const float* xt, int64_t ld, int64_t b0, int nv, float* yt, int64_t u0, int64_t u1) {
        spmm(w, xt, ld, b0, nv, bias, yt, u0, u1);
      },
      kTables[isa].transpose);
}

void csr_linear(int isa, const Problem& p, const Csr& w, const float* bias) {
  format_linear(isa, p, w, bias, kTables[isa].csr_gemv, kTables[isa].csr_spmm);
}

void nm_linear(int isa, const Problem& p, const NM& w, const float* bias) {
  format_linear(isa, p, w, bias, kTables[isa].nm_gemv, kTables[isa].nm_spmm);
}

void bsr_linear(int isa, const Problem& p, const Bsr& w, const float* bias) {
  format_linear(isa, p, w, bias, kTables[isa].bsr_gemv, kTables[isa].bsr_spmm);
}

}  // namespace st
