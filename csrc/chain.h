// Fused chains: Y = act_L(W_L ... act_1(W_1 X + b_1) ... + b_L) for X [B, in], all layers in one native call.
// Between layers the activations stay in the kernels' transposed, batch-padded panel layout (no per-layer
// transposes, allocations or Python calls), which is what makes small MLPs fast at batch 1 and 64.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace st {

enum Act : int { ACT_NONE = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3, ACT_TANH = 4, ACT_SIGMOID = 5 };
enum LayerKind : int { LAYER_CSR = 0, LAYER_NM = 1, LAYER_BSR = 2, LAYER_DENSE = 3 };

struct ChainLayer {
  int kind;  // LayerKind; only the matching member of csr / nm / bsr / dense is used
  int64_t out, in;
  Csr csr;
  NM nm;
  Bsr bsr;
  Dense dense;
  const float* bias;  // [out] or null
  int act;            // Act, applied after the bias
  // work split (as in dispatch.h's Problem): units rows (or block rows of unit_rows), prefix = cumulative work
  int64_t units, unit_rows;
  const int64_t* prefix;
  int64_t work;  // multiply-adds at batch 1
};

// layers[l].in == layers[l-1].out (checked by the caller). x rows are x_stride apart; y is [batch, out] contiguous.
// tile: widest batch panel in 16-column vectors (1..4); threads: OpenMP threads (1 for tiny chains).
void chain_forward(int isa, const std::vector<ChainLayer>& layers, const float* x, int64_t batch, int64_t x_stride,
                   float* y, int threads, int tile);

}  // namespace st
