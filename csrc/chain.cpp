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

constexpr int CHUNKS_PER_THREAD = 8;      // as in dispatch.cpp: chunks taken from a shared counter
constexpr int64_t MIN_THREAD_WORK = 65536;  // multiply-adds per call below which one thread is faster
constexpr int64_t MIN_SPLIT_WORK = 16384;   // a layer below this is not split across threads

// The calling thread's ping-pong buffers (grown, never shrunk; OpenMP workers write through the pointer).
float* chain_scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

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
std::vector<std::vector<int64_t>> chunk_bounds(const std::vector<ChainLayer>& layers, int nt, int64_t batch) {
  std::vector<std::vector<int64_t>> all;
  for (const ChainLayer& L : layers) {
    const int K = (nt == 1 || L.work * batch < MIN_SPLIT_WORK)
                      ? 1
                      : (int)std::max<int64_t>(1, std::min<int64_t>(nt * CHUNKS_PER_THREAD, L.units));
    std::vector<int64_t> b(K + 1);
    for (int c = 0; c < K; ++c) {
      int64_t u0, u1;
      split(L.prefix, L.units, c, K, u0, u1);
      b[c] = u0;
    }
    b[K] = L.units;
    all.push_back(std::move(b));
  }
  return all;
}

void barrier(int n) {
#ifdef _OPENMP
  if (n > 1) {
#pragma omp barrier
  }
#else
  (void)n;
#endif
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
    float* buf = chain_scratch(2 * maxw);
    auto src = [&](int l) -> const float* { return l == 0 ? x : buf + ((l - 1) & 1) * maxw; };
    auto dst = [&](int l) -> float* { return l == nl - 1 ? y : buf + (l & 1) * maxw; };
    if (nt == 1) {
      for (int l = 0; l < nl; ++l) gemv_rows(T, layers[l], src(l), dst(l), 0, layers[l].units);
      return;
    }
    const auto bounds = chunk_bounds(layers, nt, 1);
    std::unique_ptr<std::atomic<int>[]> next(new std::atomic<int>[nl]);
    for (int l = 0; l < nl; ++l) next[l].store(0);
    parallel(nt, [&](int, int n) {
      for (int l = 0; l < nl; ++l) {
        const std::vector<int64_t>& bd = bounds[l];
        const int K = (int)bd.size() - 1;
        for (int c; (c = next[l].fetch_add(1, std::memory_order_relaxed)) < K;)
          gemv_rows(T, layers[l], src(l), dst(l), bd[c], bd[c + 1]);
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
  float* base = chain_scratch((size_t)(2 * region * (panel_mode ? nt : 1)));
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
    std::atomic<int> next{0};
    parallel(nt, [&](int t, int) {
      for (int p; (p = next.fetch_add(1, std::memory_order_relaxed)) < P;) {
        to_panel(p, t);
        for (int l = 0; l < nl; ++l) layer_panel(l, p, t, 0, layers[l].units);
        from_panel(p, t);
      }
    });
    return;
  }

  // fewer panels than threads: every layer's (panel, row chunk) items are shared, a barrier between layers
  const auto bounds = chunk_bounds(layers, nt, B);
  std::unique_ptr<std::atomic<int>[]> next(new std::atomic<int>[nl + 2]);
  for (int l = 0; l < nl + 2; ++l) next[l].store(0);
  parallel(nt, [&](int, int n) {
    for (int p; (p = next[0].fetch_add(1, std::memory_order_relaxed)) < P;) to_panel(p, 0);
    barrier(n);
    for (int l = 0; l < nl; ++l) {
      const std::vector<int64_t>& bd = bounds[l];
      const int K = (int)bd.size() - 1;
      for (int item; (item = next[l + 1].fetch_add(1, std::memory_order_relaxed)) < P * K;) {
        const int c = item % K;
        layer_panel(l, item / K, 0, bd[c], bd[c + 1]);
      }
      barrier(n);
    }
    for (int p; (p = next[nl + 1].fetch_add(1, std::memory_order_relaxed)) < P;) from_panel(p, 0);
  });
}

}  // namespace st
