// Fused chain executor (see chain.h). Two schedules:
// * batch 1: each layer's GEMV writes a scratch vector that the next layer reads (ping-pong);
// * batched: X is transposed once into 16-column-padded panels [in, w]; a panel then runs through every
//   layer (spmm into the other buffer, bias and activation on the rows just written) and is transposed
//   back only at the end. With at least as many panels as threads, each thread takes whole panels and
//   never waits for another; otherwise all threads share each layer's rows, with a barrier between layers.
#include "chain.h"

#include <algorithm>
#include <atomic>
#include <memory>

#include "dispatch.h"

namespace st {
namespace {

constexpr int64_t MIN_THREAD_WORK = 65536;  // multiply-adds per whole chain call below which one thread is faster

void finish_rows(const Table& T, const ChainLayer& L, float* y, int64_t ld, int64_t u0, int64_t u1) {
  if (!L.act) return;
  const int64_t o0 = u0 * L.unit_rows, o1 = std::min(u1 * L.unit_rows, L.out);
  if (o1 > o0) T.activate(L.act, y + o0 * ld, (o1 - o0) * ld);
}

// y[rows of units u0..u1) = act(W x + b), batch 1
void gemv_rows(const Table& T, const ChainLayer& L, const float* x, float* y, int64_t u0, int64_t u1) {
  switch (L.kind) {
    case LAYER_CSR: T.csr_gemv(L.csr, x, L.bias, y, u0, u1); break;
    case LAYER_NM: T.nm_gemv(L.nm, x, L.bias, y, u0, u1); break;
    case LAYER_DENSE: T.dense_gemv(L.dense, x, L.bias, y, u0 * 16, std::min(u1 * 16, L.out)); break;
    default: T.bsr_gemv(L.bsr, x, L.bias, y, u0, u1); break;
  }
  finish_rows(T, L, y, 1, u0, u1);
}

// yt [out, w] rows of units u0..u1 = act(W xt + b) for one panel xt [in, w], w a multiple of 16 (<= 64)
void panel_rows(const Table& T, const ChainLayer& L, const float* xt, int64_t w, float* yt, int64_t u0, int64_t u1) {
  const int nv = (int)(w / 16);
  switch (L.kind) {
    case LAYER_CSR: T.csr_spmm(L.csr, xt, w, 0, nv, L.bias, yt, u0, u1); break;
    case LAYER_NM: T.nm_spmm(L.nm, xt, w, 0, nv, L.bias, yt, u0, u1); break;
    case LAYER_DENSE: T.dense_spmm(L.dense, xt, w, 0, nv, L.bias, yt, u0 * 16, std::min(u1 * 16, L.out)); break;
    default: T.bsr_spmm(L.bsr, xt, w, 0, nv, L.bias, yt, u0, u1); break;
  }
  finish_rows(T, L, yt, w, u0, u1);
}

// Chunk boundaries (in units) of each layer for nt threads; one chunk for layers too small to split.
std::vector<std::vector<int64_t>> layer_bounds(const std::vector<ChainLayer>& layers, int nt, int64_t batch) {
  std::vector<std::vector<int64_t>> all;
  for (const ChainLayer& L : layers)
    all.push_back(chunk_bounds(L.prefix, L.units, L.work * batch < MIN_SPLIT_WORK ? 1 : chunk_count(nt, L.units)));
  return all;
}

}  // namespace

void chain_forward(int isa, const std::vector<ChainLayer>& layers, const float* x, int64_t B, int64_t xs, float* y,
                   int threads, int tile) {
  const Table& T = table(isa);
  const int nl = (int)layers.size();
  if (nl == 0 || B < 1) return;
  int64_t maxw = 0, work = 0;
  for (const ChainLayer& L : layers) {
    maxw = std::max({maxw, L.in, L.out});
    work += L.work;
  }
  int nt = std::max(1, threads);
  if (work * B < MIN_THREAD_WORK) nt = 1;

  if (B == 1) {
    float* buf = scratch<CHAIN_SCRATCH>(2 * maxw);
    auto src = [&](int l) -> const float* { return l == 0 ? x : buf + ((l - 1) & 1) * maxw; };
    auto dst = [&](int l) -> float* { return l == nl - 1 ? y : buf + (l & 1) * maxw; };
    if (nt == 1) {
      for (int l = 0; l < nl; ++l) gemv_rows(T, layers[l], src(l), dst(l), 0, layers[l].units);
      return;
    }
    const auto bounds = layer_bounds(layers, nt, 1);
    std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[nl]);
    for (int l = 0; l < nl; ++l) next[l].store(0);
    parallel(nt, [&](int, int n) {
      for (int l = 0; l < nl; ++l) {
        const std::vector<int64_t>& bd = bounds[l];
        take_chunks(next[l], (int64_t)bd.size() - 1,
                    [&](int64_t c) { gemv_rows(T, layers[l], src(l), dst(l), bd[c], bd[c + 1]); });
        barrier(n);
      }
    });
    return;
  }

  const int64_t ld = (B + 15) / 16 * 16;  // batch padded to whole 16-lane vectors
  int tv = std::max(1, std::min(4, tile));
  if (nt > 1) tv = (int)std::min<int64_t>(tv, std::max<int64_t>(1, ld / 16 / nt));  // a panel per thread if possible
  const int64_t TW = 16 * tv;
  const int P = (int)((ld + TW - 1) / TW);
  // Whole panels per thread (P >= nt): each thread has its own two panel buffers [maxw, TW], reused for every
  // panel it takes, so they stay in L2. Otherwise (layer mode) all panels live in two shared buffers
  // [maxw, ld]. Either way layer l reads buffer l % 2 and writes (l + 1) % 2 at the panel's offset.
  const bool panel_mode = P >= nt;
  const int64_t region = panel_mode ? maxw * TW : ld * maxw;  // one buffer of one thread (panel mode) or all
  float* base = scratch<CHAIN_SCRATCH>((size_t)(2 * region * (panel_mode ? nt : 1)));
  auto buf = [&](int which, int p, int thread) -> float* {
    return panel_mode ? base + (2 * thread + which) * region : base + which * region + p * TW * maxw;
  };
  auto width = [&](int p) { return std::min<int64_t>(TW, ld - p * TW); };
  auto to_panel = [&](int p, int thread) {  // X rows b0.. -> panel [in, w], zero columns past the batch
    const int64_t b0 = p * TW, w = width(p), in = layers[0].in, nb = std::min(w, B - b0);
    float* dst = buf(0, p, thread);
    T.transpose(x + b0 * xs, xs, dst, w, nb, in);
    if (nb < w)
      for (int64_t i = 0; i < in; ++i) std::fill(dst + i * w + nb, dst + (i + 1) * w, 0.f);
  };
  auto from_panel = [&](int p, int thread) {  // panel [out, w] -> Y rows b0..
    const int64_t b0 = p * TW, w = width(p), out = layers[nl - 1].out, nb = std::min(w, B - b0);
    T.transpose(buf(nl % 2, p, thread), w, y + b0 * out, out, out, nb);
  };
  auto layer_panel = [&](int l, int p, int thread, int64_t u0, int64_t u1) {
    panel_rows(T, layers[l], buf(l % 2, p, thread), width(p), buf((l + 1) % 2, p, thread), u0, u1);
  };

  if (panel_mode) {  // whole panels per thread: no barriers
    std::atomic<int64_t> next{0};
    parallel(nt, [&](int t, int) {
      take_chunks(next, P, [&](int64_t p) {
        to_panel((int)p, t);
        for (int l = 0; l < nl; ++l) layer_panel(l, (int)p, t, 0, layers[l].units);
        from_panel((int)p, t);
      });
    });
    return;
  }

  // fewer panels than threads: every layer's (panel, row chunk) items are shared, a barrier between layers
  const auto bounds = layer_bounds(layers, nt, B);
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[nl + 2]);
  for (int l = 0; l < nl + 2; ++l) next[l].store(0);
  parallel(nt, [&](int, int n) {
    take_chunks(next[0], P, [&](int64_t p) { to_panel((int)p, 0); });
    barrier(n);
    for (int l = 0; l < nl; ++l) {
      const std::vector<int64_t>& bd = bounds[l];
      const int64_t K = (int64_t)bd.size() - 1;
      take_chunks(next[l + 1], P * K,
                  [&](int64_t item) { layer_panel(l, (int)(item / K), 0, bd[item % K], bd[item % K + 1]); });
      barrier(n);
    }
    take_chunks(next[nl + 1], P, [&](int64_t p) { from_panel((int)p, 0); });
  });
}

}  // namespace st
