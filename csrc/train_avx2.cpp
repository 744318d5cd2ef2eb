// AVX2 + FMA training kernels; only called after __builtin_cpu_supports says the CPU has them.
#if defined(__x86_64__) || defined(__i386__)
#define STT_TARGET __attribute__((target("avx2,fma")))
#define STT_VB 32
#else
#define STT_TARGET
#define STT_VB 16
#endif
#define STT_NS avx2
#include "train_impl.inc"
