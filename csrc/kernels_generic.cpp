// Portable kernels: baseline x86-64 (SSE2) or whatever the compiler targets by default.
#define ST_TARGET
#define ST_ISA 0
#define ST_NS generic
#include "kernels_impl.inc"
#include "decode_impl.inc"
#include "decode_columns.inc"
#include "attention.inc"
