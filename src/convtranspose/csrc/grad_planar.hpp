// Both gradients over planar rows (PgwJob): the entry points `planar_grad_weight` and
// `planar_grad_input`. Part of the kernel: correlate.hpp includes it inside the build's
// namespace (CT_NS).
//
// For few channels on both sides (8 -> 3, 3 -> 1, 8 -> 4 g2), where vectors along either
// channel axis hold a few lanes: here they run along the input pixels of a row. The input
// and the cotangent come as planar copies (`planar_rows` in module.cpp), each channel's
// row contiguous, the cotangent's split by W residue, so that W tap kw reads its residue's
// row from a fixed element on, step 1. Every (tap, output channel, input channel) sum is
// then a dot product of two runs of vectors; zeros past the input row's end and around
// the cotangent's make every tap run over the whole row, with no edges.
//
// A register tile holds CB input channels by E sums (tap, output channel): per vector of
// pixels, CB aligned loads of the input and E of the cotangent feed CB * E multiply-adds,
// over every row of a block of rows. The tile's sums are then added into the job's vector
// sums; the caller sums their lanes once.

// Input row `row` (flat over the job's N, D, H) and the cotangent row it meets through
// (D, H) tap pair (i, j), or null where that lies outside the cotangent.
static inline RowPos pgw_row(const PgwJob& job, int64_t row) {
  const int64_t box[6] = {0, job.dims[0], 0, job.dims[1], 0, job.dims[2]};
  return row_at(box, row);
}
template <typename T>
static inline const T* pgw_cot_row(const PgwJob& job, const T* g, RowPos pos, int64_t i,
                                   int64_t j) {
  const int64_t od = pos.d * job.step[0] + job.off[0][i];
  const int64_t oh = pos.h * job.step[1] + job.off[1][j];
  if (od < 0 || od >= job.dims[3] || oh < 0 || oh >= job.dims[4]) return nullptr;
  return g + ((pos.n * job.dims[3] + od) * job.dims[4] + oh) * job.grow;
}

// Per (W tap, output channel) of the group, W tap-major: where it reads in a cotangent
// row (its channel's residue, from the element input pixel 0 meets).
static std::vector<int64_t> pgw_pair_offsets(const PgwJob& job) {
  std::vector<int64_t> go(job.ntaps[2] * job.cout);
  for (int64_t k = 0, e = 0; k < job.ntaps[2]; ++k)
    for (int64_t co = 0; co < job.cout; ++co, ++e)
      go[e] = ((job.o0 + co) * job.res + job.wtap[2 * k]) * job.stretch + job.wtap[2 * k + 1];
  return go;
}

// rows: the block's rows the tile's sums meet, each with its input row (xr, at the
// tile's first channel) and its cotangent rows per (D, H) tap pair (gr, npair apart; a
// row of zeros where the pair lands outside). Sum e = (tap pair pe[e], W tap, output
// channel) reads its cotangent row from element go[e] on.
template <typename T, int CB, int E>
static inline void pgw_tile(const int64_t* rows, int64_t nr, const T* const* xr,
                            const T* const* gr, int64_t npair, int64_t wv, const int64_t* pe,
                            const int64_t* go, T* const* sp, int64_t ci0, int64_t nvec) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  V acc[CB][E];
  zero_tile(acc);
  for (int64_t q = 0; q < nr; ++q) {
    const int64_t r = rows[q];
    const T* xc = xr[r] + ci0 * wv;
    const T* gp[E];
#pragma GCC unroll 16
    for (int e = 0; e < E; ++e) gp[e] = gr[r * npair + pe[e]] + go[e];
    for (int64_t b = 0; b < nvec; ++b) {
      V xv[CB];
#pragma GCC unroll 8
      for (int c = 0; c < CB; ++c) xv[c] = *reinterpret_cast<const V*>(xc + c * wv + b * L);
#pragma GCC unroll 16
      for (int e = 0; e < E; ++e) {
        const V gv = *reinterpret_cast<const U*>(gp[e] + b * L);
#pragma GCC unroll 8
        for (int c = 0; c < CB; ++c) acc[c][e] += xv[c] * gv;
      }
    }
  }
#pragma GCC unroll 16
  for (int e = 0; e < E; ++e)
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) *reinterpret_cast<V*>(sp[e] + (ci0 + c) * L) += acc[c][e];
}

// Input channels per tile, and sums: the sums, CB input vectors and one cotangent vector
// within the registers. (Eight channels by two sums ran 8 -> 3 k3 s2 at 39 GFLOP/s on one
// core, four by six at 52: ten loads for 16 multiply-adds against 24.)
constexpr int PGW_CB = CT_NREGS == 32 ? 4 : 2;
template <int CB> struct PgwTile {
  static constexpr int E = std::max(1, std::min(16, (CT_NREGS - 4 - CB) / CB));
};

// Rows a tile's sums stay in registers over: their input rows stay in L1 while the tiles
// sweep them (16 rows of 8 -> 3 k3 s2: 17.6 ms; 4: 15.0; 64: 16.6).
constexpr int64_t PGW_ROWS = 4;

template <typename T>
static void planar_grad_weight_typed(const PgwJob& job) {
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t td = job.ntaps[0], th = job.ntaps[1];
  const int64_t cin = job.cin, wv = job.wv, nvec = wv / L;
  const T* x = static_cast<const T*>(job.x);
  const T* g = static_cast<const T*>(job.g);
  T* sums = static_cast<T*>(job.sums);
  // Every sum (tap, output channel), tap-major as `sums`: its (D, H) tap pair and where
  // it reads in a cotangent row.
  const std::vector<int64_t> pair_at = pgw_pair_offsets(job);
  const int64_t npair = td * th, per_pair = (int64_t)pair_at.size(), total = npair * per_pair;
  std::vector<int64_t> pe(total), go(total);
  std::vector<T*> sp(total);
  for (int64_t e = 0; e < total; ++e) {
    pe[e] = e / per_pair;
    go[e] = pair_at[e % per_pair];
    sp[e] = sums + e * cin * L;
  }
  const std::vector<T> zeros(job.grow, T(0));  // the cotangent row outside the volume
  std::vector<const T*> gr(PGW_ROWS * npair);
  std::vector<char> meets(PGW_ROWS * npair);
  const T* xr[PGW_ROWS];
  int64_t rows[PGW_ROWS];
  CtStop* const stop = ct_stop;  // asked before each block of rows
  for (int64_t first = job.row0; first < job.row1; first += PGW_ROWS) {
    if (stop && stop->stop(stop)) return;
    const int64_t nb = std::min(job.row1, first + PGW_ROWS) - first;
    for (int64_t r = 0; r < nb; ++r) {
      const RowPos pos = pgw_row(job, first + r);
      xr[r] = x + (first + r) * job.xrow + job.c0 * wv;
      for (int64_t i = 0; i < td; ++i)
        for (int64_t j = 0; j < th; ++j) {
          const T* at = pgw_cot_row(job, g, pos, i, j);
          meets[r * npair + i * th + j] = at != nullptr;
          gr[r * npair + i * th + j] = at ? at : zeros.data();
        }
    }
    in_even_blocks<PGW_CB>(cin, [&](int64_t ci0, auto cb) {  // blocks of channels
      constexpr int CB = decltype(cb)::value;
      in_even_blocks<PgwTile<CB>::E>(total, [&](int64_t e0, auto ec) {  // tiles of sums
        constexpr int E = decltype(ec)::value;
        int64_t nr = 0;  // the rows whose cotangent some sum of the tile meets
        for (int64_t r = 0; r < nb; ++r)
          for (int64_t p = pe[e0]; p <= pe[e0 + E - 1]; ++p)
            if (meets[r * npair + p]) { rows[nr++] = r; break; }
        if (nr)
          pgw_tile<T, CB, E>(rows, nr, xr, gr.data(), npair, wv, pe.data() + e0,
                             go.data() + e0, sp.data() + e0, ci0, nvec);
      });
    });
  }
}

// grad_input over the same planar cotangent (planar_grad_input): per input row, each
// register tile of CB channels by NB vectors of pixels sums, over every (tap, output
// channel) of the (D, H) tap pairs that meet the row, NB cotangent vectors times CB
// broadcast weights; then stores its pixels' channels into the channels-last rows.
template <int CB> struct PgxTile {
  static constexpr int NB = CT_NREGS == 32 ? std::max(1, std::min(4, 24 / CB))
                                           : std::max(1, std::min(2, 12 / CB));
};

template <typename T, int CB, int NB>
static inline void pgx_tile(const T* const* gp, const T* const* wp, int64_t count,
                            int64_t ci, int64_t b0, T* out) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  V acc[CB][NB];
  zero_tile(acc);
  for (int64_t e = 0; e < count; ++e) {
    V gv[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) gv[b] = *reinterpret_cast<const U*>(gp[e] + (b0 + b) * L);
#pragma GCC unroll 8
    for (int c = 0; c < CB; ++c) {
      const V wv = broadcast<V>(wp[e] + ci + c);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[c][b] += gv[b] * wv;
    }
  }
  store_tile<T>(acc, out, NB * L);
}

template <typename T>
static void planar_grad_input_typed(const PgwJob& job) {
  constexpr int L = CT_VBYTES / sizeof(T);
  const int64_t td = job.ntaps[0], th = job.ntaps[1];
  const int64_t cin = job.cin, nvec = job.wv / L, W = job.gx_w;
  const T* g = static_cast<const T*>(job.g);
  const T* wt = static_cast<const T*>(job.w);
  T* gx = static_cast<T*>(job.gx);
  const std::vector<int64_t> go = pgw_pair_offsets(job);
  const int64_t per_pair = (int64_t)go.size();
  std::vector<const T*> gp(td * th * per_pair), wp(td * th * per_pair);
  std::vector<T> tile_store(PGW_CB * 2 * 4 * L + 64 / sizeof(T));
  T* const tile = aligned_line(tile_store.data());
  CtStop* const stop = ct_stop;  // asked every 16 rows
  for (int64_t row = job.row0; row < job.row1; ++row) {
    if (stop && (row - job.row0) % 16 == 0 && stop->stop(stop)) return;
    const RowPos pos = pgw_row(job, row);
    int64_t count = 0;  // the row's (tap, output channel) terms, in tap order
    for (int64_t i = 0; i < td; ++i)
      for (int64_t j = 0; j < th; ++j) {
        const T* at = pgw_cot_row(job, g, pos, i, j);
        if (!at) continue;
        for (int64_t e = 0; e < per_pair; ++e, ++count) {
          gp[count] = at + go[e];
          wp[count] = wt + ((i * th + j) * per_pair + e) * cin;  // (tap, co) = (.., k, co)
        }
      }
    T* orow = gx + row * W * job.gx_c + job.c0;
    in_even_blocks<PGW_CB * 2>(cin, [&](int64_t ci0, auto cb) {  // blocks of channels
      constexpr int CB = decltype(cb)::value;
      constexpr int NBM = PgxTile<CB>::NB;
      for (int64_t b0 = 0; b0 < nvec; b0 += NBM) {
        with_count<NBM>(std::min<int64_t>(NBM, nvec - b0), [&](auto nb) {
          constexpr int NB = decltype(nb)::value;
          pgx_tile<T, CB, NB>(gp.data(), wp.data(), count, ci0, b0, tile);
          const int64_t w1 = std::min(W, (b0 + NB) * L);
          for (int64_t w = b0 * L; w < w1; ++w)
            for (int c = 0; c < CB; ++c)
              orow[w * job.gx_c + ci0 + c] = tile[c * NB * L + (w - b0 * L)];
        });
      }
    });
  }
}

#if CT_PART_HAS(3)
void planar_grad_input(const PgwJob& job) {
  if (job.itemsize == 4) planar_grad_input_typed<float>(job);
  else planar_grad_input_typed<double>(job);
}

void planar_grad_weight(const PgwJob& job) {
  if (job.itemsize == 4) planar_grad_weight_typed<float>(job);
  else planar_grad_weight_typed<double>(job);
}
#endif  // CT_PART_HAS(3)
