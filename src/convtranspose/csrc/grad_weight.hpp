// grad_weight (GwJob): the entry point `grad_weight`, and `fuses_grad_input`. Part of the
// kernel: correlate.hpp includes it inside the build's namespace (CT_NS).
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

// A row's last vector where PART (C_in/g not whole vectors: its first `tail` lanes, the
// others neither read nor written), else the whole vector. A compile-time choice: a
// masked load in every loop cost W1-W8's gradients 2-3.5%.
template <bool PART, typename V, typename T>
static inline V load_last(int64_t tail, const T* p) {
  if constexpr (PART) return load_lanes<V>(tail, p);
  else return (V)*reinterpret_cast<const typename Vec<T>::u*>(p);
}
template <bool PART, typename T, typename V>
static inline void store_last(int64_t tail, T* p, V v) {
  if constexpr (PART) store_lanes(tail, p, v);
  else *reinterpret_cast<typename Vec<T>::u*>(p) = v;
}

// `tail`: the lanes of B's last vector that lie in its row (lanes, unless C_in/g is not
// whole vectors: swapped, the vector side is x's channels, read in place; then PART).
template <typename T, int P, int NV, bool PART>
static inline void reduce_block(const Segment* segs, int64_t nseg, int64_t as, int64_t bs,
                                int64_t a0, int64_t b0, T* acc, int64_t cw, int64_t tail) {
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
    const auto step = [&](auto& sums, const T* ai, const T* bi) CT_ALWAYS_INLINE {
      __builtin_prefetch(ai + 64 / sizeof(T));  // the next blocks' line of this pixel
      V bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV - 1; ++v) bv[v] = *reinterpret_cast<const U*>(bi + v * L);
      bv[NV - 1] = load_last<PART, V>(tail, bi + (NV - 1) * L);
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

template <typename T, int NV, int P, bool PART>
static inline void reduce_tail(int64_t n, const Segment* segs, int64_t nseg, int64_t as,
                               int64_t bs, int64_t a0, int64_t b0, T* acc, int64_t cw,
                               int64_t tail) {
  if constexpr (P > 0) {
    if (n == P) return reduce_block<T, P, NV, PART>(segs, nseg, as, bs, a0, b0, acc, cw, tail);
    reduce_tail<T, NV, P - 1, PART>(n, segs, nseg, as, bs, a0, b0, acc, cw, tail);
  }
}

// acc: the (na x NV vectors) sums, rows `cw` apart.
template <typename T, int NV, bool PART>
static void reduce_chunk(const Segment* segs, int64_t nseg, int64_t as, int64_t bs,
                         int64_t na, int64_t b0, T* acc, int64_t cw, int64_t tail) {
  constexpr int P = Block<NV>::P;
  // Blocks of near-equal size, as the forward's rows: a last block of 2 or 4 values of A
  // does a third or two thirds of a block's multiply-adds per pass over B, with as many
  // loads of B (misaligned ones cost two). One core, 3x3x3 kernel over 16x32x32 pixels,
  // 64 columns: 32 values of A 12.9 -> 11.2 ms, 64 23.3 -> 22.3, 128 46.5 -> 45.7; 48,
  // whole blocks either way, level.
  const int64_t nb = (na + P - 1) / P, size = na / nb, bigger = na % nb;
  for (int64_t blk = 0, a0 = 0; blk < nb; ++blk) {
    const int64_t len = size + (blk < bigger);
    if (len == P)
      reduce_block<T, P, NV, PART>(segs, nseg, as, bs, a0, b0, acc + a0 * cw, cw, tail);
    else
      reduce_tail<T, NV, P - 1, PART>(len, segs, nseg, as, bs, a0, b0, acc + a0 * cw, cw, tail);
    a0 += len;
  }
}

// Few sums per tap (swapped, `few_sums`: a 16 -> 1 head has one vector per tap, a 128 ->
// 2 one two sums of four vectors). reduce_block would then do few multiply-adds per load,
// each tap sweeping the row alone. Here a tile of up to E sums (tap, output channel) of one row
// shares each pixel's vectors of x: one broadcast load per multiply-add, E independent
// chains. Every sum still runs over its row's pixels in ascending order (the pixels some
// of the tile's taps miss at the row's ends first and last), so the bits do not depend on
// which sums share a tile, nor on the thread count.
// Where the broadcast side (C_out/g values) would fill less than a register block of
// reduce_block: with three or four vectors of C_in/g, below the block's P values; with
// one or two, below 8 sums in all. Two threads, k3-k4 layers on 20x22x24 pixels: 64 -> 2
// 0.73 -> 0.35 ms, 48 -> 3 0.65 -> 0.39, 128 -> 3 1.82 -> 1.10 and 128 -> 2 k6 s2 3.5 ->
// 1.7; 64 -> 5 and 48 -> 6 level; with one or two vectors the tiles lost from 8 sums on
// (16 -> 12 1.26 -> 1.47, 32 -> 10 0.69 -> 0.80).
template <typename T>
static inline bool few_sums(int64_t cin, int64_t cout) {
  constexpr int64_t L = CT_VBYTES / sizeof(T);
  const int64_t nv = std::min<int64_t>((cin + L - 1) / L, MAXV);
  if (nv >= 4) return cout < Block<4>::P;
  if (nv == 3) return cout < Block<3>::P;
  return cout * nv < 8;
}

template <typename T>
struct FewSum {
  int64_t g;       // where the cotangent value of the first pixel the tap reaches (lo)
                   // is, from the row's origin: the cotangent at (d * step_d,
                   // h * step_h, 0), which the offsets of the tap's (D, H) pair move
  int64_t lo, hi;  // the pixels [lo, hi) of the row the tap reaches
  T* acc;          // NV vectors of sums
  const T* w;      // with grad_input too: the sum's NV vectors of the weight
  const typename LaneIndex<T>::u* sel;  // conv groups side by side (GwJob::group_cin):
                   // per vector, the channel of the cotangent row each lane takes
};

// A pixel's NV vectors of x, the last one's `tail` lanes in its row (see load_last).
template <typename T, int NV, bool PART>
static inline void load_x(typename Vec<T>::v (&xv)[NV], const T* p, int64_t tail) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
#pragma GCC unroll 4
  for (int v = 0; v < NV - 1; ++v) xv[v] = *reinterpret_cast<const U*>(p + v * L);
  xv[NV - 1] = load_last<PART, typename Vec<T>::v>(tail, p + (NV - 1) * L);
}

// A pixel's NV vectors stored at p, the last one's `tail` lanes only.
template <typename T, int NV, bool PART, typename V>
static inline void store_x(T* p, const V (&a)[NV], int64_t tail) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
#pragma GCC unroll 4
  for (int v = 0; v < NV - 1; ++v) *reinterpret_cast<U*>(p + v * L) = a[v];
  store_last<PART>(tail, p + (NV - 1) * L, a[NV - 1]);
}

// The cotangent values a sum's NV vectors take at p: one value, broadcast; or with conv
// groups side by side (GROUPED), each lane its own group's channel of the row at p, whose
// first `row` channels are loaded once and permuted per vector (`sel`). Packing G groups
// into the vectors fills G times the lanes of one group's few channels, for a permute per
// vector where one broadcast served them all.
template <typename T, int NV, bool GROUPED, typename V>
static inline void cot_values(V (&b)[NV], const T* p, const typename LaneIndex<T>::u* sel,
                              int64_t row) {
  if constexpr (GROUPED) {
    const V r = load_lanes<V>(row, p);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = select_lanes(r, sel[v]);
  } else {
    const V one = broadcast<V>(p);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = one;
  }
}

// `rows` rows with the same taps, `grs` and `xrs` apart in the cotangent and in x; `crow`:
// the cotangent channels a GROUPED row loads.
template <typename T, int NV, int E, bool PART, bool GROUPED>
static void few_sums_tile(const FewSum<T>* sums, const T* grow, int64_t grs, const T* xrow,
                          int64_t xrs, int64_t rows, int64_t xs_w, int64_t gs_w,
                          int64_t tail, int64_t crow) {
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
    const auto edge = [&](auto& sum, const FewSum<T>& f, int64_t w0, int64_t w1) CT_ALWAYS_INLINE {
      for (int64_t w = w0; w < w1; ++w) {
        V b[NV], xv[NV];
        cot_values<T, NV, GROUPED>(b, grow + f.g + (w - f.lo) * gs_w, f.sel, crow);
        load_x<T, NV, PART>(xv, xrow + w * xs_w, tail);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) sum[v] += b[v] * xv[v];
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
      load_x<T, NV, PART>(xv, xp, tail);
#pragma GCC unroll 24
      for (int e = 0; e < E; ++e) {
        V b[NV];
        cot_values<T, NV, GROUPED>(b, gp[e] + t * gs_w, sums[e].sel, crow);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) s[e][v] += b[v] * xv[v];
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

// The n sums of one row's chunk in tiles of even size, at most E each (a last tile of
// one or two sums would run latency-bound): tile(first sum, its compile-time count).
template <int E, typename T, typename F>
static void in_even_tiles(const FewSum<T>* sums, int64_t n, F&& tile) {
  in_even_blocks<E>(n, [&](int64_t first, auto size) { tile(sums + first, size); });
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
// One group's C_in/g only up to two vectors (`fuses_grad_input`): from three vectors on,
// a tile holds two sums, and grad_input's pixels are read and written once per two sums.
// Groups side by side take three and four too (their alternative, the fan-out's repeated
// cotangent, costs more).
template <int NV> struct FusedTile {
  static constexpr int E = CT_NREGS == 32 ? (NV == 1 ? 8 : NV == 2 ? 4 : 2)
                                          : (NV == 1 ? 4 : 2);
  static constexpr int U = CT_NREGS == 32 ? (NV == 1 ? 4 : NV == 2 ? 2 : 1) : (NV == 1 ? 2 : 1);
};

template <typename T, int NV, int E, bool PART, bool GROUPED>
static void fused_sums_tile(const FewSum<T>* sums, const T* grow, int64_t grs, const T* xrow,
                            int64_t xrs, T* gxrow, int64_t gxrs, int64_t gxs_w, int64_t rows,
                            int64_t xs_w, int64_t gs_w, int64_t tail, int64_t crow) {
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
      load_x<T, NV, PART>(xv, xrow + w * xs_w, tail);
      load_x<T, NV, PART>(acc[0], gp, tail);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[1][v] = V{};
#pragma GCC unroll 16
      for (int e = 0; e < E; ++e) {
        if (w < sums[e].lo || w >= sums[e].hi) continue;
        V b[NV];
        cot_values<T, NV, GROUPED>(b, grow + sums[e].g + (w - sums[e].lo) * gs_w, sums[e].sel,
                                   crow);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          s[e][v] += b[v] * xv[v];
          acc[e & 1][v] += b[v] * wv[e][v];
        }
      }
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][v] += acc[1][v];
      store_x<T, NV, PART>(gp, acc[0], tail);
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
        for (int u = 0; u < UN; ++u) {
          load_x<T, NV, PART>(xv[u], xp + u * xs_w, tail);
          load_x<T, NV, PART>(acc[u], op + u * gxs_w, tail);
        }
#pragma GCC unroll 16
        for (int e = 0; e < E; ++e)
#pragma GCC unroll 4
          for (int u = 0; u < UN; ++u) {
            V b[NV];
            cot_values<T, NV, GROUPED>(b, gp[e] + (t + u) * gs_w, sums[e].sel, crow);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              s[e][v] += b[v] * xv[u][v];
              acc[u][v] += b[v] * wv[e][v];
            }
          }
#pragma GCC unroll 4
        for (int u = 0; u < UN; ++u) store_x<T, NV, PART>(op + u * gxs_w, acc[u], tail);
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
  // The vector side: whole vectors, except swapped, where C_in/g's last vector may be
  // partial (its lanes past the row are neither read nor written; its sums, in part's
  // whole vectors, then take zeros there).
  const int64_t nb = job.swapped ? job.cin : job.cout;
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
  const int64_t group_rows =
      std::max<int64_t>(1, (192 + job.wcount - 1) / std::max<int64_t>(1, job.wcount));
  const int64_t chunks = (nb + cw_full - 1) / cw_full;
  const auto vectors_of = [&](int64_t cw) { return (cw + L - 1) / L; };
  const auto tail_of = [&](int64_t cw) { return cw - (vectors_of(cw) - 1) * L; };
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
          std::memset(acc + a * (job.pa ? job.pa : cw), 0, vectors_of(cw) * L * sizeof(T));
      }
  if (job.swapped == CT_GW_ALONG_CIN && (job.group_cin || few_sums<T>(nb, na))) {
    // Conv groups side by side (group_cin): per chunk, output channel a and vector v,
    // the channel of the cotangent row each lane takes (its group's channel a; lanes
    // past C_in, whose x is zero, any).
    typedef typename LaneIndex<T>::u Idx;
    const bool grouped = job.group_cin != 0;
    const int64_t crow = grouped ? job.cin / job.group_cin * job.cout : 0;
    std::vector<std::vector<typename LaneIndex<T>::e>> sel(chunks);  // vectors' lanes
    for (int64_t c0 = 0; grouped && c0 < nb; c0 += cw_full) {
      const int64_t nv = vectors_of(std::min(cw_full, nb - c0));
      auto& table = sel[c0 / cw_full];
      table.resize(na * nv * L);
      for (int64_t a = 0; a < na; ++a)
        for (int64_t c = c0; c < c0 + nv * L; ++c)
          table[a * nv * L + c - c0] = c < nb ? c / job.group_cin * job.cout + a : 0;
    }
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
          // W tap outermost: a tile's sums then reach the same pixels of the row, all in
          // its inner loop (by (D, H) tap first, a tile of 6 spanned 6 W offsets, and on
          // rows of 10 pixels with k7 most pixels went through the one-sum edge loop).
          for (int64_t k = 0; k < tw; ++k)
            for (int64_t i = i0; i < i1; ++i)
              for (int64_t j = j0; j < j1; ++j) {
                const int64_t tap = (i * job.ntaps[1] + j) * tw + k;
                if (lo[k] >= hi[k] || !wanted(tap, c0 / cw_full)) continue;
                const int64_t g0 = job.off[0][i] * job.gs[1] + job.off[1][j] * job.gs[2] +
                                   (lo[k] * job.step[2] + job.off[2][k]) * job.gs[3];
                T* acc = unit_acc(tap, c0, cw);
                const auto* picks = sel[c0 / cw_full].data();  // (null: not grouped)
                const int64_t nv = vectors_of(cw);
                for (int64_t a = 0; a < na; ++a)
                  sums.push_back(FewSum<T>{grouped ? g0 : g0 + a, lo[k], hi[k], acc + a * ars,
                                           wt ? wt + (acc + a * ars - part) : nullptr,
                                           grouped ? reinterpret_cast<const Idx*>(
                                                         picks + a * nv * L)
                                                   : nullptr});
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
        const int64_t tail = tail_of(cw);
        with_vectors(vectors_of(cw), [&](auto nv) { with_partial(tail < L, [&](auto part) {
          with_partial(grouped, [&](auto groups_side_by_side) {
          constexpr int NV = decltype(nv)::value;
          constexpr bool PART = decltype(part)::value;
          constexpr bool GROUPED = decltype(groups_side_by_side)::value;
          const int64_t count = (int64_t)sums.size();
          if (!gx) {
            in_even_tiles<FewTile<NV>::E>(sums.data(), count, [&](auto* first, auto e) {
              few_sums_tile<T, NV, decltype(e)::value, PART, GROUPED>(
                  first, grow, grs, xrow + c0, xrs, rows, xs_w, gs_w, tail, crow);
            });
            return;
          }
          // Every pixel of the rows is written: from zero, as the sums add up. NV vectors
          // known here, so that these are plain stores: with a run-time count GCC makes
          // them a memset per pixel, which took 6-25% of W6's time.
          typename Vec<T>::v zero[NV] = {};
          const int64_t gxs_h = job.gxs[2], gxs_w = job.gxs[3], wcount = job.wcount;
          for (int64_t r = 0; r < rows; ++r) {
            T* p = gxrow + r * gxs_h + c0;
            for (int64_t w = 0; w < wcount; ++w, p += gxs_w)
              store_x<T, NV, PART>(p, zero, tail);
          }
          in_even_tiles<FusedTile<NV>::E>(sums.data(), count, [&](auto* first, auto e) {
            fused_sums_tile<T, NV, decltype(e)::value, PART, GROUPED>(
                first, grow, grs, xrow + c0, xrs, gxrow + c0, gxs_h, gxs_w, rows, xs_w, gs_w,
                tail, crow);
          });
        }); }); });
      }
    }
    return;
  }
  std::vector<Segment> segs(group_rows);
  std::vector<RowPos> pos(group_rows);
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
  for (int64_t first = 0; first < total; first += group_rows) {
    if (stop && stop->stop(stop)) return;
    const int64_t nrows = std::min(group_rows, total - first);
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
            const int64_t nv = vectors_of(cw), tail = tail_of(cw);
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
                  for (int64_t i = 0; i < bseg[q].count; ++i, dst += nv * L)  // whole vectors
                    for (int64_t v = 0; v < nv; ++v)
                      *reinterpret_cast<typename Vec<T>::u*>(dst + v * L) =
                          load_lanes<typename Vec<T>::v>(v + 1 < nv ? L : tail,
                                                         src + i * bs + v * L);
                }
                bseg = local.data();
                b0 = 0;
                bstride = nv * L;
              }
              with_vectors(nv, [&](auto nvc) { with_partial(tail < L, [&](auto part) {
                reduce_chunk<T, decltype(nvc)::value, decltype(part)::value>(
                    bseg, bn, as, bstride, na, b0, acc, ars, tail);
              }); });
            }
          }
        }
  }
}

// The vector sums a tap keeps for dw_flat_dot's C channels: R steps in flight of C
// vectors (R enough independent chains for the FMA latency).
constexpr int64_t flat_steps(int64_t c) { return c >= 4 ? 1 : 4 / c; }

// vs[r][v] += x[p, c] * g[p, c] over n contiguous pixels, C < lanes channels, both rows
// dense (pixel stride C): along the flat pixel * channel index, C vectors a step of L * C
// elements, so that lane i of vector v always holds channel (v * L + i) % C. The sums
// stay in vectors over every row of a job (`dw_fold` folds them by channel once at the
// end): folding R * C * L lanes per row and tap cost more than the row's multiply-adds
// (1 -> 1 k4 on rows of 131 pixels: 64 scalar adds against 8 vector ones). (Along the
// channels alone, C < L left no whole vector and ran a scalar chain per channel: a
// 4-channel depthwise layer's grad_weight at 0.9 GFLOP/s.)
template <typename T, int C>
static inline void dw_flat_dot(const T* xp, const T* gp, int64_t n, T* vs) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int R = flat_steps(C);
  const int64_t total = n * C;
  // Rows shorter than R steps touch the first step's sums alone: the others are neither
  // loaded nor stored (1 -> 1 k6 3-D on rows of 41 pixels: 216 taps a row, each loading
  // and storing 4 vectors of sums for 3 multiply-adds).
  const int rr = total >= R * L * C ? R : 1;
  V s[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < C; ++v)
      s[r][v] = r < rr ? *reinterpret_cast<const V*>(vs + (r * C + v) * L) : V{};
  int64_t f = 0;
  for (; f + R * L * C <= total; f += R * L * C)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < C; ++v) {
        const int64_t at = f + (r * C + v) * L;
        s[r][v] += *reinterpret_cast<const U*>(xp + at) * *reinterpret_cast<const U*>(gp + at);
      }
  // The rest a step of C vectors at a time, then its last vectors, the partial one read
  // through a mask: f stays a multiple of L * C, so lane i of vector v keeps channel
  // (v * L + i) % C. (A scalar chain for the rest took most of a short row: a 1 -> 1
  // layer's rows of 88 pixels left 24 of them to it.)
  for (; f + L * C <= total; f += L * C)
#pragma GCC unroll 16
    for (int v = 0; v < C; ++v)
      s[0][v] += *reinterpret_cast<const U*>(xp + f + v * L) *
                 *reinterpret_cast<const U*>(gp + f + v * L);
#pragma GCC unroll 16
  for (int v = 0; v < C; ++v) {
    const int64_t at = f + v * L, m = std::min<int64_t>(L, total - at);
    if (m > 0) s[0][v] += load_first<V>(m, xp + at) * load_first<V>(m, gp + at);
  }
#pragma GCC unroll 4
  for (int r = 0; r < rr; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < C; ++v) *reinterpret_cast<V*>(vs + (r * C + v) * L) = s[r][v];
}

// acc[c] += a tap's kept vector sums: `count` vectors whose lane i of vector v holds
// channel (v * L + i) % C, in a fixed order.
template <typename T>
static void dw_fold(const T* vs, int64_t count, int64_t C, T* acc) {
  constexpr int L = CT_VBYTES / sizeof(T);
  for (int64_t v = 0; v < count; ++v)
    for (int i = 0; i < L; ++i) acc[(v * L + i) % C] += vs[v * L + i];
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
  static_assert(L <= 16, "dw_flat_dot's cases below stop at 15 channels");
  const bool flat = C < L && xs_w == C && gs_w == C;  // dense rows: `dw_flat_dot`
  // Each tap's vector sums over the job's rows, folded at the end: dw_flat_dot's R * C
  // vectors, or one for the channels past the last whole vector.
  const int64_t taps = job.ntaps[0] * job.ntaps[1] * tw;
  const int64_t kept = flat ? flat_steps(C) * C : full < C ? 1 : 0;
  std::vector<T> kept_store(taps * kept * L + 64 / sizeof(T), T(0));
  T* const vsums = aligned_line(kept_store.data());
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
          const int64_t tap = (i * job.ntaps[1] + j) * tw + k;
          T* acc = part + tap * job.pt;
          T* vs = vsums + tap * kept * L;
          const T* xp = xrow + lo * xs_w;
          const T* gp = grow + (lo * job.step[2] + job.off[2][k]) * job.gs[3];
          if (flat) {
            switch (C) {
#define CT_DW_FLAT(CC) case CC: if constexpr (CC < L) dw_flat_dot<T, CC>(xp, gp, hi - lo, vs); break;
              // every C < L, up to L = 16 (AVX-512 floats)
              CT_DW_FLAT(1) CT_DW_FLAT(2) CT_DW_FLAT(3) CT_DW_FLAT(4) CT_DW_FLAT(5) CT_DW_FLAT(6)
              CT_DW_FLAT(7) CT_DW_FLAT(8) CT_DW_FLAT(9) CT_DW_FLAT(10) CT_DW_FLAT(11)
              CT_DW_FLAT(12) CT_DW_FLAT(13) CT_DW_FLAT(14) CT_DW_FLAT(15)
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
          if (full < C) {  // the channels past the last whole vector, through a mask (a
            // scalar chain per channel took most of 24 -> 4 g4 k7 s2's fan-in grad_weight)
            const int64_t rest = C - full;
            V s[4] = {V{}, V{}, V{}, V{}};
            int64_t w = 0;
            for (; w + 4 <= hi - lo; w += 4)
#pragma GCC unroll 4
              for (int u = 0; u < 4; ++u)
                s[u] += load_first<V>(rest, xp + (w + u) * xs_w + full) *
                        load_first<V>(rest, gp + (w + u) * gs_w + full);
            for (; w < hi - lo; ++w)
              s[0] += load_first<V>(rest, xp + w * xs_w + full) *
                      load_first<V>(rest, gp + w * gs_w + full);
            *reinterpret_cast<V*>(vs) += (s[0] + s[1]) + (s[2] + s[3]);  // (lanes past
          }  // `rest` stay zero)
        }
      }
    }
  }
  for (int64_t tap = 0; tap < taps && kept; ++tap) {
    T* acc = part + tap * job.pt;
    if (flat) dw_fold(vsums + tap * kept * L, kept, C, acc);
    else
      for (int64_t c = 0; c < C - full; ++c) acc[full + c] += vsums[tap * L + c];
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

// Whether grad_weight computes grad_input in the same pass (GwJob::gx): its few sums case,
// with C_in/g in one vector or two whole ones. Both gradients, two threads, k4 s2 on 24^3,
// fused against apart: 16 -> 2 0.51 against 0.93 ms, 32 -> 2 0.88 against 1.33; with three
// or four vectors the tile's two sums lose: 48 -> 2 2.3 against 1.75, 96 -> 4 g2 k7 17.1
// against 9.4, 128 -> 2 g2 k7 13.3 against 9.0; 48 -> 1 and 64 -> 1 level. A second vector
// only partly filled loses too, its masked loads and stores once per pixel and tile: of
// the 14 sweep layers of 17-31 channels (seeds 11-34) fused took 1.1-1.75x the time apart
// on 13 (25 -> 3 k7 s4 2-D 1.99 against 1.15 ms), 0.89x on one.
template <typename T>
static bool fuses_typed(int64_t cin, int64_t cout) {
  constexpr int64_t L = CT_VBYTES / sizeof(T);
  return few_sums<T>(cin, cout) && (cin <= L || cin == 2 * L);
}
bool fuses_grad_input(int itemsize, int64_t cin, int64_t cout) {
  return itemsize == 4 ? fuses_typed<float>(cin, cout) : fuses_typed<double>(cin, cout);
}
#endif  // CT_PART_HAS(3)
