// convtranspose's transposed convolution as an MLX operation (a Primitive): eval_cpu runs
// convtranspose's compiled kernel (csrc/correlate.hpp, reached through the C function table
// of convtranspose._native, ct_capi.h) on MLX's buffers, on MLX's CPU stream, without
// Python. Two primitives share one evaluation: the forward F(x, w) and its grad_input
// GI(dy, w), a strided correlation. Both are linear in each argument, and each is the
// other's input gradient, so vjp/jvp are built from F, GI and grad_weight (MLX ops, one
// matmul per tap), and every order of derivative stays an MLX graph.
//
// Geometry is lifted to 3-D: a 1-D or 2-D call gets leading axes of size 1, kernel 1.

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

#include "ct_capi.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

const CtCapi* g_api = nullptr;

// One call's settings, lifted to 3-D (leading axes: kernel 1, stride 1, no padding).
struct Geometry {
  int ndim = 3;
  int groups = 1;
  int stride[3] = {1, 1, 1};
  int padding[3] = {0, 0, 0};
  int dilation[3] = {1, 1, 1};
  int output_padding[3] = {0, 0, 0};
  // How the kernel runs; not part of what the operation computes: threads, and the output
  // size from which it leaves by non-temporal stores (_plan.STREAM_OUTPUT_FROM_BYTES).
  int threads = 1;
  int64_t stream_from = INT64_MAX;

  bool same_as(const Geometry& o) const {
    return ndim == o.ndim && groups == o.groups &&
           std::equal(stride, stride + 3, o.stride) &&
           std::equal(padding, padding + 3, o.padding) &&
           std::equal(dilation, dilation + 3, o.dilation) &&
           std::equal(output_padding, output_padding + 3, o.output_padding);
  }
};

Geometry make_geometry(int ndim, const std::vector<int>& stride, const std::vector<int>& padding,
                       const std::vector<int>& dilation, const std::vector<int>& output_padding,
                       int groups, int threads, int64_t stream_from) {
  if (ndim < 1 || ndim > 3) throw std::invalid_argument("convtranspose: ndim must be 1, 2 or 3");
  auto check = [&](const std::vector<int>& v, const char* name) {
    if (static_cast<int>(v.size()) != ndim) {
      std::ostringstream msg;
      msg << "convtranspose: '" << name << "' needs " << ndim << " values";
      throw std::invalid_argument(msg.str());
    }
  };
  check(stride, "stride");
  check(padding, "padding");
  check(dilation, "dilation");
  check(output_padding, "output_padding");
  Geometry g;
  g.ndim = ndim;
  g.groups = groups;
  g.threads = std::max(1, threads);
  g.stream_from = stream_from;
  const int lift = 3 - ndim;
  for (int a = 0; a < ndim; ++a) {
    g.stride[lift + a] = stride[a];
    g.padding[lift + a] = padding[a];
    g.dilation[lift + a] = dilation[a];
    g.output_padding[lift + a] = output_padding[a];
    if (stride[a] < 1 || dilation[a] < 1 || groups < 1)
      throw std::invalid_argument("convtranspose: stride, dilation and groups must be >= 1");
  }
  return g;
}

// The 3-D extents of an (N, *spatial, C) shape: {N, D, H, W, C}.
std::vector<int64_t> lifted(const mx::Shape& s, int ndim) {
  std::vector<int64_t> out(5, 1);
  out[0] = s[0];
  for (int a = 0; a < ndim; ++a) out[1 + 3 - ndim + a] = s[1 + a];
  out[4] = s.back();
  return out;
}

int64_t out_size(int64_t in, int64_t k, const Geometry& g, int a) {
  return (in - 1) * g.stride[a] - 2 * g.padding[a] + g.dilation[a] * (k - 1) +
         g.output_padding[a] + 1;
}

void check_operands(const char* op, const mx::array& a, const mx::array& w, const Geometry& g) {
  const int rank = g.ndim + 2;
  if (static_cast<int>(a.ndim()) != rank || static_cast<int>(w.ndim()) != rank) {
    std::ostringstream msg;
    msg << op << ": input and weight must have " << rank << " dimensions";
    throw std::invalid_argument(msg.str());
  }
  if (a.dtype() != w.dtype() || (a.dtype() != mx::float32 && a.dtype() != mx::float64)) {
    std::ostringstream msg;
    msg << op << ": input and weight must both be float32 or both float64";
    throw std::invalid_argument(msg.str());
  }
  if (w.shape(0) % g.groups) {
    std::ostringstream msg;
    msg << op << ": groups=" << g.groups << " must divide the weight's C_out=" << w.shape(0);
    throw std::invalid_argument(msg.str());
  }
}

// --- Evaluation ----------------------------------------------------------------------------

// A read-only view of an (N, ..., C) operand as the kernel wants it: channels contiguous,
// element strides n, d, h, w. A copy where MLX's layout has strided channels.
struct View {
  const void* data;
  int64_t strides[4];
  std::vector<int64_t> dims;  // N, D, H, W, C
  std::shared_ptr<void> copy;
};

template <typename T>
void gather(const T* src, const mx::Shape& shape, const mx::Strides& strides, T* dst) {
  const int nd = static_cast<int>(shape.size());
  const int64_t total = std::accumulate(shape.begin(), shape.end(), int64_t{1},
                                        std::multiplies<int64_t>());
  std::vector<int64_t> idx(nd, 0);
  for (int64_t i = 0; i < total; ++i) {
    int64_t off = 0;
    for (int a = 0; a < nd; ++a) off += idx[a] * strides[a];
    dst[i] = src[off];
    for (int a = nd - 1; a >= 0; --a) {
      if (++idx[a] < shape[a]) break;
      idx[a] = 0;
    }
  }
}

template <typename T>
View view_of(const mx::array& a, int ndim, bool need_contiguous) {
  View v;
  v.dims = lifted(a.shape(), ndim);
  const bool channels_in_place = a.shape().back() == 1 || a.strides().back() == 1;
  if (!need_contiguous && channels_in_place) {
    // MLX's strides as they are; a lifted axis has extent 1 (any stride).
    v.data = a.data<T>();
    v.strides[0] = a.strides()[0];
    for (int i = 1; i < 4; ++i) v.strides[i] = 0;
    for (int k = 0; k < ndim; ++k) v.strides[1 + 3 - ndim + k] = a.strides()[1 + k];
    return v;
  }
  if (a.flags().row_contiguous) {
    v.data = a.data<T>();
  } else {
    T* buf = static_cast<T*>(std::malloc(sizeof(T) * std::max<size_t>(1, a.size())));
    gather(a.data<T>(), a.shape(), a.strides(), buf);
    v.copy.reset(buf, std::free);
    v.data = buf;
  }
  v.strides[3] = v.dims[4];  // row-major (N, D, H, W, C)
  v.strides[2] = v.dims[3] * v.strides[3];
  v.strides[1] = v.dims[2] * v.strides[2];
  v.strides[0] = v.dims[1] * v.strides[1];
  return v;
}

void* aligned(size_t bytes) {
  return std::aligned_alloc(64, (std::max<size_t>(bytes, 64) + 63) / 64 * 64);
}

// Jobs of one evaluation, with what they point at.
struct Batch {
  std::vector<CtJob> jobs;
  std::vector<std::vector<int64_t>> offsets;  // each job's three offset arrays
  std::vector<std::shared_ptr<void>> packed;
  std::unique_ptr<std::atomic<int64_t>[]> cursors;
  int threads = 1;
};

void run_batch(Batch& b) {
  if (b.jobs.empty()) return;
  if (b.threads <= 1) {
    for (const CtJob& j : b.jobs) g_api->correlate(&j);
    return;
  }
  b.cursors.reset(new std::atomic<int64_t>[b.jobs.size()]);
  for (size_t i = 0; i < b.jobs.size(); ++i) {
    b.cursors[i].store(0);
    b.jobs[i].cursor = reinterpret_cast<int64_t*>(&b.cursors[i]);
    b.jobs[i].sharers = b.threads;
  }
  g_api->run_shared(
      [](void* ctx) {
        for (const CtJob& j : static_cast<Batch*>(ctx)->jobs) g_api->correlate(&j);
      },
      &b, b.threads);
}

// Packs the weight (C_out, K, C_in/g) contiguous: `table` (taps x cols) names each
// column's source element, rows `row_stride` apart.
std::shared_ptr<void> pack(int item, const void* w, const std::vector<int64_t>& table,
                           int64_t taps, int64_t cols, int64_t rows, int64_t row_stride) {
  const int64_t lanes = g_api->lanes(item);
  const int64_t padded = (cols + lanes - 1) / lanes * lanes;
  std::shared_ptr<void> out(aligned(taps * rows * padded * item), std::free);
  g_api->pack(item, w, table.data(), taps, cols, rows, row_stride, padded,
              lanes * g_api->max_vectors(), out.get());
  return out;
}

enum Kind { FORWARD = 0, GRAD_INPUT = 1 };

// How the kernel lays its vectors (the planner's rule, _plan.native_mode): along the
// channels of a depthwise layer, along the reduction for 1-4 outputs, else along outputs.
int mode_for(int64_t rows, int64_t cols) {
  if (rows == 1 && cols == 1) return CT_MODE_DEPTHWISE;
  if (cols <= 4 && rows >= 8) return CT_MODE_DOT;
  return CT_MODE_CHANNELS;
}

// out = F(x, w) (kind FORWARD) or GI(dy, w) (kind GRAD_INPUT), every buffer MLX's.
// Each is a set of correlations (one per output phase of the forward; one for grad_input)
// of the operand with some of the weight's taps: `rows` channels summed, `cols` produced
// per group.
template <typename T>
void evaluate(Kind kind, const Geometry& g, const mx::array& a, const mx::array& w,
              mx::array& out) {
  const int item = sizeof(T);
  View x = view_of<T>(a, g.ndim, false);
  View wv = view_of<T>(w, g.ndim, true);  // (C_out, kD, kH, kW, C_in/g), contiguous
  const std::vector<int64_t> od = lifted(out.shape(), g.ndim);
  T* o = out.data<T>();
  const int64_t os[4] = {od[1] * od[2] * od[3] * od[4], od[2] * od[3] * od[4], od[3] * od[4],
                         od[4]};
  const int64_t G = g.groups, cout_g = wv.dims[0] / G, cin_g = wv.dims[4];
  const int64_t kern[3] = {wv.dims[1], wv.dims[2], wv.dims[3]};
  const int64_t ktot = kern[0] * kern[1] * kern[2];
  const T* wdata = static_cast<const T*>(wv.data);
  const int64_t rows = kind == FORWARD ? cin_g : cout_g;
  const int64_t cols = kind == FORWARD ? cout_g : cin_g;
  const int mode = mode_for(rows, cols);
  // The weight element of (group, tap, summed channel r, produced channel c).
  auto source = [&](int64_t grp, int64_t kidx, int64_t r, int64_t c) -> int64_t {
    const int64_t co = kind == FORWARD ? c : r, ci = kind == FORWARD ? r : c;
    return ((grp * cout_g + co) * ktot + kidx) * cin_g + ci;
  };
  const int64_t in_dims[3] = {x.dims[1], x.dims[2], x.dims[3]};

  Batch b;
  double flops = 0;
  // One correlation (per group, or one for a depthwise layer) over the taps `ks` (kernel
  // index per axis) reading input offsets `cs`, writing `count` outputs from `op`.
  auto emit = [&](std::vector<int64_t> ks[3], std::vector<int64_t> cs[3], const int64_t* step,
                  T* op, const int64_t* ostr, const int64_t* count) {
    const int64_t taps = ks[0].size() * ks[1].size() * ks[2].size();
    std::vector<int64_t> kidx;
    for (int64_t i : ks[0])
      for (int64_t j : ks[1])
        for (int64_t k : ks[2]) kidx.push_back((i * kern[1] + j) * kern[2] + k);
    const int64_t jobs = mode == CT_MODE_DEPTHWISE ? 1 : G;
    for (int64_t grp = 0; grp < jobs; ++grp) {
      std::shared_ptr<void> packed;
      if (mode == CT_MODE_CHANNELS) {  // [chunk][tap][r][column], by the kernel's packer
        std::vector<int64_t> table(taps * cols);
        for (int64_t t = 0; t < taps; ++t)
          for (int64_t c = 0; c < cols; ++c) table[t * cols + c] = source(grp, kidx[t], 0, c);
        const int64_t row_stride = rows > 1 ? source(grp, 0, 1, 0) - source(grp, 0, 0, 0) : 1;
        packed = pack(item, wdata, table, taps, cols, rows, row_stride);
      } else if (mode == CT_MODE_DOT) {  // [tap][column][r]
        packed.reset(aligned(taps * cols * rows * item), std::free);
        T* p = static_cast<T*>(packed.get());
        for (int64_t t = 0; t < taps; ++t)
          for (int64_t c = 0; c < cols; ++c)
            for (int64_t r = 0; r < rows; ++r) *p++ = wdata[source(grp, kidx[t], r, c)];
      } else {  // [tap][channel], every group's one channel
        packed.reset(aligned(taps * G * item), std::free);
        T* p = static_cast<T*>(packed.get());
        for (int64_t t = 0; t < taps; ++t)
          for (int64_t c = 0; c < G; ++c) *p++ = wdata[source(c, kidx[t], 0, 0)];
      }
      const int64_t cin = mode == CT_MODE_DEPTHWISE ? G : rows;
      const int64_t cout = mode == CT_MODE_DEPTHWISE ? G : cols;
      CtJob j{};
      j.itemsize = item;
      j.mode = mode;
      j.out_half = CT_HALF_NONE;
      j.stream_out = static_cast<int64_t>(out.nbytes()) >= g.stream_from;
      j.x = static_cast<const T*>(x.data) + grp * rows;
      std::copy(x.strides, x.strides + 4, j.xs);
      std::copy(in_dims, in_dims + 3, j.in_dims);
      j.w = packed.get();
      for (int k = 0; k < 3; ++k) {
        j.ntaps[k] = static_cast<int64_t>(cs[k].size());
        j.step[k] = step[k];
        b.offsets.push_back(cs[k]);
      }
      j.out = op + grp * cols;
      std::copy(ostr, ostr + 4, j.os);
      const int64_t box[6] = {0, od[0], 0, count[0], 0, count[1]};
      std::copy(box, box + 6, j.box);
      j.wcount = count[2];
      j.cin = cin;
      j.cout = cout;
      j.sharers = 1;
      flops += 2.0 * od[0] * count[0] * count[1] * count[2] * taps * rows * cols *
               (mode == CT_MODE_DEPTHWISE ? G : 1);
      b.jobs.push_back(j);
      b.packed.push_back(std::move(packed));
    }
  };

  bool zero_first = false;
  if (kind == FORWARD) {
    // One stride-1 correlation per phase (output residues r): see _geometry.py.
    for (int rd = 0; rd < g.stride[0]; ++rd)
      for (int rh = 0; rh < g.stride[1]; ++rh)
        for (int rw = 0; rw < g.stride[2]; ++rw) {
          const int r[3] = {rd, rh, rw};
          int64_t count[3];
          std::vector<int64_t> ks[3], cs[3];
          bool empty = false, untouched = false;
          for (int a = 0; a < 3; ++a) {
            count[a] = std::max<int64_t>(0, (od[1 + a] - r[a] + g.stride[a] - 1) / g.stride[a]);
            for (int64_t k = 0; k < kern[a]; ++k) {
              const int64_t shift = r[a] + g.padding[a] - k * g.dilation[a];
              if (shift % g.stride[a]) continue;
              const int64_t c = shift / g.stride[a];  // exact
              if (std::max<int64_t>(0, -c) < std::min<int64_t>(count[a], x.dims[1 + a] - c)) {
                ks[a].push_back(k);
                cs[a].push_back(c);
              }
            }
            empty = empty || count[a] == 0;
            untouched = untouched || ks[a].empty();
          }
          if (empty) continue;
          if (untouched) {  // no tap reaches this phase: its outputs are zero
            zero_first = true;
            continue;
          }
          const int64_t ostr[4] = {os[0], os[1] * g.stride[0], os[2] * g.stride[1],
                                   os[3] * g.stride[2]};
          const int64_t step[3] = {1, 1, 1};
          emit(ks, cs, step, o + rd * os[1] + rh * os[2] + rw * os[3], ostr, count);
        }
  } else {
    // grad_input: dx[i] = sum over taps k, channels co of dy[i*s + k*d - p, co] w[co, k, ci].
    std::vector<int64_t> ks[3], cs[3];
    for (int a = 0; a < 3; ++a)
      for (int64_t k = 0; k < kern[a]; ++k) {
        ks[a].push_back(k);
        cs[a].push_back(k * g.dilation[a] - g.padding[a]);
      }
    const int64_t count[3] = {od[1], od[2], od[3]};
    const int64_t step[3] = {g.stride[0], g.stride[1], g.stride[2]};
    emit(ks, cs, step, o, os, count);
  }
  // Each job points at its own offset arrays, whose storage is now final.
  for (size_t i = 0; i < b.jobs.size(); ++i)
    for (int k = 0; k < 3; ++k) b.jobs[i].off[k] = b.offsets[3 * i + k].data();
  // Slabs of ~1 MiB of input D rows, every job's slab in turn: a slab's input stays in
  // cache across the phases and groups that read it (the NumPy planner tiles for the same
  // reason; W7, depthwise, ran 2x slower with each phase sweeping the whole volume).
  const int64_t row_bytes = std::max<int64_t>(1, x.dims[0] * x.dims[2] * x.dims[3] * x.dims[4] * item);
  const int64_t slab = std::max<int64_t>(1, (int64_t{1} << 20) / row_bytes);
  int64_t rows_d = 0;
  for (const CtJob& j : b.jobs) rows_d = std::max(rows_d, j.box[3]);
  if (rows_d > slab) {
    std::vector<CtJob> split;
    for (int64_t d0 = 0; d0 < rows_d; d0 += slab)
      for (const CtJob& j : b.jobs) {
        if (d0 >= j.box[3]) continue;
        CtJob part = j;
        part.box[2] = d0;
        part.box[3] = std::min(d0 + slab, j.box[3]);
        part.out = static_cast<T*>(j.out) + d0 * j.os[1];  // the box's first position
        split.push_back(part);
      }
    b.jobs = std::move(split);
  }
  if (zero_first) std::memset(o, 0, out.nbytes());
  // Threads pay off above ~2 MFLOP; below, waking them costs more than it saves.
  b.threads = flops > 2e6 ? g.threads : 1;
  run_batch(b);
}

// --- The primitives --------------------------------------------------------------------------

mx::array forward(const mx::array& x, const mx::array& w, const Geometry& g, mx::StreamOrDevice s);
mx::array grad_input(const mx::array& dy, const mx::array& w, const Geometry& g,
                     const std::vector<int>& in_spatial, mx::StreamOrDevice s);
mx::array grad_weight(const mx::array& x, const mx::array& dy, const Geometry& g,
                      const std::vector<int>& kernel, mx::StreamOrDevice s);

std::vector<int> spatial(const mx::array& a) {
  return std::vector<int>(a.shape().begin() + 1, a.shape().end() - 1);
}

class CtConv : public mx::UnaryPrimitive {
 public:
  CtConv(mx::Stream stream, Kind kind, Geometry g, std::vector<int> in_spatial)
      : mx::UnaryPrimitive(stream), kind_(kind), g_(g), in_spatial_(std::move(in_spatial)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    if (!g_api)
      throw std::runtime_error("convtranspose: the kernel table is not set (load the "
                               "extension through convtranspose.mlx)");
    const mx::array& a = inputs[0];
    const mx::array& w = inputs[1];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(a);
    enc.set_input_array(w);
    enc.set_output_array(out);
    enc.dispatch([a, w, out, kind = kind_, g = g_]() mutable {
      if (out.dtype() == mx::float32)
        evaluate<float>(kind, g, a, w, out);
      else
        evaluate<double>(kind, g, a, w, out);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    std::ostringstream msg;
    msg << "convtranspose: the compiled operation runs on the CPU stream only, not on "
        << stream() << "; convtranspose.mlx defers GPU streams to MLX's own "
        << "conv_transpose ops";
    throw std::runtime_error(msg.str());
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    const mx::array& a = primals[0];
    const mx::array& w = primals[1];
    const mx::array& c = cotangents[0];
    std::vector<int> kernel(w.shape().begin() + 1, w.shape().end() - 1);
    std::vector<mx::array> out;
    for (int arg : argnums) {
      if (kind_ == FORWARD)  // y = F(x, w): dx = GI(c, w), dw = GW(x, c)
        out.push_back(arg == 0 ? grad_input(c, w, g_, spatial(a), stream())
                               : grad_weight(a, c, g_, kernel, stream()));
      else  // dx = GI(dy, w): d(dy) = F(c, w), dw = GW(c, dy)
        out.push_back(arg == 0 ? forward(c, w, g_, stream())
                               : grad_weight(c, a, g_, kernel, stream()));
    }
    return out;
  }

  std::vector<mx::array> jvp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override {
    // Bilinear: the sum of the operation with each argument's tangent in its place.
    std::vector<mx::array> out;
    for (size_t i = 0; i < argnums.size(); ++i) {
      std::vector<mx::array> args = primals;
      args[argnums[i]] = tangents[i];
      out.push_back(apply(args[0], args[1]));
    }
    mx::array sum = out[0];
    for (size_t i = 1; i < out.size(); ++i) sum = mx::add(sum, out[i], stream());
    return {sum};
  }

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs, const std::vector<int>& axes) override {
    const mx::array& a = inputs[0];
    const mx::array& w = inputs[1];
    const int ax = axes[0], aw = axes.size() > 1 ? axes[1] : -1;
    if (aw < 0) {
      // Fold the mapped axis into the batch.
      mx::array a0 = mx::moveaxis(a, ax, 0, stream());
      mx::Shape folded(a0.shape().begin() + 1, a0.shape().end());
      const int B = a0.shape(0);
      folded[0] *= B;
      mx::array y = apply(mx::reshape(a0, folded, stream()), w);
      mx::Shape unfolded = y.shape();
      unfolded[0] /= B;
      unfolded.insert(unfolded.begin(), B);
      return {{mx::reshape(y, unfolded, stream())}, {0}};
    }
    // A mapped weight: one operation per item.
    const int B = w.shape(aw);
    std::vector<mx::array> items;
    for (int b = 0; b < B; ++b) {
      mx::array ab = ax >= 0 ? mx::take(a, b, ax, stream()) : a;
      items.push_back(apply(ab, mx::take(w, b, aw, stream())));
    }
    return {{mx::stack(items, 0, stream())}, {0}};
  }

  const char* name() const override {
    return kind_ == FORWARD ? "ConvTransposeCT" : "ConvTransposeCTGradInput";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const CtConv* o = dynamic_cast<const CtConv*>(&other);
    return o && o->kind_ == kind_ && o->g_.same_as(g_) && o->in_spatial_ == in_spatial_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {shape_of(inputs[0], inputs[1])};
  }

  mx::Shape shape_of(const mx::array& a, const mx::array& w) const {
    mx::Shape s{a.shape(0)};
    const int lift = 3 - g_.ndim;
    for (int k = 0; k < g_.ndim; ++k) {
      if (kind_ == FORWARD)
        s.push_back(static_cast<int>(out_size(a.shape(1 + k), w.shape(1 + k), g_, lift + k)));
      else
        s.push_back(in_spatial_[k]);
    }
    s.push_back(kind_ == FORWARD ? w.shape(0) : w.shape(-1) * g_.groups);
    return s;
  }

 private:
  mx::array apply(const mx::array& a, const mx::array& w) {
    return kind_ == FORWARD ? forward(a, w, g_, stream())
                            : grad_input(a, w, g_, in_spatial_, stream());
  }

  Kind kind_;
  Geometry g_;
  std::vector<int> in_spatial_;  // GRAD_INPUT: the forward input's spatial extent
};

mx::array forward(const mx::array& x, const mx::array& w, const Geometry& g,
                  mx::StreamOrDevice s) {
  check_operands("conv_transpose", x, w, g);
  if (x.shape(-1) != w.shape(-1) * g.groups)
    throw std::invalid_argument("conv_transpose: input channels must equal weight C_in * groups");
  auto prim = std::make_shared<CtConv>(mx::to_stream(s), FORWARD, g, std::vector<int>{});
  mx::Shape shape = prim->shape_of(x, w);
  for (size_t k = 1; k + 1 < shape.size(); ++k)
    if (shape[k] < 1) throw std::invalid_argument("conv_transpose: empty output");
  return mx::array(shape, x.dtype(), prim, {x, w});
}

mx::array grad_input(const mx::array& dy, const mx::array& w, const Geometry& g,
                     const std::vector<int>& in_spatial, mx::StreamOrDevice s) {
  check_operands("conv_transpose grad_input", dy, w, g);
  if (dy.shape(-1) != w.shape(0) || static_cast<int>(in_spatial.size()) != g.ndim)
    throw std::invalid_argument("conv_transpose grad_input: cotangent channels must equal "
                                "the weight's C_out");
  auto prim = std::make_shared<CtConv>(mx::to_stream(s), GRAD_INPUT, g, in_spatial);
  return mx::array(prim->shape_of(dy, w), dy.dtype(), prim, {dy, w});
}

// grad_weight[co, k, ci] = sum over n, i of x[n, i, ci] dy[n, i*s + k*d - p, co], per
// group: one matmul per tap over the input positions whose tap-k output lands inside dy.
// MLX ops throughout, so that it differentiates, vmaps and compiles as they do.
mx::array grad_weight(const mx::array& x, const mx::array& dy, const Geometry& g,
                      const std::vector<int>& kernel, mx::StreamOrDevice s) {
  const int lift = 3 - g.ndim;
  const std::vector<int64_t> xd = lifted(x.shape(), g.ndim), yd = lifted(dy.shape(), g.ndim);
  const int N = static_cast<int>(xd[0]), G = g.groups;
  const int cin = static_cast<int>(xd[4]), cout = static_cast<int>(yd[4]);
  const int cin_g = cin / G, cout_g = cout / G;
  mx::array x5 = mx::reshape(x, {N, (int)xd[1], (int)xd[2], (int)xd[3], cin}, s);
  mx::array y5 = mx::reshape(dy, {N, (int)yd[1], (int)yd[2], (int)yd[3], cout}, s);
  int kern[3] = {1, 1, 1};
  for (int k = 0; k < g.ndim; ++k) kern[lift + k] = kernel[k];
  std::vector<mx::array> taps;
  for (int kd = 0; kd < kern[0]; ++kd)
    for (int kh = 0; kh < kern[1]; ++kh)
      for (int kw = 0; kw < kern[2]; ++kw) {
        const int k[3] = {kd, kh, kw};
        mx::Shape xs0{0}, xs1{N}, ys0{0}, ys1{N}, ystep{1};
        bool empty = false;
        int64_t positions = N;
        for (int a = 0; a < 3; ++a) {
          const int64_t st = g.stride[a], shift = k[a] * g.dilation[a] - g.padding[a];
          // Inputs i with 0 <= i*st + shift < out: [ceil(-shift/st), floor((out-1-shift)/st)]
          const int64_t lo = shift >= 0 ? 0 : (-shift + st - 1) / st;
          int64_t hi_num = yd[1 + a] - 1 - shift;
          int64_t hi = hi_num >= 0 ? hi_num / st + 1 : 0;
          hi = std::min<int64_t>(hi, xd[1 + a]);
          if (lo >= hi) {
            empty = true;
            break;
          }
          positions *= hi - lo;
          xs0.push_back(lo);
          xs1.push_back(hi);
          ys0.push_back(lo * st + shift);
          ys1.push_back((hi - 1) * st + shift + 1);
          ystep.push_back(st);
        }
        if (empty) {
          taps.push_back(mx::zeros({cout, cin_g}, x.dtype(), s));
          continue;
        }
        xs0.push_back(0);
        xs1.push_back(cin);
        ys0.push_back(0);
        ys1.push_back(cout);
        ystep.push_back(1);
        const int P = static_cast<int>(positions);
        mx::array xt = mx::reshape(mx::slice(x5, xs0, xs1, s), {P, G, cin_g}, s);
        mx::array yt = mx::reshape(mx::slice(y5, ys0, ys1, ystep, s), {P, G, cout_g}, s);
        // (G, C_out/g, P) @ (G, P, C_in/g) -> (C_out, C_in/g)
        mx::array prod = mx::matmul(mx::transpose(yt, {1, 2, 0}, s),
                                    mx::transpose(xt, {1, 0, 2}, s), s);
        taps.push_back(mx::reshape(prod, {cout, cin_g}, s));
      }
  mx::Shape shape{cout};
  for (int k = 0; k < g.ndim; ++k) shape.push_back(kernel[k]);
  shape.push_back(cin_g);
  return mx::reshape(mx::stack(taps, 1, s), shape, s);
}

void set_api(nb::capsule cap) {
  if (std::strcmp(cap.name(), CT_CAPI_NAME) != 0)
    throw std::invalid_argument("set_api: not convtranspose._native's kernel table");
  const CtCapi* api = static_cast<const CtCapi*>(cap.data());
  if (api->version != CT_CAPI_VERSION)
    throw std::invalid_argument("set_api: convtranspose._native's kernel table has another "
                                "version: rebuild the MLX extension");
  g_api = api;
}

}  // namespace

NB_MODULE(_ct_mlx, m) {
  m.doc() = "convtranspose's transposed convolution as an MLX primitive (see mlx.py)";
  m.def("set_api", &set_api, "capsule"_a);
  m.def(
      "conv_transpose",
      [](const mx::array& x, const mx::array& w, int ndim, const std::vector<int>& stride,
         const std::vector<int>& padding, const std::vector<int>& dilation,
         const std::vector<int>& output_padding, int groups, int threads, int64_t stream_from,
         mx::StreamOrDevice s) {
        return forward(x, w,
                       make_geometry(ndim, stride, padding, dilation, output_padding, groups,
                                     threads, stream_from),
                       s);
      },
      "x"_a, "w"_a, "ndim"_a, "stride"_a, "padding"_a, "dilation"_a, "output_padding"_a,
      "groups"_a, "threads"_a, "stream_from"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def(
      "grad_input",
      [](const mx::array& dy, const mx::array& w, const std::vector<int>& in_spatial, int ndim,
         const std::vector<int>& stride, const std::vector<int>& padding,
         const std::vector<int>& dilation, const std::vector<int>& output_padding, int groups,
         int threads, int64_t stream_from, mx::StreamOrDevice s) {
        return grad_input(dy, w,
                          make_geometry(ndim, stride, padding, dilation, output_padding,
                                        groups, threads, stream_from),
                          in_spatial, s);
      },
      "dy"_a, "w"_a, "in_spatial"_a, "ndim"_a, "stride"_a, "padding"_a, "dilation"_a,
      "output_padding"_a, "groups"_a, "threads"_a, "stream_from"_a, nb::kw_only(),
      "stream"_a = nb::none());
  m.def(
      "grad_weight",
      [](const mx::array& x, const mx::array& dy, const std::vector<int>& kernel, int ndim,
         const std::vector<int>& stride, const std::vector<int>& padding,
         const std::vector<int>& dilation, const std::vector<int>& output_padding, int groups,
         mx::StreamOrDevice s) {
        return grad_weight(x, dy,
                           make_geometry(ndim, stride, padding, dilation, output_padding,
                                         groups, 1, INT64_MAX),
                           kernel, s);
      },
      "x"_a, "dy"_a, "kernel"_a, "ndim"_a, "stride"_a, "padding"_a, "dilation"_a,
      "output_padding"_a, "groups"_a, nb::kw_only(), "stream"_a = nb::none());
}
