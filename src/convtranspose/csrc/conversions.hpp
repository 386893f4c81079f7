// Conversions that the Python side runs on the compiled kernel: the `indexed` algorithm's
// gather and sum, the `cols` algorithm's gather (col2im), rounding to and widening from
// half precision, and Winograd F(2,3)'s input transform along D. Part of the kernel:
// correlate.hpp includes it inside the build's namespace (CT_NS).

#if CT_PART_HAS(3)
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

// col2im's geometry (geo: batch, in (3), out (3), kernel (3), stride (3), dilation (3),
// padding before (3)), and the (input position, tap) pairs that land on output position o
// along axis 0 or 1.
struct Col2imGeometry {
  const int64_t *in, *os, *k, *st, *dil, *pad;
  explicit Col2imGeometry(const int64_t* geo)
      : in(geo + 1), os(geo + 4), k(geo + 7), st(geo + 10), dil(geo + 13), pad(geo + 16) {}
  void reaching(int axis, int64_t o, std::vector<std::pair<int64_t, int64_t>>& list) const {
    list.clear();
    for (int64_t t = 0; t < k[axis]; ++t) {
      const int64_t at = o + pad[axis] - t * dil[axis];
      if (at >= 0 && at % st[axis] == 0 && at / st[axis] < in[axis])
        list.emplace_back(at / st[axis], t);
    }
  }
};

// The `cols` forward's gather (kernels/cols.py) into the output box = n0, n1, d0, d1, h0,
// h1, w0, w1: every position the sum of the products of the (input pixel, tap) pairs that
// land on it, plus the bias. cols: (batch, ID, IH, IW, groups, taps, cog), the products of
// every input pixel with every tap; out: (batch, OD, OH, OW, groups * cog). geo: batch,
// in (3), out (3), kernel (3), stride (3), dilation (3), padding before (3). Every
// position in the box is written (the bias or zero where no tap lands).
// A W tap's products of neighbouring input pixels land on the output row s_w apart, on one
// W residue. So a vector of one residue's neighbouring outputs (of one channel) sums, in
// registers, one vector of products per (W tap of that residue, (D, H) tap pair reaching
// the row), gathered a pixel of cols apart and masked where the tap lands outside the
// input row; the residues' sums are then interleaved into the row. Every position adds the
// same terms in the same order (zeros for lanes masked) however the output is cut into
// boxes. (One product at a time, 64 -> 1 k7 s2 d2 gathered 3.3 M products in 2.0 ms on
// two threads.)
template <typename T>
static void col2im_typed(const T* cols, T* out, const T* bias, const int64_t* geo,
                         int64_t groups, int64_t cog, const int64_t* box) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int64_t L = CT_VBYTES / sizeof(T);
  const Col2imGeometry geometry(geo);
  const int64_t *in = geometry.in, *os = geometry.os, *k = geometry.k;
  const int64_t taps = k[0] * k[1] * k[2], cout = groups * cog, pixel = groups * taps * cog;
  const int64_t w0 = box[6], w1 = box[7], s = geometry.st[2], width = w1 - w0;
  // Input pixel iw's W tap kw lands on ow = iw * s + kw * d - p, position j = ow - w0 of
  // the box's row: residue j % s, place j / s = iw + shift[kw]. The taps of each residue.
  std::vector<int64_t> shift(k[2]);
  std::vector<std::vector<int64_t>> of_residue(s);
  for (int64_t kw = 0; kw < k[2]; ++kw) {
    const int64_t e = kw * geometry.dil[2] - geometry.pad[2] - w0;
    shift[kw] = floor_div(e, s);
    of_residue[e - shift[kw] * s].push_back(kw);
  }
  const int64_t places = (width + s - 1) / s, padded = (places + L - 1) / L * L;
  std::vector<T> sums(s * padded);  // one channel's: [residue][place]
  std::vector<std::pair<int64_t, int64_t>> along_d;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> along_hs(box[5] - box[4]);
  for (int64_t oh = box[4]; oh < box[5]; ++oh) geometry.reaching(1, oh, along_hs[oh - box[4]]);
  // Per (D, H) tap pair reaching the row: its input row's products of the pair's taps
  // (W tap 0, group 0, channel 0).
  std::vector<const T*> base;
  for (int64_t n = box[0]; n < box[1]; ++n)
    for (int64_t od = box[2]; od < box[3]; ++od) {
      geometry.reaching(0, od, along_d);
      for (int64_t oh = box[4]; oh < box[5]; ++oh) {
        base.clear();
        for (const auto& [id, kd] : along_d)
          for (const auto& [ih, kh] : along_hs[oh - box[4]])
            base.push_back(cols + ((n * in[0] + id) * in[1] + ih) * in[2] * pixel +
                           (kd * k[1] + kh) * k[2] * cog);
        const int64_t count = (int64_t)base.size();
        T* o = out + (((n * os[0] + od) * os[1] + oh) * os[2] + w0) * cout;
        for (int64_t g = 0, c = 0; g < groups; ++g)
          for (int64_t co = 0; co < cog; ++co, ++c) {
            for (int64_t r = 0; r < s; ++r)
              for (int64_t q0 = 0; q0 < places; q0 += L) {
                // Four sums, the (tap, pair) terms taken in turn: chains of adds in flight.
                V s0{}, s1{}, s2{}, s3{};
                for (const int64_t kw : of_residue[r]) {
                  // lanes whose input pixel q0 + lane - shift lies in the row
                  const int64_t first = q0 - shift[kw];
                  const int64_t lo = std::max<int64_t>(0, -first);
                  const int64_t hi = std::min<int64_t>(L, in[2] - first);
                  if (lo >= hi) continue;
                  const int64_t off = first * pixel + (g * taps + kw) * cog + co;
                  int64_t i = 0;
                  for (; i + 4 <= count; i += 4) {
                    s0 += gather_range<V>(lo, hi, base[i] + off, pixel);
                    s1 += gather_range<V>(lo, hi, base[i + 1] + off, pixel);
                    s2 += gather_range<V>(lo, hi, base[i + 2] + off, pixel);
                    s3 += gather_range<V>(lo, hi, base[i + 3] + off, pixel);
                  }
                  if (i < count) s0 += gather_range<V>(lo, hi, base[i] + off, pixel);
                  if (i + 1 < count) s1 += gather_range<V>(lo, hi, base[i + 1] + off, pixel);
                  if (i + 2 < count) s2 += gather_range<V>(lo, hi, base[i + 2] + off, pixel);
                }
                *reinterpret_cast<U*>(sums.data() + r * padded + q0) = (s0 + s1) + (s2 + s3);
              }
            const T b = bias ? bias[c] : T(0);
            for (int64_t q = 0, j = 0; q < places; ++q)  // position j = q * s + residue
              for (int64_t r = 0; r < s && j < width; ++r, ++j)
                o[j * cout + c] = sums[r * padded + q] + b;
          }
      }
    }
}

// col2im where a pixel's W taps land on neighbouring outputs (dilation 1 along W, several
// output channels a group): per (D, H) tap pair, each input pixel's run of W taps (taps *
// C_out contiguous products; with several groups, a run of C_out/g per group and tap) is
// added to one run of the output row (192 -> 3 k4 s2 on 26924 pixels: 0.55 -> 0.38 ms a
// call, where each W tap's outputs were gathered at the stride). Each position adds its
// products in one order, whichever box holds it: (D, H) tap pairs, then input pixels
// along W.
template <typename T>
static void col2im_runs(const T* cols, T* out, const T* bias, const int64_t* geo,
                        int64_t groups, int64_t cog, const int64_t* box) {
  const Col2imGeometry geometry(geo);
  const int64_t *in = geometry.in, *os = geometry.os, *k = geometry.k, *st = geometry.st,
                *pad = geometry.pad;
  const int64_t taps = k[0] * k[1] * k[2], cout = groups * cog, pixel = taps * cout;
  const int64_t w0 = box[6], w1 = box[7];
  const auto ceil_div = [](int64_t a, int64_t b) { return -floor_div(-a, b); };
  // Per W tap: the input pixels [from, to) whose outputs iw * s + kw - p lie in [w0, w1).
  std::vector<int64_t> from(k[2]), to(k[2]);
  for (int64_t kw = 0; kw < k[2]; ++kw) {
    const int64_t shift = kw - pad[2];
    from[kw] = std::max<int64_t>(0, ceil_div(w0 - shift, st[2]));
    to[kw] = std::max(from[kw],
                      std::min<int64_t>(in[2], floor_div(w1 - 1 - shift, st[2]) + 1));
  }
  // the input pixels that land every tap inside [w0, w1) need no clipping
  const int64_t whole0 = from[0], whole1 = to[k[2] - 1];
  const int64_t first = std::min(from[k[2] - 1], from[0]), last = std::max(to[0], to[k[2] - 1]);
  std::vector<std::pair<int64_t, int64_t>> along_d, along_h;
  for (int64_t n = box[0]; n < box[1]; ++n)
    for (int64_t od = box[2]; od < box[3]; ++od) {
      geometry.reaching(0, od, along_d);
      for (int64_t oh = box[4]; oh < box[5]; ++oh) {
        geometry.reaching(1, oh, along_h);
        T* o = out + ((n * os[0] + od) * os[1] + oh) * os[2] * cout;
        for (int64_t w = w0; w < w1; ++w)
          for (int64_t c = 0; c < cout; ++c) o[w * cout + c] = bias ? bias[c] : T(0);
        for (const auto& [id, kd] : along_d)
          for (const auto& [ih, kh] : along_h) {
            const T* row = cols + ((n * in[0] + id) * in[1] + ih) * in[2] * pixel +
                           (kd * k[1] + kh) * k[2] * cog;
            for (int64_t iw = first; iw < last; ++iw) {
              int64_t t0 = 0, t1 = k[2];
              if (iw < whole0 || iw >= whole1) {  // clipped at w0 or w1
                while (t0 < k[2] && !(iw >= from[t0] && iw < to[t0])) ++t0;
                t1 = t0;
                while (t1 < k[2] && iw >= from[t1] && iw < to[t1]) ++t1;
                if (t0 >= t1) continue;
              }
              const T* __restrict src = row + iw * pixel + t0 * cog;
              T* __restrict dst = o + (iw * st[2] - pad[2] + t0) * cout;
              if (groups == 1) {
                const int64_t m = (t1 - t0) * cout;
                for (int64_t j = 0; j < m; ++j) dst[j] += src[j];
                continue;
              }
              for (int64_t g = 0; g < groups; ++g)  // group g's products: taps * cog on
                for (int64_t t = 0; t < t1 - t0; ++t)
                  for (int64_t j = 0; j < cog; ++j)
                    dst[t * cout + g * cog + j] += src[g * taps * cog + t * cog + j];
            }
          }
      }
    }
}

// The run-by-run add where `runs` (kernels/cols.py's runs_along_w decides; the binding
// takes it only with dilation 1 along W), else the gathers.
template <typename T>
static void col2im_any(const T* cols, T* out, const T* bias, const int64_t* geo, int64_t groups,
                       int64_t cog, const int64_t* box, bool runs) {
  if (runs)
    col2im_runs(cols, out, bias, geo, groups, cog, box);
  else
    col2im_typed(cols, out, bias, geo, groups, cog, box);
}

void col2im(int itemsize, const void* cols, void* out, const void* bias, const int64_t* geo,
            int64_t groups, int64_t cog, const int64_t* box, bool runs) {
  if (itemsize == 4)
    col2im_any(static_cast<const float*>(cols), static_cast<float*>(out),
               static_cast<const float*>(bias), geo, groups, cog, box, runs);
  else
    col2im_any(static_cast<const double*>(cols), static_cast<double*>(out),
               static_cast<const double*>(bias), geo, groups, cog, box, runs);
}

// Transposes an L x L block held as L vectors (row i becomes column i): log2(L) rounds,
// each swapping the off-diagonal sub-blocks of width B between rows i and i + B by
// two-source shuffles (a 16 x 16 float32 block: 64 shuffles, not 256 scalar moves).
#ifndef __clang__
template <typename V, typename M, int L, int B>
static inline void transpose_block(V* r) {
  if constexpr (B >= 1) {
    M lo, hi;  // lanes of (row i, row i + B): lane l of each from a or b (index >= L: b)
    for (int l = 0; l < L; ++l) {
      lo[l] = l & B ? L + l - B : l;
      hi[l] = l & B ? L + l : l + B;
    }
    for (int i = 0; i < L; ++i)
      if (!(i & B)) {
        const V a = r[i], b = r[i + B];
        r[i] = __builtin_shuffle(a, b, lo);
        r[i + B] = __builtin_shuffle(a, b, hi);
      }
    transpose_block<V, M, L, B / 2>(r);
  }
}
#endif

// grad_weight's packed sums (chunks of `chunk` columns, each [tap][row][column]) into one
// group's gw (column, tap, row) for taps [tap0, tap1): whole L x L blocks (L rows of L
// columns) loaded as vectors, transposed in registers and stored as vectors; the blocks
// at the edges value by value.
template <typename T>
static void unpack_grad_weight_typed(const T* part, T* gw, int64_t taps, int64_t rows,
                                     int64_t cols, int64_t chunk, int64_t tap0, int64_t tap1) {
  typedef typename Vec<T>::v V;
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I M __attribute__((vector_size(CT_VBYTES)));
  for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
    const int64_t width = std::min(chunk, cols - c0);
    const T* chunk_start = part + taps * rows * c0;  // the chunks before are whole
    for (int64_t k0 = 0; k0 < width; k0 += L) {
      const int64_t kn = std::min<int64_t>(L, width - k0);
      for (int64_t tap = tap0; tap < tap1; ++tap) {
        const T* src = chunk_start + tap * rows * width + k0;
        T* dst = gw + (c0 + k0) * taps * rows + tap * rows;
        for (int64_t r0 = 0; r0 < rows; r0 += L) {
          const int64_t rn = std::min<int64_t>(L, rows - r0);
#ifndef __clang__  // (GCC's two-source shuffle; clang spells it with constant lanes only)
          if (kn == L && rn == L) {
            V r[L];
            for (int i = 0; i < L; ++i) r[i] = *reinterpret_cast<const U*>(src + (r0 + i) * width);
            transpose_block<V, M, L, L / 2>(r);
            for (int k = 0; k < L; ++k) *reinterpret_cast<U*>(dst + k * taps * rows + r0) = r[k];
            continue;
          }
#endif
          for (int64_t k = 0; k < kn; ++k)
            for (int64_t r = 0; r < rn; ++r)
              dst[k * taps * rows + r0 + r] = src[(r0 + r) * width + k];
        }
      }
    }
  }
}

void unpack_grad_weight(int itemsize, const void* part, void* gw, int64_t taps, int64_t rows,
                        int64_t cols, int64_t chunk, int64_t tap0, int64_t tap1) {
  if (itemsize == 4)
    unpack_grad_weight_typed(static_cast<const float*>(part), static_cast<float*>(gw), taps,
                             rows, cols, chunk, tap0, tap1);
  else
    unpack_grad_weight_typed(static_cast<const double*>(part), static_cast<double*>(gw), taps,
                             rows, cols, chunk, tap0, tap1);
}

// n float32 values to float16 or bfloat16 (CT_HALF_*), rounded as the kernel stores them:
// the `indexed` path's results (NumPy's float16 rounding took 10 of W9's 40 us).
void round_half(int kind, const float* src, void* dst, int64_t n) {
  store_out<float>(kind, static_cast<char*>(dst), src, n);
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
#endif  // CT_PART_HAS(3)
