// Sparse Linear kernels Y = X @ W^T over plain buffers (no torch ABI). One set of kernels per ISA
// (generic / AVX2 / AVX-512), compiled from kernels_impl.inc with per-function target attributes.
// Every kernel here is single-threaded over a row range; dispatch.cpp splits rows across OpenMP threads.
#pragma once
#include <cstdint>

namespace st {

// CSR rows [r0, r1): indptr [out+1] int64, indices uint16 (bits=16) or int32 (bits=32), values fp32.
struct Csr {
  const int64_t* indptr;
  const void* indices;
  int bits;
  const float* values;
};
// N:M rows: each row keeps n of every m inputs; values/offsets are [out, groups*n], offsets uint8 in [0, m).
struct NM {
  const float* values;
  const uint8_t* offsets;
  int n, m;
  int64_t groups;
};
// BSR with RxC blocks stored row-major [nblocks, R, C]; indptr over block rows, indices are block columns.
struct Bsr {
  const int64_t* indptr;
  const void* indices;
  int bits;
  const float* values;
  int R, C;
};

// Dense layer inside a fused chain (a weakly sparse layer runs faster unindexed), stored transposed:
// values_t [in, ldw], ldw = out rounded up to 16 with zero padding, so batch-1 rows are whole vectors
// (callers start row ranges at multiples of 16: the batch-1 kernel reads whole vectors from there).
struct Dense {
  const float* values_t;
  int64_t in, out, ldw;
};

#define ST_DECLARE_KERNELS(NS)                                                                              \
  namespace NS {                                                                                           \
  /* y[o] = W[o,:] . x + bias[o] for rows o in [r0, r1) */                                                 \
  void csr_gemv(const Csr& w, const float* x, const float* bias, float* y, int64_t r0, int64_t r1);       \
  /* yt[o, b0:b0+16*nv] = W[o,:] @ xt[:, b0:b0+16*nv] (+bias); xt/yt rows have stride ld (padded batch) */ \
  void csr_spmm(const Csr& w, const float* xt, int64_t ld, int64_t b0, int nv, const float* bias,        \
                float* yt, int64_t r0, int64_t r1);                                                        \
  void nm_gemv(const NM& w, const float* x, const float* bias, float* y, int64_t r0, int64_t r1);         \
  void nm_spmm(const NM& w, const float* xt, int64_t ld, int64_t b0, int nv, const float* bias, float* yt, \
               int64_t r0, int64_t r1);                                                                    \
  /* BSR kernels work on block rows [br0, br1) */                                                          \
  void bsr_gemv(const Bsr& w, const float* x, const float* bias, float* y, int64_t br0, int64_t br1);     \
  void bsr_spmm(const Bsr& w, const float* xt, int64_t ld, int64_t b0, int nv, const float* bias,        \
                float* yt, int64_t br0, int64_t br1);                                                      \
  void dense_gemv(const Dense& w, const float* x, const float* bias, float* y, int64_t r0, int64_t r1);     \
  void dense_spmm(const Dense& w, const float* xt, int64_t ld, int64_t b0, int nv, const float* bias,    \
                  float* yt, int64_t r0, int64_t r1);                                                      \
  /* dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols */                                         \
  void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols);    \
  /* p[0:n] = act(p[0:n]): 0 none, 1 relu, 2 gelu (erf), 3 gelu (tanh), 4 tanh, 5 sigmoid */             \
  void activate(int act, float* p, int64_t n);                                                             \
  }

ST_DECLARE_KERNELS(generic)
ST_DECLARE_KERNELS(avx2)
ST_DECLARE_KERNELS(avx512)

}  // namespace st
