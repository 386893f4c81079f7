// The job a Python caller describes, shared by every instruction-set build.
#pragma once
#include <cstdint>

// The enums name the values of the jobs' int fields (CtJob::mode and out_half,
// GwJob::swapped), which Python passes by number: each value is written out, and a new
// one is one more line.

// How the vectors are laid (CtJob::mode): along output channels (the weight [tap][c][co],
// C_out padded to whole vectors, in chunks), along input channels for 1-8 output channels
// (any layout with each output's channels contiguous: see woff), along the channels of a
// depthwise layer ([tap][c]), or along the output
// pixels of a row for 1-8 output channels over a planar input ([g][residue][tap][c][co],
// planar.hpp).
enum CtMode : int {
  CT_MODE_CHANNELS = 0,
  CT_MODE_DOT = 1,
  CT_MODE_DEPTHWISE = 2,
  CT_MODE_PLANAR = 3,
};

// The most output channels a dot-mode register block holds (8 with 32 vector registers,
// else 4; a job's others in chunks: forward.hpp's run_mode), and that a planar job takes
// (per group, all at once).
constexpr int CT_DOT_MAX_OUT = 8;
constexpr int CT_PLANAR_MAX_OUT = 8;
// The most values a planar job writes per column of its rows (W residues x C_out): a
// block's sums of them all are held until the row's run is stored.
constexpr int CT_PLANAR_MAX_ROW = 32;

// Below this many input channels (the reduction per tap) CT_MODE_CHANNELS keeps each
// block's sums in registers across the taps (rows_chunk_taps_inner in forward.hpp).
constexpr int CT_TAPS_INNER_BELOW = 16;

// Output element types other than the compute type (CtJob::out_half): rounded from float32
// as stored.
enum CtHalf : int {
  CT_HALF_NONE = 0,
  CT_HALF_F16 = 1,
  CT_HALF_BF16 = 2,
};

struct CtJob {
  int itemsize;          // 4: float32, 8: float64
  int mode;              // a CtMode
  int out_half;          // a CtHalf: the output is float16 or bfloat16 (from float32),
                         // rounded as stored
  int stream_out;        // 1: the output is far bigger than the caches: stream it out
  const void* x;         // input at (n=0, d=0, h=0, w=0, c=0); channels contiguous
  int64_t xs[4];         // input strides in elements: n, d, h, w
  int64_t in_dims[3];    // input D, H, W
  const void* w;         // the weight: packed (see forward.hpp), or dot mode's where it
                         // lies (woff)
  const int64_t* off[3]; // per axis, the input offset of each tap
  int64_t ntaps[3];
  int64_t step[3];       // input position = output position * step + offset
  void* out;             // output at the box's first position; channels contiguous
  int64_t os[4];         // output strides in elements: n, d, h, w
  int64_t box[6];        // n0, n1, d0, d1, h0, h1 (output positions; out points at n0,d0,h0)
  int64_t wcount;        // output positions along W
  int64_t cin, cout;
  int64_t* cursor;       // null: this call computes every row of the box. Else `sharers`
  int64_t sharers;       // calls share the box's rows, each claiming runs of rows from
                         // *cursor (0 at first) until none is left
  int64_t pair_out;      // 0. Else Winograd F(2,3) along D (see `pair_transform`): the
                         // input is the transformed V, its 4 D taps (step 4, offsets 0-3)
                         // are summed apart, and box row d is the output pair (2d, 2d+1)
                         // (rows os[1] apart); 2d + 1 is written only below pair_out
  const void* bias;      // null; else bias[co] (the compute type), added to each output as
                         // it is stored; readable in whole vectors past cout (padded)
  int64_t cs;            // 0; CT_MODE_PLANAR: the input's channel stride (its pixels are
                         // contiguous, xs[3] == 1)
  // CT_MODE_PLANAR only: a job writes its rows whole, every W residue of every conv group,
  // each output line once. Residue r's column c lies at out + c * os[3] + r * res_stride;
  // its W taps are res_taps[r] input offsets from res_off (residue after residue, off[2]
  // unused), its columns res_count[r] (non-increasing in r; wcount is res_count[0]).
  // Group g reads channels g / chunks * cin on and writes outputs g * cout on (the
  // weight [g][r][tap][c][co]): a conv group's outputs may come in `chunks` groups of
  // cout, each reading its inputs (a register block of at most CT_PLANAR_MAX_OUT).
  int64_t groups;
  int64_t chunks;
  int64_t res;
  const int64_t* res_taps;
  const int64_t* res_off;
  const int64_t* res_count;
  int64_t res_stride;
  // CT_MODE_DOT: the weight where it lies, each output's channels contiguous: output o of
  // tap (i, j, k) at w + wout[((i * ntaps[1] + j) * ntaps[2] + k) * cout + o] (outputs of
  // merged residues have taps of their own). Null: packed [tap][co][c].
  const int64_t* wout;
  // CT_MODE_DOT and CT_MODE_CHANNELS: null, and a pixel's outputs lie one after another;
  // else output o lies oout[o] elements from the pixel's first (dot mode's residues merged
  // across rows, or either mode's W residues merged in a layer of several conv groups:
  // each residue's outputs where its own position lies).
  const int64_t* oout;
  // CT_MODE_DOT and CT_MODE_CHANNELS: `groups` conv groups in one job (0 or 1: one),
  // each row's groups one after another while its lines are in cache. Group g reads input
  // channels g * cin on, the weight (dot mode's where it lies, channels mode's packed)
  // group_w elements on per group, writes its outputs group_out elements on per group, and
  // adds bias[g * cout + o].
  int64_t group_w;
  int64_t group_out;
};

// grad_weight of one tile of input rows, added into a partial sum `part` laid out as the
// packed weight of CT_MODE_CHANNELS: [chunk][tap][a][column], with (a, columns) = (C_in,
// C_out), or (C_out, C_in) when `swapped`, or at any strides (pa, pt). The column count
// must be whole vectors, except swapped at strides of whole vectors: C_in's last vector
// may then be partial (x and gx are read and written only where they lie; the sums hold
// whole vectors, zeros past C_in). Columns are cut into chunks of up to 4 vectors.

// Which side the vectors run along (GwJob::swapped): C_out, the columns of (C_in, C_out);
// C_in, swapped; or the channels of a depthwise layer, one per group (dw_grad_weight_typed
// in grad_weight.hpp).
enum CtGwLayout : int {
  CT_GW_ALONG_COUT = 0,
  CT_GW_ALONG_CIN = 1,
  CT_GW_DEPTHWISE = 2,
};

struct GwJob {
  int itemsize;
  int swapped;           // a CtGwLayout
  const void* x;         // input at (0, 0, 0, 0, 0); channels contiguous
  int64_t xs[4];
  const void* g;         // cotangent at (0, 0, 0, 0, 0); channels contiguous
  int64_t gs[4];
  int64_t gdims[3];      // cotangent D, H, W
  const int64_t* off[3]; // per axis, tap k's offset k * dilation - padding
  int64_t ntaps[3];
  int64_t step[3];       // cotangent position = input position * stride + offset
  void* part;
  int64_t pa, pt;        // 0, 0: part laid out as above; else the sum of (tap, a, column)
                         // is part[tap * pt + a * pa + column] (grad_weight in place)
  int64_t unit0, unit1;  // only these (tap, chunk of columns) units, tap * chunks + chunk
  int zero;              // 1: the units' sums start from zero (else add into part)
  int64_t box[6];        // input rows n0, n1, d0, d1, h0, h1
  int64_t wcount;        // input W
  int64_t cin, cout;
  void* gx;              // null; else grad_input too, in the same pass (swapped with few
  int64_t gxs[4];        // sums only, every unit, part at strides (pa, pt)): gx at (0, 0,
  const void* w;         // 0, 0, the group's channel 0), strides gxs, every row of the box
                         // written; w the weight laid out as part (w[tap * pt + a * pa + c])
  int64_t group_cin;     // 0; else conv groups side by side (swapped with few sums only):
                         // the vectors run along every group's C_in/g = group_cin channels
                         // (cin in all), a is the output channel within a group (cout of
                         // them), and lane c's cotangent value is channel
                         // (c / group_cin) * cout + a of its row
};

// Winograd F(2,3) along D, the input side: for outputs 2j and 2j+1 of a stride-1 axis
// whose three taps read inputs 2j + base + (0, 1, 2) and 2j + 1 + base + (0, 1, 2),
//   v[n, j, 0] = x0 - x2, v[n, j, 1] = x1 + x2, v[n, j, 2] = x2 - x1, v[n, j, 3] = x1 - x3
// with xt = x[n, 2j + base + t] (zero outside the input), each a whole (H, W, C) plane.
// v is C-contiguous (N, J, 4, H, W, C); this call fills items n0..n1, pairs j0..j1.
// grad_weight over planar rows (grad_planar.hpp), for few channels on both sides: vectors
// run along input pixels W, each (tap, output, input channel) sum a vector of partial
// sums, added into `sums` [tap][co][ci][lanes].
struct PgwJob {
  int itemsize;
  const void* x;         // planar input: row (n, d, h) at x + row * xrow, channel c at
  int64_t xrow;          // + c * wv; W contiguous, zeros from W to wv (whole vectors),
  int64_t wv;            // the row aligned to a vector
  const void* g;         // planar cotangent: row (n, od, oh) at g + row * grow; channel co,
  int64_t grow;          // W residue r at + (co * res + r) * stretch: element j is cotangent
  int64_t stretch;       // pixel (j - left) * s + r, zero where that lies outside
  int64_t res;
  int64_t dims[5];       // input N, D, H; cotangent D, H
  const int64_t* off[2]; // D, H tap offsets (k * dilation - padding)
  int64_t ntaps[3];      // D, H, W taps
  int64_t step[2];       // D, H strides
  const int64_t* wtap;   // per W tap: its residue, and the element j that pixel w = 0 meets
  int64_t c0, cin;       // the group's input channels [c0, c0 + cin)
  int64_t o0, cout;      // and output channels
  void* sums;
  int64_t row0, row1;    // the job's input rows, flat over (n, d, h)
  int64_t gx_w, gx_c;     // the input's W and channels (x's rows hold gx_c of wv each)
  // planar_grad_input only (x and sums unused): the group's weight [tap][co][ci], and
  // grad_input, channels-last (gx_c channels a pixel, rows of gx_w pixels), written whole
  // for the group's channels of the job's rows.
  const void* w;
  void* gx;
};

struct PairJob {
  int itemsize;
  const void* x;         // input at (0, 0, 0, 0, 0); channels contiguous
  int64_t xs[4];         // input strides in elements: n, d, h, w
  int64_t in_d, base;
  int64_t h, w, c;       // the plane's extent (every input row and channel)
  void* v;
  int64_t pairs;         // J
  int64_t n0, n1, j0, j1;
};

// Stopping a call early (Ctrl-C): module.cpp points `ct_stop` at a stop on each thread
// that runs kernel calls; the kernel asks it between runs of rows and, once it answers
// true, returns with rows left undone (the caller then discards the output).
struct CtStop {
  bool (*stop)(CtStop*);
};
extern __thread CtStop* ct_stop;  // null: never stop

#define CT_DECLARE(NS) \
  namespace NS { void correlate(const CtJob&); void grad_weight(const GwJob&); \
                 void round_half(int, const float*, void*, int64_t); \
                 void unpack_grad_weight(int, const void*, void*, int64_t, int64_t, int64_t, \
                                         int64_t, int64_t, int64_t); \
                 void widen_half(int, const void*, float*, int64_t); \
                 void gather_sum(int, const void*, const int64_t*, int64_t, int64_t, int64_t, \
                                 void*); \
                 void col2im(int, const void*, void*, const void*, const int64_t*, int64_t, \
                             int64_t, const int64_t*, bool); \
                 void pair_transform(const PairJob&); \
                 void planar_grad_weight(const PgwJob&); \
                 void planar_grad_input(const PgwJob&); \
                 int lanes(int); int max_vectors(); \
                 bool fuses_grad_input(int, int64_t, int64_t); }
CT_DECLARE(avx512)
CT_DECLARE(avx2)
CT_DECLARE(generic)
