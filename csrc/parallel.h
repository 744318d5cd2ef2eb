// Threading shared by every driver (inference layers, fused chains, training kernels): the OpenMP region,
// the work splits, chunks taken from a shared counter, the size thresholds and per-thread scratch buffers.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace st {

// Work is cut into CHUNKS_PER_THREAD chunks per thread that threads take from a shared counter: when another
// job on a shared machine delays one thread, the others take its chunks instead of waiting for it at the end
// (static halves made 2-thread calls up to 2x slower then).
constexpr int CHUNKS_PER_THREAD = 8;
// Below these many multiply-adds a second thread costs more to wake than it saves (more on a shared machine,
// where the wake-up waits for a time slice): inference layers, and training products (~0.1 ms).
constexpr int64_t MIN_SPLIT_WORK = 16384;
constexpr int64_t MIN_TRAIN_SPLIT_WORK = int64_t(1) << 20;
// Training transposes are memory-bound and short (a [256, 4096] fp32 batch: ~0.7 ms): below this many
// elements one thread does them (the backward packs dY one [256, 1024] panel at a time, 262K elements).
constexpr int64_t TRANSPOSE_PARALLEL = int64_t(1) << 17;

// body(thread, threads) on nt OpenMP threads (or inline when nt == 1 / no OpenMP).
template <class Body>
void parallel(int nt, Body body) {
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  body(0, 1);
}

// A barrier among the n threads of the enclosing parallel region (a no-op for one thread).
inline void barrier(int n) {
#ifdef _OPENMP
  if (n > 1) {
#pragma omp barrier
  }
#else
  (void)n;
#endif
}

// Unit range [u0, u1) of part t of nt with about equal work: prefix (units+1 cumulative entries, e.g. a CSR
// indptr) gives the work per unit, or null for equal work per unit.
inline void split(const int64_t* prefix, int64_t units, int t, int nt, int64_t& u0, int64_t& u1) {
  if (!prefix) {
    u0 = units * t / nt;
    u1 = units * (t + 1) / nt;
    return;
  }
  const int64_t total = prefix[units] - prefix[0];
  auto at = [&](int tt) -> int64_t {
    if (tt <= 0) return 0;
    if (tt >= nt) return units;
    const int64_t target = prefix[0] + total * tt / nt;
    return std::lower_bound(prefix, prefix + units + 1, target) - prefix;
  };
  u0 = std::min(at(t), units);
  u1 = std::min(at(t + 1), units);
}

// The K+1 boundaries of K chunks of about equal work over `units` (see split).
inline std::vector<int64_t> chunk_bounds(const int64_t* prefix, int64_t units, int K) {
  std::vector<int64_t> bounds(K + 1);
  for (int c = 0; c < K; ++c) {
    int64_t u1;
    split(prefix, units, c, K, bounds[c], u1);
  }
  bounds[K] = units;
  return bounds;
}

// Chunks per call for nt threads over `units` (one chunk when single-threaded).
inline int chunk_count(int nt, int64_t units) {
  return nt == 1 ? 1 : (int)std::max<int64_t>(1, std::min<int64_t>((int64_t)nt * CHUNKS_PER_THREAD, units));
}

// run(c) for every chunk c < K, taken from a shared counter by the calling threads.
template <class Run>
void take_chunks(std::atomic<int64_t>& next, int64_t K, Run run) {
  for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < K;) run(c);
}

// The calling thread's scratch buffer number Slot (grown, never shrunk; OpenMP workers write through it).
// Separate slots for callers whose buffers are live at the same time (a chain's panels and a layer's).
// Aligned to 64 bytes: a large vector's data sits 16 bytes past a page start (malloc's header), which made
// every 64-byte vector load of a panel straddle two cache lines.
template <int Slot, class T = float>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  constexpr size_t pad = 64 / sizeof(T);
  if (buf.size() < n + pad) buf.resize(n + pad);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t(63));
}

enum ScratchSlot { LAYER_SCRATCH = 0, CHAIN_SCRATCH = 1, SPMM_SCRATCH = 2, ROWS_SCRATCH = 3, COLUMN_SCRATCH = 4 };

}  // namespace st
