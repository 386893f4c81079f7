// Few output channels over a planar input (CT_MODE_PLANAR), included by forward.hpp
// inside its instruction-set namespace.
//
// Vectors run along output pixels: the input is a planar copy (`to_planar` in module.cpp)
// in which each input plane (n, d) holds its channels one after another, each an (H, W)
// image padded with zeros (rows job.xs[2] elements apart, channels job.cs) so that every
// (H, W) tap of every output position of the box lies in it. With input step 1 along H
// and W, a run of output rows of a plane is then one flat run of pixels h * pitch + w
// (the pitch's last columns computed and dropped), and each (H, W) tap one constant
// offset into it: for each D tap, input channel and (H, W) tap, CO broadcast weights
// times NB vectors of the run. Every lane works whatever C_in/g is, rows of a few pixels
// fill whole vectors, and there are no sums across lanes. Dot mode, the native kernel's
// other way for such layers, runs its vectors along C_in/g (6 of 8 lanes for 24 -> 4 g4),
// reduces each output across lanes and computes a pixel pointer per tap.
//
// A job writes its output rows whole: for each block of pixels it sums every W residue
// (each with its own W taps) of every conv group into a buffer, then stores each output
// pixel's channels, residue after residue, as one run of the row. Output lines are
// written once, in order; a job per residue and group rewrote each line s_w * groups
// times at a stride (1 -> 3 k4 s2 on 2 x 740 x 436, two threads: 20 ms, now 3.4).
//
// Weight [g][residue][tap][c][co] (taps D-major, then H, then W), C_out/g = CO unpadded.
// NB vectors of pixels by CO outputs: NB * CO sums, CO broadcast weights and one input
// vector live in registers.
template <int CO> struct PlanarBlock {
  static constexpr int NB =
      CT_NREGS == 32 ? (CO == 1 ? 16 : CO == 2 ? 12 : CO == 3 ? 8 : CO == 4 ? 6 : CO <= 6 ? 4 : 3)
                     : (CO == 1 ? 12 : CO == 2 ? 6 : CO == 3 ? 4 : CO == 4 ? 2 : 1);
};

// The sums of NB vectors of a run's pixels from q0 on, over every tap and channel:
// planes[i] is D tap i's input plane (null outside the input), flat[t] the offset of
// (H, W) tap t in it.
template <typename T, int CO, int NB, typename V>
static inline void planar_block(V (&acc)[NB][CO], const T* const* planes, int64_t td,
                                const int64_t* flat, int64_t hw, int64_t group, int64_t cin,
                                int64_t cs, const T* wt, int64_t q0) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b)
#pragma GCC unroll 8
    for (int o = 0; o < CO; ++o) acc[b][o] = V{};
  for (int64_t i = 0; i < td; ++i) {
    if (!planes[i]) continue;
    for (int64_t c = 0; c < cin; ++c) {
      const T* xc = planes[i] + group + c * cs + q0;  // the (H, W) taps of a channel share lines
      const T* wc = wt + (i * hw * cin + c) * CO;
      for (int64_t t = 0; t < hw; ++t) {
        const T* x = xc + flat[t];
        const T* wk = wc + t * cin * CO;
        V wv[CO];
#pragma GCC unroll 8
        for (int o = 0; o < CO; ++o) wv[o] = broadcast<V>(wk + o);
#pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) {
          const V xv = *reinterpret_cast<const U*>(x + b * L);
#pragma GCC unroll 8
          for (int o = 0; o < CO; ++o) acc[b][o] += xv * wv[o];
        }
      }
    }
  }
}

// Columns [0, cols) of one W residue of a row: channel c of column j is sums[c * block + j]
// plus start[c], stored at out + j * os[3] + c. Channel by channel, a tight loop each
// (columns os[3] apart, contiguous for one residue of one channel); the block's lines
// stay in L1 until every channel has been stored.
template <typename T, int CO>
static inline void store_columns(const CtJob& job, char* out, const T* sums, int64_t block,
                                 int64_t cols, const T* start) {
  const int64_t step = job.os[3], channels = job.groups * CO;
  if (job.out_half) {
    const int64_t oi = 2;
    for (int64_t j = 0; j < cols; ++j) {
      T px[CT_PLANAR_MAX_ROW];
      for (int64_t c = 0; c < channels; ++c) px[c] = sums[c * block + j] + start[c];
      store_out(job.out_half, out + j * step * oi, px, channels);
    }
    return;
  }
  T* o = reinterpret_cast<T*>(out);
  if (step == 1) {  // one channel, one residue: a plain run
    for (int64_t j = 0; j < cols; ++j) o[j] = sums[j] + start[0];
    return;
  }
  for (int64_t c = 0; c < channels; ++c) {
    const T* from = sums + c * block;
    const T b = start[c];
    T* to = o + c;
    for (int64_t j = 0; j < cols; ++j) to[j * step] = from[j] + b;
  }
}

// Columns [0, cols) of every residue at once, where a column's residues lie one after
// another (residue stride == channels): the output is one run of cols * rc values, value
// e channel e % rc (residue-major) of column e / rc, gathered from the block's sums a
// vector at a time (`idx`: lane offsets of one vector per value of a column, L columns'
// worth; `bias` alike) and stored whole. Strided a channel at a time, each value was a
// store of its own (3 -> 6 g3 k4 s2 on 4x279x266: ~60% of the call).
template <typename T>
static inline void store_run(T* out, const T* sums, int64_t cols, int64_t rc,
                             const int32_t* idx, const T* bias) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  for (int64_t j = 0; j < cols; j += L) {
    const int64_t values = std::min<int64_t>(L, cols - j) * rc;
    for (int64_t e = 0; e < values; e += L) {
      const V v = gather_at<V>(sums + j, idx + e) + *reinterpret_cast<const U*>(bias + e);
      store_lanes(std::min<int64_t>(L, values - e), out + j * rc + e, v);
    }
  }
}

template <typename T, int CO>
static void planar_rows(const CtJob& job) {
  typedef typename Vec<T>::v V;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int NB = PlanarBlock<CO>::NB;
  constexpr int64_t BLOCK = NB * L;  // pixels a block computes
  const int64_t cin = job.cin, cs = job.cs, pitch = job.xs[2], wcount = job.wcount;
  const int64_t td = job.ntaps[0], th = job.ntaps[1], res = job.res, groups = job.groups;
  const int64_t chunks = std::max<int64_t>(1, job.chunks);  // of CO outputs per conv group
  const int64_t channels = groups * CO;  // of one output pixel
  // Per W residue: the flat offsets of its (H, W) taps, where its weights start in a
  // group's, and its taps.
  std::vector<int64_t> flat, flat_at(res + 1, 0), w_at(res + 1, 0);
  for (int64_t r = 0, k0 = 0; r < res; k0 += job.res_taps[r], ++r) {
    for (int64_t j = 0; j < th; ++j)
      for (int64_t k = 0; k < job.res_taps[r]; ++k)
        flat.push_back(job.off[1][j] * pitch + job.res_off[k0 + k]);
    flat_at[r + 1] = static_cast<int64_t>(flat.size());
    w_at[r + 1] = w_at[r] + td * (flat_at[r + 1] - flat_at[r]) * cin * CO;
  }
  const int64_t group_w = w_at[res];  // a conv group's weights, every residue's
  std::vector<const T*> planes(td);
  const T* x = static_cast<const T*>(job.x);
  const T* wt = static_cast<const T*>(job.w);
  const T* bias = static_cast<const T*>(job.bias);
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  char* out = static_cast<char*>(job.out);
  // A block's sums, [residue][channel][pixel]: each output pixel's channels of every
  // residue, gathered from here, are one run of the output row.
  // (A vector of T, aligned by hand: std::vector<V> drops V's alignment.)
  // (store_run's gathers read up to L - 1 values past a channel's block)
  std::vector<T> sums_storage(res * channels * BLOCK + 2 * L);
  T* sums = sums_storage.data() + (L - reinterpret_cast<uintptr_t>(sums_storage.data()) /
                                           sizeof(T) % L) % L;
  std::vector<T> start(channels, T(0));  // what each channel's sums start from: the bias
  if (bias) std::copy(bias, bias + channels, start.begin());
  // store_run's gather offsets and bias, L columns of every residue's channels, where a
  // column's residues lie one after another (float and double outputs)
  const int64_t rc = res * channels;
  const bool runs = !job.out_half && job.res_stride == channels && job.os[3] == rc;
  std::vector<int32_t> run_idx(runs ? L * rc : 0);
  std::vector<T> run_bias(runs ? L * rc : 0);
  for (int64_t e = 0; e < (int64_t)run_idx.size(); ++e) {
    run_idx[e] = static_cast<int32_t>(e % rc * BLOCK + e / rc);
    run_bias[e] = start[e % rc % channels];
  }
  // Claims of whole rows, enough of them for a few blocks' run.
  RowClaims claims(job, (4 * BLOCK + pitch - 1) / pitch);
  for (int64_t run0, run1; claims.next(run0, run1);) {
    for (int64_t r = run0; r < run1;) {
      const RowPos pos = row_at(job.box, r);
      const int64_t rows = std::min(run1 - r, job.box[5] - pos.h);  // within the plane
      for (int64_t i = 0; i < td; ++i) {
        const int64_t id = pos.d * job.step[0] + job.off[0][i];
        planes[i] = id >= 0 && id < job.in_dims[0]
                        ? x + pos.n * job.xs[0] + id * job.xs[1] + pos.h * pitch : nullptr;
      }
      char* orow = out + out_row_offset(job, pos, oi);
      const int64_t end = (rows - 1) * pitch + wcount;  // the last row's columns past
      for (int64_t q0 = 0; q0 < end; q0 += BLOCK) {     // wcount are not needed
        with_count<NB>(std::min<int64_t>(NB, (end - q0 + L - 1) / L), [&](auto nb) {
          constexpr int N = decltype(nb)::value;
          for (int64_t rs = 0; rs < res; ++rs)
            for (int64_t g = 0; g < groups; ++g) {
              V acc[N][CO];
              planar_block<T, CO, N>(acc, planes.data(), td, flat.data() + flat_at[rs],
                                     flat_at[rs + 1] - flat_at[rs], g / chunks * cin * cs,
                                     cin, cs, wt + g * group_w + w_at[rs], q0);
              T* at = sums + (rs * channels + g * CO) * BLOCK;
#pragma GCC unroll 8
              for (int o = 0; o < CO; ++o)
#pragma GCC unroll 16
                for (int b = 0; b < N; ++b)
                  *reinterpret_cast<V*>(at + o * BLOCK + b * L) = acc[b][o];
            }
        });
        // Pixel q of the run is output (row q / pitch, column q % pitch): columns past a
        // residue's count (and lanes past the run) summed whatever lay there, dropped.
        const int64_t n = std::min<int64_t>(BLOCK, end - q0);
        for (int64_t p = 0; p < n;) {
          const int64_t row = (q0 + p) / pitch, col = q0 + p - row * pitch;
          const int64_t seg = std::min(n - p, pitch - col);  // to the pitch's end
          char* dst = orow + (row * job.os[2] + col * job.os[3]) * oi;
          int64_t whole = runs ? seg : 0;  // columns every residue has
          for (int64_t rs = 0; rs < res; ++rs)
            whole = std::min(whole, job.res_count[rs] - col);
          if (whole >= L) {
            store_run(reinterpret_cast<T*>(dst), sums + p, whole, rc, run_idx.data(),
                      run_bias.data());
            p += whole;
            continue;
          }
          for (int64_t rs = 0; rs < res; ++rs) {
            const int64_t cols = std::min(seg, job.res_count[rs] - col);
            if (cols <= 0) break;  // and the later residues, of no more columns
            store_columns<T, CO>(job, dst + rs * job.res_stride * oi,
                                 sums + rs * channels * BLOCK + p, BLOCK, cols, start.data());
          }
          p += seg;
        }
      }
      r += rows;
    }
  }
}

template <typename T>
static void run_planar(const CtJob& job) {
  switch (job.cout) {
    case 1: planar_rows<T, 1>(job); break;
    case 2: planar_rows<T, 2>(job); break;
    case 3: planar_rows<T, 3>(job); break;
    case 4: planar_rows<T, 4>(job); break;
    case 5: planar_rows<T, 5>(job); break;
    case 6: planar_rows<T, 6>(job); break;
    case 7: planar_rows<T, 7>(job); break;
    case 8: planar_rows<T, 8>(job); break;
  }
}
