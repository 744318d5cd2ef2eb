// Bitmask-compressed Linear kernels for LLM decode (memory-bound: every byte of weight counts).
// Y [B, out] = X [B, in] @ W^T (+ bias), W stored as one bit per weight plus the kept values in column order:
// at 50-90% sparsity that is fewer bytes than any index format (CSR pays 16 bits per kept weight), and
// N:M patterns are just bitmasks (2:4 costs 1 bit per weight, the same as 2-bit in-group positions).
#pragma once
#include <cstdint>

namespace st {

enum ValueType { VALUES_F32 = 0, VALUES_BF16 = 1, VALUES_F16 = 2, VALUES_I8 = 3 };

struct Bitmask {
  // bit j of mask[o * words + c] says W[o, 16c + j] is kept; null mask = every weight kept (dense values)
  const uint16_t* mask;
  int64_t words;                // 16-bit mask words per row, ceil(in / 16)
  const int64_t* row_start;     // [out + 1]: row o's values are [row_start[o], row_start[o+1])
  const void* values;           // kept values in row-major column order, type vtype
  int vtype;
  const float* scales;          // int8: [out, groups] scale per row and group of `group` columns, else null
  int64_t group;                // int8 group size in columns, a multiple of 16 (in rounded up: one per row)
  int64_t in;
};

// Mask word c of row o; rows without a mask are dense (all 16 bits, fewer in the last word).
inline unsigned word_at(const Bitmask& w, int64_t o, int64_t c) {
  if (w.mask) return w.mask[o * w.words + c];
  const int64_t left = w.in - 16 * c;
  return left >= 16 ? 0xFFFFu : (1u << left) - 1u;
}

// Activations quantized for the int8 x int8 kernels, per row and group of QX_GROUP columns: magnitudes
// round(|x| / scale) in 0..255 (uint8, padded to `ld`, a multiple of 64, with 0), the signs one bit per column
// (set: negative; 64 columns per word), scale [nb, groups] (x ~= +-code * scale). Sign and magnitude rather than
// code + 128: twice the levels and no offset to correct; groups keep one outlier from coarsening a whole row.
constexpr int64_t QX_GROUP = 256;
// Columns per scale of the 16-bit activation codes of the dense int8 decode kernel on AVX2 (dense_rows_i16)
constexpr int64_t I16_GROUP = 256;

// Batch columns per panel of the many-rows (prefill) kernel, X^T laid out as [panels, in, width]: 128 from
// 65 rows on (each broadcast weight and decoded offset serve 8 vectors: 1.15-1.25x over 64 at 512 rows), 64
// below (at 32 rows the wider layout's half-empty panel rows ran ~15% slower).
constexpr int64_t SPMM_PANEL_MIN = 64, SPMM_PANEL_MAX = 128;

struct QuantX {
  const uint8_t* codes;   // [nb, ld]
  const uint64_t* signs;  // [nb, ld / 64]
  int64_t ld;
  const float* scale;     // [nb, groups]
  int64_t groups;         // ceil(in / QX_GROUP)
};

// W [out, in] column by column for decode with activation sparsity (decode_columns.inc): outputs in tiles of
// COL_TILE; entry r = t * in + j is input column j within output tile t, its COL_TILE_WORDS mask words at
// mask[r * COL_TILE_WORDS] (bit k of word c: W[COL_TILE t + 16 c + k, j] kept; none past out) and its kept
// values at [start[r], start[r + 1]) in output order. int8 values have one scale per output.
constexpr int COL_TILE_WORDS = 16;
constexpr int COL_TILE = 16 * COL_TILE_WORDS;

// mask == nullptr: dense columns (DenseColumnWeight), values [in, out] (column j of W at values + j * ld, ld >=
// out: a sibling's columns within its group's), no start; a zeroed input skips a whole column of W, a gap of out
// values the hardware prefetchers do not fill.
struct ColBitmask {
  const uint16_t* mask;    // [tiles * in, COL_TILE_WORDS]
  const int64_t* start;    // [tiles * in + 1]
  const void* values;
  int vtype;
  const float* scales;     // int8: [out], else null
  int64_t out, in, tiles;  // tiles = ceil(out / COL_TILE)
  int64_t ld;              // dense columns: values between columns
};

#define ST_DECLARE_DECODE(NS)                                                                                \
  namespace NS {                                                                                             \
  /* y[b * ys + o] = W[o, :] . x[b * xs : ...] + bias[o] for rows o in [r0, r1) and batch rows b < nb */      \
  void bitmask_rows(const Bitmask& w, const float* x, int64_t xs, int64_t nb, const float* bias, float* y,    \
                    int64_t ys, int64_t r0, int64_t r1);                                                      \
  /* yt[p][o][:] for rows [r0, r1) of every panel p of X^T xt[p][j][:] (pw columns, pw a multiple of 16 up */ \
  /* to SPMM_PANEL_MAX; 16 last_nv of them computed in the last): W xt + bias, W decoded once for all panels */ \
  void bitmask_spmm(const Bitmask& w, const float* xt, int64_t panels, int64_t pw, int last_nv, int64_t out,    \
                    const float* bias, float* yt, int64_t r0, int64_t r1);                                    \
  /* dense[o * in + c] = W[o, c] for rows [r0, r1) (float32, zeros in place) */                              \
  void bitmask_unpack(const Bitmask& w, float* dense, int64_t r0, int64_t r1);                               \
  /* quantize rows of x (QuantX): codes [nb, ld], signs [nb, ld / 64], scale [nb, ceil(in / QX_GROUP)] */  \
  void quantize_rows(const float* x, int64_t xs, int64_t nb, int64_t in, uint8_t* codes, uint64_t* signs,    \
                     int64_t ld, float* scale);                                                               \
  /* y[k * ys + o] for output tiles [t0, t1), batch rows k < nb (<= 8): sum over the na active inputs a */   \
  /* (columns active[a]) of xa[a * nb + k] * W[o, active[a]], scaled (int8) + bias */                        \
  void colmask_tiles(const ColBitmask& w, const int32_t* active, const float* xa, int64_t na, int nb,         \
                     const float* bias, float* y, int64_t ys, int64_t t0, int64_t t1);                       \
  /* dense columns (w.mask null): part[k * out + o] = sum over a < na of xa[a * nb + k] * W[o, active[a]] */  \
  void coldense_columns(const ColBitmask& w, const int32_t* active, const float* xa, int64_t na, int nb,      \
                        float* part);                                                                         \
  /* dense_t[j * out + o] = W[o, j] for the outputs of tiles [t0, t1) (W^T, float32, zeros in place) */       \
  void colmask_unpack_t(const ColBitmask& w, float* dense_t, int64_t t0, int64_t t1);                        \
  /* out [group, dv] = softmax(q [group, d] . K[keep]^T * scale) V[keep]: n kept rows of K and V (rows ks */  \
  /* and vs floats apart), p a [group, n] scratch (attention.inc) */                                          \
  void attention_head(const float* q, const float* k, int64_t ks, const float* v, int64_t vs,                \
                      const int32_t* keep, int64_t n, int64_t group, int64_t d, int64_t dv, float scale,      \
                      float* p, float* out);                                                                  \
  }

ST_DECLARE_DECODE(generic)
ST_DECLARE_DECODE(avx2)
ST_DECLARE_DECODE(avx512)

namespace avx2 {
// AVX2 only (decode_impl.inc; see bitmask_linear): 16-bit codes of x, a scale per batch row and I16_GROUP columns,
// and a dense int8 layer (no mask) over them
void int16_codes(const float* x, int64_t xs, int64_t nb, int64_t in, int16_t* codes, int64_t ld, float* scale,
                 int64_t groups);
void dense_rows_i16(const Bitmask& w, const int16_t* codes, int64_t ld, const float* scale, int64_t groups,
                    int64_t nb, const float* bias, float* y, int64_t ys, int64_t r0, int64_t r1);
}  // namespace avx2

namespace vnni {
// int8 weights x int8 activations (AVX-512 VNNI + VBMI2): y[b * ys + o] for rows [r0, r1), b < nb
void bitmask_rows_q8(const Bitmask& w, const QuantX& qx, int64_t nb, const float* bias, float* y, int64_t ys,
                     int64_t r0, int64_t r1);
}  // namespace vnni
bool has_vnni();  // the CPU has AVX-512 VNNI and VBMI2 (and the F/BW/VL/DQ tier)

namespace q8avx2 {
// The same on AVX2 (decode_q8_avx2.cpp); x16 [nb, qx.ld]: the activations as signed 16-bit codes (signed_codes)
void signed_codes(const QuantX& qx, int64_t nb, int16_t* x16);
void bitmask_rows_q8(const Bitmask& w, const QuantX& qx, const int16_t* x16, int64_t nb, const float* bias, float* y,
                     int64_t ys, int64_t r0, int64_t r1);
}  // namespace q8avx2

// Threaded drivers (decode_dispatch.cpp).
void bitmask_linear(int isa, int threads, const Bitmask& w, int64_t out, const float* x, int64_t nb, int64_t xs,
                    const float* bias, float* y);
// int8 activations: the VNNI kernel at isa 2 where the CPU has it, else the AVX2 one (isa >= 1)
void bitmask_linear_q8(int isa, int threads, const Bitmask& w, int64_t out, const float* x, int64_t nb, int64_t xs,
                       const float* bias, float* y);
void bitmask_to_dense(int isa, int threads, const Bitmask& w, int64_t out, float* dense);
// Many rows (prefill): X transposed into panels of 64 or 128 rows, all run through bitmask_spmm per chunk of rows.
void bitmask_linear_many(int isa, int threads, const Bitmask& w, int64_t out, const float* x, int64_t nb,
                         int64_t xs, const float* bias, float* y);
// y [nb, out] = (x masked to |x| > threshold) @ W^T + bias, reading only the columns of W some row keeps
// (skip) or every column, the masked inputs multiplied as zeros (!skip: one unbroken stream of weights)
void colmask_linear(int isa, int threads, const ColBitmask& w, const float* x, int64_t nb, int64_t xs,
                    float threshold, bool skip, const float* bias, float* y);
void colmask_to_dense_t(int isa, int threads, const ColBitmask& w, float* dense_t);

// Attention of one query token per batch row (decode): q [batch, kv_heads, group, d] (contiguous), K and V
// [batch, kv_heads, L, d or dv] with element strides (batch, head, row; unit last stride), keep [batch, L]
// (row bs apart; nonzero = attend) or null for every row; out [batch, kv_heads * group, dv] contiguous.
struct DecodeAttention {
  const float* q;
  const float* k;
  const float* v;
  const uint8_t* keep;
  int64_t batch, kv_heads, group, L, d, dv;
  int64_t k_bs, k_hs, k_ls, v_bs, v_hs, v_ls, keep_bs;
  float scale;
  float* out;
};
void decode_attention(int isa, int threads, const DecodeAttention& a);

}  // namespace st
