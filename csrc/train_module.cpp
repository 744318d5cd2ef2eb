// Python bindings of the training kernels (sparsetorch.kernels._train). Buffers travel as raw addresses
// (tensor.data_ptr()) so the extension never touches torch's C++ ABI; sparsetorch/sparse_training/_kernels.py
// checks dtypes, shapes and contiguity and keeps the tensors alive during the call.
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "train_dispatch.h"

namespace py = pybind11;
using u64 = unsigned long long;

namespace {

template <class T>
T* ptr(u64 a) { return reinterpret_cast<T*>(static_cast<uintptr_t>(a)); }

void check(int isa, int dtype, int64_t tw, int bits) {
  if (isa < 0 || isa > stt::best_isa()) throw std::invalid_argument("ISA level not supported by this CPU");
  if (dtype != stt::F32 && dtype != stt::F64) throw std::invalid_argument("dtype must be 0 (float32) or 1 (float64)");
  if (tw != 16 && tw != 32 && tw != 64 && tw != 128 && tw != 256)
    throw std::invalid_argument("panel width must be 16, 32, 64, 128 or 256");
  if (bits != 16 && bits != 32) throw std::invalid_argument("bits must be 16 or 32");
}

}  // namespace

PYBIND11_MODULE(_train, m) {
  m.doc() = "sparsetorch sparse training kernels (CSR forward, transposed backward, SDDMM), AVX-512/AVX2/portable";
  m.def("best_isa", &stt::best_isa, "0 = portable, 1 = AVX2+FMA, 2 = AVX-512 (F/BW/VL/DQ)");
  m.def(
      "spmm",
      [](int isa, int threads, int dtype, int64_t rows, u64 indptr, u64 indices, int bits, u64 vmap, u64 values,
         u64 src, int64_t src_rows, u64 dst, int64_t tw, int64_t panels) {
        check(isa, dtype, tw, bits);
        if (rows < 0 || src_rows < 0 || panels < 0) throw std::invalid_argument("bad shape");
        stt::Pattern w{ptr<const int64_t>(indptr), ptr<const void>(indices), bits, ptr<const int32_t>(vmap)};
        py::gil_scoped_release nogil;
        stt::spmm(isa, threads, dtype, w, rows, ptr<const void>(values), ptr<const void>(src), src_rows,
                  ptr<void>(dst), tw, panels);
      });
  m.def(
      "spmm_t",
      [](int isa, int threads, int dtype, int64_t rows, u64 indptr, u64 indices, int bits, u64 values, u64 src,
         u64 dst, int64_t dst_rows, int64_t tw, int64_t panels) {
        check(isa, dtype, tw, bits);
        if (rows < 0 || dst_rows < 0 || panels < 0) throw std::invalid_argument("bad shape");
        stt::Pattern w{ptr<const int64_t>(indptr), ptr<const void>(indices), bits, nullptr};
        py::gil_scoped_release nogil;
        stt::spmm_t(isa, threads, dtype, w, rows, ptr<const void>(values), ptr<const void>(src), ptr<void>(dst),
                    dst_rows, tw, panels);
      });
  m.def(
      "sddmm",
      [](int isa, int threads, int dtype, int64_t rows, u64 indptr, u64 indices, int bits, u64 a, u64 b,
         int64_t b_rows, u64 dw, int64_t tw, int64_t panels) {
        check(isa, dtype, tw, bits);
        if (rows < 0 || b_rows < 0 || panels < 1) throw std::invalid_argument("bad shape");
        stt::Pattern w{ptr<const int64_t>(indptr), ptr<const void>(indices), bits, nullptr};
        py::gil_scoped_release nogil;
        stt::sddmm(isa, threads, dtype, w, rows, ptr<const void>(a), ptr<const void>(b), b_rows, ptr<void>(dw), tw,
                   panels);
      });
  m.def("pack", [](int threads, int dtype, u64 src, int64_t batch, int64_t n, int64_t stride, u64 dst, int64_t tw) {
    check(0, dtype, tw, 32);
    if (batch < 0 || n < 0 || stride < n) throw std::invalid_argument("bad shape");
    py::gil_scoped_release nogil;
    stt::pack(threads, dtype, ptr<const void>(src), batch, n, stride, ptr<void>(dst), tw);
  });
  m.def("unpack", [](int threads, int dtype, u64 src, int64_t batch, int64_t n, int64_t tw, u64 dst, u64 bias) {
    check(0, dtype, tw, 32);
    if (batch < 0 || n < 0) throw std::invalid_argument("bad shape");
    py::gil_scoped_release nogil;
    stt::unpack(threads, dtype, ptr<const void>(src), batch, n, tw, ptr<void>(dst), ptr<const void>(bias));
  });
}
