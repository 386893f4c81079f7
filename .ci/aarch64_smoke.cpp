// The portable kernel (generic::correlate), compiled for aarch64 and run under qemu by
// .ci/aarch64_check: a 1-D correlation in CT_MODE_CHANNELS against a plain loop, for
// float32 and float64, with few input channels (sums in registers across taps) and more.
#include <cmath>
#include <cstdio>
#include <vector>

#include "../src/convtranspose/csrc/correlate_api.h"

// The kernel asks this thread's stop (Ctrl-C) between runs of rows; module.cpp, which
// defines it, is not linked here: none.
__thread CtStop* ct_stop = nullptr;

template <typename T>
static int check(int64_t cin, int64_t cout) {
  const int64_t W = 11, K = 3, WO = W - K + 1;
  const int64_t L = generic::lanes(sizeof(T)), cw_full = generic::max_vectors() * L;
  const int64_t cpad = (cout + L - 1) / L * L;
  std::vector<T> x(W * cin), w(K * cin * cout), packed(K * cin * cpad, 0), out(WO * cout, 0);
  for (size_t i = 0; i < x.size(); ++i) x[i] = T(int(i * 7 % 13) - 6) / 4;
  for (size_t i = 0; i < w.size(); ++i) w[i] = T(int(i * 5 % 11) - 5) / 8;
  // The CHANNELS layout: columns padded to whole vectors, in chunks of up to cw_full
  // columns, each chunk [tap][c][column].
  for (int64_t c0 = 0; c0 < cpad; c0 += cw_full) {
    const int64_t cwid = cpad - c0 < cw_full ? cpad - c0 : cw_full;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < cin; ++c)
        for (int64_t j = 0; j < cwid && c0 + j < cout; ++j)
          packed[K * cin * c0 + (k * cin + c) * cwid + j] = w[(k * cin + c) * cout + c0 + j];
  }
  const int64_t zero[1] = {0}, offs[K] = {0, 1, 2};
  CtJob job{};
  job.itemsize = sizeof(T);
  job.mode = CT_MODE_CHANNELS;
  job.x = x.data();
  job.xs[0] = job.xs[1] = job.xs[2] = W * cin;
  job.xs[3] = cin;
  job.in_dims[0] = job.in_dims[1] = 1;
  job.in_dims[2] = W;
  job.w = packed.data();
  job.off[0] = job.off[1] = zero;
  job.off[2] = offs;
  job.ntaps[0] = job.ntaps[1] = 1;
  job.ntaps[2] = K;
  job.step[0] = job.step[1] = job.step[2] = 1;
  job.out = out.data();
  job.os[0] = job.os[1] = job.os[2] = WO * cout;
  job.os[3] = cout;
  job.box[1] = job.box[3] = job.box[5] = 1;
  job.wcount = WO;
  job.cin = cin;
  job.cout = cout;
  job.sharers = 1;
  generic::correlate(job);
  double worst = 0;
  for (int64_t p = 0; p < WO; ++p)
    for (int64_t o = 0; o < cout; ++o) {
      double want = 0;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < cin; ++c)
          want += double(x[(p + k) * cin + c]) * double(w[(k * cin + c) * cout + o]);
      worst = std::fmax(worst, std::fabs(want - double(out[p * cout + o])));
    }
  const bool ok = worst < 1e-4;
  std::printf("%s float%d cin %lld cout %lld: max error %.2g\n", ok ? "ok  " : "FAIL",
              int(8 * sizeof(T)), (long long)cin, (long long)cout, worst);
  return ok ? 0 : 1;
}

int main() {
  return check<float>(2, 3) | check<float>(5, 9) | check<double>(3, 5) | check<double>(6, 4);
}
