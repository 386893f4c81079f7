#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#define CT_NS avx2
#define CT_VBYTES 32
#define CT_NREGS 16
#include <immintrin.h>
#define CT_BROADCAST_F(p) _mm256_set1_ps(*(p))
#define CT_BROADCAST_D(p) _mm256_set1_pd(*(p))
#define CT_F16_STORE(dst, src) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(_mm256_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#include "correlate.hpp"
#endif
