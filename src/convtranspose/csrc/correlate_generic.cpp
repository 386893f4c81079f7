// Portable build: 16-byte vectors (SSE2 on x86-64, NEON on AArch64) via GCC's vector
// extensions, no fused multiply-add assumed.
#define CT_NS generic
#define CT_VBYTES 16
#define CT_NREGS 16
#include "correlate.hpp"
