// Portable training kernels (SSE2 on x86-64, whatever the compiler vectorises elsewhere).
#define STT_TARGET
#define STT_VB 16
#define STT_NS generic
#include "train_impl.inc"
