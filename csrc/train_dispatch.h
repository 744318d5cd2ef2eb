// Threaded drivers of the training kernels: runtime ISA choice, OpenMP row split, panel (un)packing.
#pragma once
#include <cstdint>

#include "train_kernels.h"

namespace stt {

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum { F32 = 0, F64 = 1 };
int best_isa();

// dst panels [rows, tw] = W (pattern w, values val) @ src panels [src_rows, tw]; rows with no nonzero get 0.
void spmm(int isa, int threads, int dtype, const Pattern& w, int64_t rows, const void* val, const void* src,
          int64_t src_rows, void* dst, int64_t tw, int64_t panels);
// dst panels [dst_rows, tw] = W^T (pattern w with `rows` rows, values val) @ src panels [rows, tw], read by rows.
void spmm_t(int isa, int threads, int dtype, const Pattern& w, int64_t rows, const void* val, const void* src,
            void* dst, int64_t dst_rows, int64_t tw, int64_t panels);
// dw[nnz] = for each nonzero (r, c): <a panels row r, b panels row c> over the whole (padded) batch.
void sddmm(int isa, int threads, int dtype, const Pattern& w, int64_t rows, const void* a, const void* b,
           int64_t b_rows, void* dw, int64_t tw, int64_t panels);
// src [B, n] (row stride `stride`, unit column stride) -> panels [ceil(B/tw), n, tw], batch padded with 0.
void pack(int threads, int dtype, const void* src, int64_t batch, int64_t n, int64_t stride, void* dst, int64_t tw);
// panels [ceil(B/tw), n, tw] -> dst [B, n] contiguous, + bias[n] if given.
void unpack(int threads, int dtype, const void* src, int64_t batch, int64_t n, int64_t tw, void* dst,
            const void* bias);

}  // namespace stt
