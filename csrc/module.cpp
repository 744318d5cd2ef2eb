// Python bindings. Buffers travel as raw addresses (tensor.data_ptr()) so the extension never touches
// torch's C++ ABI; the Python side (sparsetorch/kernels/_ext.py) checks dtypes, shapes and contiguity
// and keeps the tensors alive for the duration of the call.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <vector>

#include "chain.h"
#include "decode.h"
#include "dispatch.h"

namespace py = pybind11;
using u64 = unsigned long long;

namespace {

template <class T>
T* ptr(u64 a) { return reinterpret_cast<T*>(static_cast<uintptr_t>(a)); }

int checked_isa(int isa) {
  if (isa < 0 || isa > st::best_isa()) throw std::invalid_argument("ISA level not supported by this CPU");
  return isa;
}

st::Problem problem(int64_t out, int64_t in, int64_t batch, u64 x, int64_t x_stride, u64 y, int threads, int tile,
                    int64_t units, int64_t unit_rows, const int64_t* prefix, int64_t work) {
  if (out < 0 || in < 0 || batch < 1 || x_stride < in) throw std::invalid_argument("bad problem shape");
  return st::Problem{out, in, batch, ptr<const float>(x), x_stride, ptr<float>(y), threads, tile,
                     units, unit_rows, prefix, work};
}

// One layer of a fused chain from (kind, act, bias, *static): static as the matching *_linear function takes it
// (csr: out, in, indptr, indices, bits, values, nnz; nm: out, in, n, m, values, offsets;
//  bsr: out, in, R, C, indptr, indices, bits, values, nblocks; dense: out, in, values_t [in, ldw], ldw).
st::ChainLayer chain_layer(const py::tuple& t) {
  st::ChainLayer L{};
  L.kind = t[0].cast<int>();
  L.act = t[1].cast<int>();
  L.bias = ptr<const float>(t[2].cast<u64>());
  L.out = t[3].cast<int64_t>();
  L.in = t[4].cast<int64_t>();
  if (L.out < 1 || L.in < 1 || L.act < st::ACT_NONE || L.act > st::ACT_SIGMOID)
    throw std::invalid_argument("bad chain layer shape or activation");
  auto need = [&](size_t n) {
    if (t.size() != n) throw std::invalid_argument("wrong number of fields for this chain layer kind");
  };
  if (L.kind == st::LAYER_CSR) {
    need(10);
    const int bits = t[7].cast<int>();
    if (bits != 16 && bits != 32) throw std::invalid_argument("bits must be 16 or 32");
    L.csr = st::Csr{ptr<const int64_t>(t[5].cast<u64>()), ptr<const void>(t[6].cast<u64>()), bits,
                    ptr<const float>(t[8].cast<u64>())};
    L.units = L.out, L.unit_rows = 1, L.prefix = L.csr.indptr, L.work = t[9].cast<int64_t>();
  } else if (L.kind == st::LAYER_NM) {
    need(9);
    const int n = t[5].cast<int>(), mm = t[6].cast<int>();
    if (n < 1 || mm < n || mm > 256 || L.in % mm != 0) throw std::invalid_argument("bad N:M parameters");
    L.nm = st::NM{ptr<const float>(t[7].cast<u64>()), ptr<const uint8_t>(t[8].cast<u64>()), n, mm, L.in / mm};
    L.units = L.out, L.unit_rows = 1, L.prefix = nullptr, L.work = L.out * (L.in / mm) * n;
  } else if (L.kind == st::LAYER_BSR) {
    need(12);
    const int R = t[5].cast<int>(), C = t[6].cast<int>(), bits = t[9].cast<int>();
    if (R < 1 || C < 1 || L.out % R != 0 || L.in % C != 0) throw std::invalid_argument("bad block shape");
    if (bits != 16 && bits != 32) throw std::invalid_argument("bits must be 16 or 32");
    L.bsr = st::Bsr{ptr<const int64_t>(t[7].cast<u64>()), ptr<const void>(t[8].cast<u64>()), bits,
                    ptr<const float>(t[10].cast<u64>()), R, C};
    L.units = L.out / R, L.unit_rows = R, L.prefix = L.bsr.indptr, L.work = t[11].cast<int64_t>() * R * C;
  } else if (L.kind == st::LAYER_DENSE) {
    need(7);
    const int64_t ldw = t[6].cast<int64_t>();
    if (ldw < L.out || ldw % 16 != 0) throw std::invalid_argument("dense ldw must be out rounded up to 16");
    L.dense = st::Dense{ptr<const float>(t[5].cast<u64>()), L.in, L.out, ldw};
    // split in 16-row units so every thread's rows start on a whole vector of the padded Wt rows
    L.units = (L.out + 15) / 16, L.unit_rows = 16, L.prefix = nullptr, L.work = L.out * L.in;
  } else {
    throw std::invalid_argument("chain layer kind must be 0 (csr), 1 (nm), 2 (bsr) or 3 (dense)");
  }
  return L;
}

// A bitmask weight from its fields (see csrc/decode.h); mask = 0 means dense values.
st::Bitmask bitmask(int64_t out, int64_t in, u64 mask, int64_t words, u64 row_start, u64 values, int vtype, u64 scales,
                    int64_t group) {
  if (out < 1 || in < 1) throw std::invalid_argument("bitmask weight: bad shape");
  if (words != (in + 15) / 16) throw std::invalid_argument("bitmask weight: words per row must be ceil(in / 16)");
  if (vtype < st::VALUES_F32 || vtype > st::VALUES_I8) throw std::invalid_argument("bitmask weight: bad value type");
  if ((vtype == st::VALUES_I8) != (scales != 0)) throw std::invalid_argument("bitmask weight: int8 values need scales");
  if (scales && (group < 16 || group % 16 != 0)) throw std::invalid_argument("bitmask weight: group must be a multiple of 16");
  return st::Bitmask{ptr<const uint16_t>(mask), words, ptr<const int64_t>(row_start), ptr<const void>(values), vtype,
                     ptr<const float>(scales), group, in};
}

// A column-major bitmask weight from its fields (see csrc/decode.h).
st::ColBitmask col_bitmask(int64_t out, int64_t in, u64 mask, u64 start, u64 values, int vtype, u64 scales,
                           int64_t ld = 0) {
  if (out < 1 || in < 1) throw std::invalid_argument("column bitmask weight: bad shape");
  if (vtype < st::VALUES_F32 || vtype > st::VALUES_I8) throw std::invalid_argument("column bitmask weight: bad value type");
  if ((vtype == st::VALUES_I8) != (scales != 0)) throw std::invalid_argument("column bitmask weight: int8 values need scales");
  if (!mask && ld < out) throw std::invalid_argument("dense columns: ld below out");
  return st::ColBitmask{ptr<const uint16_t>(mask), ptr<const int64_t>(start), ptr<const void>(values), vtype,
                        ptr<const float>(scales), out, in, (out + st::COL_TILE - 1) / st::COL_TILE, ld};
}

struct Chain {
  std::vector<st::ChainLayer> layers;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsetorch compiled CPU kernels (CSR / N:M / BSR sparse Linear), AVX-512 / AVX2 / portable";
  m.def("best_isa", &st::best_isa, "0 = portable, 1 = AVX2+FMA, 2 = AVX-512 (F/BW/VL/DQ)");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def(
      "csr_linear",
      [](int isa, int threads, int tile, int64_t out, int64_t in, u64 indptr, u64 indices, int bits, u64 values,
         int64_t nnz, u64 x, int64_t batch, int64_t x_stride, u64 bias, u64 y) {
        if (bits != 16 && bits != 32) throw std::invalid_argument("bits must be 16 or 32");
        const int64_t* ip = ptr<const int64_t>(indptr);
        st::Problem p = problem(out, in, batch, x, x_stride, y, threads, tile, out, 1, ip, nnz);
        st::Csr w{ip, ptr<const void>(indices), bits, ptr<const float>(values)};
        isa = checked_isa(isa);
        py::gil_scoped_release nogil;
        st::csr_linear(isa, p, w, ptr<const float>(bias));
      });
  m.def(
      "nm_linear",
      [](int isa, int threads, int tile, int64_t out, int64_t in, int n, int mm, u64 values, u64 offsets, u64 x,
         int64_t batch, int64_t x_stride, u64 bias, u64 y) {
        if (n < 1 || mm < n || mm > 256 || in % mm != 0) throw std::invalid_argument("bad N:M parameters");
        const int64_t groups = in / mm;
        st::Problem p = problem(out, in, batch, x, x_stride, y, threads, tile, out, 1, nullptr, out * groups * n);
        st::NM w{ptr<const float>(values), ptr<const uint8_t>(offsets), n, mm, groups};
        isa = checked_isa(isa);
        py::gil_scoped_release nogil;
        st::nm_linear(isa, p, w, ptr<const float>(bias));
      });
  m.def(
      "bsr_linear",
      [](int isa, int threads, int tile, int64_t out, int64_t in, int R, int C, u64 indptr, u64 indices, int bits,
         u64 values, int64_t nblocks, u64 x, int64_t batch, int64_t x_stride, u64 bias, u64 y) {
        if (bits != 16 && bits != 32) throw std::invalid_argument("bits must be 16 or 32");
        if (R < 1 || C < 1 || out % R != 0 || in % C != 0) throw std::invalid_argument("bad block shape");
        const int64_t* ip = ptr<const int64_t>(indptr);
        st::Problem p =
            problem(out, in, batch, x, x_stride, y, threads, tile, out / R, R, ip, nblocks * R * C);
        st::Bsr w{ip, ptr<const void>(indices), bits, ptr<const float>(values), R, C};
        isa = checked_isa(isa);
        py::gil_scoped_release nogil;
        st::bsr_linear(isa, p, w, ptr<const float>(bias));
      });
  m.def("has_vnni", &st::has_vnni, "AVX-512 VNNI + VBMI2 (int8 x int8 bitmask kernels)");
  m.def(
      "bitmask_linear",
      // tile is unused (one signature with the other kernels); qx = 1 quantizes x to int8 (VNNI / AVX2 kernel)
      [](int isa, int threads, int /*tile*/, int64_t out, int64_t in, u64 mask, int64_t words, u64 row_start,
         u64 values, int vtype, u64 scales, int64_t group, int qx, u64 x, int64_t batch,
         int64_t x_stride, u64 bias, u64 y) {
        const st::Bitmask w = bitmask(out, in, mask, words, row_start, values, vtype, scales, group);
        if (batch < 1 || x_stride < in) throw std::invalid_argument("bad input shape");
        isa = checked_isa(isa);
        if (qx && (vtype != st::VALUES_I8 || group % 64 != 0 || isa < 1))
          throw std::invalid_argument("int8 activations need int8 values, group % 64 == 0 and AVX2 or VNNI");
        py::gil_scoped_release nogil;
        if (qx) st::bitmask_linear_q8(isa, threads, w, out, ptr<const float>(x), batch, x_stride, ptr<const float>(bias),
                                      ptr<float>(y));
        else st::bitmask_linear(isa, threads, w, out, ptr<const float>(x), batch, x_stride, ptr<const float>(bias),
                                ptr<float>(y));
      });
  m.def(
      "bitmask_linear_many",
      // many input rows (prefill): X^T panels through the sparse x dense kernel (fp32 activations)
      [](int isa, int threads, int64_t out, int64_t in, u64 mask, int64_t words, u64 row_start, u64 values, int vtype,
         u64 scales, int64_t group, u64 x, int64_t batch, int64_t x_stride, u64 bias, u64 y) {
        const st::Bitmask w = bitmask(out, in, mask, words, row_start, values, vtype, scales, group);
        if (batch < 1 || x_stride < in) throw std::invalid_argument("bad input shape");
        isa = checked_isa(isa);
        py::gil_scoped_release nogil;
        st::bitmask_linear_many(isa, threads, w, out, ptr<const float>(x), batch, x_stride, ptr<const float>(bias),
                                ptr<float>(y));
      });
  m.def(
      "bitmask_to_dense",
      [](int isa, int threads, int64_t out, int64_t in, u64 mask, int64_t words, u64 row_start, u64 values, int vtype,
         u64 scales, int64_t group, u64 dense) {
        const st::Bitmask w = bitmask(out, in, mask, words, row_start, values, vtype, scales, group);
        isa = checked_isa(isa);
        py::gil_scoped_release nogil;
        st::bitmask_to_dense(isa, threads, w, out, ptr<float>(dense));
      });
  m.def(
      "colmask_linear",
      // tile is unused (one signature with the other kernels); inputs with |x| <= threshold count as zero,
      // and with skip their weight columns are not read; ld: values between dense columns (mask 0)
      [](int isa, int threads, int /*tile*/, int64_t out, int64_t in, u64 mask, u64 start, u64 values, int vtype,
         u64 scales, double threshold, int skip, int64_t ld, u64 x, int64_t batch, int64_t x_stride, u64 bias, u64 y) {
        const st::ColBitmask w = col_bitmask(out, in, mask, start, values, vtype, scales, ld);
        if (batch < 1 || x_stride < in) throw std::invalid_argument("bad input shape");
        isa = checked_isa(isa);
        py::gil_scoped_release nogil;
        st::colmask_linear(isa, threads, w, ptr<const float>(x), batch, x_stride, (float)threshold, skip != 0,
                           ptr<const float>(bias), ptr<float>(y));
      });
  m.def(
      "decode_attention",
      // shapes and strides in elements; keep is a bool [batch, L] mask (row keep_bs apart) or 0 for all rows
      [](int isa, int threads, u64 q, u64 k, u64 v, u64 keep, int64_t batch, int64_t kv_heads, int64_t group,
         int64_t L, int64_t d, int64_t dv, int64_t k_bs, int64_t k_hs, int64_t k_ls, int64_t v_bs, int64_t v_hs,
         int64_t v_ls, int64_t keep_bs, double scale, u64 out) {
        if (batch < 1 || kv_heads < 1 || group < 1 || L < 1 || d < 1 || dv < 1 || k_ls < d || v_ls < dv ||
            L > INT32_MAX)
          throw std::invalid_argument("bad decode attention shape");
        const st::DecodeAttention a{ptr<const float>(q), ptr<const float>(k), ptr<const float>(v),
                                    ptr<const uint8_t>(keep), batch, kv_heads, group, L, d, dv, k_bs, k_hs, k_ls,
                                    v_bs, v_hs, v_ls, keep_bs, (float)scale, ptr<float>(out)};
        isa = checked_isa(isa);
        py::gil_scoped_release nogil;
        st::decode_attention(isa, threads, a);
      });
  m.def(
      "colmask_to_dense_t",
      [](int isa, int threads, int64_t out, int64_t in, u64 mask, u64 start, u64 values, int vtype, u64 scales,
         u64 dense_t) {
        const st::ColBitmask w = col_bitmask(out, in, mask, start, values, vtype, scales);
        if (!w.mask) throw std::invalid_argument("dense columns have no tiles to unpack: they are W^T already");
        isa = checked_isa(isa);
        py::gil_scoped_release nogil;
        st::colmask_to_dense_t(isa, threads, w, ptr<float>(dense_t));
      });
  py::class_<Chain>(m, "Chain", "Consecutive sparse layers (+ bias, activation) run by one call; see csrc/chain.h")
      .def(py::init([](const py::list& specs) {
        Chain c;
        for (const auto& item : specs) {
          c.layers.push_back(chain_layer(item.cast<py::tuple>()));
          const size_t n = c.layers.size();
          if (n > 1 && c.layers[n - 1].in != c.layers[n - 2].out)
            throw std::invalid_argument("chain layers do not connect (in != previous out)");
        }
        if (c.layers.empty()) throw std::invalid_argument("empty chain");
        return c;
      }))
      .def_property_readonly("in_features", [](const Chain& c) { return c.layers.front().in; })
      .def_property_readonly("out_features", [](const Chain& c) { return c.layers.back().out; })
      .def("run", [](const Chain& c, int isa, int threads, int tile, u64 x, int64_t batch, int64_t x_stride, u64 y) {
        if (batch < 0 || x_stride < c.layers.front().in) throw std::invalid_argument("bad input shape");
        if (batch == 0) return;
        isa = checked_isa(isa);
        py::gil_scoped_release nogil;
        st::chain_forward(isa, c.layers, ptr<const float>(x), batch, x_stride, ptr<float>(y), threads, tile);
      });
}
