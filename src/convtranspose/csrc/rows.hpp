// The rows of a job's box, and the pixels of a row each W tap reaches: shared by the
// forward and grad_weight. Part of the kernel: correlate.hpp includes it inside the
// build's namespace (CT_NS).

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
