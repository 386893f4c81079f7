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
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512dq,fma,avx2,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512vl,avx512dq,fma,avx2,f16c")
#endif
#define CT_NS avx512
#define CT_VBYTES 64
#define CT_NREGS 32
#ifndef __clang__
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own reduce intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"  // (the same, inlined into blocks of 1-3)
#endif
#include <immintrin.h>
#define CT_BROADCAST_F(p) _mm512_set1_ps(*(p))
#define CT_BROADCAST_D(p) _mm512_set1_pd(*(p))
#define CT_HSUM_F(v) _mm512_reduce_add_ps((__m512)(v))
#define CT_HSUM_D(v) _mm512_reduce_add_pd((__m512d)(v))
#define CT_F16_STORE(dst, src) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(_mm512_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
static inline void ct_stream(float* d, const float* s) { _mm512_stream_ps(d, _mm512_loadu_ps(s)); }
static inline void ct_stream(double* d, const double* s) { _mm512_stream_pd(d, _mm512_loadu_pd(s)); }
#define CT_STREAM(dst, src) ct_stream(dst, src)
#define CT_STREAM_FENCE() _mm_sfence()
// Masked loads (valid: 0 or 1) that stay loads: hidden from the optimiser, a mask known
// to be all or nothing would become a branch per pixel.
static inline unsigned ct_opaque(unsigned m) { __asm__("" : "+r"(m)); return m; }
#define CT_MASKZ_LOAD_F(valid, p) _mm512_maskz_loadu_ps((__mmask16)ct_opaque(0u - (valid)), p)
#define CT_MASKZ_LOAD_D(valid, p) _mm512_maskz_loadu_pd((__mmask8)ct_opaque(0u - (valid)), p)
// The first n (0-15 / 0-7) elements at p, zeros after them (lanes past n are not read).
#define CT_LOAD_FIRST_F(n, p) _mm512_maskz_loadu_ps((__mmask16)((1u << (n)) - 1), p)
#define CT_LOAD_FIRST_D(n, p) _mm512_maskz_loadu_pd((__mmask8)((1u << (n)) - 1), p)
// Lanes [lo, hi) of p[lane * stride], zeros in the others (lanes outside are not read).
#define CT_RANGE_MASK(lo, hi) (((1u << (hi)) - 1) & ~((1u << (lo)) - 1))
#define CT_GATHER_RANGE_F(lo, hi, p, stride) _mm512_mask_i32gather_ps(_mm512_setzero_ps(), (__mmask16)CT_RANGE_MASK(lo, hi), _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(stride)), p, 4)
#define CT_GATHER_RANGE_D(lo, hi, p, stride) _mm512_mask_i32gather_pd(_mm512_setzero_pd(), (__mmask8)CT_RANGE_MASK(lo, hi), _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(stride)), p, 8)
// p[idx[lane]] for the int32 offsets at idx.
#define CT_GATHER_IDX_F(p, idx) _mm512_i32gather_ps(_mm512_loadu_si512(idx), p, 4)
#define CT_GATHER_IDX_D(p, idx) _mm512_i32gather_pd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), p, 8)
#define CT_STORE_FIRST_F(n, p, v) _mm512_mask_storeu_ps(p, (__mmask16)((1u << (n)) - 1), (__m512)(v))
#define CT_STORE_FIRST_D(n, p, v) _mm512_mask_storeu_pd(p, (__mmask8)((1u << (n)) - 1), (__m512d)(v))
#define CT_F16_SCALAR(f) ((uint16_t)_cvtss_sh((f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define CT_F16_LOAD(dst, src) _mm512_storeu_ps(dst, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))))
#include "correlate.hpp"
#ifdef __clang__
#pragma clang attribute pop
#endif
#endif
