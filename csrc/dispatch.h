// Threaded drivers: Y [B, out] = X [B, in] @ W^T (+ bias) for each sparse format.
#pragma once
#include <cstdint>
#include <functional>

#include "kernels.h"
#include "parallel.h"

namespace st {

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
int best_isa();

// One ISA's kernels (the batch-1 CSR kernel of AVX-512 CPUs is the AVX2 one: see dispatch.cpp).
struct Table {
  decltype(&generic::csr_gemv) csr_gemv;
  decltype(&generic::csr_spmm) csr_spmm;
  decltype(&generic::nm_gemv) nm_gemv;
  decltype(&generic::nm_spmm) nm_spmm;
  decltype(&generic::bsr_gemv) bsr_gemv;
  decltype(&generic::bsr_spmm) bsr_spmm;
  decltype(&generic::dense_gemv) dense_gemv;
  decltype(&generic::dense_spmm) dense_spmm;
  decltype(&generic::transpose) transpose;
  decltype(&generic::activate) activate;
};
const Table& table(int isa);

struct Problem {
  int64_t out, in, batch;
  const float* x;    // [batch, in], rows x_stride apart, unit stride inside a row
  int64_t x_stride;
  float* y;          // [batch, out], contiguous
  int threads;       // OpenMP threads for this call (the caller passes torch.get_num_threads())
  int tile_vectors;  // batched kernels: batch tile = 16 * tile_vectors columns (1..4)
  // work split: `units` rows (or block rows of unit_rows rows); prefix = cumulative work per unit or null
  int64_t units, unit_rows;
  const int64_t* prefix;
  int64_t work;      // total multiply-adds for batch 1 (nnz), to keep tiny calls single-threaded
};

using GemvFn = std::function<void(const float*, float*, int64_t, int64_t)>;
using SpmmFn = std::function<void(const float*, int64_t, int64_t, int, float*, int64_t, int64_t)>;

using TransposeFn = void (*)(const float*, int64_t, float*, int64_t, int64_t, int64_t);

void linear(const Problem& p, const GemvFn& gemv, const SpmmFn& spmm, TransposeFn transpose);
void csr_linear(int isa, const Problem& p, const Csr& w, const float* bias);
void nm_linear(int isa, const Problem& p, const NM& w, const float* bias);
void bsr_linear(int isa, const Problem& p, const Bsr& w, const float* bias);

}  // namespace st
