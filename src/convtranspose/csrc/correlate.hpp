// The compiled kernel, included once per instruction set.
//
// Before including, a translation unit defines:
//   CT_NS      the namespace of this instantiation (avx512, avx2, generic)
//   CT_VBYTES  the SIMD register width in bytes (64, 32, 16)
//   CT_NREGS   the number of SIMD registers (32 or 16): it bounds the register block
// and, where it has intrinsics for them, the CT_* operations the headers below test for
// (CT_BROADCAST_F, CT_HSUM_F, CT_F16_STORE, CT_STREAM, ...).
//
// One header per operation, included here in this order inside namespace CT_NS (each
// uses those before it); they are parts of this file, not headers of their own:
//   simd.hpp         the vector types, register blocks, broadcasts, loads, horizontal sums
//   half.hpp         float16 and bfloat16: rounding as results are stored, and widening
//   rows.hpp         a box's rows, and the pixels of a row each W tap reaches
//   forward.hpp      the correlation (CtJob): channels, dot and depthwise modes; run_mode
//   grad_weight.hpp  grad_weight (GwJob), with grad_input in the same pass where it fuses
//   grad_planar.hpp  planar_grad_weight (PgwJob): few channels on both sides
//   conversions.hpp  gather_sum, round_half, widen_half, pair_transform

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "correlate_api.h"

// CT_PART compiles one part of the entry points, so that a build can compile the parts of
// an instruction set in parallel (setup.py): 1 the float32 correlation, 2 the float64
// one, 3 the rest. Unset: every entry point.
#ifdef CT_PART
#define CT_PART_HAS(n) (CT_PART == (n))
#else
#define CT_PART_HAS(n) 1
#endif

namespace CT_NS {

#include "simd.hpp"
#include "half.hpp"
#include "rows.hpp"
#include "forward.hpp"
#include "grad_weight.hpp"
#include "grad_planar.hpp"
#include "conversions.hpp"

}  // namespace CT_NS
