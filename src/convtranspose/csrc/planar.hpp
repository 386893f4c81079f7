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
// Weight [tap][c][co] (taps D-major, then H, then W), C_out/g = CO unpadded.
// NB vectors of pixels by CO outputs: NB * CO sums, CO broadcast weights and one input
// vector live in registers.
template <int CO> struct PlanarBlock {
  static constexpr int NB = CT_NREGS == 32 ? (CO == 1 ? 16 : CO == 2 ? 12 : CO == 3 ? 8 : 6)
                                           : (CO == 1 ? 12 : CO == 2 ? 6 : CO == 3 ? 4 : 2);
};

// The sums of NB vectors of a run's pixels from q0 on, over every tap and channel:
// planes[i] is D tap i's input plane (null outside the input), flat[t] the offset of
// (H, W) tap t in it.
template <typename T, int CO, int NB, typename V>
static inline void planar_block(V (&acc)[NB][CO], const T* const* planes, int64_t td,
                                const int64_t* flat, int64_t hw, int64_t cin, int64_t cs,
                                const T* wt, int64_t q0) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
#pragma GCC unroll 16
  for (int b = 0; b < NB; ++b)
#pragma GCC unroll 4
    for (int o = 0; o < CO; ++o) acc[b][o] = V{};
  for (int64_t i = 0; i < td; ++i) {
    if (!planes[i]) continue;
    for (int64_t c = 0; c < cin; ++c) {
      const T* xc = planes[i] + c * cs + q0;  // the (H, W) taps of a channel share lines
      const T* wc = wt + (i * hw * cin + c) * CO;
      for (int64_t t = 0; t < hw; ++t) {
        const T* x = xc + flat[t];
        const T* wk = wc + t * cin * CO;
        V wv[CO];
#pragma GCC unroll 4
        for (int o = 0; o < CO; ++o) wv[o] = broadcast<V>(wk + o);
#pragma GCC unroll 16
        for (int b = 0; b < NB; ++b) {
          const V xv = *reinterpret_cast<const U*>(x + b * L);
#pragma GCC unroll 4
          for (int o = 0; o < CO; ++o) acc[b][o] += xv * wv[o];
        }
      }
    }
  }
}

template <typename T, int CO>
static void planar_rows(const CtJob& job) {
  typedef typename Vec<T>::v V;
  constexpr int L = CT_VBYTES / sizeof(T);
  constexpr int NB = PlanarBlock<CO>::NB;
  const int64_t cin = job.cin, cs = job.cs, pitch = job.xs[2], wcount = job.wcount;
  const int64_t td = job.ntaps[0], hw = job.ntaps[1] * job.ntaps[2];
  std::vector<int64_t> flat(hw);
  for (int64_t j = 0; j < job.ntaps[1]; ++j)
    for (int64_t k = 0; k < job.ntaps[2]; ++k)
      flat[j * job.ntaps[2] + k] = job.off[1][j] * pitch + job.off[2][k];
  std::vector<const T*> planes(td);
  const T* x = static_cast<const T*>(job.x);
  const T* wt = static_cast<const T*>(job.w);
  const T* bias = static_cast<const T*>(job.bias);
  const int64_t oi = job.out_half ? 2 : sizeof(T);
  char* out = static_cast<char*>(job.out);
  // Claims of whole rows, enough of them for a few blocks' run.
  RowClaims claims(job, (4 * NB * L + pitch - 1) / pitch);
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
      for (int64_t q0 = 0; q0 < end; q0 += NB * L) {    // wcount are not needed
        with_count<NB>(std::min<int64_t>(NB, (end - q0 + L - 1) / L), [&](auto nb) {
          constexpr int N = decltype(nb)::value;
          V acc[N][CO];
          planar_block<T, CO, N>(acc, planes.data(), td, flat.data(), hw, cin, cs, wt, q0);
          alignas(64) T sums[CO][N * L];
#pragma GCC unroll 4
          for (int o = 0; o < CO; ++o)
#pragma GCC unroll 16
            for (int b = 0; b < N; ++b) *reinterpret_cast<V*>(&sums[o][b * L]) = acc[b][o];
          // Pixel q of the run is output (row q / pitch, column q % pitch): columns past
          // wcount (and lanes past the run) summed whatever lay there and are dropped.
          const int64_t n = std::min<int64_t>(N * L, end - q0);
          int64_t row = q0 / pitch, col = q0 - row * pitch;
          for (int64_t p = 0; p < n; ++p) {
            if (col < wcount) {
              T px[CO];
#pragma GCC unroll 4
              for (int o = 0; o < CO; ++o) px[o] = sums[o][p] + (bias ? bias[o] : T(0));
              store_out(job.out_half, orow + (row * job.os[2] + col * job.os[3]) * oi, px, CO);
            }
            if (++col == pitch) col = 0, ++row;
          }
        });
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
  }
}
