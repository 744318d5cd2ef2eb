// Threaded drivers of the bitmask kernels: rows split into chunks of about equal kept values (row_start is the
// prefix of work), taken from a shared counter; each chunk runs every batch row so its weights stream once.
#include <atomic>
#include <vector>

#include "decode.h"
#include "parallel.h"

namespace st {

namespace {

using RowsFn = decltype(&generic::bitmask_rows);
using UnpackFn = decltype(&generic::bitmask_unpack);
const RowsFn kRows[3] = {generic::bitmask_rows, avx2::bitmask_rows, avx512::bitmask_rows};
const UnpackFn kUnpack[3] = {generic::bitmask_unpack, avx2::bitmask_unpack, avx512::bitmask_unpack};

// run(r0, r1) over the rows of w on up to `threads` threads (one when the call is too small to split)
template <class Run>
void over_rows(int threads, const Bitmask& w, int64_t out, int64_t nb, Run run) {
  const int64_t work = (w.row_start[out] - w.row_start[0]) * nb;
  int nt = work < MIN_SPLIT_WORK ? 1 : (int)std::min<int64_t>(std::max(1, threads), std::max<int64_t>(out, 1));
  const int K = chunk_count(nt, out);
  const std::vector<int64_t> bounds = chunk_bounds(w.row_start, out, K);
  std::atomic<int64_t> next{0};
  parallel(nt, [&](int, int) {
    take_chunks(next, K, [&](int64_t c) {
      if (bounds[c + 1] > bounds[c]) run(bounds[c], bounds[c + 1]);
    });
  });
}

}  // namespace

void bitmask_linear(int isa, int threads, const Bitmask& w, int64_t out, const float* x, int64_t nb, int64_t xs,
                    const float* bias, float* y) {
  const RowsFn rows = kRows[isa];
  over_rows(threads, w, out, nb, [&](int64_t r0, int64_t r1) { rows(w, x, xs, nb, bias, y, out, r0, r1); });
}

void bitmask_linear_q8(int threads, const Bitmask& w, int64_t out, const float* x, int64_t nb, int64_t xs,
                       const float* bias, float* y) {
  const int64_t ld = (w.in + 63) / 64 * 64;
  std::vector<uint8_t> codes((size_t)(nb * ld));
  std::vector<float> scale((size_t)nb);
  avx512::quantize_rows(x, xs, nb, w.in, codes.data(), ld, scale.data());
  const QuantX qx{codes.data(), ld, scale.data()};
  over_rows(threads, w, out, nb, [&](int64_t r0, int64_t r1) { vnni::bitmask_rows_q8(w, qx, nb, bias, y, out, r0, r1); });
}

void bitmask_to_dense(int isa, int threads, const Bitmask& w, int64_t out, float* dense) {
  const UnpackFn unpack = kUnpack[isa];
  over_rows(threads, w, out, 1, [&](int64_t r0, int64_t r1) { unpack(w, dense, r0, r1); });
}

}  // namespace st
