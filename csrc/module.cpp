// Python bindings. Buffers travel as raw addresses (tensor.data_ptr()) so the extension never touches
// torch's C++ ABI; the Python side (sparsetorch/kernels/_ext.py) checks dtypes, shapes and contiguity
// and keeps the tensors alive for the duration of the call.
#include <pybind11/pybind11.h>

#include <stdexcept>

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
}
