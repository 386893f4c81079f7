// The forward correlation (CtJob): the entry point `correlate`, and `run_mode`, which
// runs the job's layout of the vectors (CtJob::mode). Part of the kernel: correlate.hpp
// includes it inside the build's namespace (CT_NS).
//
// out[n, d, h, w, :] = sum over taps (i, j, k) and input channels c of
//     x[n, d*step_d + off_d[i], h*step_h + off_h[j], w*step_w + off_w[k], c]
//       * weight[(i, j, k), c, :]
// where taps reading outside the input contribute nothing. Each output element is
// computed in registers over every tap and channel and stored once: no accumulation
// passes through memory, no operand is packed per call beyond the weight.
//
// The weight is packed by the caller. CT_MODE_CHANNELS: output channels padded to a
// multiple of the vector length, cut into chunks of `chunk` columns (the last may be
// narrower), each chunk laid out [tap][c][column]. Dot and depthwise modes: see dot_rows
// and depthwise_rows.

// The first of n elements from src to dst up to dst's next vector boundary (none where
// dst lies on one), by store_lanes: how many. What follows then goes out as aligned
// vectors, none of them across a cache line.
template <typename T>
static inline int64_t store_to_boundary(T* dst, const T* src, int64_t n) {
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t misaligned = reinterpret_cast<uintptr_t>(dst) / sizeof(T) % L;
  const int64_t i = misaligned ? std::min<int64_t>(n, L - misaligned) : 0;
  if (i) store_lanes(i, dst, load_lanes<typename Vec<T>::v>(i, src));
  return i;
}

// One pixel's chunk of output channels, from the accumulators. Outputs far bigger than
// the caches (job.stream_out) are written with non-temporal stores wherever whole aligned
// vectors go out: no read for ownership of lines about to be overwritten, and no eviction
// of lines still in use (one core: W2 107 -> 82 ms, W1 35 -> 30, W4 54 -> 48).
template <typename T>
static inline void store_chunk(const CtJob& job, char* dst, const T* src, int64_t n) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
#ifdef CT_STREAM
  if (job.stream_out && n % L == 0 && reinterpret_cast<uintptr_t>(dst) % CT_VBYTES == 0) {
    for (int64_t i = 0; i < n; i += L) CT_STREAM(reinterpret_cast<T*>(dst) + i, src + i);
    return;
  }
#endif
  if (!job.out_half) {
    // Whole vectors inline, the rest by store_lanes: std::memcpy with a run-time size is a
    // library call per pixel (W6's grad_input stores 32768 pixels of one vector each; 32
    // -> 16 g2 k1 s2 d2 on 109964 pixels, 8 channels a group, 5.1 -> 4.3 ms masked).
    // Below AVX-512, a destination off the vector's alignment (C_out not a multiple of the
    // vector) takes the lanes up to its next boundary first, so that no store crosses a
    // line: of 36 sweep layers so (seeds 201-202, two threads, Zen 3), 190 -> 26 g2 k3 s2
    // 11.3 -> 8.4 ms, 128 -> 3 k7 s(2, 1, 1) 2.4 -> 1.9, 14 others 1.05-1.22x, the rest
    // level (four that first read 0.60-0.92x level on a rerun).
    int64_t i = CT_VBYTES < 64 ? store_to_boundary(reinterpret_cast<T*>(dst), src, n) : 0;
    for (; i + L <= n; i += L)
      *reinterpret_cast<U*>(dst + i * sizeof(T)) = *reinterpret_cast<const U*>(src + i);
    if (i < n)
      store_lanes(n - i, reinterpret_cast<T*>(dst) + i,
                  load_lanes<typename Vec<T>::v>(n - i, src + i));
    return;
  }
  store_out(job.out_half, dst, src, n);
}

// Where a chunk's columns lie in a pixel's outputs: null, one run from the pixel's first
// output; else (CtJob::oout: a merged W group of one of several conv groups, each
// residue's outputs C_out apart) runs of columns that lie one after another.
struct ColumnRuns {
  int count = 0;
  int64_t col[MAXV * CT_VBYTES / 4], at[MAXV * CT_VBYTES / 4], len[MAXV * CT_VBYTES / 4];
  ColumnRuns(const int64_t* oo, int64_t n) {
    for (int64_t c = 0; c < n; ++c)
      if (count && oo[c] == at[count - 1] + len[count - 1]) {
        ++len[count - 1];
      } else {
        col[count] = c, at[count] = oo[c], len[count] = 1;
        ++count;
      }
  }
};

// A pixel's n sums from `src` to its outputs at `dst`, where `runs` says (null: in order).
template <typename T>
static inline void store_pixel(const CtJob& job, char* dst, const T* src, int64_t n,
                               const ColumnRuns* runs) {
  if (!runs) return store_chunk(job, dst, src, n);
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  for (int i = 0; i < runs->count; ++i)
    store_chunk(job, dst + runs->at[i] * oi, src + runs->col[i], runs->len[i]);
}

#ifdef CT_STREAM
// n elements from src to dst, the whole lines of dst by non-temporal stores (never read
// before they are overwritten), the partial lines at either end by plain ones.
template <typename T>
static inline void stream_copy(T* dst, const T* src, int64_t n) {
  typedef typename Vec<T>::v V;
  constexpr int L = CT_VBYTES / sizeof(T);
  int64_t i = store_to_boundary(dst, src, n);
  for (; i + L <= n; i += L) CT_STREAM(dst + i, src + i);
  if (i < n) store_lanes(n - i, dst + i, load_lanes<V>(n - i, src + i));
}
#endif

// P pixels by NV vectors of output channels: add the products of `cn` input channels of
// one tap into the row buffer `acc` (pixel stride `cw`), held in registers meanwhile.
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

// One vector of output channels (NV 1: a 16 -> 16 or narrower chunk), P pixels, every W
// tap of one (D, H) pair at once: pixel p's tap k reads input pixel j = p + k * D of the
// block, so each input value broadcast serves up to TW multiply-adds instead of one
// (block's NV = 1 runs a load per multiply-add). Input pixel j lies at xb + j * pstride,
// or, EDGE (a block reaching past the row's ends), at px[j], pixels outside the row
// pointing at zeros. The sums of pixels [0, skip) are computed but not stored (a row's
// last block overlaps the one before it).
template <typename T, int P, int TW, int D, bool EDGE>
static inline void block_wtaps(const T* xb, int64_t pstride, const T* const* px,
                               const T* wt, int64_t tap_stride, int64_t cn, T* acc,
                               int64_t skip) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int J = P + (TW - 1) * D;  // input pixels the block reads
  constexpr int64_t LINE = 64 / sizeof(T);
  const int64_t lines = (cn + LINE - 1) / LINE + 1;  // a pixel's channels may start mid-line
  V r[P];
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p) r[p] = *reinterpret_cast<const U*>(acc + p * L);
  for (int64_t c = 0; c < cn; ++c) {
    V wv[TW];
#pragma GCC unroll 8
    for (int k = 0; k < TW; ++k) wv[k] = *reinterpret_cast<const U*>(wt + k * tap_stride + c * L);
    // The next block's new pixels (P on from this block's last), whole lines spread over
    // this block's channels: a large input comes from memory, and J interleaved streams
    // are more than the hardware prefetcher follows (each stream prefetched a few lines
    // ahead, as `block` does: 96 -> 16 k2 on 2x273x203 at 143 GFLOP/s on one core, 197
    // so).
    for (int e = 0; e < 2; ++e) {
      const int64_t i = 2 * c + e;
      if (i < P * lines) __builtin_prefetch(xb + (J + i / lines) * pstride + i % lines * LINE);
    }
#pragma GCC unroll 48
    for (int j = 0; j < J; ++j) {
      const V b = broadcast<V>((EDGE ? px[j] : xb + j * pstride) + c);
#pragma GCC unroll 8
      for (int k = 0; k < TW; ++k) {
        const int p = j - k * D;
        if (p >= 0 && p < P) r[p] += b * wv[k];
      }
    }
  }
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
    if (p >= skip) *reinterpret_cast<U*>(acc + p * L) = r[p];
}

// block_wtaps' pixels per block: as many as leave registers for the TW weight vectors and
// a broadcast.
template <int TW> struct WTapsBlock {
  static constexpr int P = CT_NREGS == 32 ? (TW <= 6 ? 24 : 22) : ((15 - TW) & ~1);
};

// The W taps' spacing in input pixels if every tap is d in {1, 2} pixels past the one
// before (block_wtaps' layout), -d if before (the transposed convolution's flipped
// taps), else 0.
static inline int wtaps_spacing(const CtJob& job) {
  const int64_t tw = job.ntaps[2], step = job.step[2];
  if (tw < 2 || tw > 7) return 0;
  for (int d : {1, -1, 2, -2}) {
    bool even = true;
    for (int64_t k = 1; k < tw && even; ++k)
      even = job.off[2][k] - job.off[2][k - 1] == d * step;
    if (even) return d;
  }
  return 0;
}

constexpr int64_t WTAPS_MAX_CIN = 4096;  // rows_wtaps' zeros for pixels past a row's ends

// rows_chunk's rows for (D, H) pair q, every W tap at once (block_wtaps), over the pixels
// [a, b) that some tap reaches, where that does at most half as many multiply-adds again
// as the taps' own pixels (`reached`, summed over the taps) hold; false where it does not
// (rows_chunk then runs each tap's blocks).
template <typename T>
static bool rows_wtaps(const CtJob& job, int64_t nrows, const T* const* xrows, int64_t q,
                       int64_t d, int64_t a, int64_t b, int64_t reached, const T* wq,
                       int64_t cw, T* acc, int64_t wcount, int64_t w0, int64_t pstride) {
  bool done = false;
  const auto run = [&](auto tw_c, auto d_c) {
    constexpr int TW = decltype(tw_c)::value, DD = decltype(d_c)::value;
    constexpr int P = WTapsBlock<TW>::P, J = P + (TW - 1) * DD;
    const int64_t blocks = (b - a + P - 1) / P;
    if (b - a < P || 2 * blocks * P * TW > 3 * reached || job.cin > WTAPS_MAX_CIN) return;
    done = true;
    const int64_t cin = job.cin, dh_taps = job.ntaps[0] * job.ntaps[1];
    const int64_t step = job.step[2], in_w = job.in_dims[2], xs = job.xs[3];
    // Taps whose offsets fall (d < 0) are taken last to first.
    const int64_t first = d < 0 ? TW - 1 : 0;
    const int64_t tap_stride = d < 0 ? -cin * cw : cin * cw;
    const T* wfirst = wq + first * cin * cw;
    int64_t cb = 24576 / (TW * cw * (int64_t)sizeof(T));
    if (cb < 8) cb = 8;
    alignas(64) static const T zeros[WTAPS_MAX_CIN] = {};  // input pixels outside the row
    const T* px[J];
    for (int64_t c0 = 0; c0 < cin; c0 += cb) {
      const int64_t cn = cin - c0 < cb ? cin - c0 : cb;
      for (int64_t r = 0; r < nrows; ++r) {
        const T* xrow = xrows[r * dh_taps + q];
        if (!xrow) continue;
        T* arow = acc + (r * wcount - w0) * cw;
        for (int64_t p0 = a; p0 < b; p0 += P) {
          const int64_t at = p0 + P <= b ? p0 : b - P;  // the last block overlaps
          const int64_t j0 = at * step + job.off[2][first];  // input pixel of j = 0
          const T* xb = xrow + j0 * xs + c0;
          const T* wt = wfirst + c0 * cw;
          if (j0 >= 0 && j0 + (J - 1) * step < in_w) {
            block_wtaps<T, P, TW, DD, false>(xb, pstride, px, wt, tap_stride, cn,
                                             arow + at * cw, p0 - at);
          } else {
            for (int j = 0; j < J; ++j) {
              const int64_t i = j0 + j * step;
              px[j] = i >= 0 && i < in_w ? xrow + i * xs + c0 : zeros + c0;
            }
            block_wtaps<T, P, TW, DD, true>(xb, pstride, px, wt, tap_stride, cn,
                                            arow + at * cw, p0 - at);
          }
        }
      }
    }
  };
  const auto with_d = [&](auto tw_c) {
    if (d == 1 || d == -1) run(tw_c, std::integral_constant<int, 1>{});
    else run(tw_c, std::integral_constant<int, 2>{});
  };
  switch (job.ntaps[2]) {
    case 2: with_d(std::integral_constant<int, 2>{}); break;
    case 3: with_d(std::integral_constant<int, 3>{}); break;
    case 4: with_d(std::integral_constant<int, 4>{}); break;
    case 5: with_d(std::integral_constant<int, 5>{}); break;
    case 6: with_d(std::integral_constant<int, 6>{}); break;
    case 7: with_d(std::integral_constant<int, 7>{}); break;
  }
  return done;
}

// A run of a row's output pixels [w0, w0 + n): rows_chunk's sums cover one run at a time,
// so that a long row (a 1-D layer's is the whole signal) keeps them in cache.
struct WRun { int64_t w0, n; };

// Winograd F(2,3)'s output side: row r's pair of outputs from its four slots' sums m,
// y0 = m0 + m1 + m2 at orows[r] and y1 = m1 - m2 - m3 at orows[nrows + r] (null where the
// pair's second output lies past the end).
template <typename T>
static void store_pairs(const CtJob& job, int64_t nrows, char* const* orows, const T* acc,
                        int64_t slot_size, int64_t cw, int64_t n, const T* bias, WRun run,
                        const ColumnRuns* runs) {
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
      store_pixel(job, orows[r] + (run.w0 + w) * os * oi, y0, n, runs);
      if (orows[nrows + r])
        store_pixel(job, orows[nrows + r] + (run.w0 + w) * os * oi, y1, n, runs);
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
  const int64_t dh_taps = job.ntaps[0] * job.ntaps[1];
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
  // NV 1: every W tap at once where the taps' spacing allows (rows_wtaps), else each
  // tap's blocks over its pixels.
  const int spacing = NV == 1 ? wtaps_spacing(job) : 0;
  int64_t fa = 0, fb = 0, reached = 0;
  if (spacing) {
    fa = INT64_MAX, fb = INT64_MIN;
    for (int64_t k = 0; k < tw; ++k) {
      if (lo[k] >= hi[k]) continue;
      fa = std::min(fa, lo[k]);
      fb = std::max(fb, hi[k]);
      reached += hi[k] - lo[k];
    }
  }
  for (int64_t q = 0; q < dh_taps; ++q) {
    T* const acc_q = job.pair_out ? acc + q / job.ntaps[1] * slot_size : acc;
    if (spacing && reached &&
        rows_wtaps<T>(job, nrows, xrows, q, spacing, fa, fb, reached,
                      wchunk + q * tw * cin * cw, cw, acc_q, wcount, run.w0, pstride))
      continue;
    for (int64_t k = 0; k < tw; ++k) {
      if (lo[k] >= hi[k]) continue;
      const T* wtap = wchunk + (q * tw + k) * cin * cw;
      const int64_t xoff = (lo[k] * job.step[2] + job.off[2][k]) * job.xs[3];
      for (int64_t c0 = 0; c0 < cin; c0 += cb) {
        const int64_t cn = cin - c0 < cb ? cin - c0 : cb;
        const T* wt = wtap + c0 * cw;
        for (int64_t r = 0; r < nrows; ++r) {
          const T* xrow = xrows[r * dh_taps + q];
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
  const ColumnRuns where(job.oout ? job.oout + (job.cout - live) : nullptr, job.oout ? n : 0);
  const ColumnRuns* runs = job.oout ? &where : nullptr;
  if (job.pair_out) {
    store_pairs(job, nrows, orows, acc, slot_size, cw, n, bias, run, runs);
    return;
  }
  const int64_t os = job.os[3], oi = job.out_half ? 2 : sizeof(T);
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t w = 0; w < wcount; ++w)
      store_pixel(job, orows[r] + (run.w0 + w) * os * oi, acc + (r * wcount + w) * cw, n,
                  runs);
}

// Few input channels (fewer than CT_TAPS_INNER_BELOW): rows_chunk would load and store
// each block's sums once per tap for only cin multiply-adds per pixel and vector, so here
// each block of P pixels keeps its sums in registers over every tap and channel. Pixels
// that a tap does not reach are masked with compile-time indices, which keeps the sums in
// registers. Measured (k4, 16 outputs, one core): cin 1 25 -> 35-48 GFLOP/s, cin 2 37 ->
// 58. On the 77 sweep layers (seeds 11-34) of 4-15 channels, alternating processes: 0.87x
// the time of rows_chunk (geomean; 0.64x to 1.18x). From 16 to 31 channels it is even
// (0.975x), and up to 1.7x slower with many taps, whose weight no longer stays in L1
// while the blocks sweep it.

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
  const int64_t dh_taps = job.ntaps[0] * job.ntaps[1];
  const int64_t pstride = job.step[2] * job.xs[3];
  const int64_t os = job.os[3], oi = job.out_half ? 2 : sizeof(T);
  const int64_t n = live < cw ? live : cw;
  const ColumnRuns where(job.oout ? job.oout + (job.cout - live) : nullptr, job.oout ? n : 0);
  const ColumnRuns* runs = job.oout ? &where : nullptr;
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
    const T* const* rows = xrows + r * dh_taps;
    for (int64_t w0 = 0; w0 < wcount; w0 += P) {
      const int64_t np = wcount - w0 < P ? wcount - w0 : P;
      const Span* block_spans = spans.data() + (w0 / P) * tw;
      V sum[P][NV];
#pragma GCC unroll 32
      for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) sum[p][v] = start[v];
      for (int64_t q = 0; q < dh_taps; ++q) {
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
      store_pixel(job, orows[r] + (run.w0 + w) * os * oi, acc + w * cw, n, runs);
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

// A job's conv groups (CtJob::groups; 0 or 1: one) as jobs of one group each: group g's
// weight and bias where they lie. Its input rows: `conv_group_rows`; its outputs lie
// g * group_out elements on.
template <typename T>
static std::vector<CtJob> conv_group_jobs(const CtJob& job) {
  std::vector<CtJob> jobs(job.groups > 1 ? job.groups : 1, job);
  for (size_t g = 1; g < jobs.size(); ++g) {
    jobs[g].w = static_cast<const T*>(job.w) + g * job.group_w;
    if (job.bias) jobs[g].bias = static_cast<const T*>(job.bias) + g * job.cout;
  }
  return jobs;
}

// The n input rows `rows` (null: outside the input) as conv group g reads them, its
// channels g * cin on: `rows` itself for group 0, else written to `into`.
template <typename T>
static const T* const* conv_group_rows(const CtJob& job, int64_t g, const T* const* rows,
                                       int64_t n, const T** into) {
  if (!g) return rows;
  for (int64_t i = 0; i < n; ++i) into[i] = rows[i] ? rows[i] + g * job.cin : nullptr;
  return into;
}

// Where output row (n, d, h) starts, in bytes from the box's first position.
// (A Winograd pair's row d is output row 2d.)
static inline int64_t out_row_offset(const CtJob& job, RowPos r, int64_t item) {
  const int64_t dstep = job.pair_out ? 2 : 1;
  return ((r.n - job.box[0]) * job.os[0] + (r.d - job.box[2]) * dstep * job.os[1] +
          (r.h - job.box[4]) * job.os[2]) * item;
}

// Outputs far bigger than the caches (CtJob::stream_out) whose pixels the chunks cannot
// store as whole aligned vectors (conv groups side by side, merged W residues, C_out not
// a multiple of the vector): a row group's run of outputs gathers here, laid out as in
// the output, then goes out by non-temporal stores, each output line written whole and
// never read first. Stored in place, every partial vector read its line from memory
// first: 8 -> 96 g4 k3 s2 2-D spent half its time in the stores. On only where the
// pixels' outputs (every conv group's) make runs of two lines or more, or whole rows, and
// where a thread computes every chunk of its row groups (not where threads share a row
// group's chunks). Its size is a row group's pixels (about `pixels` in run_typed) times
// a pixel's stride: at most a few MB per thread.
template <typename T>
struct OutputStage {
  bool on = false;
  bool whole_rows = false;  // a pixel's outputs fill its stride: the rows are contiguous
  int64_t pitch = 0;        // elements per staged row
  int64_t stride = 0;       // elements from a pixel to the next (CtJob::os[3])
  std::vector<std::pair<int64_t, int64_t>> spans;  // a pixel's outputs: (first, count)
  std::vector<T> store;
  T* rows = nullptr;

  // `shared_chunks`: threads share a row group's chunks (then no stage).
  OutputStage(const CtJob& job, int64_t groups, bool shared_chunks, int64_t max_rows,
              int64_t run_max) {
#ifdef CT_STREAM
    constexpr int L = CT_VBYTES / sizeof(T);
    if (!job.stream_out || job.out_half || shared_chunks) return;
    std::vector<int64_t> at;
    at.reserve(groups * job.cout);
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t c = 0; c < job.cout; ++c)
        at.push_back(g * job.group_out + (job.oout ? job.oout[c] : c));
    std::sort(at.begin(), at.end());
    int64_t shortest = INT64_MAX;
    for (size_t i = 0; i < at.size(); ++i) {
      if (!spans.empty() && at[i] == spans.back().first + spans.back().second) {
        ++spans.back().second;
        continue;
      }
      if (!spans.empty()) shortest = std::min(shortest, spans.back().second);
      spans.push_back({at[i], 1});
    }
    shortest = std::min(shortest, spans.back().second);
    stride = job.os[3];
    // Runs of whole vectors from a vector's start go out in place, each store a whole
    // aligned vector (staged, a copy for nothing: 48 -> 64 g4 k2 s(1, 2) on 3x99x184, two
    // merged W residues of four groups in one call, ran 1.3x as long on two threads).
    bool whole_vectors = stride % L == 0;
    for (const auto& [first, count] : spans) whole_vectors &= first % L == 0 && count % L == 0;
    if (whole_vectors) return;
    whole_rows = spans.size() == 1 && spans[0].first == 0 && spans[0].second == stride;
    if (!whole_rows && shortest * (int64_t)sizeof(T) < 128) return;
    on = true;
    pitch = (run_max * stride + L - 1) / L * L;
    // A spare line for aligned_line: L spare elements (half a line with AVX2) let the last
    // staged row overrun the buffer, a heap corruption (AVX2, float64, phantom merges).
    store.resize(max_rows * pitch + 64 / sizeof(T));
    rows = aligned_line(store.data());
#else
    (void)job, (void)groups, (void)shared_chunks, (void)max_rows, (void)run_max;
#endif
  }

  // Rows staged instead of the output rows `dest` (n of them, null: none) for a run from
  // pixel w0: orows[r] as the kernels index it, pixel w0 landing on staged row r's start.
  void point(char** orows, char* const* dest, int64_t n, int64_t w0) const {
    for (int64_t r = 0; r < n; ++r)
      orows[r] = dest[r] ? reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(rows + r * pitch) -
                                                   w0 * stride * (int64_t)sizeof(T))
                         : nullptr;
  }

#ifdef CT_STREAM
  // The staged run out to the rows `dest`.
  void flush(char* const* dest, int64_t n, WRun run) const {
    for (int64_t r = 0; r < n; ++r) {
      if (!dest[r]) continue;
      T* to = reinterpret_cast<T*>(dest[r]) + run.w0 * stride;
      const T* from = rows + r * pitch;
      if (whole_rows) {
        stream_copy(to, from, run.n * stride);
        continue;
      }
      for (int64_t w = 0; w < run.n; ++w)
        for (const auto& [first, count] : spans)
          stream_copy(to + w * stride + first, from + w * stride + first, count);
    }
  }
#else
  void flush(char* const*, int64_t, WRun) const {}
#endif
};

template <typename T>
static void run_typed(const CtJob& job, const WRanges& wr) {
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t cpad = (job.cout + L - 1) / L * L;
  // Chunks of MAXV vectors, or from CT_TAPS_INNER_BELOW channels on, of one width but
  // the last, as few as hold cpad (_native_kernel.chunk_columns, which packs the weight
  // so): 9 vectors as 3 + 3 + 3, not 4 + 4 + 1.
  const int64_t vectors = cpad / L, fewest = (vectors + MAXV - 1) / MAXV;
  const int64_t cw_full =
      job.cin < CT_TAPS_INNER_BELOW ? MAXV * L : (vectors + fewest - 1) / fewest * L;
  const int64_t taps = job.ntaps[0] * job.ntaps[1] * job.ntaps[2];
  char* out = static_cast<char*>(job.out);
  const int64_t oi = job.out_half ? 2 : sizeof(T);  // bytes per output element
  // Rows per group: enough pixels that a weight block in L1 serves ~96 of them. A chunk of
  // the weight (every tap) beyond ~1 MiB no longer stays in L2 from one group to the next
  // and streams in again for each: then ~512 pixels (W3's grad_input, 64 taps x 128
  // channels, 2 MiB chunks: 28.0 -> 25.6 ms; at 1 MiB and below, W4, W5 and W8 level or
  // slower, as the sums of a group outgrow L1).
  const int64_t dh_taps = job.ntaps[0] * job.ntaps[1];
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
  int64_t group_rows = std::max<int64_t>(
      1, std::min<int64_t>(64, (pixels + run_max - 1) / std::max<int64_t>(1, run_max)));
  // Conv groups in one job (CtJob::groups): each row group's conv groups in turn, so that
  // output lines shared by groups' channels are written while in cache (8 -> 24 g4 k4 s2
  // wrote 6 of a pixel's 24 channels per call, each line fetched again by each group).
  std::vector<CtJob> group_jobs = conv_group_jobs<T>(job);
  const int64_t groups = group_jobs.size();
  // Shared by threads, the rows cut into a whole number of groups per sharer: claims are
  // whole groups, and 7 groups of 57 rows left one of two threads idle for 1.4 ms of 6.9
  // (192 -> 40 k4 on 4x8x10x8, a group ~512 pixels: 7.0 -> 6.3 ms). Fewer rows than a
  // group are cut too where the sharers have no chunks of channels to share instead
  // (below), each sharer's group reading the weight once: 384 -> 38 k4 on 1x14x10, 17
  // rows of 13 pixels in one group, ran on one thread of two.
  const int64_t per_group = (cpad + cw_full - 1) / cw_full;
  const int64_t chunks = groups * per_group;  // (conv group, channel chunk) pairs
  if (job.sharers > 1 && (box_rows(job.box) > group_rows || chunks == 1)) {
    const int64_t total = box_rows(job.box), sharers = job.sharers;
    const int64_t per = (total + sharers * group_rows - 1) / (sharers * group_rows);
    group_rows = (total + sharers * per - 1) / (sharers * per);
  }
  // The sums on a cache line boundary: malloc's 16-byte alignment made every tile load
  // and store of them span two lines (aligned: 1.5-5% on W1, W4, W5, W8, one core).
  // Winograd pairs: four slots of sums per row, and each row's second output.
  const int64_t slots = job.pair_out ? job.ntaps[0] : 1, outs = job.pair_out ? 2 : 1;
  std::vector<T> acc_store(slots * group_rows * run_max * cw_full + 64 / sizeof(T));
  std::vector<const T*> xrows(group_rows * dh_taps);
  std::vector<char*> orows(outs * group_rows);
  T* acc = aligned_line(acc_store.data());
  const int64_t total = box_rows(job.box);
  const int64_t row_groups = (total + group_rows - 1) / group_rows;
  // Too few row groups for the threads sharing the box (a few pixels of wide channels:
  // 16 rows of 4 pixels made one group, and the other thread waited): they claim (row
  // group, channel chunk) pairs instead, a group's chunks one after the other.
  const bool shared_chunks = job.sharers > 1 && chunks > 1 && row_groups < 2 * job.sharers;
  const OutputStage<T> stage(job, groups, shared_chunks, outs * group_rows, run_max);
  for (CtJob& j : group_jobs) j.stream_out &= !stage.on;  // (the stage stays in cache)
  std::vector<char*> dest(stage.on ? outs * group_rows : 0);  // (staged: the real rows)
  int64_t nrows = 0;
  const auto set_rows = [&](int64_t first, int64_t count) {  // a group's input and output rows
    nrows = count;
    for (int64_t r = 0; r < nrows; ++r) {
      const RowPos pos = row_at(job.box, first + r);
      tap_rows<T>(job, pos, xrows.data() + r * dh_taps);
      orows[r] = out + out_row_offset(job, pos, oi);
      if (job.pair_out)  // the pair's second output, where it lies inside
        orows[nrows + r] = 2 * pos.d + 1 < job.pair_out ? orows[r] + job.os[1] * oi : nullptr;
    }
    if (stage.on) std::copy(orows.begin(), orows.begin() + outs * nrows, dest.begin());
  };
  std::vector<const T*> group_xrows(groups > 1 ? group_rows * dh_taps : 0);
  // Conv group g's outputs of channels [c0, c0 + cw_full) in W run i.
  const auto chunk = [&](int64_t g, int64_t c0, int64_t i) {
    const int64_t cw = cpad - c0 < cw_full ? cpad - c0 : cw_full;
    const T* wchunk = static_cast<const T*>(group_jobs[g].w) + taps * job.cin * c0;
    const int64_t live = job.cout - c0;
    const T* const* rows =
        conv_group_rows<T>(job, g, xrows.data(), nrows * dh_taps, group_xrows.data());
    // (merged W residues of several conv groups: the chunk's columns lie where oout says)
    const int64_t shift = (g * job.group_out + (job.oout ? 0 : c0)) * oi;
    char* o[128];
    for (int64_t r = 0; r < outs * nrows; ++r) o[r] = orows[r] ? orows[r] + shift : nullptr;
    const bool inner = job.cin < CT_TAPS_INNER_BELOW;
    with_vectors(cw / L, [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      (inner ? rows_chunk_taps_inner<T, NV> : rows_chunk<T, NV>)(
          group_jobs[g], nrows, rows, o, run_lo.data() + i * tw, run_hi.data() + i * tw,
          wchunk, cw, live, acc, runs[i]);
    });
  };
  if (shared_chunks) {
    RowClaims claims(job, 1, row_groups * chunks);
    int64_t current = -1;
    for (int64_t run0, run1; claims.next(run0, run1);)
      for (int64_t v = run0; v < run1; ++v) {
        if (v / chunks != current) {
          current = v / chunks;
          set_rows(current * group_rows,
                   std::min(group_rows, total - current * group_rows));
        }
        const int64_t c = v % chunks;
        for (int64_t i = 0; i < nruns; ++i) chunk(c / per_group, c % per_group * cw_full, i);
      }
  } else {
    RowClaims claims(job, group_rows);
    for (int64_t run0, run1; claims.next(run0, run1);)
      for (int64_t first = run0; first < run1; first += group_rows) {
        set_rows(first, std::min(group_rows, run1 - first));
        // A run's input and output lines serve every conv group and chunk while in cache.
        for (int64_t i = 0; i < nruns; ++i) {
          if (stage.on) stage.point(orows.data(), dest.data(), outs * nrows, runs[i].w0);
          for (int64_t g = 0; g < groups; ++g)
            for (int64_t c0 = 0; c0 < cpad; c0 += cw_full) chunk(g, c0, i);
          if (stage.on) stage.flush(dest.data(), outs * nrows, runs[i]);
        }
      }
  }
#ifdef CT_STREAM_FENCE
  if (job.stream_out) CT_STREAM_FENCE();  // non-temporal stores are weakly ordered
#endif
}

// Per row of the box and chunk c of `chunks`: calls f(rows, out_row, c) with the input
// row of each (D, H) tap pair (null where it reads outside the input) and the row's
// output address. Rows are claimed with their chunks one after another, or, `by_chunk`,
// each chunk over every row before the next.
template <typename T, typename F>
static void for_each_row(const CtJob& job, int64_t chunks, bool by_chunk, F&& f) {
  char* out = static_cast<char*>(job.out);
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  std::vector<const T*> rows(job.ntaps[0] * job.ntaps[1]);
  const int64_t nrows = box_rows(job.box);
  RowClaims claims(job, 1, nrows * chunks);
  int64_t last = -1;  // the row `rows` holds
  for (int64_t run0, run1; claims.next(run0, run1);)
    for (int64_t unit = run0; unit < run1; ++unit) {
      const int64_t flat = by_chunk ? unit % nrows : unit / chunks;
      const RowPos pos = row_at(job.box, flat);
      if (flat != last) tap_rows<T>(job, pos, rows.data());
      last = flat;
      f(rows.data(), out + out_row_offset(job, pos, oi), by_chunk ? unit / nrows : unit % chunks);
    }
}

// Few output channels (a 16 -> 1 head): vectors run along the input channels instead,
// P pixels x C_out accumulators, reduced across lanes once per output. The weight where
// `DotWeights` says (each output's channels contiguous).

// P pixels by CO outputs of dot mode: P * CO accumulators and CO weight vectors in
// registers (the input vector is the multiply-add's memory operand).
// With 32 registers up to eight outputs (DotBlock<CO>::MAX_OUT; more run in chunks), as
// many pixels as leave room for the weights: each x vector then serves CO multiply-adds
// and each weight vector P.
template <int CO> struct DotBlock {
  static constexpr int MAX_OUT = CT_NREGS == 32 ? 8 : 4;
  static constexpr int P = CT_NREGS == 32
                               ? (CO == 1 ? 16 : CO == 2 ? 8 : CO == 3 ? 6 : CO == 4 ? 5
                                  : CO <= 6 ? 4 : 3)
                               : (CO == 1 ? 12 : CO == 2 ? 6 : CO == 3 ? 4 : 3);
};

// Dot mode's P x CO sums reduced across lanes (`lane_sums`) and stored, plus the bias:
// pixels [skip, np) of the block, pixel p's CO outputs at `out` + p * `pstride` bytes, one
// after another, or, `oo` given, output o oo[o] elements from there (merged residues of
// other rows: `CtJob::oout`).
template <typename T, int P, int CO, typename V>
static inline void store_dot_block(const CtJob& job, const V (&acc)[P][CO], const T* bias,
                                   char* out, int64_t pstride, int64_t skip, int64_t np,
                                   const int64_t* oo) {
  constexpr int L = CT_VBYTES / sizeof(T);
  alignas(64) T sums[(P * CO + L - 1) / L * L];
  lane_sums<V, T, P * CO>(reinterpret_cast<const V(&)[P * CO]>(acc), sums);
  if (bias)
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int o = 0; o < CO; ++o) sums[p * CO + o] += bias[o];
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  if (oo) {  // one value at a time (the compute type's as plain stores)
    for (int64_t p = skip; p < np; ++p)
#pragma GCC unroll 8
      for (int o = 0; o < CO; ++o) {
        char* at = out + p * pstride + oo[o] * oi;
        if (job.out_half) store_out(job.out_half, at, sums + p * CO + o, 1);
        else *reinterpret_cast<T*>(at) = sums[p * CO + o];
      }
    return;
  }
  for (int64_t p = skip; p < np; ++p) store_out(job.out_half, out + p * pstride, sums + p * CO, CO);
}

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

// One tap of dot mode into the P x CO sums: pixels p in [pa, pb) of the block at xb,
// output o's weight at wt + wo[o].
// A whole block sweeps the channels once, each weight vector serving P pixels, the pixels
// reached by stepping one pointer (P pointers live at once spilled to the stack: 71 -> 1
// s3 ran at 7 GFLOP/s). A partial block (a row's edges) points its other pixels at
// `zeros` (`cin` of them) and runs the same sweep: a test per pixel and vector, as
// before, or a pixel at a time, kept its sums latency-bound.
template <typename T, int CO, int P, typename V>
static inline void dot_tap(V (&acc)[P][CO], const T* xb, int64_t pstride, const T* wt,
                           const int64_t* wo, const T* tail, int64_t cin, int64_t full, int64_t pa,
                           int64_t pb, const T* zeros) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  // Channels past the last whole vector, where there is one before them: the vector
  // ending at the last channel, weighed by `tail` (dot_tails: the weight's with its first
  // lanes, channels the whole vectors summed, zeroed): a plain load per pixel, where a
  // masked one cost as much as the whole vectors of 53 channels.
  const int64_t rest = cin - full;
  const bool overlap = rest > 0 && full > 0;
  V wtail[CO] = {};  // (read only with `overlap`; zeros keep GCC from warning otherwise)
  if (overlap)
#pragma GCC unroll 8
    for (int o = 0; o < CO; ++o) wtail[o] = *reinterpret_cast<const U*>(tail + o * L);
  const int64_t ends = overlap ? full + L : full;  // sweeps: whole vectors, then the tail's
  // The weight vectors of sweep c (the tail's past the whole vectors), and where it reads.
  const auto weights = [&](int64_t c, V (&wv)[CO]) CT_ALWAYS_INLINE {
#pragma GCC unroll 8
    for (int o = 0; o < CO; ++o)
      wv[o] = c < full ? *reinterpret_cast<const U*>(wt + wo[o] + c) : wtail[o];
    return c < full ? c : cin - L;
  };
  if (pa == 0 && pb == P) {
    for (int64_t c = 0; c < ends; c += L) {
      V wv[CO];
      const T* xp = xb + weights(c, wv);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p, xp += pstride) {
        const V xv = *reinterpret_cast<const U*>(xp);
#pragma GCC unroll 8
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
#pragma GCC unroll 8
        for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[o];
      }
    }
  }
  if (rest > 0 && !overlap) {  // fewer channels than a vector: one partial vector
    // (a scalar chain per pixel ran latency-bound: 71 -> 1 at a third of PyTorch)
    V wv[CO];
#pragma GCC unroll 8
    for (int o = 0; o < CO; ++o) wv[o] = load_first<V>(rest, wt + wo[o]);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      if (p < pa || p >= pb) continue;
      const V xv = load_first<V>(rest, xb + p * pstride);
#pragma GCC unroll 8
      for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[o];
    }
  }
}

// Whether rows of wcount pixels take dot mode's blocks of P / 2 rather than P: the
// fewer pixels computed, a block's overhead counted as two more (a row of 8 in blocks of
// 16 computed twice its pixels: 256 -> 2 g2 k6 on 7-wide rows).
static inline bool dot_half_block(int64_t wcount, int64_t P) {
  const auto cost = [&](int64_t p) { return (wcount + p - 1) / p * (p + 2); };
  return P >= 4 && cost(P / 2) < cost(P);
}

// Where dot mode reads its weight: output o of tap (q, k) (q the (D, H) tap pair, k the
// W tap) at w + at(q, k)[o], each output's channels contiguous. From the job's table
// (`wout`: the caller's weight where it lies, no copy; outputs of merged residues have
// taps of their own), or, without it, the packed [tap][co][c].
struct DotWeights {
  std::vector<int64_t> own;
  const int64_t* table;
  int64_t tw, cout;
  explicit DotWeights(const CtJob& job) : tw(job.ntaps[2]), cout(job.cout) {
    if (!job.wout) {
      own.resize(job.ntaps[0] * job.ntaps[1] * tw * cout);
      for (int64_t i = 0; i < (int64_t)own.size(); ++i) own[i] = i * job.cin;
    }
    table = job.wout ? job.wout : own.data();
  }
  const int64_t* at(int64_t q, int64_t k) const { return table + (q * tw + k) * cout; }
};

// The weight's last vector of each (tap, output) for dot_tap's channels past the whole
// vectors: the vector ending at the last channel, lanes the whole vectors summed zeroed
// ([tap][co][lane]; empty where C_in is whole vectors or less than one). Made once per
// job: built per tap call, it cost 24 -> 5 k3 more than its multiply-adds.
template <typename T>
static std::vector<T> dot_tails(const CtJob& job, const DotWeights& dw) {
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t cin = job.cin, rest = cin % L;
  if (rest == 0 || cin < L) return {};
  const int64_t taps = job.ntaps[0] * job.ntaps[1] * job.ntaps[2];
  const T* w = static_cast<const T*>(job.w);
  std::vector<T> tails(taps * job.cout * L + 64 / sizeof(T));
  T* t = aligned_line(tails.data());
  for (int64_t tap = 0; tap < taps; ++tap)
    for (int64_t o = 0; o < job.cout; ++o, t += L) {
      const T* last = w + dw.table[tap * job.cout + o] + cin - L;
      for (int i = 0; i < L; ++i) t[i] = i >= L - rest ? last[i] : T(0);
    }
  return tails;
}

// Pixels [b, end) of a dot-mode row in blocks of P, what is left in blocks of P / 2,
// P / 4, ... down to one pixel: block(std::integral_constant<int, Q>, first) for each, so
// that every pixel is computed once. (A last block of P placed to end at the row's end
// computed its overlap again, and a row shorter than P computed P pixels, the rest reading
// zeros: 96 -> 4 k3 on 16x16x7, rows of 7 in blocks of 5, computed 10 a row; 0.39 -> 0.29
// ms.)
template <int P, typename F>
static inline void halving_blocks(int64_t b, int64_t end, F&& block) {
  for (; b + P <= end; b += P) block(std::integral_constant<int, P>{}, b);
  if constexpr (P > 1) {
    if (b < end) halving_blocks<P / 2>(b, end, block);
  }
}

// One output row of dot mode, its outputs [o0, o0 + CO) of job.cout (their weights where
// `dw` says). `zeros`: cin zeros; `tails`: dot_tails' (line-aligned). Blocks of P pixels,
// the rest in smaller ones (`halving_blocks`).
template <typename T, int CO, int P>
CT_NOINLINE static void dot_row(const CtJob& job, const int64_t* lo, const int64_t* hi,
                                const T* const* rows, char* orow, int64_t o0,
                                const DotWeights& dw, const T* zeros, const T* tails) {
  typedef typename Vec<T>::v V;
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t cin = job.cin, full = cin / L * L, tw = job.ntaps[2];
  const int64_t dh_taps = job.ntaps[0] * job.ntaps[1];
  const int64_t pstride = job.step[2] * job.xs[3], os = job.os[3];
  const T* w = static_cast<const T*>(job.w);
  const T* bias = job.bias ? static_cast<const T*>(job.bias) + o0 : nullptr;
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  const int64_t* oo = job.oout ? job.oout + o0 : nullptr;  // (merged rows)
  if (!oo) orow += o0 * oi;
  halving_blocks<P>(0, job.wcount, [&](auto size, int64_t b) CT_ALWAYS_INLINE {
    constexpr int Q = decltype(size)::value;
    V acc[Q][CO];
    zero_tile(acc);
    for (int64_t q = 0; q < dh_taps; ++q) {
      if (!rows[q]) continue;
      for (int64_t k = 0; k < tw; ++k) {
        const int64_t a = std::max(lo[k], b), e = std::min(hi[k], b + Q);
        if (a >= e) continue;
        dot_tap<T, CO, Q>(acc, rows[q] + (b * job.step[2] + job.off[2][k]) * job.xs[3],
                          pstride, w, dw.at(q, k) + o0,
                          tails ? tails + ((q * tw + k) * job.cout + o0) * L : nullptr,
                          cin, full, a - b, e - b, zeros);
      }
    }
    store_dot_block<T, Q, CO>(job, acc, bias, orow + b * os * oi, os * oi, 0, Q, oo);
  });
}

// Dot mode where a row's W taps read input pixels DELTA apart (step 1; 1-3 outputs, as
// thin layers and merged W residues have): taps in groups of G, each input vector of the
// block's window loaded once and multiplied by every tap of the group that reads it
// (G * CO weight vectors in registers), where the taps one at a time (dot_tap) load a
// vector per multiply-add from rows that seldom fit L1 (48 -> 1 k7 ran at under one
// multiply-add a cycle). Window pixels outside the row load as zeros (masked where the
// build masks loads; below a vector of channels, from `zeros`).
template <typename T, int CO, int P, int G, int DELTA, typename V>
static inline void dot_window(V (&acc)[P][CO], const T* xb, int64_t first, int64_t in_w,
                              int64_t pstride, const T* wt, const int64_t* wo, int64_t wstep,
                              const T* tail, int64_t cin, int64_t full, const T* zeros) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int N = P + DELTA * (G - 1);  // the window's input pixels
  const int64_t rest = cin - full, ends = rest > 0 && full > 0 ? full + L : full;
  // A sweep over c's vector: G * CO weight vectors (the tail's past the whole vectors),
  // then each window pixel's vector, `load(i, p)` at p (one pointer stepped along: P of
  // them live at once spilled, as in dot_tap), into every product it meets.
  const auto sweep = [&](int64_t c, auto&& load) CT_ALWAYS_INLINE {
    V wv[G][CO];
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j)
#pragma GCC unroll 4
      for (int o = 0; o < CO; ++o)
        wv[j][o] = c < full ? *reinterpret_cast<const U*>(wt + wo[j * wstep + o] + c)
                   : full > 0 ? *reinterpret_cast<const U*>(tail + (j * wstep + o) * L)
                              : load_first<V>(rest, wt + wo[j * wstep + o]);
    const T* xp = xb + (c < full ? c : full > 0 ? cin - L : 0);
#pragma GCC unroll 32
    for (int i = 0; i < N; ++i, xp += pstride) {
      const V xv = load(i, xp);
#pragma GCC unroll 4
      for (int j = 0; j < G; ++j) {
        const int p = i - j * DELTA;
        if (p < 0 || p >= P) continue;
#pragma GCC unroll 4
        for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[j][o];
      }
    }
  };
  const bool partial = full == 0;  // fewer channels than a vector: one masked sweep
  const int64_t sweeps = partial ? 1 : ends;
  if (first >= 0 && first + N <= in_w) {
    for (int64_t c = 0; c < sweeps; c += L)
      sweep(c, [&](int, const T* xp) CT_ALWAYS_INLINE {
        return partial ? load_first<V>(rest, xp) : (V)*reinterpret_cast<const U*>(xp);
      });
    return;
  }
  // Bit i: window pixel i lies inside the row; the others read zeros.
  const int64_t lo = std::max<int64_t>(0, -first), hi = std::min<int64_t>(N, in_w - first);
  const uint64_t inside = lo >= hi ? 0 : ((~0ull >> (64 - (hi - lo))) << lo);
  for (int64_t c = 0; c < sweeps; c += L)
    sweep(c, [&](int i, const T* xp) CT_ALWAYS_INLINE {
      const unsigned in = (inside >> i) & 1;
      return partial ? load_first<V>(rest, in ? xp : zeros) : load_or_zero<V>(in, xp);
    });
}

// dot_window's register block for CO outputs: P pixels, taps in groups of up to G; the
// P * CO sums, G * CO weight vectors and the input vector in the registers (MAX_OUT: the
// most outputs that leave room for two taps a group).
// (Four outputs, 4 pixels by 3 taps, ran 2.2-2.5x as long as dot_row.)
template <int CO> struct WindowBlock {
  static constexpr int MAX_OUT = CT_NREGS == 32 ? 3 : 2;
  static constexpr int P = CT_NREGS == 32 ? (CO == 1 ? 16 : CO == 2 ? 8 : 6)
                                          : (CO == 1 ? 12 : 4);
  static constexpr int G = CT_NREGS == 32 ? 4 : 3;
};

// dot_row with its W taps in windows (dot_window): the taps' input offsets DELTA apart,
// rising with the tap or, `falling` (a transposed convolution's phases: tap k reads
// offset -k), the other way; step 1.
//
// `groups` conv groups at once (`conv_group_jobs`: jobs[g] group g's weight and bias;
// rows[g * dh_taps + q] its input rows, `conv_group_rows`; tails[g]; `orow` group 0's):
// each block of pixels computed for every group in turn, the block's input lines in L1
// for all of them. (Each group over the whole row read each line from L2 once per group, for a
// few multiply-adds each: 48 -> 4 g4 k2 on 100x385, one thread, 1.08 -> 0.91 ms; on
// 3x265x385 both read the 59 MB input from memory at the same pace.)
template <typename T, int CO, int P, int DELTA>
CT_NOINLINE static void dot_row_window(const CtJob* jobs, int64_t groups, bool falling,
                                       const T* const* rows, char* orow, int64_t o0,
                                       const DotWeights& dw, const T* zeros,
                                       const T* const* tails) {
  typedef typename Vec<T>::v V;
  const CtJob& job = jobs[0];
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t cin = job.cin, full = cin / L * L, tw = job.ntaps[2], in_w = job.in_dims[2];
  const int64_t dh_taps = job.ntaps[0] * job.ntaps[1];
  const int64_t pstride = job.xs[3], os = job.os[3], cout = job.cout;
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  // Groups of at most GM taps, as even as they go (7 taps as 3 + 4): each group's size
  // and the tap that reads its window's start.
  constexpr int GM = WindowBlock<CO>::G;
  static_assert(GM >= 3, "groups as even as they go then hold two taps or more");
  const int64_t windows = (tw + GM - 1) / GM;
  int64_t gn[16], gk[16];  // (window_delta: at most 32 taps)
  for (int64_t i = 0; i < windows; ++i) {
    const int64_t k0 = tw * i / windows;
    gn[i] = tw * (i + 1) / windows - k0;
    gk[i] = falling ? k0 + gn[i] - 1 : k0;
  }
  const int64_t wstep = falling ? -cout : cout;
  const int64_t* oo = job.oout ? job.oout + o0 : nullptr;  // (merged rows)
  if (!oo) orow += o0 * oi;
  for (int64_t b0 = 0; b0 < job.wcount; b0 += P) {
    const DotSpan at = dot_span(b0, P, job.wcount);
    const int64_t w0 = at.w0;
    for (int64_t g = 0; g < groups; ++g) {  // conv group g: its channels, weight, outputs
      const T* w = static_cast<const T*>(jobs[g].w);
      const T* bias = jobs[g].bias ? static_cast<const T*>(jobs[g].bias) + o0 : nullptr;
      const T* const* grows = rows + g * dh_taps;
      V acc[P][CO];
      zero_tile(acc);
      for (int64_t q = 0; q < dh_taps; ++q) {
        if (!grows[q]) continue;
        for (int64_t i = 0; i < windows; ++i) {
          const int64_t k = gk[i], first = w0 + job.off[2][k];
          const T* xb = grows[q] + first * pstride;
          const int64_t* wo = dw.at(q, k) + o0;
          const T* tail = tails[g] ? tails[g] + ((q * tw + k) * cout + o0) * L : nullptr;
#define CT_WINDOW(G)                                                                    \
  dot_window<T, CO, P, G, DELTA>(acc, xb, first, in_w, pstride, w, wo, wstep, tail,     \
                                 cin, full, zeros)
          if constexpr (GM >= 4) if (gn[i] == 4) { CT_WINDOW(4); continue; }
          if (gn[i] == 3) { CT_WINDOW(3); continue; }
          CT_WINDOW(2);
#undef CT_WINDOW
        }
      }
      store_dot_block<T, P, CO>(job, acc, bias, orow + g * job.group_out * oi + w0 * os * oi,
                                os * oi, at.skip, at.np, oo);
    }
  }
}

// The step between a row's neighbouring W taps' input offsets where dot_row_window takes
// them (+-1 or +-2, step 1, 2-32 taps), else 0.
static inline int window_delta(const CtJob& job) {
  const int64_t tw = job.ntaps[2];
  if (job.step[2] != 1 || tw < 2 || tw > 32) return 0;
  const int64_t d = job.off[2][1] - job.off[2][0];
  for (int64_t k = 1; k < tw; ++k)
    if (job.off[2][k] - job.off[2][k - 1] != d) return 0;
  return d == 1 || d == 2 || d == -1 || d == -2 ? (int)d : 0;
}

// A row of dot mode through dot_row_window (taps `delta` apart), in half blocks where
// those cost less.
template <typename T, int CO>
static void dot_window_row(const CtJob* jobs, int64_t groups, int delta, const T* const* rows,
                           char* orow, int64_t o0, const DotWeights& dw, const T* zeros,
                           const T* const* tails) {
  constexpr int P = WindowBlock<CO>::P;
  const bool half = dot_half_block(jobs[0].wcount, P), falling = delta < 0;
  if (delta == 1 || delta == -1)
    (half ? dot_row_window<T, CO, P / 2, 1> : dot_row_window<T, CO, P, 1>)(
        jobs, groups, falling, rows, orow, o0, dw, zeros, tails);
  else
    (half ? dot_row_window<T, CO, P / 2, 2> : dot_row_window<T, CO, P, 2>)(
        jobs, groups, falling, rows, orow, o0, dw, zeros, tails);
}

// dot_row when every pixel's channels are CV whole vectors and pixels lie next to each
// other (step 1, C_in = CV * lanes, pixel stride C_in: a 16 -> 1 head's forward): all
// addresses are constant offsets from one pointer. dot_row computes P pointers per tap,
// which for a single vector of channels cost more than the tap's multiply-adds (W6: 32
// cycles a pixel). Taps that reach past the row's ends load zeros for those pixels
// (masked loads do not fault), so every tap runs the same straight code.
template <typename T, int CO, int CV>
CT_NOINLINE static void dot_row_packed(const CtJob& job, const int64_t* lo, const int64_t* hi,
                                       const T* const* rows, char* orow, int64_t o0,
                                       const DotWeights& dw) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  // The sums alone may fill the registers here (16 for one output on AVX2, one spilled):
  // no pixel pointers compete for them, and 16 pixels tile W6's rows of 32 exactly, where
  // 12 computed 36 (two threads: W6 6.9 ms at 12, 5.5-6.5 at 16).
  constexpr int P = CO == 1 ? 16 : CO == 2 ? 8 : CO <= 4 ? 4 : DotBlock<CO>::P;
  constexpr int64_t PS = CV * L;  // the pixel stride, in elements
  const int64_t tw = job.ntaps[2], dh_taps = job.ntaps[0] * job.ntaps[1], os = job.os[3];
  const T* w = static_cast<const T*>(job.w);
  const T* bias = job.bias ? static_cast<const T*>(job.bias) + o0 : nullptr;
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  const int64_t* oo = job.oout ? job.oout + o0 : nullptr;  // (merged rows)
  if (!oo) orow += o0 * oi;
  halving_blocks<P>(0, job.wcount, [&](auto size, int64_t b) CT_ALWAYS_INLINE {
    constexpr int Q = decltype(size)::value;
    V acc[Q][CO];
    zero_tile(acc);
    for (int64_t q = 0; q < dh_taps; ++q) {
      if (!rows[q]) continue;
      for (int64_t k = 0; k < tw; ++k) {
        const int64_t pa = std::max(lo[k], b) - b, pb = std::min(hi[k], b + Q) - b;
        if (pa >= pb) continue;
        const int64_t* wo = dw.at(q, k) + o0;
        const T* xb = rows[q] + (b + job.off[2][k]) * PS;
        // One tap: a whole block loads plainly, an edge block through the valid mask.
        const auto tap = [&](auto masked, unsigned valid) {
#pragma GCC unroll 4
          for (int v = 0; v < CV; ++v) {
            V wv[CO];
#pragma GCC unroll 8
            for (int o = 0; o < CO; ++o) wv[o] = *reinterpret_cast<const U*>(w + wo[o] + v * L);
#pragma GCC unroll 16
            for (int p = 0; p < Q; ++p) {
              const T* at = xb + p * PS + v * L;
              V xv;
              if constexpr (decltype(masked)::value) xv = load_or_zero<V>((valid >> p) & 1, at);
              else xv = *reinterpret_cast<const U*>(at);
#pragma GCC unroll 8
              for (int o = 0; o < CO; ++o) acc[p][o] += xv * wv[o];
            }
          }
        };
        if (pa == 0 && pb == Q) tap(std::false_type{}, 0u);
        else tap(std::true_type{}, ((1u << pb) - 1) & ~((1u << pa) - 1));  // bit p: pixel p
      }
    }
    store_dot_block<T, Q, CO>(job, acc, bias, orow + b * os * oi, os * oi, 0, Q, oo);
  });
}

// Depthwise (one input and one output channel per group): vectors run along the
// channels, each tap one multiply-add per pixel and vector. A job of cout = R * cin
// outputs a position computes R W residues merged (R neighbouring output pixels, lying
// one after another), each from the same cin input channels with weights of its own:
// weight [tap][r][c], bias [r][c]; residue r's channels at the position's r * cin on.
template <typename T>
static void depthwise_rows(const CtJob& job, const int64_t* lo, const int64_t* hi) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int P = 4, NV = 4;
  const int64_t ch = job.cin, tw = job.ntaps[2], residues = job.cout / job.cin;
  const int64_t dh_taps = job.ntaps[0] * job.ntaps[1];
  const int64_t pstride = job.step[2] * job.xs[3], os = job.os[3];
  const T* const wpk0 = static_cast<const T*>(job.w);
  const T* const bias0 = static_cast<const T*>(job.bias);
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  for_each_row<T>(job, 1, false, [&](const T* const* rows, char* orow0, int64_t) {
    for (int64_t r = 0; r < residues; ++r) {
      // residue r: its weights within each tap's, its bias, its outputs within a position's
      const T* wpk = wpk0 + r * ch;
      const T* bias = bias0 ? bias0 + r * ch : nullptr;
      char* orow = orow0 + r * ch * oi;
      for (int64_t c0 = 0; c0 < ch; c0 += NV * L) {
        const int64_t nv = std::min<int64_t>(NV, (ch - c0) / L);  // whole vectors here
        for (int64_t w0 = 0; w0 < job.wcount; w0 += P) {
          const int64_t np = job.wcount - w0 < P ? job.wcount - w0 : P;
          V acc[P][NV];
          for (int p = 0; p < P; ++p)
            for (int v = 0; v < NV; ++v) acc[p][v] = V{};
          for (int64_t q = 0; q < dh_taps; ++q) {
            if (!rows[q]) continue;
            for (int64_t k = 0; k < tw; ++k) {
              const int64_t a = std::max(lo[k], w0), b = std::min(hi[k], w0 + np);
              const T* wt = wpk + (q * tw + k) * job.cout + c0;
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
          if (nv < NV && c0 + nv * L < ch) {
            // Channels past the last whole vector: one vector read through a mask (a scalar
            // sum per channel and tap took most of a 24-channel layer's time: the fan-in
            // gradients of 24 -> 4 g4 k7 s2 ran at 6 GFLOP/s).
            const int64_t cr = c0 + nv * L, rest = ch - cr;
            V accr[P];
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p) accr[p] = V{};
            for (int64_t q = 0; q < dh_taps; ++q) {
              if (!rows[q]) continue;
              for (int64_t k = 0; k < tw; ++k) {
                const int64_t pa = std::max(lo[k], w0) - w0, pb = std::min(hi[k], w0 + np) - w0;
                if (pa >= pb) continue;
                const V wv = load_first<V>(rest, wpk + (q * tw + k) * job.cout + cr);
                const T* xb = rows[q] + (w0 * job.step[2] + job.off[2][k]) * job.xs[3] + cr;
#pragma GCC unroll 4
                for (int p = 0; p < P; ++p)
                  if (p >= pa && p < pb) accr[p] += load_first<V>(rest, xb + p * pstride) * wv;
              }
            }
            const V bv = bias ? load_first<V>(rest, bias + cr) : V{};
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p) {
              if (p >= np) continue;
              T lanes_out[L];
              *reinterpret_cast<U*>(lanes_out) = accr[p] + bv;
              // (masked: store_out's memcpy of `rest` elements is a library call a pixel)
              store_chunk(job, orow + ((w0 + p) * os + cr) * oi, lanes_out, rest);
            }
          }
        }
      }
    }
  });
}

// to[w * stride + c] = from[w * ch + c] for pixels w < n and channels c < ch: a copy of a
// size known when compiled per pixel up to 16 channels (a copy of ch elements was a
// library call a pixel, and channel by channel a scalar loop took longer than the
// products of 8 -> 8 k4 s2).
template <int C, typename T>
static inline void interleave_fixed(T* to, int64_t stride, const T* from, int64_t n) {
  for (int64_t w = 0; w < n; ++w) std::memcpy(to + w * stride, from + w * C, C * sizeof(T));
}

template <typename T>
static void interleave_pixels(T* to, int64_t stride, const T* from, int64_t ch, int64_t n) {
  switch (ch) {
#define CT_INTERLEAVE(C) \
    case C: return interleave_fixed<C>(to, stride, from, n);
    CT_INTERLEAVE(1) CT_INTERLEAVE(2) CT_INTERLEAVE(3) CT_INTERLEAVE(4) CT_INTERLEAVE(5)
    CT_INTERLEAVE(6) CT_INTERLEAVE(7) CT_INTERLEAVE(8) CT_INTERLEAVE(9) CT_INTERLEAVE(10)
    CT_INTERLEAVE(11) CT_INTERLEAVE(12) CT_INTERLEAVE(13) CT_INTERLEAVE(14) CT_INTERLEAVE(15)
    CT_INTERLEAVE(16)
#undef CT_INTERLEAVE
    default: {  // whole vectors, then a masked one
      typedef typename Vec<T>::v V;
      typedef typename Vec<T>::u U;
      constexpr int L = CT_VBYTES / sizeof(T);
      for (int64_t w = 0; w < n; ++w) {
        const T* a = from + w * ch;
        T* b = to + w * stride;
        int64_t c = 0;
        for (; c + L <= ch; c += L)
          *reinterpret_cast<U*>(b + c) = *reinterpret_cast<const U*>(a + c);
        if (c < ch) store_lanes(ch - c, b + c, load_lanes<V>(ch - c, a + c));
      }
    }
  }
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
  const int64_t ch = job.cin, tw = job.ntaps[2], residues = job.cout / job.cin;
  const int64_t dh_taps = job.ntaps[0] * job.ntaps[1], taps = dh_taps * tw;
  const int64_t flat = job.wcount * ch, os = job.os[3];
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  const T* wpk = static_cast<const T*>(job.w);
  const int64_t plen = ch + BLOCK;  // pattern: pat[r][t][j] = w[t][r][j % ch]
  std::vector<T> pat(residues * taps * plen);
  for (int64_t r = 0; r < residues; ++r)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t j = 0, c = 0; j < plen; ++j, c = c + 1 == ch ? 0 : c + 1)
        pat[(r * taps + t) * plen + j] = wpk[t * job.cout + r * ch + c];
  // The sums start from the bias, laid along the same pattern (zeros: none).
  std::vector<T> bpat(residues * plen, T(0));
  if (job.bias)
    for (int64_t r = 0; r < residues; ++r)
      for (int64_t j = 0, c = 0; j < plen; ++j, c = c + 1 == ch ? 0 : c + 1)
        bpat[r * plen + j] = static_cast<const T*>(job.bias)[r * ch + c];
  std::vector<T> row_store(flat + BLOCK + 64 / sizeof(T));
  T* row = aligned_line(row_store.data());
  // Merged residues whose positions' outputs lie one after another: their rows
  // interleaved here, then stored as one run.
  const bool interleave = residues > 1 && os == job.cout;
  std::vector<T> stage_store(interleave ? flat * residues + 64 / sizeof(T) : 0);
  T* stage = interleave ? aligned_line(stage_store.data()) : nullptr;
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
  for_each_row<T>(job, 1, false, [&](const T* const* rows, char* orow, int64_t) {
    for (int64_t r = 0; r < residues; ++r) {
      const T* patr = pat.data() + r * taps * plen;
      const T* bpr = bpat.data() + r * plen;
      for (int64_t j0 = 0, m0 = 0; j0 < flat; j0 += BLOCK) {
        const int64_t j1 = std::min(flat, j0 + BLOCK);
        if (j0 >= inner0 && j0 + BLOCK <= inner1) {
          V sum[NB];
#pragma GCC unroll 8
          for (int v = 0; v < NB; ++v) sum[v] = *reinterpret_cast<const U*>(bpr + m0 + v * L);
          for (int64_t q = 0; q < dh_taps; ++q) {
            if (!rows[q]) continue;
            const T* xq = rows[q] + j0;
            const T* pq = patr + q * tw * plen + m0;
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
        for (int v = 0; v < NB; ++v) sum[v] = *reinterpret_cast<const U*>(bpr + m0 + v * L);
        bool partial = false;  // some tap's share of the block went to row[] lane by lane
        for (int64_t q = 0; q < dh_taps; ++q) {
          if (!rows[q]) continue;
          for (int64_t k = 0; k < tw; ++k) {
            const int64_t a = std::max(lo[k] * ch, j0), b = std::min(hi[k] * ch, j1);
            if (a >= b) continue;
            const T* x = rows[q] + job.off[2][k] * ch;  // x[j]: the input flat j reads
            const T* p = patr + (q * tw + k) * plen + m0 - j0;  // p[j]: its weight
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
              // a vector at a time, the last one's lanes masked: lane by lane, rows
              // shorter than a block (1 -> 1 k6 3-D's grad_input, rows of 41) went
              // through here whole, a scalar multiply-add per value and tap
              for (int64_t j = a; j < b; j += L) {
                const int64_t m = std::min<int64_t>(L, b - j);
                store_lanes(m, row + j, load_lanes<V>(m, row + j) +
                                            load_lanes<V>(m, x + j) * load_lanes<V>(m, p + j));
              }
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
      if (interleave) {
        interleave_pixels(stage + r * ch, job.cout, row, ch, job.wcount);
      } else if (os == ch) {
        store_chunk(job, orow, row, flat);
      } else {
        // (whole vectors and a masked one: store_out's memcpy of `ch` elements is a library
        // call a pixel, a quarter of 2 -> 2 k5 s2's time)
        for (int64_t w = 0; w < job.wcount; ++w)
          store_chunk(job, orow + (w * os + r * ch) * oi, row + w * ch, ch);
      }
    }
    if (interleave) store_chunk(job, orow, stage, flat * residues);
  });
}

#include "planar.hpp"

// The most weight (every conv group's) for which dot mode runs a row's groups in turn.
#define CT_DOT_GROUPS_IN_ROW_BYTES (32 * 1024)

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
    if (job.step[2] == 1 && job.xs[3] == job.cin && job.cin < 4 * L)
      return depthwise_flat_rows<T>(job, lo, hi);
    return depthwise_rows<T>(job, lo, hi);
  }
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t cv = job.cin / L;
  const bool packed = job.step[2] == 1 && job.xs[3] == job.cin && job.cin == cv * L && cv >= 1 &&
                      cv <= 2;
  const DotWeights dw(job);
  const std::vector<T> zeros(job.cin);  // what a partial block's pixels outside it read
  // Per conv group: the job as its rows see it (its weight and bias), and its tails.
  // (Each group a job of its own read the input once per group: 92 -> 4 g4 k2 s(4,2,2)
  // streamed 40 MB eight times.)
  const std::vector<CtJob> group_jobs = conv_group_jobs<T>(job);
  const int64_t groups = group_jobs.size();
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  std::vector<std::vector<T>> tail_store(groups);
  std::vector<const T*> tails(groups, nullptr);
  for (int64_t g = 0; g < groups; ++g) {
    if (!packed) tail_store[g] = dot_tails<T>(group_jobs[g], dw);
    if (!tail_store[g].empty()) tails[g] = aligned_line(tail_store[g].data());
  }
  std::vector<const T*> group_rows(job.ntaps[0] * job.ntaps[1]);
  // More outputs than a register block takes in chunks, as even as they go (AVX2's 5:
  // 3 + 2). (CHANNELS mode padded 5 outputs to 16 lanes: 384 -> 5 ran at 45 GFLOP/s, 4
  // outputs at 112.) Each row's chunks one after another while its input rows are in
  // cache; or, where rows are short (fewer pixels than MAXO per W tap: each chunk then
  // reads more weight than input), each chunk's weight over every row while it is in
  // cache, the weight read once (384 -> 96 k5 s(3,1,4) on 1x3x3 pixels reads 18 MiB).
  // Conv groups likewise: each row's groups in turn where every group's weight fits in
  // L1 together (CT_DOT_GROUPS_IN_ROW_BYTES), else each group over every row (256 -> 4
  // g4 k6, 55 KB a group: 11.2 ms a row's groups in turn, 9.3 each group over every row).
  constexpr int MAXO = DotBlock<1>::MAX_OUT;
  const int64_t chunks = (job.cout + MAXO - 1) / MAXO;
  const int64_t weight_bytes =
      job.ntaps[0] * job.ntaps[1] * job.ntaps[2] * job.cout * job.cin * (int64_t)sizeof(T);
  const bool by_chunk = (chunks > 1 && job.wcount < MAXO * job.ntaps[2]) ||
                        groups * weight_bytes > CT_DOT_GROUPS_IN_ROW_BYTES;
  const int delta = window_delta(job);
  if (delta && groups > 1 && chunks == 1 && !by_chunk && job.cout <= WindowBlock<1>::MAX_OUT) {
    // every conv group of a block of pixels in turn (dot_row_window)
    const int64_t dh = group_rows.size();
    std::vector<const T*> every_group_rows(groups * dh);
    for_each_row<T>(job, 1, false, [&](const T* const* rows, char* orow, int64_t) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* const* own = conv_group_rows<T>(job, g, rows, dh, group_rows.data());
        std::copy(own, own + dh, every_group_rows.begin() + g * dh);
      }
      switch (job.cout) {
#define CT_GROUPS(CO)                                                                     \
  case CO:                                                                                \
    if constexpr (CO <= WindowBlock<1>::MAX_OUT)                                          \
      dot_window_row<T, CO>(group_jobs.data(), groups, delta, every_group_rows.data(),    \
                            orow, 0, dw, zeros.data(), tails.data());                     \
    break;
        CT_GROUPS(1) CT_GROUPS(2) CT_GROUPS(3)
#undef CT_GROUPS
      }
    });
    return;
  }
  for_each_row<T>(job, groups * chunks, by_chunk, [&](const T* const* all_rows, char* orow,
                                                      int64_t unit) {
    const int64_t g = unit / chunks, c = unit % chunks;
    const CtJob& gjob = group_jobs[g];
    // the group's channels of the same input rows, its outputs of the same row
    const T* const* rows =
        conv_group_rows<T>(job, g, all_rows, group_rows.size(), group_rows.data());
    orow += g * job.group_out * oi;
    const int64_t o0 = job.cout * c / chunks, n = job.cout * (c + 1) / chunks - o0;
#define CT_DOT(CO)                                                                        \
  if constexpr (CO <= WindowBlock<1>::MAX_OUT) {                                          \
    if (delta) {                                                                          \
      dot_window_row<T, CO>(&gjob, 1, delta, rows, orow, o0, dw, zeros.data(), &tails[g]); \
      break;                                                                              \
    }                                                                                     \
  }                                                                                       \
  if constexpr (CO <= MAXO) {                                                             \
    if (packed)                                                                           \
      (cv == 1 ? dot_row_packed<T, CO, 1> : dot_row_packed<T, CO, 2>)(gjob, lo, hi, rows, \
                                                                       orow, o0, dw);     \
    else                                                                                  \
      dot_row<T, CO, DotBlock<CO>::P>(gjob, lo, hi, rows, orow, o0, dw, zeros.data(),      \
                                      tails[g]);                                          \
  }                                                                                       \
  break;
    switch (n) {
      case 1: CT_DOT(1)
      case 2: CT_DOT(2)
      case 3: CT_DOT(3)
      case 4: CT_DOT(4)
      case 5: CT_DOT(5)
      case 6: CT_DOT(6)
      case 7: CT_DOT(7)
      case 8: CT_DOT(8)
    }
#undef CT_DOT
  });
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
