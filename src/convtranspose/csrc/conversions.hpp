// Conversions that the Python side runs on the compiled kernel: the `indexed` algorithm's
// gather and sum, rounding to and widening from half precision, and Winograd F(2,3)'s
// input transform along D. Part of the kernel: correlate.hpp includes it inside the
// build's namespace (CT_NS).

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
