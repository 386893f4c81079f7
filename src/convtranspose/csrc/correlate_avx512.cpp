#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512dq,fma,avx2")
#define CT_NS avx512
#define CT_VBYTES 64
#define CT_NREGS 32
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own reduce intrinsics
#include <immintrin.h>
#define CT_BROADCAST_F(p) _mm512_set1_ps(*(p))
#define CT_BROADCAST_D(p) _mm512_set1_pd(*(p))
#define CT_HSUM_F(v) _mm512_reduce_add_ps((__m512)(v))
#define CT_HSUM_D(v) _mm512_reduce_add_pd((__m512d)(v))
#include "correlate.hpp"
#endif
