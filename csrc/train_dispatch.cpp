// Runtime ISA choice, threading and the batch transposes around the single-threaded training kernels.
#include "train_dispatch.h"

#include "isa.h"

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "parallel.h"

namespace stt {

int best_isa() { return st_isa::detect(); }  // same values as the ISA_* enum

namespace {

using st::take_chunks;

// One ISA's training kernels, chosen once per call by index (as kTables in dispatch.cpp for inference).
struct Table {
  decltype(&generic::spmm_f32) spmm_f32;
  decltype(&generic::spmm_f64) spmm_f64;
  decltype(&generic::spmm_t_f32) spmm_t_f32;
  decltype(&generic::spmm_t_f64) spmm_t_f64;
  decltype(&generic::sddmm_f32) sddmm_f32;
  decltype(&generic::sddmm_f64) sddmm_f64;
};

const Table kTables[3] = {
    {generic::spmm_f32, generic::spmm_f64, generic::spmm_t_f32, generic::spmm_t_f64, generic::sddmm_f32,
     generic::sddmm_f64},
    {avx2::spmm_f32, avx2::spmm_f64, avx2::spmm_t_f32, avx2::spmm_t_f64, avx2::sddmm_f32, avx2::sddmm_f64},
    {avx512::spmm_f32, avx512::spmm_f64, avx512::spmm_t_f32, avx512::spmm_t_f64, avx512::sddmm_f32,
     avx512::sddmm_f64},
};

// run(r0, r1) over rows cut into chunks of about equal nnz taken from a shared counter (see parallel.h).
template <class Rows>
void over_rows(int threads, const int64_t* ptr, int64_t rows, int64_t work, Rows run) {
  const int nt = work < st::MIN_TRAIN_SPLIT_WORK ? 1 : std::max(1, threads);
  const int K = st::chunk_count(nt, rows);
  const std::vector<int64_t> bounds = st::chunk_bounds(ptr, rows, K);
  std::atomic<int64_t> next{0};
  st::parallel(nt, [&](int, int) {
    take_chunks(next, K, [&](int64_t c) {
      if (bounds[c + 1] > bounds[c]) run(bounds[c], bounds[c + 1]);
    });
  });
}

// Both transposes go through 16 x 16 tiles held in a local array: reads and writes then touch 16 lines each,
// instead of one line per element on the strided side (rows of X are 4n bytes apart and share cache sets).
constexpr int64_t TT = 16;

// body(i0, i1) over feature chunks [i0, i1) of n (multiples of TT), spread over the threads.
template <class Body>
void over_features(int threads, int64_t elements, int64_t n, Body body) {
  const int nt = elements < st::TRANSPOSE_PARALLEL ? 1 : std::max(1, threads);
  const int64_t chunk = nt == 1 ? n : std::max<int64_t>(TT, (n / (4 * nt) + TT - 1) / TT * TT);
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  st::parallel(nt, [&](int, int) {
    take_chunks(next, chunks, [&](int64_t c) { body(c * chunk, std::min(n, (c + 1) * chunk)); });
  });
}

template <class T>
void pack_t(int threads, const T* src, int64_t batch, int64_t n, int64_t stride, T* dst, int64_t tw) {
  const int64_t panels = (batch + tw - 1) / tw;
  over_features(threads, batch * n, n, [&](int64_t i0, int64_t i1) {
    T tile[TT][TT];
    for (int64_t p = 0; p < panels; ++p) {
      T* d = dst + p * n * tw;
      for (int64_t bb = 0; bb < tw; bb += TT) {  // tw is a multiple of 16
        const int64_t b0 = p * tw + bb;
        const int64_t nb = std::max<int64_t>(0, std::min(TT, batch - b0));  // real rows in this tile
        for (int64_t ib = i0; ib < i1; ib += TT) {
          const int64_t ni = std::min(TT, i1 - ib);
          for (int64_t b = 0; b < TT; ++b) {
            const T* s = src + (b0 + b) * stride + ib;
            if (b < nb && ni == TT)
              for (int64_t i = 0; i < TT; ++i) tile[i][b] = s[i];
            else
              for (int64_t i = 0; i < ni; ++i) tile[i][b] = b < nb ? s[i] : T(0);
          }
          for (int64_t i = 0; i < ni; ++i)
            for (int64_t b = 0; b < TT; ++b) d[(ib + i) * tw + bb + b] = tile[i][b];
        }
      }
    }
  });
}

template <class T>
void unpack_t(int threads, const T* src, int64_t batch, int64_t n, int64_t tw, T* dst, const T* bias) {
  over_features(threads, batch * n, n, [&](int64_t i0, int64_t i1) {  // features = output columns
    T tile[TT][TT];
    for (int64_t b0 = 0; b0 < batch; b0 += TT) {
      const int64_t nb = std::min(TT, batch - b0);
      const T* s = src + (b0 / tw) * n * tw + (b0 % tw);  // tiles never straddle panels (tw % 16 == 0)
      for (int64_t ib = i0; ib < i1; ib += TT) {
        const int64_t ni = std::min(TT, i1 - ib);
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t b = 0; b < TT; ++b) tile[b][i] = s[(ib + i) * tw + b];
        for (int64_t b = 0; b < nb; ++b) {
          T* d = dst + (b0 + b) * n + ib;
          if (bias)
            for (int64_t i = 0; i < ni; ++i) d[i] = tile[b][i] + bias[ib + i];
          else
            for (int64_t i = 0; i < ni; ++i) d[i] = tile[b][i];
        }
      }
    }
  });
}

}  // namespace

void spmm(int isa, int threads, int dtype, const Pattern& w, int64_t rows, const void* val, const void* src,
          int64_t src_rows, void* dst, int64_t tw, int64_t panels) {
  const Table& T = kTables[isa];
  const int64_t work = (w.ptr[rows] - w.ptr[0]) * tw * panels + rows * tw * panels;
  over_rows(threads, w.ptr, rows, work, [&](int64_t r0, int64_t r1) {
    if (dtype == F32)
      T.spmm_f32(w, (const float*)val, (const float*)src, src_rows, (float*)dst, rows, tw, panels, r0, r1);
    else
      T.spmm_f64(w, (const double*)val, (const double*)src, src_rows, (double*)dst, rows, tw, panels, r0, r1);
  });
}

void spmm_t(int isa, int threads, int dtype, const Pattern& w, int64_t rows, const void* val, const void* src,
            void* dst, int64_t dst_rows, int64_t tw, int64_t panels) {
  // Work items are (panel, column range) pairs: disjoint strips of dst, so threads never write the same value.
  // Ranges are halved (down to 16 columns) until every thread has an item: narrower ranges mean more passes
  // over W (measured 1.6x slower dX per 256-row panel with four 64-column ranges than with two of 128).
  const Table& T = kTables[isa];
  const int64_t work = (w.ptr[rows] - w.ptr[0]) * tw * panels + dst_rows * tw * panels;
  const int nt = work < st::MIN_TRAIN_SPLIT_WORK ? 1 : std::max(1, threads);
  int64_t cw = tw;
  while (cw > 16 && panels * (tw / cw) < nt) cw /= 2;
  const int64_t per_panel = tw / cw, items = panels * per_panel;
  std::atomic<int64_t> next{0};
  st::parallel(nt, [&](int, int) {
    take_chunks(next, items, [&](int64_t i) {
      const int64_t p = i / per_panel, c0 = (i % per_panel) * cw;
      if (dtype == F32)
        T.spmm_t_f32(w, (const float*)val, (const float*)src + p * rows * tw, rows, (float*)dst + p * dst_rows * tw,
                     dst_rows, tw, c0, c0 + cw);
      else
        T.spmm_t_f64(w, (const double*)val, (const double*)src + p * rows * tw, rows,
                     (double*)dst + p * dst_rows * tw, dst_rows, tw, c0, c0 + cw);
    });
  });
}

void sddmm(int isa, int threads, int dtype, const Pattern& w, int64_t rows, const void* a, const void* b,
           int64_t b_rows, void* dw, int64_t tw, int64_t panels) {
  const Table& T = kTables[isa];
  const int64_t work = (w.ptr[rows] - w.ptr[0]) * tw * panels;
  over_rows(threads, w.ptr, rows, work, [&](int64_t r0, int64_t r1) {
    if (dtype == F32)
      T.sddmm_f32(w, (const float*)a, rows, (const float*)b, b_rows, (float*)dw, tw, panels, r0, r1);
    else
      T.sddmm_f64(w, (const double*)a, rows, (const double*)b, b_rows, (double*)dw, tw, panels, r0, r1);
  });
}

void pack(int threads, int dtype, const void* src, int64_t batch, int64_t n, int64_t stride, void* dst, int64_t tw) {
  if (dtype == F32) pack_t(threads, (const float*)src, batch, n, stride, (float*)dst, tw);
  else pack_t(threads, (const double*)src, batch, n, stride, (double*)dst, tw);
}

void unpack(int threads, int dtype, const void* src, int64_t batch, int64_t n, int64_t tw, void* dst,
            const void* bias) {
  if (dtype == F32) unpack_t(threads, (const float*)src, batch, n, tw, (float*)dst, (const float*)bias);
  else unpack_t(threads, (const double*)src, batch, n, tw, (double*)dst, (const double*)bias);
}

}  // namespace stt
