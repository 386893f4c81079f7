// Direct stride-1/strided correlation microkernel, included once per instruction set.
//
// Before including, a translation unit defines:
//   CT_NS      the namespace of this instantiation (avx512, avx2, generic)
//   CT_VBYTES  the SIMD register width in bytes (64, 32, 16)
//   CT_NREGS   the number of SIMD registers (32 or 16): it bounds the register block
//
// out[n, d, h, w, :] = sum over taps (i, j, k) and input channels c of
//     x[n, d*step_d + off_d[i], h*step_h + off_h[j], w*step_w + off_w[k], c]
//       * weight[(i, j, k), c, :]
// where taps reading outside the input contribute nothing. Each output element is
// computed in registers over every tap and channel and stored once: no accumulation
// passes through memory, no operand is packed per call beyond the weight.
//
// The weight is packed by the caller: output channels padded to a multiple of the
// vector length, cut into chunks of `chunk` columns (the last may be narrower), each
// chunk laid out [tap][c][column].

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "correlate_api.h"

// CT_PART compiles one part of the entry points, so that a build can compile the parts of
// an instruction set in parallel (setup.py): 1 the float32 correlation, 2 the float64
// one, 3 the rest. Unset: every entry point.
#ifdef CT_PART
#define CT_PART_HAS(n) (CT_PART == (n))
#else
#define CT_PART_HAS(n) 1
#endif

namespace CT_NS {

typedef float vf __attribute__((vector_size(CT_VBYTES)));
typedef float vfu __attribute__((vector_size(CT_VBYTES), aligned(4)));
typedef double vd __attribute__((vector_size(CT_VBYTES)));
typedef double vdu __attribute__((vector_size(CT_VBYTES), aligned(8)));

template <typename T> struct Vec;
template <> struct Vec<float> { typedef vf v; typedef vfu u; };
template <> struct Vec<double> { typedef vd v; typedef vdu u; };

// Register blocking: `nv` vectors of output channels by `P` output pixels, with
// P * nv accumulators, nv weight vectors and one broadcast held in registers.
constexpr int MAXV = CT_NREGS == 32 ? 4 : 2;
template <int NV> struct Block {
  static constexpr int P = CT_NREGS == 32 ? (NV == 4 ? 6 : NV == 3 ? 8 : NV == 2 ? 12 : 24)
                                          : (NV == 2 ? 6 : 12);
};

// f(std::integral_constant<int, NV>) for a chunk of nv (1..MAXV) vectors: the one place
// that turns a chunk's width into the compile-time NV its kernels are built for.
template <typename F>
static inline void with_vectors(int64_t nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
#if CT_NREGS == 32
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
#endif
  }
}

// A vector of copies of *p, read straight from memory into the register (GCC builds a
// generic `V{} + *p` as a scalar add of zero plus a register broadcast, two instructions
// on the FMA ports). Translation units with intrinsics define CT_BROADCAST_F/D.
template <typename V, typename T>
static inline V broadcast(const T* p) {
#ifdef CT_BROADCAST_F
  if constexpr (sizeof(T) == 4) return (V)CT_BROADCAST_F(reinterpret_cast<const float*>(p));
  else return (V)CT_BROADCAST_D(reinterpret_cast<const double*>(p));
#else
  constexpr int L = CT_VBYTES / sizeof(T);
  const T value = *p;
  V b;
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) b[i] = value;
  return b;
#endif
}


// p rounded up to a cache line boundary (the buffer holds 64 spare bytes for it).
template <typename T>
static inline T* aligned_line(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// The P x NV accumulator tile, to and from `acc` (row stride cw): each pass of a block
// adds into what earlier passes left there.
template <typename T, int P, int NV, typename V>
static inline void load_tile(V (&r)[P][NV], const T* acc, int64_t cw) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) r[p][v] = *reinterpret_cast<const U*>(acc + p * cw + v * L);
}

template <typename T, int P, int NV, typename V>
static inline void store_tile(const V (&r)[P][NV], T* acc, int64_t cw) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(acc + p * cw + v * L) = r[p][v];
}

// P pixels by NV vectors of output channels: add the products of `cn` input channels of
// one tap into the row buffer `acc` (pixel stride `cw`), held in registers meanwhile.
// float32 -> float16 (IEEE binary16), round to nearest even: where the result is
// float16 the kernel rounds as it stores, instead of a float32 block rounded by NumPy.
static inline uint16_t f16_from_f32(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t mag = x & 0x7fffffffu;
  if (mag >= 0x7f800000u)  // inf, or nan (kept quiet)
    return sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u | ((mag >> 13) & 0x3ffu) : 0);
  if (mag >= 0x477ff000u) return sign | 0x7c00u;  // rounds past the largest half: inf
  if (mag < 0x38800000u) {  // a subnormal half (or zero): scale by 2^24 and round
    const float scaled = std::fabs(f) * 16777216.0f;  // exact: a power of two
    const float rounded = std::nearbyint(scaled);     // the default rounding: to even
    return sign | (uint16_t)rounded;
  }
  const uint32_t lsb = (mag >> 13) & 1u;
  return sign | (uint16_t)((mag - 0x38000000u + 0xfffu + lsb) >> 13);
}

template <typename T>
static inline void to_f16(char* dst, const T* src, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    int64_t i = 0;
#ifdef CT_F16_STORE
    for (; i + CT_VBYTES / 4 <= n; i += CT_VBYTES / 4) CT_F16_STORE(dst + 2 * i, src + i);
#endif
    for (; i < n; ++i) {
#ifdef CT_F16_SCALAR
      const uint16_t h = CT_F16_SCALAR(src[i]);  // one instruction (dot mode stores singly)
#else
      const uint16_t h = f16_from_f32(src[i]);
#endif
      std::memcpy(dst + 2 * i, &h, 2);
    }
  }
}

// float32 -> bfloat16, round to nearest even; every nan becomes the quiet nan of its
// sign, as ml_dtypes rounds (bit for bit: tests/test_native.py checks it).
static inline uint16_t bf16_from_f32(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((x >> 16) & 0x8000u) | 0x7fc0u);
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

typedef uint32_t vu32 __attribute__((vector_size(CT_VBYTES)));
typedef uint16_t vu16 __attribute__((vector_size(CT_VBYTES / 2)));

template <typename T>
static inline void to_bf16(char* dst, const T* src, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    constexpr int L = CT_VBYTES / 4;
    int64_t i = 0;
    for (; i + L <= n; i += L) {  // bf16_from_f32 a vector at a time (GCC kept it scalar)
      vu32 x;
      std::memcpy(&x, src + i, CT_VBYTES);
      const vu32 nan = (vu32)((x & 0x7fffffffu) > 0x7f800000u);  // all ones where nan
      const vu32 even = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
      const vu32 quiet = ((x >> 16) & 0x8000u) | 0x7fc0u;
      const vu16 h = __builtin_convertvector((nan & quiet) | (~nan & even), vu16);
      std::memcpy(dst + 2 * i, &h, CT_VBYTES / 2);
    }
    for (; i < n; ++i) {
      const uint16_t h = bf16_from_f32(src[i]);
      std::memcpy(dst + 2 * i, &h, 2);
    }
  }
}

// Store n results at dst (a byte address): as T, or rounded to float16 or bfloat16.
template <typename T>
static inline void store_out(int half, char* dst, const T* src, int64_t n) {
  if (half == CT_HALF_F16) to_f16(dst, src, n);
  else if (half == CT_HALF_BF16) to_bf16(dst, src, n);
  else std::memcpy(dst, src, n * sizeof(T));
}

// One pixel's chunk of output channels, from the accumulators. Outputs far bigger than
// the caches (job.stream_out) are written with non-temporal stores wherever whole aligned
// vectors go out: no read for ownership of lines about to be overwritten, and no eviction
// of lines still in use (one core: W2 107 -> 82 ms, W1 35 -> 30, W4 54 -> 48).
template <typename T>
static inline void store_chunk(const CtJob& job, char* dst, const T* src, int64_t n) {
#ifdef CT_STREAM
  constexpr int L = CT_VBYTES / sizeof(T);
  if (job.stream_out && n % L == 0 && reinterpret_cast<uintptr_t>(dst) % CT_VBYTES == 0) {
    for (int64_t i = 0; i < n; i += L) CT_STREAM(reinterpret_cast<T*>(dst) + i, src + i);
    return;
  }
#endif
  if (!job.out_half && n % (CT_VBYTES / sizeof(T)) == 0) {
    // Whole vectors, inline: std::memcpy with a run-time size is a library call per
    // pixel (W6's grad_input stores 32768 pixels of one vector each).
    typedef typename Vec<T>::u U;
    constexpr int L = CT_VBYTES / sizeof(T);
    for (int64_t i = 0; i < n; i += L)
      *reinterpret_cast<U*>(dst + i * sizeof(T)) = *reinterpret_cast<const U*>(src + i);
    return;
  }
  store_out(job.out_half, dst, src, n);
}

template <typename T, int P, int NV>
static inline void block(const T* xb, int64_t pstride, const T* wt, int64_t cw, int64_t cn,
                         T* acc) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  V r[P][NV];
  load_tile<T, P, NV>(r, acc, cw);
  for (int64_t c = 0; c < cn; ++c) {
    V wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = *reinterpret_cast<const U*>(wt + c * cw + v * L);
    if ((c & (64 / sizeof(T) - 1)) == 0) {
      // Each pixel's channels are one stream; with few taps they come from memory, and
      // P interleaved streams are more than the hardware prefetcher follows. The next
      // block's streams start here too, so that it does not open on misses (1-2%).
#pragma GCC unroll 32
      for (int p = 0; p < P; ++p) {
        __builtin_prefetch(xb + p * pstride + c + 256 / sizeof(T));
        __builtin_prefetch(xb + (P + p) * pstride + c);
      }
    }
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p) {
      const V b = broadcast<V>(xb + p * pstride + c);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) r[p][v] += b * wv[v];
    }
  }
  store_tile<T, P, NV>(r, acc, cw);
}

// A block of r < P pixels: the largest instantiation that fits.
template <typename T, int NV, int P>
static inline void tail(int64_t r, const T* xb, int64_t pstride, const T* wt, int64_t cw,
                        int64_t cn, T* acc) {
  if constexpr (P > 0) {
    if (r == P) {
      block<T, P, NV>(xb, pstride, wt, cw, cn, acc);
      return;
    }
    tail<T, NV, P - 1>(r, xb, pstride, wt, cw, cn, acc);
  }
}

// Winograd F(2,3)'s output side: row r's pair of outputs from its four slots' sums m,
// y0 = m0 + m1 + m2 at orows[r] and y1 = m1 - m2 - m3 at orows[nrows + r] (null where the
// pair's second output lies past the end).
// A run of a row's output pixels [w0, w0 + n): rows_chunk's sums cover one run at a time,
// so that a long row (a 1-D layer's is the whole signal) keeps them in cache.
struct WRun { int64_t w0, n; };

template <typename T>
static void store_pairs(const CtJob& job, int64_t nrows, char* const* orows, const T* acc,
                        int64_t slot_size, int64_t cw, int64_t n, const T* bias, WRun run) {
  alignas(64) T y0[MAXV * CT_VBYTES / sizeof(T)], y1[MAXV * CT_VBYTES / sizeof(T)];
  alignas(64) T b[MAXV * CT_VBYTES / sizeof(T)] = {};  // the chunk's bias (zeros: none)
  if (bias) std::memcpy(b, bias, cw * sizeof(T));
  const int64_t os = job.os[3], oi = job.out_half ? 2 : sizeof(T), wcount = run.n;
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t w = 0; w < wcount; ++w) {
      const T* __restrict m = acc + (r * wcount + w) * cw;
      for (int64_t c = 0; c < cw; ++c) {
        const T m1 = m[slot_size + c], m2 = m[2 * slot_size + c];
        y0[c] = m[c] + m1 + m2 + b[c];
        y1[c] = m1 - m2 - m[3 * slot_size + c] + b[c];
      }
      store_chunk(job, orows[r] + (run.w0 + w) * os * oi, y0, n);
      if (orows[nrows + r]) store_chunk(job, orows[nrows + r] + (run.w0 + w) * os * oi, y1, n);
    }
  }
}

// A group of output rows and one chunk of output channels: tap by tap and input-channel
// block by block, every pixel of every row the tap reaches is swept while that block of
// the weight stays in L1 (short rows are grouped so that each block serves enough
// pixels). The rows accumulate in `acc` (rows x pixels x cw), then are stored once.
template <typename T, int NV>
static void rows_chunk(const CtJob& job, int64_t nrows, const T* const* xrows,
                       char* const* orows, const int64_t* lo, const int64_t* hi,
                       const T* wchunk, int64_t cw, int64_t live, T* acc, WRun run) {
  constexpr int P = Block<NV>::P;
  const int64_t cin = job.cin, wcount = run.n, tw = job.ntaps[2];
  const int64_t pairs = job.ntaps[0] * job.ntaps[1];
  const int64_t pstride = job.step[2] * job.xs[3];
  // Input channels per pass: keep the weight block (cb x cw) within about 24 KiB.
  int64_t cb = 24576 / (cw * (int64_t)sizeof(T));
  if (cb < 8) cb = 8;
  // Winograd pairs (job.pair_out): the sums of each of V's D taps apart, one slot each.
  const int64_t slots = job.pair_out ? job.ntaps[0] : 1, slot_size = nrows * wcount * cw;
  // The chunk's bias (its first channel is job.cout - live): the sums start from it, so
  // that it costs no pass of its own; Winograd pairs add it as they store.
  const T* bias = job.bias ? static_cast<const T*>(job.bias) + (job.cout - live) : nullptr;
  if (bias && !job.pair_out) {  // NV vectors a pixel, stored inline (as the memset was)
    typedef typename Vec<T>::u U;
    constexpr int L = CT_VBYTES / sizeof(T);
    typename Vec<T>::v b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const U*>(bias + v * L);
    for (T* a = acc; a < acc + slot_size; a += cw)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(a + v * L) = b[v];
  } else {
    std::memset(acc, 0, sizeof(T) * slots * slot_size);
  }
  for (int64_t q = 0; q < pairs; ++q) {
    T* const acc_q = job.pair_out ? acc + q / job.ntaps[1] * slot_size : acc;
    for (int64_t k = 0; k < tw; ++k) {
      if (lo[k] >= hi[k]) continue;
      const T* wtap = wchunk + (q * tw + k) * cin * cw;
      const int64_t xoff = (lo[k] * job.step[2] + job.off[2][k]) * job.xs[3];
      for (int64_t c0 = 0; c0 < cin; c0 += cb) {
        const int64_t cn = cin - c0 < cb ? cin - c0 : cb;
        const T* wt = wtap + c0 * cw;
        for (int64_t r = 0; r < nrows; ++r) {
          const T* xrow = xrows[r * pairs + q];
          if (!xrow) continue;  // this (D, H) tap reads outside the input for this row
          const T* xb = xrow + xoff + c0;
          T* a = acc_q + (r * wcount + lo[k] - run.w0) * cw;
          // Blocks of even size: a remainder of 1-2 pixels would run latency-bound, with
          // too few independent sums to fill the FMA pipes (31 = 6+5+5+5+5+5, not 6*5+1;
          // W3's rows of 8 = 4+4: 8% faster).
          const int64_t n = hi[k] - lo[k], nb = (n + P - 1) / P;
          const int64_t size = n / nb, bigger = n % nb;
          for (int64_t b = 0; b < nb; ++b) {
            const int64_t len = size + (b < bigger);
            if (len == P) block<T, P, NV>(xb, pstride, wt, cw, cn, a);
            else tail<T, NV, P - 1>(len, xb, pstride, wt, cw, cn, a);
            xb += len * pstride;
            a += len * cw;
          }
        }
      }
    }
  }
  const int64_t n = live < cw ? live : cw;
  if (job.pair_out) {
    store_pairs(job, nrows, orows, acc, slot_size, cw, n, bias, run);
    return;
  }
  const int64_t os = job.os[3], oi = job.out_half ? 2 : sizeof(T);
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t w = 0; w < wcount; ++w)
      store_chunk(job, orows[r] + (run.w0 + w) * os * oi, acc + (r * wcount + w) * cw, n);
}

// Very few input channels (fewer than CT_TAPS_INNER_BELOW): rows_chunk would load and store
// each block's sums once per tap for only cin multiply-adds per pixel and vector, so here
// each block of P pixels keeps its sums in registers over every tap and channel. Pixels
// that a tap does not reach are masked with compile-time indices, which keeps the sums in
// registers. Measured (k4, 16 outputs, one core): cin 1 25 -> 35-48 GFLOP/s, cin 2 37 ->
// 58; even at 4-8; from 16 on rows_chunk wins (138 against 104), its input and weight
// blocks staying in L1 where this sweep streams every tap's rows.

// One tap's multiply-adds into the P x NV sums of rows_chunk_taps_inner, over every
// input channel; MASKED: only pixels [a, b) (compile-time indices keep the sums in
// registers), else all P without a test.
template <typename T, int NV, int P, int S, int CI, bool MASKED, typename V>
static inline void taps_inner_tap(V (&sum)[P][NV], const T* xb, int64_t pstride, const T* wt,
                                  int64_t cw, int64_t cin, int64_t a, int64_t b) {
  if constexpr (CI > 0) cin = CI;
  if constexpr (S > 0) pstride = S * CI;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  for (int64_t c = 0; c < cin; ++c) {
    V wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = *reinterpret_cast<const U*>(wt + c * cw + v * L);
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p) {
      if (MASKED && (p < a || p >= b)) continue;
      const V x = broadcast<V>(xb + p * pstride + c);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) sum[p][v] += x * wv[v];
    }
  }
}

template <typename T, int NV, int P, int S, int CI>
static void rows_chunk_taps_inner(const CtJob& job, int64_t nrows, const T* const* xrows,
                                  char* const* orows, const int64_t* lo, const int64_t* hi,
                                  const T* wchunk, int64_t cw, int64_t live, T* acc,
                                  WRun run) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t cin = job.cin, wcount = run.n, tw = job.ntaps[2];
  const int64_t pairs = job.ntaps[0] * job.ntaps[1];
  const int64_t pstride = job.step[2] * job.xs[3];
  const int64_t os = job.os[3], oi = job.out_half ? 2 : sizeof(T);
  const int64_t n = live < cw ? live : cw;
  // Per block of a row and W tap, the same for every row: the block's pixels [a, b) the
  // tap reaches, and where its first one reads, from the row's start.
  struct Span { int64_t a, b, x; };
  std::vector<Span> spans(((wcount + P - 1) / P) * tw);
  for (int64_t w0 = 0, i = 0; w0 < wcount; w0 += P)
    for (int64_t k = 0; k < tw; ++k, ++i) {
      const int64_t np = wcount - w0 < P ? wcount - w0 : P;
      const int64_t at = run.w0 + w0;  // the block's first pixel in the row
      spans[i] = {std::max(lo[k], at) - at, std::min(hi[k], at + np) - at,
                  (at * job.step[2] + job.off[2][k]) * job.xs[3]};
    }
  const int64_t wtap = (CI > 0 ? CI : cin) * cw;  // weight elements per tap
  V start[NV];  // the sums start from the chunk's bias (its first channel: cout - live)
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v)
    start[v] = job.bias ? *reinterpret_cast<const U*>(static_cast<const T*>(job.bias) +
                                                        (job.cout - live) + v * L)
                        : V{};
  for (int64_t r = 0; r < nrows; ++r) {
    const T* const* rows = xrows + r * pairs;
    for (int64_t w0 = 0; w0 < wcount; w0 += P) {
      const int64_t np = wcount - w0 < P ? wcount - w0 : P;
      const Span* block_spans = spans.data() + (w0 / P) * tw;
      V sum[P][NV];
#pragma GCC unroll 32
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) sum[p][v] = start[v];
      for (int64_t q = 0; q < pairs; ++q) {
        if (!rows[q]) continue;  // this (D, H) tap reads outside the input for this row
        const T* wq = wchunk + q * tw * wtap;
        for (int64_t k = 0; k < tw; ++k) {
          const Span t = block_spans[k];
          if (t.a >= t.b) continue;
          if (t.a == 0 && t.b == P)  // every pixel of the block
            taps_inner_tap<T, NV, P, S, CI, false>(sum, rows[q] + t.x, pstride, wq + k * wtap,
                                                   cw, cin, 0, P);
          else  // pixels [a, b) only
            taps_inner_tap<T, NV, P, S, CI, true>(sum, rows[q] + t.x, pstride, wq + k * wtap,
                                                  cw, cin, t.a, t.b);
        }
      }
      T* a_row = acc + w0 * cw;
#pragma GCC unroll 32
      for (int p = 0; p < P; ++p) {
        if (p >= np) continue;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(a_row + p * cw + v * L) = sum[p][v];
      }
    }
    for (int64_t w = 0; w < wcount; ++w)
      store_chunk(job, orows[r] + (run.w0 + w) * os * oi, acc + w * cw, n);
  }
}

// Every block but a row's last is whole, and a last block of a few pixels costs about a
// whole one: of the register blocks that fit, the one with the least work per row.
template <typename T, int NV>
static void rows_chunk_taps_inner(const CtJob& job, int64_t nrows, const T* const* xrows,
                                  char* const* orows, const int64_t* lo, const int64_t* hi,
                                  const T* wchunk, int64_t cw, int64_t live, T* acc,
                                  WRun run) {
  constexpr int P = Block<NV>::P;
  constexpr int P2 = P * 2 / 3 > 0 ? P * 2 / 3 : 1, P3 = P / 2 > 0 ? P / 2 : 1;
  const int64_t w = run.n;
  const auto cost = [w](int64_t p) { return (w + p - 1) / p * (p + 6); };
  const int best = cost(P) <= cost(P2) && cost(P) <= cost(P3) ? P
                   : cost(P2) <= cost(P3)                     ? P2 : P3;
  // With one or two vectors of outputs a tap's work is small (cin * P * NV multiply-adds)
  // and its overhead shows: the channel count and the pixel stride (step times channels,
  // contiguous) known here unroll the channels and put every pixel's broadcast at a
  // constant offset from one register, where else the P addresses need P registers and
  // spill. W6's grad_input, one core: 1.37 -> 0.87 ms (the stride alone 1.05 -> 0.87).
  const int ci = NV <= 2 && job.cin >= 1 && job.cin <= 3 ? (int)job.cin : 0;
  const int s = ci && job.xs[3] == job.cin && job.step[2] <= 2 ? (int)job.step[2] : 0;
#define CT_INNER(PB, SB, CIB)                                                                 \
  if (best == PB && s == SB && ci == CIB)                                                     \
    return rows_chunk_taps_inner<T, NV, PB, SB, CIB>(job, nrows, xrows, orows, lo, hi, wchunk, \
                                                    cw, live, acc, run);
#define CT_INNER_C(PB, CIB) CT_INNER(PB, 1, CIB) CT_INNER(PB, 2, CIB) CT_INNER(PB, 0, CIB)
#define CT_INNER_P(PB)                                                                       \
  if constexpr (NV <= 2) { CT_INNER_C(PB, 1) CT_INNER_C(PB, 2) CT_INNER_C(PB, 3) }           \
  CT_INNER(PB, 0, 0)
  CT_INNER_P(P) CT_INNER_P(P2) CT_INNER_P(P3)
#undef CT_INNER_P
#undef CT_INNER_C
#undef CT_INNER
}

static inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

// Per W tap k, the output pixels [lo, hi) of a row whose input w * step + off[k] lies in
// [0, in_w).
struct WRanges {
  std::vector<int64_t> lo, hi;
};
static WRanges w_ranges(const int64_t* off, int64_t taps, int64_t step, int64_t in_w,
                        int64_t wcount) {
  WRanges r{std::vector<int64_t>(taps), std::vector<int64_t>(taps)};
  for (int64_t k = 0; k < taps; ++k) {
    r.lo[k] = std::max<int64_t>(0, -floor_div(off[k], step));  // ceil(-off / step)
    r.hi[k] = std::min<int64_t>(wcount, floor_div(in_w - 1 - off[k], step) + 1);
  }
  return r;
}

// The (n, d, h) of the flat-th row of a box (n0, n1, d0, d1, h0, h1), rows in C order.
struct RowPos {
  int64_t n, d, h;
};
static inline RowPos row_at(const int64_t* box, int64_t flat) {
  const int64_t nd = box[3] - box[2], nh = box[5] - box[4];
  return {box[0] + flat / (nd * nh), box[2] + (flat / nh) % nd, box[4] + flat % nh};
}

static inline int64_t box_rows(const int64_t* box) {
  return (box[1] - box[0]) * (box[3] - box[2]) * (box[5] - box[4]);
}

// The runs of rows [first, last) of the box this call computes, in whole `unit`s but the
// box's last: every row at once when the job is not shared, else claims on the shared
// cursor. A claim is 1 / (2 * sharers) of the rows left: long runs of neighbouring rows
// at first, then shorter ones, so that the sharers finish within about a unit of each
// other (a fixed cut into tasks left one worker idle for up to a task: W5 lost 0.5 ms of
// 10 so). Which call computes a row changes no bit of it. A run is handed out a unit at a
// time, `ct_stop` asked before each: Ctrl-C stops the call within a unit of rows.
class RowClaims {
 public:
  // `total`: claims over that many units of work instead of the box's rows.
  RowClaims(const CtJob& job, int64_t unit, int64_t total = -1)
      : cursor_(job.cursor), sharers_(std::max<int64_t>(1, job.sharers)),
        total_(total >= 0 ? total : box_rows(job.box)), unit_(std::max<int64_t>(1, unit)),
        stop_(ct_stop) {}

  bool next(int64_t& first, int64_t& last) {
    if (at_ >= end_ && !claim(at_, end_)) return false;
    if (stop_ && stop_->stop(stop_)) return false;
    first = at_;
    last = at_ = std::min(end_, at_ + unit_);
    return true;
  }

 private:
  bool claim(int64_t& first, int64_t& last) {
    if (!cursor_) {
      first = 0;
      last = total_;
      return !std::exchange(done_, true) && total_ > 0;
    }
    const int64_t left = total_ - __atomic_load_n(cursor_, __ATOMIC_RELAXED);
    if (left <= 0) return false;
    const int64_t share = (left + 2 * sharers_ - 1) / (2 * sharers_);
    const int64_t take = (share + unit_ - 1) / unit_ * unit_;
    first = __atomic_fetch_add(cursor_, take, __ATOMIC_RELAXED);
    last = std::min(total_, first + take);
    return first < total_;
  }

  int64_t* cursor_;
  int64_t sharers_, total_, unit_;
  bool done_ = false;
  CtStop* stop_;
  int64_t at_ = 0, end_ = 0;  // the run being handed out
};

// For output row (n, d, h): the input row each (D, H) tap pair reads, or null where the
// pair reads outside the input.
template <typename T>
static inline void tap_rows(const CtJob& job, RowPos r, const T** rows) {
  const T* x = static_cast<const T*>(job.x);
  for (int64_t i = 0; i < job.ntaps[0]; ++i) {
    const int64_t id = r.d * job.step[0] + job.off[0][i];
    for (int64_t j = 0; j < job.ntaps[1]; ++j) {
      const int64_t ih = r.h * job.step[1] + job.off[1][j];
      const bool inside = id >= 0 && id < job.in_dims[0] && ih >= 0 && ih < job.in_dims[1];
      rows[i * job.ntaps[1] + j] =
          inside ? x + r.n * job.xs[0] + id * job.xs[1] + ih * job.xs[2] : nullptr;
    }
  }
}

// Where output row (n, d, h) starts, in bytes from the box's first position.
// (A Winograd pair's row d is output row 2d.)
static inline int64_t out_row_offset(const CtJob& job, RowPos r, int64_t item) {
  const int64_t dstep = job.pair_out ? 2 : 1;
  return ((r.n - job.box[0]) * job.os[0] + (r.d - job.box[2]) * dstep * job.os[1] +
          (r.h - job.box[4]) * job.os[2]) * item;
}

template <typename T>
static void run_typed(const CtJob& job, const WRanges& wr) {
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t cw_full = MAXV * L;
  const int64_t cpad = (job.cout + L - 1) / L * L;
  const int64_t taps = job.ntaps[0] * job.ntaps[1] * job.ntaps[2];
  const T* wpk = static_cast<const T*>(job.w);
  char* out = static_cast<char*>(job.out);
  const int64_t oi = job.out_half ? 2 : sizeof(T);  // bytes per output element
  // Rows per group: enough pixels that a weight block in L1 serves ~96 of them. A chunk of
  // the weight (every tap) beyond ~1 MiB no longer stays in L2 from one group to the next
  // and streams in again for each: then ~512 pixels (W3's grad_input, 64 taps x 128
  // channels, 2 MiB chunks: 28.0 -> 25.6 ms; at 1 MiB and below, W4, W5 and W8 level or
  // slower, as the sums of a group outgrow L1).
  const int64_t pairs = job.ntaps[0] * job.ntaps[1];
  const int64_t chunk_bytes = taps * job.cin * cw_full * (int64_t)sizeof(T);
  const int64_t pixels = chunk_bytes > (int64_t(1) << 20) ? 512 : 96;
  // Rows longer than W_RUN pixels are computed a run of about W_RUN at a time (`WRun`):
  // a row's sums for one chunk of channels stay within L2, not a 1-D layer's whole signal
  // streamed through memory twice (4 -> 4 k1 over 615646 pixels, one core: 82 -> 8 ms).
  constexpr int64_t W_RUN = 512;
  const int64_t nruns = job.wcount > W_RUN * 3 / 2 ? (job.wcount + W_RUN - 1) / W_RUN : 1;
  const int64_t run_max = (job.wcount + nruns - 1) / nruns;
  const int64_t tw = job.ntaps[2];
  std::vector<int64_t> run_lo(nruns * tw), run_hi(nruns * tw);  // per run: tap ranges in it
  std::vector<WRun> runs(nruns);
  for (int64_t i = 0; i < nruns; ++i) {
    runs[i] = {i * run_max, std::min(run_max, job.wcount - i * run_max)};
    for (int64_t k = 0; k < tw; ++k) {
      run_lo[i * tw + k] = std::max(wr.lo[k], runs[i].w0);
      run_hi[i * tw + k] = std::min(wr.hi[k], runs[i].w0 + runs[i].n);
    }
  }
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(64, (pixels + run_max - 1) /
                                                                       std::max<int64_t>(1, run_max)));
  // The sums on a cache line boundary: malloc's 16-byte alignment made every tile load
  // and store of them span two lines (aligned: 1.5-5% on W1, W4, W5, W8, one core).
  // Winograd pairs: four slots of sums per row, and each row's second output.
  const int64_t slots = job.pair_out ? job.ntaps[0] : 1, outs = job.pair_out ? 2 : 1;
  std::vector<T> acc_store(slots * group * run_max * cw_full + 64 / sizeof(T));
  std::vector<const T*> xrows(group * pairs);
  std::vector<char*> orows(outs * group);
  T* acc = aligned_line(acc_store.data());
  int64_t nrows = 0;
  const auto set_rows = [&](int64_t first, int64_t count) {  // a group's input and output rows
    nrows = count;
    for (int64_t r = 0; r < nrows; ++r) {
      const RowPos pos = row_at(job.box, first + r);
      tap_rows<T>(job, pos, xrows.data() + r * pairs);
      orows[r] = out + out_row_offset(job, pos, oi);
      if (job.pair_out)  // the pair's second output, where it lies inside
        orows[nrows + r] = 2 * pos.d + 1 < job.pair_out ? orows[r] + job.os[1] * oi : nullptr;
    }
  };
  // The group's outputs of channels [c0, c0 + cw_full) in W run i.
  const auto chunk = [&](int64_t c0, int64_t i) {
    const int64_t cw = cpad - c0 < cw_full ? cpad - c0 : cw_full;
    const T* wchunk = wpk + taps * job.cin * c0;
    const int64_t live = job.cout - c0;
    char* o[128];
    for (int64_t r = 0; r < outs * nrows; ++r) o[r] = orows[r] ? orows[r] + c0 * oi : nullptr;
    const bool inner = job.cin < CT_TAPS_INNER_BELOW;
    with_vectors(cw / L, [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      (inner ? rows_chunk_taps_inner<T, NV> : rows_chunk<T, NV>)(
          job, nrows, xrows.data(), o, run_lo.data() + i * tw, run_hi.data() + i * tw, wchunk,
          cw, live, acc, runs[i]);
    });
  };
  const int64_t total = box_rows(job.box), groups = (total + group - 1) / group;
  const int64_t chunks = (cpad + cw_full - 1) / cw_full;
  if (job.sharers > 1 && chunks > 1 && groups < 2 * job.sharers) {
    // Too few row groups for the threads sharing the box (a few pixels of wide channels:
    // 16 rows of 4 pixels made one group, and the other thread waited): they claim (row
    // group, channel chunk) pairs instead, a group's chunks one after the other.
    RowClaims claims(job, 1, groups * chunks);
    int64_t current = -1;
    for (int64_t run0, run1; claims.next(run0, run1);)
      for (int64_t v = run0; v < run1; ++v) {
        if (v / chunks != current) {
          current = v / chunks;
          set_rows(current * group, std::min(group, total - current * group));
        }
        for (int64_t i = 0; i < nruns; ++i) chunk(v % chunks * cw_full, i);
      }
  } else {
    RowClaims claims(job, group);
    for (int64_t run0, run1; claims.next(run0, run1);)
      for (int64_t first = run0; first < run1; first += group) {
        set_rows(first, std::min(group, run1 - first));
        for (int64_t i = 0; i < nruns; ++i)  // a run's input rows serve every chunk
          for (int64_t c0 = 0; c0 < cpad; c0 += cw_full) chunk(c0, i);
      }
  }
#ifdef CT_STREAM_FENCE
  if (job.stream_out) CT_STREAM_FENCE();  // non-temporal stores are weakly ordered
#endif
}

// Horizontal sum of a vector (translation units with intrinsics define CT_HSUM_F/D).
template <typename V, typename T>
static inline T hsum(V v) {
#ifdef CT_HSUM_F
  if constexpr (sizeof(T) == 4) return CT_HSUM_F(v);
  else return CT_HSUM_D(v);
#else
  constexpr int L = CT_VBYTES / sizeof(T);
  T s = 0;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
#endif
}

// Per row of the box: calls f(rows, out_row) with the input row of each (D, H) tap pair
// (null where it reads outside the input) and the row's output address.
template <typename T, typename F>
static void for_each_row(const CtJob& job, F&& f) {
  char* out = static_cast<char*>(job.out);
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  std::vector<const T*> rows(job.ntaps[0] * job.ntaps[1]);
  RowClaims claims(job, 1);
  for (int64_t run0, run1; claims.next(run0, run1);)
    for (int64_t flat = run0; flat < run1; ++flat) {
      const RowPos pos = row_at(job.box, flat);
      tap_rows<T>(job, pos, rows.data());
      f(rows.data(), out + out_row_offset(job, pos, oi));
    }
}

// Few output channels (a 16 -> 1 head): vectors run along the input channels instead,
// P pixels x C_out accumulators, reduced across lanes once per output. Weight [tap][co][c].
// The first n < lanes elements at p as a vector, zeros after them, reading none past them
// (translation units with masked loads define CT_LOAD_FIRST_F/D).
template <typename V, typename T>
static inline V load_first(int64_t n, const T* p) {
#ifdef CT_LOAD_FIRST_F
  if constexpr (sizeof(T) == 4) return (V)CT_LOAD_FIRST_F(n, reinterpret_cast<const float*>(p));
  else return (V)CT_LOAD_FIRST_D(n, reinterpret_cast<const double*>(p));
#else
  V v{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

// P pixels by CO outputs of dot mode: P * CO accumulators and CO weight vectors in
// registers (the input vector is the multiply-add's memory operand).
template <int CO> struct DotBlock {
  static constexpr int P = CT_NREGS == 32 ? (CO == 1 ? 16 : CO == 2 ? 8 : 4)
                                          : (CO == 1 ? 12 : CO == 2 ? 6 : CO == 3 ? 4 : 3);
};

// Where dot mode computes the block of a row that starts at pixel b0 (blocks of P, rows
// of wcount): at w0, np pixels, the first `skip` of them already stored. A partial last
// block starts P pixels before the row's end instead, its first pixels computed again but
// not stored: whole blocks run unmasked (W6's rows of 32 left a block of 8 masked in
// three).
struct DotSpan { int64_t w0, skip, np; };
static inline DotSpan dot_span(int64_t b0, int64_t P, int64_t wcount) {
  const int64_t w0 = wcount - b0 < P && wcount >= P ? wcount - P : b0;
  return {w0, b0 - w0, wcount - w0 < P ? wcount - w0 : P};
}

// One tap of dot mode into the P x CO sums: pixels p in [pa, pb) of the block at xb.
// A whole block sweeps the channels once, each weight vector serving P pixels, the pixels
// reached by stepping one pointer (P pointers live at once spilled to the stack: 71 -> 1
// s3 ran at 7 GFLOP/s). A partial block (a row's edges) points its other pixels at
// `zeros` (`cin` of them) and runs the same sweep: a test per pixel and vector, as
// before, or a pixel at a time, kept its sums latency-bound.
template <typename T, int CO, int P, typename V>
static inline void dot_tap(V (&acc)[P][CO], const T* xb, int64_t pstride, const T* wt,
                           int64_t cin, int64_t full, int64_t pa, int64_t pb,
                           const T* zeros) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  // Channels past the last whole vector, where there is one before them: the vector
  // ending at the last channel, weighed by the weight's with its first lanes (channels
  // the whole vectors summed) zeroed: a plain load per pixel, where a masked one cost as
  // much as the whole vectors of 53 channels.
  const int64_t rest = cin - full;
  const bool overlap = rest > 0 && full > 0;
  V wtail[CO];
  if (overlap) {
    alignas(64) T lanes[L];
#pragma GCC unroll 4
    for (int o = 0; o < CO; ++o) {
      for (int i = 0; i < L; ++i) lanes[i] = i >= L - rest ? wt[o * cin + cin - L + i] : T(0);
      wtail[o] = *reinterpret_cast<const U*>(lanes);
    }
  }
  const int64_t ends = overlap ? full + L : full;  // sweeps: whole vectors, then the tail's
  // The weight vectors of sweep c (the tail's past the whole vectors), and where it reads.
  const auto weights = [&](int64_t c, V (&wv)[CO]) {
#pragma GCC unroll 4
    for (int o = 0; o < CO; ++o)
      wv[o] = c < full ? *reinterpret_cast<const U*>(wt + o * cin + c) : wtail[o];
    return c < full ? c : cin - L;
  };
  if (pa == 0 && pb == P) {
    for (int64_t c = 0; c < ends; c += L) {
      V wv[CO];
      const T* xp = xb + weights(c, wv);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p, xp += pstride) {
        const V xv = *reinterpret_cast<const U*>(xp);
#pragma GCC unroll 4
        for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[o];
      }
    }
  } else {  // pixels outside [pa, pb) read zeros: the same sweep, one pointer each
    const T* xp[P];
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) xp[p] = p >= pa && p < pb ? xb + p * pstride : zeros;
    for (int64_t c = 0; c < ends; c += L) {
      V wv[CO];
      const int64_t at = weights(c, wv);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const V xv = *reinterpret_cast<const U*>(xp[p] + at);
#pragma GCC unroll 4
        for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[o];
      }
    }
  }
  if (rest > 0 && !overlap) {  // fewer channels than a vector: one partial vector
    // (a scalar chain per pixel ran latency-bound: 71 -> 1 at a third of PyTorch)
    V wv[CO];
#pragma GCC unroll 4
    for (int o = 0; o < CO; ++o) wv[o] = load_first<V>(rest, wt + o * cin);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      if (p < pa || p >= pb) continue;
      const V xv = load_first<V>(rest, xb + p * pstride);
#pragma GCC unroll 4
      for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[o];
    }
  }
}

template <typename T, int CO>
static void dot_rows(const CtJob& job, const int64_t* lo, const int64_t* hi) {
  typedef typename Vec<T>::v V;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int P = DotBlock<CO>::P;
  const int64_t cin = job.cin, full = cin / L * L, tw = job.ntaps[2];
  const int64_t pairs = job.ntaps[0] * job.ntaps[1];
  const int64_t pstride = job.step[2] * job.xs[3], os = job.os[3];
  const T* wpk = static_cast<const T*>(job.w);
  const T* bias = static_cast<const T*>(job.bias);
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  const std::vector<T> zeros(cin);  // what a partial block's pixels outside it read
  for_each_row<T>(job, [&](const T* const* rows, char* orow) {
    for (int64_t b0 = 0; b0 < job.wcount; b0 += P) {
      const DotSpan at = dot_span(b0, P, job.wcount);
      const int64_t w0 = at.w0, skip = at.skip, np = at.np;
      V acc[P][CO];
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int o = 0; o < CO; ++o) acc[p][o] = V{};
      for (int64_t q = 0; q < pairs; ++q) {
        if (!rows[q]) continue;
        for (int64_t k = 0; k < tw; ++k) {
          const int64_t a = std::max(lo[k], w0), b = std::min(hi[k], w0 + np);
          if (a >= b) continue;
          dot_tap<T, CO, P>(acc, rows[q] + (w0 * job.step[2] + job.off[2][k]) * job.xs[3],
                            pstride, wpk + (q * tw + k) * CO * cin, cin, full, a - w0, b - w0,
                            zeros.data());
        }
      }
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        if (p < skip || p >= np) continue;
#pragma GCC unroll 4
        for (int o = 0; o < CO; ++o) {
          const T value = hsum<V, T>(acc[p][o]) + (bias ? bias[o] : T(0));
          store_out(job.out_half, orow + ((w0 + p) * os + o) * oi, &value, 1);
        }
      }
    }
  });
}

// dot_rows when every pixel's channels are CV whole vectors and pixels lie next to each
// other (step 1, C_in = CV * lanes, pixel stride C_in: a 16 -> 1 head's forward): all
// addresses are constant offsets from one pointer. dot_rows computed P pointers per tap,
// which for a single vector of channels cost more than the tap's multiply-adds (W6: 32
// cycles a pixel). Taps that reach past the row's ends load zeros for those pixels
// (masked loads do not fault), so every tap runs the same straight code.
template <typename V, typename T>
static inline V load_or_zero(unsigned valid, const T* p) {  // valid: 0 or 1
#ifdef CT_MASKZ_LOAD_F
  if constexpr (sizeof(T) == 4) return (V)CT_MASKZ_LOAD_F(valid, reinterpret_cast<const float*>(p));
  else return (V)CT_MASKZ_LOAD_D(valid, reinterpret_cast<const double*>(p));
#else
  typedef typename Vec<T>::u U;
  return valid ? (V)*reinterpret_cast<const U*>(p) : V{};
#endif
}

template <typename T, int CO, int CV>
static void dot_rows_packed(const CtJob& job, const int64_t* lo, const int64_t* hi) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  // The sums alone may fill the registers here (16 for one output on AVX2, one spilled):
  // no pixel pointers compete for them, and 16 pixels tile W6's rows of 32 exactly, where
  // 12 computed 36 (two threads: W6 6.9 ms at 12, 5.5-6.5 at 16).
  constexpr int P = CO == 1 ? 16 : CO == 2 ? 8 : 4;
  constexpr int64_t PS = CV * L;  // the pixel stride, in elements
  const int64_t tw = job.ntaps[2], pairs = job.ntaps[0] * job.ntaps[1], os = job.os[3];
  const T* wpk = static_cast<const T*>(job.w);
  const T* bias = static_cast<const T*>(job.bias);
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  for_each_row<T>(job, [&](const T* const* rows, char* orow) {
    for (int64_t b0 = 0; b0 < job.wcount; b0 += P) {
      const DotSpan at = dot_span(b0, P, job.wcount);
      const int64_t w0 = at.w0, skip = at.skip, np = at.np;
      V acc[P][CO];
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int o = 0; o < CO; ++o) acc[p][o] = V{};
      for (int64_t q = 0; q < pairs; ++q) {
        if (!rows[q]) continue;
        for (int64_t k = 0; k < tw; ++k) {
          const int64_t pa = std::max(lo[k], w0) - w0, pb = std::min(hi[k], w0 + np) - w0;
          if (pa >= pb) continue;
          const T* wt = wpk + (q * tw + k) * CO * PS;
          const T* xb = rows[q] + (w0 + job.off[2][k]) * PS;
          // One tap: a whole block loads plainly, an edge block through the valid mask.
          const auto tap = [&](auto masked, unsigned valid) {
#pragma GCC unroll 4
            for (int v = 0; v < CV; ++v) {
              V wv[CO];
#pragma GCC unroll 4
              for (int o = 0; o < CO; ++o) wv[o] = *reinterpret_cast<const U*>(wt + o * PS + v * L);
#pragma GCC unroll 16
              for (int p = 0; p < P; ++p) {
                const T* at = xb + p * PS + v * L;
                V xv;
                if constexpr (decltype(masked)::value) xv = load_or_zero<V>((valid >> p) & 1, at);
                else xv = *reinterpret_cast<const U*>(at);
#pragma GCC unroll 4
                for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[o];
              }
            }
          };
          if (pa == 0 && pb == P) tap(std::false_type{}, 0u);
          else tap(std::true_type{}, ((1u << pb) - 1) & ~((1u << pa) - 1));  // bit p: pixel p
        }
      }
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        if (p < skip || p >= np) continue;
#pragma GCC unroll 4
        for (int o = 0; o < CO; ++o) {
          const T value = hsum<V, T>(acc[p][o]) + (bias ? bias[o] : T(0));
          store_out(job.out_half, orow + ((w0 + p) * os + o) * oi, &value, 1);
        }
      }
    }
  });
}

// Depthwise (one input and one output channel per group): vectors run along the
// channels, each tap one multiply-add per pixel and vector. Weight [tap][c].
template <typename T>
static void depthwise_rows(const CtJob& job, const int64_t* lo, const int64_t* hi) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int P = 4, NV = 4;
  const int64_t ch = job.cout, tw = job.ntaps[2];
  const int64_t pairs = job.ntaps[0] * job.ntaps[1];
  const int64_t pstride = job.step[2] * job.xs[3], os = job.os[3];
  const T* wpk = static_cast<const T*>(job.w);
  const T* bias = static_cast<const T*>(job.bias);
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  for_each_row<T>(job, [&](const T* const* rows, char* orow) {
    for (int64_t c0 = 0; c0 < ch; c0 += NV * L) {
      const int64_t nv = std::min<int64_t>(NV, (ch - c0) / L);  // whole vectors here
      for (int64_t w0 = 0; w0 < job.wcount; w0 += P) {
        const int64_t np = job.wcount - w0 < P ? job.wcount - w0 : P;
        V acc[P][NV];
        for (int p = 0; p < P; ++p)
          for (int v = 0; v < NV; ++v) acc[p][v] = V{};
        for (int64_t q = 0; q < pairs; ++q) {
          if (!rows[q]) continue;
          for (int64_t k = 0; k < tw; ++k) {
            const int64_t a = std::max(lo[k], w0), b = std::min(hi[k], w0 + np);
            const T* wt = wpk + (q * tw + k) * ch + c0;
            const T* xb = rows[q] + (w0 * job.step[2] + job.off[2][k]) * job.xs[3] + c0;
            if (nv == NV && a == w0 && b == w0 + P) {
              V wv[NV];
              for (int v = 0; v < NV; ++v) wv[v] = *reinterpret_cast<const U*>(wt + v * L);
#pragma GCC unroll 4
              for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v)
                  acc[p][v] += *reinterpret_cast<const U*>(xb + p * pstride + v * L) * wv[v];
            } else {  // masked, with compile-time indices (accumulators in registers)
              const int64_t pa = a - w0, pb = b - w0;
#pragma GCC unroll 4
              for (int p = 0; p < P; ++p) {
                if (p < pa || p >= pb) continue;
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v)
                  if (v < nv)
                    acc[p][v] += *reinterpret_cast<const U*>(xb + p * pstride + v * L) *
                                 *reinterpret_cast<const U*>(wt + v * L);
              }
            }
          }
        }
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
          if (p >= np) continue;
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v)
            if (v < nv) {
              T lanes_out[L];
              *reinterpret_cast<U*>(lanes_out) =
                  bias ? acc[p][v] + *reinterpret_cast<const U*>(bias + c0 + v * L) : acc[p][v];
              store_out(job.out_half, orow + ((w0 + p) * os + c0 + v * L) * oi, lanes_out, L);
            }
        }
        if (nv < NV && c0 + nv * L < ch) {  // channels past the last whole vector: scalar
          for (int64_t p = 0; p < np; ++p)
            for (int64_t c = c0 + nv * L; c < ch; ++c) {
              T sum = bias ? bias[c] : T(0);
              for (int64_t q = 0; q < pairs; ++q) {
                if (!rows[q]) continue;
                for (int64_t k = 0; k < tw; ++k) {
                  const int64_t w = w0 + p;
                  if (w < lo[k] || w >= hi[k]) continue;
                  sum += rows[q][(w * job.step[2] + job.off[2][k]) * job.xs[3] + c] *
                         wpk[(q * tw + k) * ch + c];
                }
              }
              store_out(job.out_half, orow + ((w0 + p) * os + c) * oi, &sum, 1);
            }
        }
      }
    }
  });
}

// Depthwise at input step 1 with contiguous pixels (every forward phase): a run of pixels
// of a row is one flat run of pixel * C + channel, in the input as in the sums, so the
// vectors run along that flat index whatever the channel count (C = 2 used 2 of 16 lanes
// per vector along the channels, and C < 16 had no whole vector at all). Lane i of the
// vector at flat index j needs the weight of channel (j + i) % C: each tap's weights
// repeated along a pattern, read at offset j % C. A block of NB vectors keeps its sums
// in registers over every tap; where a tap reaches only part of the block (the row's
// ends), that tap's share goes through memory, lane by lane.
template <typename T>
static void depthwise_flat_rows(const CtJob& job, const int64_t* lo, const int64_t* hi) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int NB = CT_NREGS == 32 ? 8 : 4;
  constexpr int64_t BLOCK = NB * L;
  const int64_t ch = job.cout, tw = job.ntaps[2];
  const int64_t pairs = job.ntaps[0] * job.ntaps[1], taps = pairs * tw;
  const int64_t flat = job.wcount * ch, os = job.os[3];
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  const T* wpk = static_cast<const T*>(job.w);
  const int64_t plen = ch + BLOCK;  // pattern: pat[t][j] = w[t][j % ch]
  std::vector<T> pat(taps * plen);
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t j = 0, c = 0; j < plen; ++j, c = c + 1 == ch ? 0 : c + 1)
      pat[t * plen + j] = wpk[t * ch + c];
  // The sums start from the bias, laid along the same pattern (zeros: none).
  std::vector<T> bpat(plen, T(0));
  if (job.bias)
    for (int64_t j = 0, c = 0; j < plen; ++j, c = c + 1 == ch ? 0 : c + 1)
      bpat[j] = static_cast<const T*>(job.bias)[c];
  std::vector<T> row_store(flat + BLOCK + 64 / sizeof(T));
  T* row = aligned_line(row_store.data());
  const int64_t step_mod = BLOCK % ch;
  // Blocks inside [inner0, inner1) are reached whole by every W tap: no range test there
  // (the tests cost several times a block's multiply-adds: a 16-channel k5 layer ran at
  // 3 GFLOP/s with them).
  int64_t inner0 = 0, inner1 = flat;
  for (int64_t k = 0; k < tw; ++k) {
    inner0 = std::max(inner0, lo[k] * ch);
    inner1 = std::min(inner1, hi[k] * ch);
  }
  std::vector<int64_t> xoff(tw);
  for (int64_t k = 0; k < tw; ++k) xoff[k] = job.off[2][k] * ch;
  for_each_row<T>(job, [&](const T* const* rows, char* orow) {
    for (int64_t j0 = 0, m0 = 0; j0 < flat; j0 += BLOCK) {
      const int64_t j1 = std::min(flat, j0 + BLOCK);
      if (j0 >= inner0 && j0 + BLOCK <= inner1) {
        V sum[NB];
#pragma GCC unroll 8
        for (int v = 0; v < NB; ++v) sum[v] = *reinterpret_cast<const U*>(bpat.data() + m0 + v * L);
        for (int64_t q = 0; q < pairs; ++q) {
          if (!rows[q]) continue;
          const T* xq = rows[q] + j0;
          const T* pq = pat.data() + q * tw * plen + m0;
          for (int64_t k = 0; k < tw; ++k) {
            const T* x = xq + xoff[k];
            const T* p = pq + k * plen;
#pragma GCC unroll 8
            for (int v = 0; v < NB; ++v)
              sum[v] += *reinterpret_cast<const U*>(x + v * L) *
                        *reinterpret_cast<const U*>(p + v * L);
          }
        }
#pragma GCC unroll 8
        for (int v = 0; v < NB; ++v) *reinterpret_cast<U*>(row + j0 + v * L) = sum[v];
        m0 += step_mod;
        if (m0 >= ch) m0 -= ch;
        continue;
      }
      V sum[NB];
#pragma GCC unroll 8
      for (int v = 0; v < NB; ++v) sum[v] = *reinterpret_cast<const U*>(bpat.data() + m0 + v * L);
      bool partial = false;  // some tap's share of the block went to row[] lane by lane
      for (int64_t q = 0; q < pairs; ++q) {
        if (!rows[q]) continue;
        for (int64_t k = 0; k < tw; ++k) {
          const int64_t a = std::max(lo[k] * ch, j0), b = std::min(hi[k] * ch, j1);
          if (a >= b) continue;
          const T* x = rows[q] + job.off[2][k] * ch;  // x[j]: the input flat j reads
          const T* p = pat.data() + (q * tw + k) * plen + m0 - j0;  // p[j]: its weight
          if (a == j0 && b == j0 + BLOCK) {
#pragma GCC unroll 8
            for (int v = 0; v < NB; ++v)
              sum[v] += *reinterpret_cast<const U*>(x + j0 + v * L) *
                        *reinterpret_cast<const U*>(p + j0 + v * L);
          } else {
            if (!partial) {
              std::fill(row + j0, row + j0 + BLOCK, T(0));
              partial = true;
            }
            for (int64_t j = a; j < b; ++j) row[j] += x[j] * p[j];
          }
        }
      }
      if (partial) {
#pragma GCC unroll 8
        for (int v = 0; v < NB; ++v) sum[v] += *reinterpret_cast<const U*>(row + j0 + v * L);
      }
#pragma GCC unroll 8
      for (int v = 0; v < NB; ++v) *reinterpret_cast<U*>(row + j0 + v * L) = sum[v];
      m0 += step_mod;
      if (m0 >= ch) m0 -= ch;
    }
    if (os == ch) {
      store_chunk(job, orow, row, flat);
    } else {
      for (int64_t w = 0; w < job.wcount; ++w) store_out(job.out_half, orow + w * os * oi,
                                                         row + w * ch, ch);
    }
  });
}

#include "planar.hpp"

template <typename T>
static void run_mode(const CtJob& job) {
  if (job.mode == CT_MODE_PLANAR) return run_planar<T>(job);
  const WRanges wr = w_ranges(job.off[2], job.ntaps[2], job.step[2], job.in_dims[2], job.wcount);
  if (job.mode == CT_MODE_CHANNELS) return run_typed<T>(job, wr);
  const int64_t* lo = wr.lo.data();
  const int64_t* hi = wr.hi.data();
  if (job.mode == CT_MODE_DEPTHWISE) {
    // Few channels along the flat index; many along the channels, where each weight
    // vector serves four pixels.
    constexpr int L = CT_VBYTES / sizeof(T);
    if (job.step[2] == 1 && job.xs[3] == job.cout && job.cout < 4 * L)
      return depthwise_flat_rows<T>(job, lo, hi);
    return depthwise_rows<T>(job, lo, hi);
  }
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t cv = job.cin / L;
  if (job.step[2] == 1 && job.xs[3] == job.cin && job.cin == cv * L && cv >= 1 && cv <= 2) {
#define CT_DOT(CO) (cv == 1 ? dot_rows_packed<T, CO, 1> : dot_rows_packed<T, CO, 2>)(job, lo, hi)
    switch (job.cout) {
      case 1: CT_DOT(1); break;
      case 2: CT_DOT(2); break;
      case 3: CT_DOT(3); break;
      case 4: CT_DOT(4); break;
    }
#undef CT_DOT
    return;
  }
  switch (job.cout) {
    case 1: dot_rows<T, 1>(job, lo, hi); break;
    case 2: dot_rows<T, 2>(job, lo, hi); break;
    case 3: dot_rows<T, 3>(job, lo, hi); break;
    case 4: dot_rows<T, 4>(job, lo, hi); break;
  }
}

void correlate_f32(const CtJob& job);
void correlate_f64(const CtJob& job);
#if CT_PART_HAS(1)
void correlate_f32(const CtJob& job) { run_mode<float>(job); }
#endif
#if CT_PART_HAS(2)
void correlate_f64(const CtJob& job) { run_mode<double>(job); }
#endif
#if CT_PART_HAS(3)
void correlate(const CtJob& job) {
  if (job.itemsize == 4) correlate_f32(job);
  else correlate_f64(job);
}
#endif

// --- grad_weight ------------------------------------------------------------------------
//
// part[tap][a][b] += sum over pixels of A[pixel][a] * B[pixel][b]: with A the input rows
// and B the cotangent rows a tap meets (or swapped, when C_out is the short side), one
// GEMM per tap whose reduction runs along the pixels. Register blocks of P values of A
// (broadcast) by NV vectors of B, held in registers over every pixel of a group of rows.

struct Segment {
  const void* a;  // first pixel's A row (at channel 0)
  const void* b;
  int64_t count;
};

template <typename T, int P, int NV>
static inline void reduce_block(const Segment* segs, int64_t nseg, int64_t as, int64_t bs,
                                int64_t a0, int64_t b0, T* acc, int64_t cw) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  // With few sums (a 16 -> 1 head has one per tap) each pixel's multiply-add would wait
  // on the previous one: U interleaved copies of the sums keep 8 chains in flight, added
  // in a fixed order at the end.
  constexpr int UN = P * NV >= 8 ? 1 : 8 / (P * NV);
  V r[UN][P][NV];
  load_tile<T, P, NV>(r[0], acc, cw);
#pragma GCC unroll 8
  for (int u = 1; u < UN; ++u)
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) r[u][p][v] = V{};
  for (int64_t sgi = 0; sgi < nseg; ++sgi) {
    const T* a = static_cast<const T*>(segs[sgi].a) + a0;
    const T* b = static_cast<const T*>(segs[sgi].b) + b0;
    const int64_t count = segs[sgi].count;
    int64_t i = 0;
    const auto step = [&](auto& sums, const T* ai, const T* bi) {
      __builtin_prefetch(ai + 64 / sizeof(T));  // the next blocks' line of this pixel
      V bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const U*>(bi + v * L);
#pragma GCC unroll 32
      for (int p = 0; p < P; ++p) {
        const V x = broadcast<V>(ai + p);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) sums[p][v] += x * bv[v];
      }
    };
    for (; i + UN <= count; i += UN, a += UN * as, b += UN * bs) {
#pragma GCC unroll 8
      for (int u = 0; u < UN; ++u) step(r[u], a + u * as, b + u * bs);
    }
    for (; i < count; ++i, a += as, b += bs) step(r[0], a, b);
  }
#pragma GCC unroll 8
  for (int u = 1; u < UN; ++u)
#pragma GCC unroll 32
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) r[0][p][v] += r[u][p][v];
  store_tile<T, P, NV>(r[0], acc, cw);
}

template <typename T, int NV, int P>
static inline void reduce_tail(int64_t n, const Segment* segs, int64_t nseg, int64_t as,
                               int64_t bs, int64_t a0, int64_t b0, T* acc, int64_t cw) {
  if constexpr (P > 0) {
    if (n == P) return reduce_block<T, P, NV>(segs, nseg, as, bs, a0, b0, acc, cw);
    reduce_tail<T, NV, P - 1>(n, segs, nseg, as, bs, a0, b0, acc, cw);
  }
}

// acc: the (na x NV vectors) sums, rows `cw` apart.
template <typename T, int NV>
static void reduce_chunk(const Segment* segs, int64_t nseg, int64_t as, int64_t bs,
                         int64_t na, int64_t b0, T* acc, int64_t cw) {
  constexpr int P = Block<NV>::P;
  // Blocks of near-equal size, as the forward's rows: a last block of 2 or 4 values of A
  // does a third or two thirds of a block's multiply-adds per pass over B, with as many
  // loads of B (misaligned ones cost two). One core, 3x3x3 kernel over 16x32x32 pixels,
  // 64 columns: 32 values of A 12.9 -> 11.2 ms, 64 23.3 -> 22.3, 128 46.5 -> 45.7; 48,
  // whole blocks either way, level.
  const int64_t nb = (na + P - 1) / P, size = na / nb, bigger = na % nb;
  for (int64_t blk = 0, a0 = 0; blk < nb; ++blk) {
    const int64_t len = size + (blk < bigger);
    if (len == P) reduce_block<T, P, NV>(segs, nseg, as, bs, a0, b0, acc + a0 * cw, cw);
    else reduce_tail<T, NV, P - 1>(len, segs, nseg, as, bs, a0, b0, acc + a0 * cw, cw);
    a0 += len;
  }
}

// Few sums per tap (swapped, C_out/g * vectors of C_in/g < 8: a 16 -> 1 head has one
// vector per tap). reduce_block would then do one multiply-add per two loads, each tap
// sweeping the row alone. Here a tile of up to E sums (tap, output channel) of one row
// shares each pixel's vectors of x: one broadcast load per multiply-add, E independent
// chains. Every sum still runs over its row's pixels in ascending order (the pixels some
// of the tile's taps miss at the row's ends first and last), so the bits do not depend on
// which sums share a tile, nor on the thread count.
template <typename T>
static inline bool few_sums(int64_t cin, int64_t cout) {
  return cout * std::min<int64_t>(cin / (CT_VBYTES / (int64_t)sizeof(T)), MAXV) < 8;
}

template <typename T>
struct FewSum {
  int64_t g;       // where the cotangent value of the first pixel the tap reaches (lo)
                   // is, from the row's origin: the cotangent at (d * step_d,
                   // h * step_h, 0), which the offsets of the tap's (D, H) pair move
  int64_t lo, hi;  // the pixels [lo, hi) of the row the tap reaches
  T* acc;          // NV vectors of sums
  const T* w;      // with grad_input too: the sum's NV vectors of the weight
};

// `rows` rows with the same taps, `grs` and `xrs` apart in the cotangent and in x.
template <typename T, int NV, int E>
static void few_sums_tile(const FewSum<T>* sums, const T* grow, int64_t grs, const T* xrow,
                          int64_t xrs, int64_t rows, int64_t xs_w, int64_t gs_w) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  V s[E][NV];
  int64_t ilo = sums[0].lo, ihi = sums[0].hi;
#pragma GCC unroll 24
  for (int e = 0; e < E; ++e) {
    ilo = std::max(ilo, sums[e].lo);
    ihi = std::min(ihi, sums[e].hi);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) s[e][v] = *reinterpret_cast<const U*>(sums[e].acc + v * L);
  }
  const bool inner = ilo < ihi;
  for (int64_t r = 0; r < rows; ++r, grow += grs, xrow += xrs) {
    const auto edge = [&](auto& sum, const FewSum<T>& f, int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const V b = broadcast<V>(grow + f.g + (w - f.lo) * gs_w);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          sum[v] += b * *reinterpret_cast<const U*>(xrow + w * xs_w + v * L);
      }
    };
#pragma GCC unroll 24
    for (int e = 0; e < E; ++e) edge(s[e], sums[e], sums[e].lo, inner ? ilo : sums[e].hi);
    if (!inner) continue;
    const T* gp[E];
#pragma GCC unroll 24
    for (int e = 0; e < E; ++e) gp[e] = grow + sums[e].g + (ilo - sums[e].lo) * gs_w;
    const T* xp = xrow + ilo * xs_w;
    for (int64_t t = 0, n = ihi - ilo; t < n; ++t, xp += xs_w) {
      V xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) xv[v] = *reinterpret_cast<const U*>(xp + v * L);
#pragma GCC unroll 24
      for (int e = 0; e < E; ++e) {
        const V b = broadcast<V>(gp[e] + t * gs_w);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) s[e][v] += b * xv[v];
      }
    }
#pragma GCC unroll 24
    for (int e = 0; e < E; ++e) edge(s[e], sums[e], ihi, sums[e].hi);
  }
#pragma GCC unroll 24
  for (int e = 0; e < E; ++e)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(sums[e].acc + v * L) = s[e][v];
}

// Sums per tile: up to 12, as the vector registers allow (W6's 64 taps on one core, single
// runs: 6 per tile 0.78 ms, 8 0.73, 12 0.65, 16 0.93; past 8 the broadcast addresses no
// longer all fit in registers, yet the x vectors serve more sums).
template <int NV> struct FewTile {
  static constexpr int E = std::min(12, (CT_NREGS == 32 ? 24 : 12) / NV);
};

// f(first, std::integral_constant<int, len>) for a compile-time len in 1..E equal to n.
template <int E, typename T, typename F>
static inline void with_tile_size(int64_t n, const FewSum<T>* first, F&& f) {
  if constexpr (E > 0) {
    if (n == E) return f(first, std::integral_constant<int, E>{});
    with_tile_size<E - 1>(n, first, f);
  }
}

// The n sums of one row's chunk in tiles of even size, at most E each (a last tile of
// one or two sums would run latency-bound): tile(first sum, its compile-time count).
template <int E, typename T, typename F>
static void in_even_tiles(const FewSum<T>* sums, int64_t n, F&& tile) {
  const int64_t tiles = (n + E - 1) / E, size = n / std::max<int64_t>(1, tiles),
                bigger = n % std::max<int64_t>(1, tiles);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t len = size + (t < bigger);
    with_tile_size<E>(len, sums, tile);
    sums += len;
  }
}

// Both gradients in one pass (job.gx, few sums only): each broadcast cotangent value b of
// sum e = (tap, output channel) feeds its grad_weight sum, s[e] += b * x[pixel], and the
// pixel's grad_input, gx[pixel] += b * W[e], with W[e] held in registers over the tile.
// Two multiply-adds per broadcast load where grad_weight alone has one (and grad_input
// alone one per broadcast too), so the pass runs on the FMA ports, not the load ports.
// U pixels at a time keep U independent grad_input chains in flight. The grad_weight sums
// run in the same order as few_sums_tile's; a pixel's grad_input adds the row's sums in
// list order, tile by tile.
// Register use: E * NV sums, E * NV weight vectors, U * NV each of x and grad_input, and
// a broadcast. W6 (NV = 1), one core: E 8, U 4: 1.30 ms; E 8, U 2: 1.28; E 6, U 4: 1.33;
// E 12, U 2: 1.27, level within the noise; fewer sums mean fewer base pointers to keep.
template <int NV> struct FusedTile {
  static constexpr int E = CT_NREGS == 32 ? (NV == 1 ? 8 : NV == 2 ? 4 : 2) : (NV == 1 ? 4 : 2);
  static constexpr int U = CT_NREGS == 32 ? (NV <= 3 ? (NV == 1 ? 4 : 2) : 1) : (NV == 1 ? 2 : 1);
};

template <typename T, int NV, int E>
static void fused_sums_tile(const FewSum<T>* sums, const T* grow, int64_t grs, const T* xrow,
                            int64_t xrs, T* gxrow, int64_t gxrs, int64_t gxs_w, int64_t rows,
                            int64_t xs_w, int64_t gs_w) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int UP = FusedTile<NV>::U;
  V s[E][NV], wv[E][NV];
  // [ilo, ihi): the pixels every sum of the tile reaches; [wlo, whi): those any reaches.
  int64_t ilo = sums[0].lo, ihi = sums[0].hi, wlo = ilo, whi = ihi;
#pragma GCC unroll 16
  for (int e = 0; e < E; ++e) {
    ilo = std::max(ilo, sums[e].lo);
    ihi = std::min(ihi, sums[e].hi);
    wlo = std::min(wlo, sums[e].lo);
    whi = std::max(whi, sums[e].hi);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      s[e][v] = *reinterpret_cast<const U*>(sums[e].acc + v * L);
      wv[e][v] = *reinterpret_cast<const U*>(sums[e].w + v * L);
    }
  }
  // The pixels some sums miss, [wlo, ilo) and [ihi, whi) (every pixel when none is reached
  // by all): one at a time, each sum that reaches it in turn, the pixel's grad_input in
  // registers (two chains, even and odd sums).
  const bool inner = ilo < ihi;
  const int64_t left_end = inner ? ilo : whi;
  for (int64_t r = 0; r < rows; ++r, grow += grs, xrow += xrs, gxrow += gxrs) {
    const auto edge = [&](int64_t w) {
      V xv[NV], acc[2][NV];
      T* gp = gxrow + w * gxs_w;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        xv[v] = *reinterpret_cast<const U*>(xrow + w * xs_w + v * L);
        acc[0][v] = *reinterpret_cast<const U*>(gp + v * L);
        acc[1][v] = V{};
      }
#pragma GCC unroll 16
      for (int e = 0; e < E; ++e) {
        if (w < sums[e].lo || w >= sums[e].hi) continue;
        const V b = broadcast<V>(grow + sums[e].g + (w - sums[e].lo) * gs_w);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          s[e][v] += b * xv[v];
          acc[e & 1][v] += b * wv[e][v];
        }
      }
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        *reinterpret_cast<U*>(gp + v * L) = acc[0][v] + acc[1][v];
    };
    for (int64_t w = wlo; w < left_end; ++w) edge(w);
    if (inner) {
      const T* gp[E];
#pragma GCC unroll 16
      for (int e = 0; e < E; ++e) gp[e] = grow + sums[e].g + (ilo - sums[e].lo) * gs_w;
      const T* xp = xrow + ilo * xs_w;
      T* op = gxrow + ilo * gxs_w;
      const auto step = [&](auto up, int64_t t) {
        constexpr int UN = decltype(up)::value;
        V xv[UN][NV], acc[UN][NV];
#pragma GCC unroll 4
        for (int u = 0; u < UN; ++u)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) {
            xv[u][v] = *reinterpret_cast<const U*>(xp + u * xs_w + v * L);
            acc[u][v] = *reinterpret_cast<const U*>(op + u * gxs_w + v * L);
          }
#pragma GCC unroll 16
        for (int e = 0; e < E; ++e)
#pragma GCC unroll 4
          for (int u = 0; u < UN; ++u) {
            const V b = broadcast<V>(gp[e] + (t + u) * gs_w);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              s[e][v] += b * xv[u][v];
              acc[u][v] += b * wv[e][v];
            }
          }
#pragma GCC unroll 4
        for (int u = 0; u < UN; ++u)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v)
            *reinterpret_cast<U*>(op + u * gxs_w + v * L) = acc[u][v];
        xp += UN * xs_w;
        op += UN * gxs_w;
      };
      const int64_t n = ihi - ilo;
      int64_t t = 0;
      for (; t + UP <= n; t += UP) step(std::integral_constant<int, UP>{}, t);
      for (; t < n; ++t) step(std::integral_constant<int, 1>{}, t);
    }
    if (inner)
      for (int64_t w = ihi; w < whi; ++w) edge(w);
  }
#pragma GCC unroll 16
  for (int e = 0; e < E; ++e)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(sums[e].acc + v * L) = s[e][v];
}

template <typename T>
static void grad_weight_typed(const GwJob& job) {
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t cw_full = MAXV * L;
  const int64_t na = job.swapped ? job.cout : job.cin;
  const int64_t nb = job.swapped ? job.cin : job.cout;  // a multiple of L (the caller checks)
  const int64_t taps = job.ntaps[0] * job.ntaps[1] * job.ntaps[2];
  const T* x = static_cast<const T*>(job.x);
  const T* g = static_cast<const T*>(job.g);
  T* part = static_cast<T*>(job.part);
  const int64_t tw = job.ntaps[2];
  T* gx = static_cast<T*>(job.gx);             // grad_input too (few sums only)
  const T* wt = static_cast<const T*>(job.w);  // its weight, laid out as part
  const WRanges wr = w_ranges(job.off[2], tw, job.step[2], job.gdims[2], job.wcount);
  const std::vector<int64_t>& lo = wr.lo;
  const std::vector<int64_t>& hi = wr.hi;
  const int64_t xs_w = job.xs[3], gs_w = job.gs[3] * job.step[2];
  const int64_t as = job.swapped ? gs_w : xs_w, bs = job.swapped ? xs_w : gs_w;
  const int64_t total = box_rows(job.box);
  const int64_t group = std::max<int64_t>(1, (192 + job.wcount - 1) / std::max<int64_t>(1, job.wcount));
  const int64_t chunks = (nb + cw_full - 1) / cw_full;
  CtStop* const stop = ct_stop;  // asked before each group of rows (see RowClaims)
  // The sums of unit (tap, chunk c0 / cw_full), and their row stride.
  const auto unit_acc = [&](int64_t tap, int64_t c0, int64_t cw) {
    return job.pa ? part + tap * job.pt + c0 : part + taps * na * c0 + tap * na * cw;
  };
  const auto wanted = [&](int64_t tap, int64_t chunk) {
    const int64_t u = tap * chunks + chunk;
    return u >= job.unit0 && u < job.unit1;
  };
  if (job.zero)
    for (int64_t tap = 0; tap < taps; ++tap)
      for (int64_t c0 = 0; c0 < nb; c0 += cw_full) {
        if (!wanted(tap, c0 / cw_full)) continue;
        const int64_t cw = nb - c0 < cw_full ? nb - c0 : cw_full;
        T* acc = unit_acc(tap, c0, cw);
        for (int64_t a = 0; a < na; ++a)
          std::memset(acc + a * (job.pa ? job.pa : cw), 0, cw * sizeof(T));
      }
  if (job.swapped == 1 && few_sums<T>(nb, na)) {
    // A row's sums depend only on which (D, H) tap pairs it reaches: a range of i and one
    // of j, as the offsets k * dilation - padding rise with k. They are listed again only
    // where those ranges change, at the volume's faces.
    std::vector<std::vector<FewSum<T>>> lists((nb + cw_full - 1) / cw_full);
    int64_t key[4] = {-1, -1, -1, -1};
    const auto first_inside = [](const int64_t* off, int64_t taps, int64_t p, int64_t dim) {
      int64_t t = 0;
      while (t < taps && p + off[t] < 0) ++t;
      int64_t u = t;
      while (u < taps && p + off[u] < dim) ++u;
      return std::make_pair(t, u);
    };
    // Runs of up to 8 rows of one (n, d) plane with the same taps share each tile's
    // sums in registers (their x rows, 2 KiB each for W6, stay in L1).
    const int64_t nh = job.box[5] - job.box[4];
    for (int64_t flat = 0, rows; flat < total; flat += rows) {
      if (stop && stop->stop(stop)) return;
      const auto [n, d, h] = row_at(job.box, flat);
      const auto [i0, i1] = first_inside(job.off[0], job.ntaps[0], d * job.step[0], job.gdims[0]);
      const auto [j0, j1] = first_inside(job.off[1], job.ntaps[1], h * job.step[1], job.gdims[1]);
      rows = 1;
      while (rows < 8 && h - job.box[4] + rows < nh &&
             first_inside(job.off[1], job.ntaps[1], (h + rows) * job.step[1], job.gdims[1]) ==
                 std::make_pair(j0, j1))
        ++rows;
      if (i0 != key[0] || i1 != key[1] || j0 != key[2] || j1 != key[3]) {
        key[0] = i0, key[1] = i1, key[2] = j0, key[3] = j1;
        for (int64_t c0 = 0; c0 < nb; c0 += cw_full) {
          const int64_t cw = nb - c0 < cw_full ? nb - c0 : cw_full;
          const int64_t ars = job.pa ? job.pa : cw;  // row stride of the sums
          std::vector<FewSum<T>>& sums = lists[c0 / cw_full];
          sums.clear();
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t j = j0; j < j1; ++j)
              for (int64_t k = 0; k < tw; ++k) {
                const int64_t tap = (i * job.ntaps[1] + j) * tw + k;
                if (lo[k] >= hi[k] || !wanted(tap, c0 / cw_full)) continue;
                const int64_t g0 = job.off[0][i] * job.gs[1] + job.off[1][j] * job.gs[2] +
                                   (lo[k] * job.step[2] + job.off[2][k]) * job.gs[3];
                T* acc = unit_acc(tap, c0, cw);
                for (int64_t a = 0; a < na; ++a)
                  sums.push_back(FewSum<T>{g0 + a, lo[k], hi[k], acc + a * ars,
                                           wt ? wt + (acc + a * ars - part) : nullptr});
              }
        }
      }
      const T* xrow = x + n * job.xs[0] + d * job.xs[1] + h * job.xs[2];
      // The row's origin in the cotangent (each sum's `g` adds its tap's offsets).
      const T* grow = g + n * job.gs[0] + d * job.step[0] * job.gs[1] + h * job.step[1] * job.gs[2];
      const int64_t grs = job.step[1] * job.gs[2], xrs = job.xs[2];
      T* gxrow = gx ? gx + n * job.gxs[0] + d * job.gxs[1] + h * job.gxs[2] : nullptr;
      for (int64_t c0 = 0; c0 < nb; c0 += cw_full) {
        const std::vector<FewSum<T>>& sums = lists[c0 / cw_full];
        const int64_t cw = nb - c0 < cw_full ? nb - c0 : cw_full;
        with_vectors(cw / L, [&](auto nv) {
          constexpr int NV = decltype(nv)::value;
          const int64_t count = (int64_t)sums.size();
          if (!gx) {
            in_even_tiles<FewTile<NV>::E>(sums.data(), count, [&](auto* first, auto e) {
              few_sums_tile<T, NV, decltype(e)::value>(first, grow, grs, xrow + c0, xrs, rows,
                                                       xs_w, gs_w);
            });
            return;
          }
          // Every pixel of the rows is written: from zero, as the sums add up. NV vectors
          // known here, so that these are plain stores: with a run-time count GCC makes
          // them a memset per pixel, which took 6-25% of W6's time.
          typedef typename Vec<T>::u U;
          const typename Vec<T>::v zero{};
          const int64_t gxs_h = job.gxs[2], gxs_w = job.gxs[3], wcount = job.wcount;
          for (int64_t r = 0; r < rows; ++r) {
            T* p = gxrow + r * gxs_h + c0;
            for (int64_t w = 0; w < wcount; ++w, p += gxs_w)
#pragma GCC unroll 4
              for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(p + v * L) = zero;
          }
          in_even_tiles<FusedTile<NV>::E>(sums.data(), count, [&](auto* first, auto e) {
            fused_sums_tile<T, NV, decltype(e)::value>(first, grow, grs, xrow + c0, xrs,
                                                       gxrow + c0, gxs_h, gxs_w, rows, xs_w,
                                                       gs_w);
          });
        });
      }
    }
    return;
  }
  std::vector<Segment> segs(group);
  std::vector<RowPos> pos(group);
  std::vector<Segment> batches;  // pieces of segs, each batch ended by a count of -1
  // The vector side's rows of a batch, copied to a cache line boundary where they are not
  // on one (NumPy's big arrays start 16 bytes past a page): every broadcast block re-reads
  // them, and a vector load across two lines costs two. Worth its copy from ~96 blocks of
  // the broadcast side on (W1 -6%, W4 -4..-9%, W3 -3%; W5 and W8, with 64, lost 3-5%).
  // Room for a batch: at most 64 pixels (SUB below, as na >= 8) of cw_full columns.
  const bool copy_b = na >= 96;
  std::vector<T> bstore(copy_b ? 64 * cw_full + 64 / sizeof(T) : 0);
  T* bbuf = aligned_line(bstore.data());
  std::vector<Segment> local;
  for (int64_t first = 0; first < total; first += group) {
    if (stop && stop->stop(stop)) return;
    const int64_t nrows = std::min(group, total - first);
    for (int64_t r = 0; r < nrows; ++r) pos[r] = row_at(job.box, first + r);
    for (int64_t i = 0; i < job.ntaps[0]; ++i)
      for (int64_t j = 0; j < job.ntaps[1]; ++j)
        for (int64_t k = 0; k < tw; ++k) {
          if (lo[k] >= hi[k]) continue;
          const int64_t tap = (i * job.ntaps[1] + j) * tw + k;
          bool any = false;
          for (int64_t c = 0; c < chunks; ++c) any = any || wanted(tap, c);
          if (!any) continue;
          int64_t nseg = 0;
          for (int64_t r = 0; r < nrows; ++r) {
            const auto [n, d, h] = pos[r];
            const int64_t od = d * job.step[0] + job.off[0][i];
            const int64_t oh = h * job.step[1] + job.off[1][j];
            if (od < 0 || od >= job.gdims[0] || oh < 0 || oh >= job.gdims[1]) continue;
            const T* xp = x + n * job.xs[0] + d * job.xs[1] + h * job.xs[2] + lo[k] * xs_w;
            const T* gp = g + n * job.gs[0] + od * job.gs[1] + oh * job.gs[2] +
                          (lo[k] * job.step[2] + job.off[2][k]) * job.gs[3];
            segs[nseg].a = job.swapped ? (const void*)gp : (const void*)xp;
            segs[nseg].b = job.swapped ? (const void*)xp : (const void*)gp;
            segs[nseg].count = hi[k] - lo[k];
            ++nseg;
          }
          if (!nseg) continue;
          // Cut the pixels into batches of about SUB, so that a batch's rows of the vector
          // side stay in L1 while every block of the broadcast side sweeps them; with a
          // broadcast side of a few values (one block) there is nothing to keep: no cuts.
          // The batch's rows of both sides within ~32 KiB of L1, 32 to 64 pixels: the
          // broadcast side's lines (one per pixel) must stay too. Two cores, against 48
          // pixels: W1 20.6 -> 18.0 ms, W4 33.7 -> 31.0, W3 33.0 -> 31.3, W8 28 -> 26;
          // against 32 for every shape: W3 -5%, W5 -3%, W8 -3%, W4 +3%, W1 level.
          const int64_t row_bytes = (na + std::min<int64_t>(nb, cw_full)) * (int64_t)sizeof(T);
          const int64_t SUB = na < 8 ? INT64_MAX / 2
                                     : std::max<int64_t>(32, std::min<int64_t>(64, 32768 / row_bytes));
          batches.clear();
          int64_t run = 0;
          for (int64_t q = 0; q < nseg; ++q) {
            for (int64_t done = 0; done < segs[q].count;) {
              const int64_t take = std::min(segs[q].count - done, SUB - run);
              Segment piece = segs[q];
              piece.a = static_cast<const T*>(piece.a) + done * as;
              piece.b = static_cast<const T*>(piece.b) + done * bs;
              piece.count = take;
              batches.push_back(piece);
              done += take;
              run += take;
              if (run == SUB) { batches.push_back(Segment{nullptr, nullptr, -1}); run = 0; }
            }
          }
          if (run) batches.push_back(Segment{nullptr, nullptr, -1});
          for (int64_t c0 = 0; c0 < nb; c0 += cw_full) {
            if (!wanted(tap, c0 / cw_full)) continue;
            const int64_t cw = nb - c0 < cw_full ? nb - c0 : cw_full;
            T* acc = unit_acc(tap, c0, cw);
            const int64_t ars = job.pa ? job.pa : cw;  // row stride of the sums
            size_t start = 0;
            for (size_t e = 0; e < batches.size(); ++e) {
              if (batches[e].count >= 0) continue;
              const Segment* bseg = batches.data() + start;
              const int64_t bn = (int64_t)(e - start);
              start = e + 1;
              int64_t b0 = c0, bstride = bs;
              const uintptr_t first_b =
                  reinterpret_cast<uintptr_t>(static_cast<const T*>(bseg[0].b) + c0);
              if (copy_b && ((first_b | (bs * sizeof(T))) & 63)) {
                local.assign(bseg, bseg + bn);
                T* dst = bbuf;
                for (int64_t q = 0; q < bn; ++q) {
                  const T* src = static_cast<const T*>(bseg[q].b) + c0;
                  local[q].b = dst;
                  for (int64_t i = 0; i < bseg[q].count; ++i, dst += cw)  // whole vectors
                    for (int64_t c = 0; c < cw; c += L)
                      *reinterpret_cast<typename Vec<T>::u*>(dst + c) =
                          *reinterpret_cast<const typename Vec<T>::u*>(src + i * bs + c);
                }
                bseg = local.data();
                b0 = 0;
                bstride = cw;
              }
              with_vectors(cw / L, [&](auto nv) {
                reduce_chunk<T, decltype(nv)::value>(bseg, bn, as, bstride, na, b0, acc, ars);
              });
            }
          }
        }
  }
}

// acc[c] += sum over n contiguous pixels of x[p, c] * g[p, c], C < lanes channels, both
// rows dense (pixel stride C): along the flat pixel * channel index, C vectors a step of
// L * C elements, so that lane i of vector v always holds channel (v * L + i) % C; folded
// by channel at the end. (Along the channels alone, C < L left no whole vector and ran a
// scalar chain per channel: a 4-channel depthwise layer's grad_weight at 0.9 GFLOP/s.)
template <typename T, int C>
static inline void dw_flat_dot(const T* xp, const T* gp, int64_t n, T* acc) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int R = C >= 4 ? 1 : 4 / C;  // steps in flight: enough independent sums
  V s[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < C; ++v) s[r][v] = V{};
  const int64_t total = n * C;
  int64_t f = 0;
  for (; f + R * L * C <= total; f += R * L * C)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < C; ++v) {
        const int64_t at = f + (r * C + v) * L;
        s[r][v] += *reinterpret_cast<const U*>(xp + at) * *reinterpret_cast<const U*>(gp + at);
      }
  T lane[R][C][L];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < C; ++v) *reinterpret_cast<U*>(lane[r][v]) = s[r][v];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < C; ++v)
      for (int i = 0; i < L; ++i) acc[(v * L + i) % C] += lane[r][v][i];
  for (; f < total; ++f) acc[f % C] += xp[f] * gp[f];  // f starts at a multiple of C
}

// Depthwise (one input and one output channel per group, C = cin channels):
// part[tap * pt + c] += sum over the box's input pixels of x[p, c] * g[p * step + off, c].
// Vectors along the channels; row by row, every tap of the row in turn while the row is
// in L1. (NumPy's einsum per tap took 12 ms on W7, twice the forward.)
template <typename T>
static void dw_grad_weight_typed(const GwJob& job) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t C = job.cin, full = C / L * L, tw = job.ntaps[2];
  const T* x = static_cast<const T*>(job.x);
  const T* g = static_cast<const T*>(job.g);
  T* part = static_cast<T*>(job.part);
  const WRanges wr = w_ranges(job.off[2], tw, job.step[2], job.gdims[2], job.wcount);
  const int64_t xs_w = job.xs[3], gs_w = job.gs[3] * job.step[2];
  const bool flat = C < L && xs_w == C && gs_w == C;  // dense rows: `dw_flat_dot`
  for (int64_t row = 0, total = box_rows(job.box); row < total; ++row) {
    const auto [n, d, h] = row_at(job.box, row);
    const T* xrow = x + n * job.xs[0] + d * job.xs[1] + h * job.xs[2];
    for (int64_t i = 0; i < job.ntaps[0]; ++i) {
      const int64_t od = d * job.step[0] + job.off[0][i];
      if (od < 0 || od >= job.gdims[0]) continue;
      for (int64_t j = 0; j < job.ntaps[1]; ++j) {
        const int64_t oh = h * job.step[1] + job.off[1][j];
        if (oh < 0 || oh >= job.gdims[1]) continue;
        const T* grow = g + n * job.gs[0] + od * job.gs[1] + oh * job.gs[2];
        for (int64_t k = 0; k < tw; ++k) {
          const int64_t lo = wr.lo[k], hi = wr.hi[k];
          if (lo >= hi) continue;
          T* acc = part + ((i * job.ntaps[1] + j) * tw + k) * job.pt;
          const T* xp = xrow + lo * xs_w;
          const T* gp = grow + (lo * job.step[2] + job.off[2][k]) * job.gs[3];
          if (flat) {
            switch (C) {
#define CT_DW_FLAT(CC) case CC: if constexpr (CC < L) dw_flat_dot<T, CC>(xp, gp, hi - lo, acc); break;
              CT_DW_FLAT(1) CT_DW_FLAT(2) CT_DW_FLAT(3) CT_DW_FLAT(4) CT_DW_FLAT(5) CT_DW_FLAT(6)
              CT_DW_FLAT(7)
#undef CT_DW_FLAT
            }
            continue;
          }
          for (int64_t c = 0; c < full; c += L) {
            V s[4] = {V{}, V{}, V{}, V{}};  // four chains: the FMA latency
            int64_t w = 0;
            for (; w + 4 <= hi - lo; w += 4)
#pragma GCC unroll 4
              for (int u = 0; u < 4; ++u)
                s[u] += *reinterpret_cast<const U*>(xp + (w + u) * xs_w + c) *
                        *reinterpret_cast<const U*>(gp + (w + u) * gs_w + c);
            for (; w < hi - lo; ++w)
              s[0] += *reinterpret_cast<const U*>(xp + w * xs_w + c) *
                      *reinterpret_cast<const U*>(gp + w * gs_w + c);
            const V sum = (s[0] + s[1]) + (s[2] + s[3]);
            *reinterpret_cast<U*>(acc + c) = *reinterpret_cast<const U*>(acc + c) + sum;
          }
          for (int64_t c = full; c < C; ++c) {
            T sum = 0;
            for (int64_t w = 0; w < hi - lo; ++w) sum += xp[w * xs_w + c] * gp[w * gs_w + c];
            acc[c] += sum;
          }
        }
      }
    }
  }
}

#if CT_PART_HAS(3)
void grad_weight(const GwJob& job) {
  if (job.swapped == CT_GW_DEPTHWISE) {
    if (job.itemsize == 4) dw_grad_weight_typed<float>(job);
    else dw_grad_weight_typed<double>(job);
    return;
  }
  if (job.itemsize == 4) grad_weight_typed<float>(job);
  else grad_weight_typed<double>(job);
}

// out[o, :] = sum over j, in order, of src[table[j, o], :]: the `indexed` algorithm's
// gather and sum in one pass (NumPy's take then add.reduce built an (terms, nout, cols)
// temporary: 9 of a small call's 20 us).
template <typename T, int C>  // C > 0: that many columns, known here; 0: `cols`
static void gather_sum_typed(const T* __restrict src, const int64_t* __restrict table,
                             int64_t terms, int64_t nout, int64_t cols, T* __restrict out) {
  if (C) cols = C;
  for (int64_t o = 0; o < nout; ++o) {
    T* __restrict dst = out + o * cols;
    const T* first = src + table[o] * cols;
    for (int64_t c = 0; c < cols; ++c) dst[c] = first[c];
    for (int64_t j = 1; j < terms; ++j) {
      const T* __restrict row = src + table[j * nout + o] * cols;
      for (int64_t c = 0; c < cols; ++c) dst[c] += row[c];
    }
  }
}

template <typename T>
static void gather_sum_any(const T* src, const int64_t* table, int64_t terms, int64_t nout,
                           int64_t cols, T* out) {
  switch (cols) {  // the common narrow widths unrolled into whole vectors
    case 4: gather_sum_typed<T, 4>(src, table, terms, nout, cols, out); break;
    case 8: gather_sum_typed<T, 8>(src, table, terms, nout, cols, out); break;
    case 16: gather_sum_typed<T, 16>(src, table, terms, nout, cols, out); break;
    default: gather_sum_typed<T, 0>(src, table, terms, nout, cols, out);
  }
}

void gather_sum(int itemsize, const void* src, const int64_t* table, int64_t terms,
                int64_t nout, int64_t cols, void* out) {
  if (itemsize == 4)
    gather_sum_any(static_cast<const float*>(src), table, terms, nout, cols,
                   static_cast<float*>(out));
  else
    gather_sum_any(static_cast<const double*>(src), table, terms, nout, cols,
                   static_cast<double*>(out));
}

// n float32 values to float16 or bfloat16 (CT_HALF_*), rounded as the kernel stores them:
// the `indexed` path's results (NumPy's float16 rounding took 10 of W9's 40 us).
void round_half(int kind, const float* src, void* dst, int64_t n) {
  store_out<float>(kind, static_cast<char*>(dst), src, n);
}

// float16 -> float32, exactly (every half is a float): the portable path's conversion.
static inline float f32_from_f16(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, nan
  } else if (exp) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else {  // zero or subnormal: mant * 2^-24, exact in float32
    const float f = (float)mant * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// n float16 or bfloat16 (CT_HALF_*) values to float32: a half-precision input converted
// for the kernel (NumPy's float16 cast ran at ~1.3 ns a value: 22 ms for W2's input).
void widen_half(int kind, const void* src, float* dst, int64_t n) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (kind == CT_HALF_BF16) {
    for (; i < n; ++i) {  // the top half of a float32: vectorises as is
      const uint32_t bits = (uint32_t)h[i] << 16;
      std::memcpy(dst + i, &bits, 4);
    }
    return;
  }
#ifdef CT_F16_LOAD
  for (; i + CT_VBYTES / 4 <= n; i += CT_VBYTES / 4) CT_F16_LOAD(dst + i, h + i);
#endif
  for (; i < n; ++i) dst[i] = f32_from_f16(h[i]);
}

template <typename T>
static void pair_transform_typed(const PairJob& job) {
  const T* x = static_cast<const T*>(job.x);
  const int64_t H = job.h, W = job.w, C = job.c, plane = H * W * C;
  const std::vector<T> zeros(C, T(0));  // the rows of positions outside the input
  for (int64_t n = job.n0; n < job.n1; ++n) {
    for (int64_t j = job.j0; j < job.j1; ++j) {
      const T* xt[4];
      for (int t = 0; t < 4; ++t) {
        const int64_t d = 2 * j + job.base + t;
        xt[t] = d >= 0 && d < job.in_d ? x + n * job.xs[0] + d * job.xs[1] : nullptr;
      }
      T* const v = static_cast<T*>(job.v) + (n * job.pairs + j) * 4 * plane;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          const int64_t at = h * job.xs[2] + w * job.xs[3];
          const T* __restrict x0 = xt[0] ? xt[0] + at : zeros.data();
          const T* __restrict x1 = xt[1] ? xt[1] + at : zeros.data();
          const T* __restrict x2 = xt[2] ? xt[2] + at : zeros.data();
          const T* __restrict x3 = xt[3] ? xt[3] + at : zeros.data();
          T* __restrict v0 = v + (h * W + w) * C;
          T* __restrict v1 = v0 + plane;
          T* __restrict v2 = v1 + plane;
          T* __restrict v3 = v2 + plane;
          for (int64_t c = 0; c < C; ++c) {
            v0[c] = x0[c] - x2[c];
            v1[c] = x1[c] + x2[c];
            v2[c] = x2[c] - x1[c];
            v3[c] = x1[c] - x3[c];
          }
        }
      }
    }
  }
}

void pair_transform(const PairJob& job) {
  if (job.itemsize == 4) pair_transform_typed<float>(job);
  else pair_transform_typed<double>(job);
}

int lanes(int itemsize) { return CT_VBYTES / itemsize; }
bool fuses_grad_input(int itemsize, int64_t cin, int64_t cout) {
  return itemsize == 4 ? few_sums<float>(cin, cout) : few_sums<double>(cin, cout);
}
int max_vectors() { return MAXV; }
#endif  // CT_PART_HAS(3)

}  // namespace CT_NS
