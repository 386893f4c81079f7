#if defined(__x86_64__) && defined(__GNUC__)
// The standard library's templates before the target pragma: their instantiations here
// are shared (weak) symbols that the linker may pick for every unit, so they must not
// carry this unit's instructions.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#ifdef __clang__  // which has no `#pragma GCC target`
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define CT_NS avx2
#define CT_VBYTES 32
#define CT_NREGS 16
#include <immintrin.h>
#define CT_BROADCAST_F(p) _mm256_set1_ps(*(p))
#define CT_BROADCAST_D(p) _mm256_set1_pd(*(p))
#define CT_F16_STORE(dst, src) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(_mm256_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
static inline void ct_stream(float* d, const float* s) { _mm256_stream_ps(d, _mm256_loadu_ps(s)); }
static inline void ct_stream(double* d, const double* s) { _mm256_stream_pd(d, _mm256_loadu_pd(s)); }
#define CT_STREAM(dst, src) ct_stream(dst, src)
#define CT_STREAM_FENCE() _mm_sfence()
// Masked loads (valid: 0 or 1) that stay loads: hidden from the optimiser, a mask known
// to be all or nothing would become a branch per pixel.
static inline int ct_opaque(int m) { __asm__("" : "+r"(m)); return m; }
#define CT_MASKZ_LOAD_F(valid, p) _mm256_maskload_ps(p, _mm256_set1_epi32(ct_opaque(-(int)(valid))))
#define CT_MASKZ_LOAD_D(valid, p) _mm256_maskload_pd(p, _mm256_set1_epi64x(ct_opaque(-(int)(valid))))
// The first n (0-7 / 0-3) elements at p, zeros after them (lanes past n are not read).
#define CT_LOAD_FIRST_F(n, p) _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))
#define CT_LOAD_FIRST_D(n, p) _mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)(n)), _mm256_setr_epi64x(0, 1, 2, 3)))
// Lanes [lo, hi) of p[lane * stride], zeros in the others (lanes outside are not read).
#define CT_RANGE_LANES_F(lo, hi) _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(hi)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))
#define CT_RANGE_LANES_D(lo, hi) _mm256_andnot_si256(_mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)(lo)), _mm256_setr_epi64x(0, 1, 2, 3)), _mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)(hi)), _mm256_setr_epi64x(0, 1, 2, 3)))
#define CT_GATHER_RANGE_F(lo, hi, p, stride) _mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(stride)), _mm256_castsi256_ps(CT_RANGE_LANES_F(lo, hi)), 4)
#define CT_GATHER_RANGE_D(lo, hi, p, stride) _mm256_mask_i32gather_pd(_mm256_setzero_pd(), p, _mm_mullo_epi32(_mm_setr_epi32(0, 1, 2, 3), _mm_set1_epi32(stride)), _mm256_castsi256_pd(CT_RANGE_LANES_D(lo, hi)), 8)
// p[idx[lane]] for the int32 offsets at idx (the masked form: GCC 12 warns of the plain
// one's undefined source).
#define CT_GATHER_IDX_F(p, idx) _mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), _mm256_castsi256_ps(_mm256_set1_epi32(-1)), 4)
#define CT_GATHER_IDX_D(p, idx) _mm256_mask_i32gather_pd(_mm256_setzero_pd(), p, _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)), _mm256_castsi256_pd(_mm256_set1_epi64x(-1)), 8)
// The first n (1-7 / 1-3) lanes of v at p as plain stores of 4, 2 and 1 lanes, not a
// masked store (vmaskmovps), which is slow on Zen 3 (with store_chunk's aligned stores:
// 8 -> 4 g4 k4 1-D on 2x711348, two threads, 43.9 -> 31.3 ms).
static inline void ct_store_first(int64_t n, float* p, __m256 v) {
  __m128 part = _mm256_castps256_ps128(v);
  if (n & 4) _mm_storeu_ps(p, part), part = _mm256_extractf128_ps(v, 1), p += 4;
  if (n & 2) _mm_storel_pi(reinterpret_cast<__m64*>(p), part), part = _mm_movehl_ps(part, part), p += 2;
  if (n & 1) _mm_store_ss(p, part);
}
static inline void ct_store_first(int64_t n, double* p, __m256d v) {
  __m128d part = _mm256_castpd256_pd128(v);
  if (n & 2) _mm_storeu_pd(p, part), part = _mm256_extractf128_pd(v, 1), p += 2;
  if (n & 1) _mm_store_sd(p, part);
}
#define CT_STORE_FIRST_F(n, p, v) ct_store_first(n, p, (__m256)(v))
#define CT_STORE_FIRST_D(n, p, v) ct_store_first(n, p, (__m256d)(v))
#define CT_F16_SCALAR(f) ((uint16_t)_cvtss_sh((f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define CT_F16_LOAD(dst, src) _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))))
#include "correlate.hpp"
#ifdef __clang__
#pragma clang attribute pop
#endif
#endif
