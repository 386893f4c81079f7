#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define CT_NS avx2
#define CT_VBYTES 32
#define CT_NREGS 16
#include <immintrin.h>
#define CT_BROADCAST_F(p) _mm256_set1_ps(*(p))
#define CT_BROADCAST_D(p) _mm256_set1_pd(*(p))
#include "correlate.hpp"
#endif
