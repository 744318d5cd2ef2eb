// AVX2 + FMA kernels; only called after __builtin_cpu_supports says the CPU has them.
#if defined(__x86_64__) || defined(__i386__)
#define ST_TARGET __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define ST_ISA 2
#else
#define ST_TARGET
#define ST_ISA 0
#endif
#define ST_NS avx2
#include "kernels_impl.inc"
#include "decode_impl.inc"
#include "decode_columns.inc"
#include "attention.inc"
