// AVX-512 (F/BW/VL/DQ) kernels; only called after __builtin_cpu_supports says the CPU has them.
#if defined(__x86_64__) || defined(__i386__)
#define ST_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")))
#define ST_ISA 512
#else
#define ST_TARGET
#define ST_ISA 0
#endif
#define ST_NS avx512
#include "kernels_impl.inc"
#include "decode_impl.inc"
#include "decode_columns.inc"
#include "attention.inc"
