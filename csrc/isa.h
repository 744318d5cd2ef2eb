// Which SIMD instruction set this CPU runs: 0 portable, 1 AVX2+FMA, 2 AVX-512 (F/BW/VL/DQ).
// Shared by the inference (_C) and training (_train) extensions so both choose alike.
#pragma once

namespace st_isa {

inline int detect() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

}  // namespace st_isa
