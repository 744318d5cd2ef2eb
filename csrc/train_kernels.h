// Sparse training kernels over plain buffers (no torch ABI): forward Y = X W^T, input gradient dX = dY W and
// weight gradient at the kept positions only (SDDMM), for W in CSR with fixed nnz.
//
// Dense operands live in a "panel" layout: a [B, n] matrix (batch-major, as torch hands it) is transposed into
// P = ceil(B / TW) contiguous panels of [n, TW] (batch padded with zeros). Each nonzero then touches TW
// consecutive batch values of one feature: a TW-wide axpy (SpMM) or dot (SDDMM) that vectorises over the batch,
// and a panel (n * TW values) is sized to stay in L2 while every row of W passes over it.
// Every kernel here is single-threaded over a row range [r0, r1); train_dispatch.cpp spreads rows over threads.
#pragma once
#include <cstdint>

namespace stt {

// CSR-like index structure: row r owns positions [ptr[r], ptr[r+1]); ind (uint16 if bits == 16, else int32)
// are the columns. vmap (optional, int32) redirects position k to value vmap[k]: the transposed (CSC) view of
// W reads the CSR values through it, so the values exist once and only the indices are duplicated.
struct Pattern {
  const int64_t* ptr;
  const void* ind;
  int bits;
  const int32_t* vmap;
};

#define STT_DECLARE_KERNELS(NS)                                                                            \
  namespace NS {                                                                                          \
  /* dst panel rows [r0, r1) = sum_k val[k] * src panel row ind[k], for panels [0, panels) */            \
  void spmm_f32(const Pattern& w, const float* val, const float* src, int64_t src_rows, float* dst,       \
                int64_t dst_rows, int64_t tw, int64_t panels, int64_t r0, int64_t r1);                    \
  void spmm_f64(const Pattern& w, const double* val, const double* src, int64_t src_rows, double* dst,    \
                int64_t dst_rows, int64_t tw, int64_t panels, int64_t r0, int64_t r1);                    \
  /* one panel's dst columns [c0, c1) = W^T src: dst [dst_rows, tw], src [src_rows = rows of W, tw] */     \
  void spmm_t_f32(const Pattern& w, const float* val, const float* src, int64_t src_rows, float* dst,     \
                  int64_t dst_rows, int64_t tw, int64_t c0, int64_t c1);                                  \
  void spmm_t_f64(const Pattern& w, const double* val, const double* src, int64_t src_rows, double* dst,  \
                  int64_t dst_rows, int64_t tw, int64_t c0, int64_t c1);                                  \
  /* dw[k] = sum over all panels of <a panel row r, b panel row ind[k]> for rows r in [r0, r1) */        \
  void sddmm_f32(const Pattern& w, const float* a, int64_t a_rows, const float* b, int64_t b_rows,        \
                 float* dw, int64_t tw, int64_t panels, int64_t r0, int64_t r1);                          \
  void sddmm_f64(const Pattern& w, const double* a, int64_t a_rows, const double* b, int64_t b_rows,      \
                 double* dw, int64_t tw, int64_t panels, int64_t r0, int64_t r1);                         \
  }

STT_DECLARE_KERNELS(generic)
STT_DECLARE_KERNELS(avx2)
STT_DECLARE_KERNELS(avx512)

}  // namespace stt
