// convtranspose._native: the compiled correlation kernel, picked at import time for the
// best instruction set this CPU has (AVX-512, AVX2+FMA, or portable vectors).
//
// No NumPy headers: Python passes raw addresses and element strides (the arrays stay
// alive in the caller for the duration of the call), so the extension builds with only
// a C++ compiler and Python's headers. The GIL is released while the kernel runs, so
// the package's worker threads compute tiles in parallel.

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <utility>
#include <vector>

#ifdef __SSE2__
#include <xmmintrin.h>
#endif

#include "correlate_api.h"
#include "ct_capi.h"
#include "pool.hpp"

__thread CtStop* ct_stop = nullptr;

namespace {

// --- Ctrl-C during a call ------------------------------------------------------------------
// A call runs without the GIL, so Python's SIGINT handler (KeyboardInterrupt) would run only
// once it returns. Instead the calling thread, between runs of rows and between calls (its
// `ct_stop`, a CallerStop), notices a SIGINT and takes the GIL to let Python decide:
//  - SIGINT's C handler is wrapped ("armed") to count each SIGINT after Python's own
//    handler has noted it, so a thread notices one with an atomic load. Arming happens
//    with the GIL held (Python changes handlers only under it), at import and again every
//    look below: a program that sets a handler again (IPython does, per cell) is re-armed.
//    Where SIGINT is ignored or not handled by anything, nothing is armed.
//  - Every LOOK_NS too, in case a handler was set since the last arming, it looks.
//  - To look, it takes the GIL: on the main thread Python runs its pending handlers
//    (PyErr_CheckSignals); the call stops if one raised. On another thread (a Dask
//    worker) the call stops with KeyboardInterrupt where a SIGINT arrived and Python's
//    handler is the default one, which raises it in the main thread.
// The pool's helpers then stop at their next run of rows (pool.hpp), and the call raises.

std::atomic<uint64_t> g_interrupts{0};
std::atomic<const struct sigaction*> g_chained{nullptr};  // the handler that ours wraps
constexpr int64_t LOOK_NS = 100000000;

void on_sigint(int sig, siginfo_t* info, void* context) {
  const int saved = errno;
  const struct sigaction* prev = g_chained.load(std::memory_order_acquire);
  if (prev && (prev->sa_flags & SA_SIGINFO))
    prev->sa_sigaction(sig, info, context);
  else if (prev && prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN)
    prev->sa_handler(sig);
  g_interrupts.fetch_add(1, std::memory_order_acq_rel);  // after Python noted the signal
  errno = saved;
}

bool same_action(const struct sigaction& a, const struct sigaction& b) {
  const bool info = a.sa_flags & SA_SIGINFO;
  return a.sa_flags == b.sa_flags && std::memcmp(&a.sa_mask, &b.sa_mask, sizeof a.sa_mask) == 0 &&
         (info ? a.sa_sigaction == b.sa_sigaction : a.sa_handler == b.sa_handler);
}

// Wrap SIGINT's C handler (with the GIL held), unless it is wrapped already or there is
// no handler to wrap (SIG_DFL, SIG_IGN).
void arm() {
  struct sigaction cur;
  if (sigaction(SIGINT, nullptr, &cur) != 0) return;
  if ((cur.sa_flags & SA_SIGINFO) ? cur.sa_sigaction == on_sigint
                                  : cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN)
    return;
  const struct sigaction* prev = g_chained.load(std::memory_order_acquire);
  if (!prev || !same_action(*prev, cur)) {
    prev = new struct sigaction(cur);  // never freed: a handler may be reading the last one
    g_chained.store(prev, std::memory_order_release);
  }
  struct sigaction mine = cur;  // the same mask and flags
  mine.sa_flags |= SA_SIGINFO;
  mine.sa_sigaction = on_sigint;
  sigaction(SIGINT, &mine, nullptr);
}

// `attribute` of `module`, or null (no exception left set).
PyObject* python_attr(const char* module, const char* attribute) {
  PyObject* m = PyImport_ImportModule(module);
  PyObject* a = m ? PyObject_GetAttrString(m, attribute) : nullptr;
  Py_XDECREF(m);
  if (!a) PyErr_Clear();
  return a;
}

bool on_main_thread() {
  PyObject* main = python_attr("threading", "main_thread");
  PyObject* thread = main ? PyObject_CallNoArgs(main) : nullptr;
  PyObject* ident = thread ? PyObject_GetAttrString(thread, "ident") : nullptr;
  const bool yes = !ident || PyLong_AsUnsignedLong(ident) == PyThread_get_thread_ident();
  Py_XDECREF(ident);
  Py_XDECREF(thread);
  Py_XDECREF(main);
  PyErr_Clear();
  return yes;
}

// Whether Python's SIGINT handler is the default one (raise KeyboardInterrupt).
bool default_sigint() {
  PyObject* get = python_attr("signal", "getsignal");
  PyObject* handler = get ? PyObject_CallFunction(get, "i", SIGINT) : nullptr;
  PyObject* fallback = python_attr("signal", "default_int_handler");
  const bool yes = handler && handler == fallback;
  Py_XDECREF(fallback);
  Py_XDECREF(handler);
  Py_XDECREF(get);
  PyErr_Clear();
  return yes;
}

// With the GIL: -1, an exception set, where the call is to stop (see above); `seen`, the
// count of SIGINTs already answered, moves on.
int look(uint64_t& seen) {
  if (PyErr_CheckSignals() < 0) return -1;
  const uint64_t now = g_interrupts.load(std::memory_order_acquire);
  if (now != seen) {
    seen = now;
    if (!on_main_thread() && default_sigint()) {
      PyErr_SetNone(PyExc_KeyboardInterrupt);
      return -1;
    }
  }
  arm();
  return 0;
}

// The calling thread's stop, while it runs kernel calls without the GIL.
struct CallerStop : CtStop {
  CallerStop() : seen(g_interrupts.load(std::memory_order_acquire)) { stop = poll; }

  static bool poll(CtStop* base) {
    CallerStop* s = static_cast<CallerStop*>(base);
    if (s->flag.load(std::memory_order_relaxed)) return true;
    if (g_interrupts.load(std::memory_order_acquire) == s->seen) {
      if ((++s->polls & 15) != 0) return false;  // a clock read costs ~0.1 us here
      const int64_t now = pool::now_ns();
      if (s->next_look == 0) s->next_look = now + LOOK_NS;
      if (now < s->next_look) return false;
    }
    PyEval_RestoreThread(s->ts);
    const bool stop = look(s->seen) < 0;
    s->ts = PyEval_SaveThread();
    s->next_look = pool::now_ns() + LOOK_NS;
    if (stop) s->flag.store(1, std::memory_order_relaxed);
    return stop;
  }

  std::atomic<int> flag{0};  // raised: stop (an exception is set in `ts`)
  PyThreadState* ts = nullptr;
  uint64_t seen;
  int64_t next_look = 0;  // 0: from the first clock read on
  unsigned polls = 0;
};

// Runs work(stop flag) with the GIL released and this thread's `ct_stop` a CallerStop;
// false, with an exception set, where it stopped early. `nested`: this thread was
// already running a call (a signal handler called us during a look).
template <typename F>
bool run_released(F&& work) {
  CallerStop stop;
  CtStop* outer = ct_stop;
  ct_stop = &stop;
  stop.ts = PyEval_SaveThread();
  work(&stop.flag, outer != nullptr);
  PyEval_RestoreThread(stop.ts);
  ct_stop = outer;
  return !stop.flag.load(std::memory_order_relaxed);
}

struct Isa {
  const char* name;
  void (*correlate)(const CtJob&);
  void (*grad_weight)(const GwJob&);
  void (*round_half)(int, const float*, void*, int64_t);
  void (*unpack_grad_weight)(int, const void*, void*, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t);
  void (*widen_half)(int, const void*, float*, int64_t);
  void (*gather_sum)(int, const void*, const int64_t*, int64_t, int64_t, int64_t, void*);
  void (*col2im)(int, const void*, void*, const void*, const int64_t*, int64_t, int64_t,
                 const int64_t*, bool);
  void (*pair_transform)(const PairJob&);
  void (*planar_grad_weight)(const PgwJob&);
  void (*planar_grad_input)(const PgwJob&);
  int (*lanes)(int);
  int (*max_vectors)();
  bool (*fuses_grad_input)(int, int64_t, int64_t);
};

// The instruction sets this build compiled (setup.py defines CT_WITH_ISAS and one
// CT_WITH_<NAME> each; a build without CT_WITH_ISAS compiled all), best first.
#ifndef CT_WITH_ISAS
#if defined(__x86_64__) && defined(__GNUC__)
#define CT_WITH_AVX512
#define CT_WITH_AVX2
#endif
#define CT_WITH_GENERIC
#endif
const Isa kIsas[] = {
#ifdef CT_WITH_AVX512
    {"avx512", avx512::correlate, avx512::grad_weight, avx512::round_half,
     avx512::unpack_grad_weight, avx512::widen_half,
     avx512::gather_sum, avx512::col2im, avx512::pair_transform, avx512::planar_grad_weight,
     avx512::planar_grad_input,
     avx512::lanes, avx512::max_vectors, avx512::fuses_grad_input},
#endif
#ifdef CT_WITH_AVX2
    {"avx2", avx2::correlate, avx2::grad_weight, avx2::round_half,
     avx2::unpack_grad_weight, avx2::widen_half,
     avx2::gather_sum, avx2::col2im, avx2::pair_transform, avx2::planar_grad_weight,
     avx2::planar_grad_input,
     avx2::lanes, avx2::max_vectors, avx2::fuses_grad_input},
#endif
#ifdef CT_WITH_GENERIC
    {"generic", generic::correlate, generic::grad_weight, generic::round_half,
     generic::unpack_grad_weight, generic::widen_half,
     generic::gather_sum, generic::col2im, generic::pair_transform, generic::planar_grad_weight,
     generic::planar_grad_input,
     generic::lanes, generic::max_vectors, generic::fuses_grad_input},
#endif
};
const int kIsaCount = sizeof(kIsas) / sizeof(kIsas[0]);

bool supported(const Isa& isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (std::strcmp(isa.name, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c");
  if (std::strcmp(isa.name, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return true;
}

const Isa* current = nullptr;

// --- Jobs by name ---------------------------------------------------------------------------
// Python describes a job as a dict keyed by the fields of its C struct (correlate_api.h),
// e.g. correlate({"itemsize": 4, "mode": 0, "x": <address>, "xs": (n, d, h, w), ...}).
// Each job's table below names its fields, and `fill` writes each one where its
// declaration says (offsetof, its type and length), as XNNPACK fills its operator
// contexts field by field. So a new field is one line in the struct, one in its table and
// one key in Python; nothing is numbered. A missing field (one without a default), a name
// the struct lacks, or a list of the wrong length is a TypeError that names it. A dict
// rather than keyword arguments: Python builds a dict for a call of more than 15 keywords
// anyway, and a vectorcall would turn it back into names (measured: slower).

enum class Type { INT, I64, PTR };  // int, int64_t, an address (any pointer)

struct Field {
  const char* name;
  Type type;
  size_t offset;        // in the struct
  int count;            // 1: one value; n > 1: an array field, given as n values
  bool optional;        // absent: the default its parser set stays
  PyObject* key;        // the name, interned at import (matched by pointer)
};

// A member's Type and length, from its declaration: the tables name fields and cannot
// disagree with the structs on either (a member of another type, say a bool, does not
// compile until a Member says how Python gives it).
template <typename T>
struct Member;
template <>
struct Member<int> {
  static constexpr Type type = Type::INT;
  static constexpr int count = 1;
};
template <>
struct Member<int64_t> {
  static constexpr Type type = Type::I64;
  static constexpr int count = 1;
};
template <typename T>
struct Member<T*> {
  static constexpr Type type = Type::PTR;
  static constexpr int count = 1;
};
template <typename T, size_t N>
struct Member<T[N]> {
  static_assert(Member<T>::count == 1, "arrays of arrays are not fields");
  static constexpr Type type = Member<T>::type;
  static constexpr int count = static_cast<int>(N);
};

#define CT_MEMBER(Struct, name, optional)                                                    \
  Field {                                                                                    \
    #name, Member<decltype(Struct::name)>::type, offsetof(Struct, name),                     \
        Member<decltype(Struct::name)>::count, optional, nullptr                             \
  }
#define CT_FIELD(Struct, name) CT_MEMBER(Struct, name, false)
#define CT_OPTIONAL(Struct, name) CT_MEMBER(Struct, name, true)  // absent: the default stays

// One value of field `f` into `where`; false with an error set.
bool store_value(const char* what, const Field& f, PyObject* value, char* where) {
  // Ints and what has __index__ (NumPy's), as PyArg's "n" read them: PyLong_AsLongLong
  // would take a slow path for every address (two 30-bit digits).
  const Py_ssize_t v = PyNumber_AsSsize_t(value, PyExc_OverflowError);
  if (v == -1 && PyErr_Occurred()) {
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError, "%s: field '%s' takes ints, got %R", what, f.name, value);
    }
    return false;
  }
  switch (f.type) {
    case Type::INT: {
      if (v < INT_MIN || v > INT_MAX) {
        PyErr_Format(PyExc_OverflowError, "%s: field '%s' is out of range: %zd", what,
                     f.name, v);
        return false;
      }
      const int i = static_cast<int>(v);
      std::memcpy(where, &i, sizeof i);
      return true;
    }
    case Type::I64: {
      const int64_t i = v;
      std::memcpy(where, &i, sizeof i);
      return true;
    }
    case Type::PTR: {
      void* p = reinterpret_cast<void*>(static_cast<intptr_t>(v));
      std::memcpy(where, &p, sizeof p);
      return true;
    }
  }
  return false;
}

size_t type_size(Type t) {
  return t == Type::INT ? sizeof(int) : t == Type::I64 ? sizeof(int64_t) : sizeof(void*);
}

bool store_field(const char* what, const Field& f, PyObject* value, char* base) {
  if (f.count == 1) return store_value(what, f, value, base + f.offset);
  // A tuple or a list of exactly `count` values, read where they lie.
  if (!(PyTuple_Check(value) || PyList_Check(value)) ||
      PySequence_Fast_GET_SIZE(value) != f.count) {
    PyErr_Format(PyExc_TypeError, "%s: field '%s' takes a tuple or list of %d ints, got %R",
                 what, f.name, f.count, value);
    return false;
  }
  PyObject** items = PySequence_Fast_ITEMS(value);
  const size_t step = type_size(f.type);
  for (int i = 0; i < f.count; ++i)
    if (!store_value(what, f, items[i], base + f.offset + i * step)) return false;
  return true;
}

// The fields of `spec` (a dict: name -> value) into `job`, a `structure`, one by one; false
// with an error set. Fields left out keep the values the caller set first. A literal
// dict's keys are interned, as the table's are, so a key finds its field by pointer, in
// the table's order at the first look.
template <size_t N>
bool fill(const char* what, const char* structure, Field (&fields)[N], PyObject* spec,
          void* job) {
  if (!PyDict_Check(spec)) {
    PyErr_Format(PyExc_TypeError, "%s: takes a dict of the fields of a %s by name, got %R",
                 what, structure, spec);
    return false;
  }
  char* base = static_cast<char*>(job);
  bool given[N] = {};
  size_t next = 0;  // where the previous key was found, plus one
  PyObject *name, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(spec, &pos, &name, &value)) {
    size_t at = N;
    for (size_t k = 0; k < N && at == N; ++k)
      if (fields[(next + k) % N].key == name) at = (next + k) % N;
    for (size_t k = 0; k < N && at == N; ++k)  // a key built at run time: by value
      if (PyUnicode_Check(name) && PyUnicode_Compare(name, fields[k].key) == 0) at = k;
    if (at == N) {
      PyErr_Format(PyExc_TypeError, "%s: unknown field %R (%s has no such field)", what,
                   name, structure);
      return false;
    }
    given[at] = true;
    next = at + 1;
    if (!store_field(what, fields[at], value, base)) return false;
  }
  for (size_t k = 0; k < N; ++k) {
    if (!given[k] && !fields[k].optional) {
      PyErr_Format(PyExc_TypeError, "%s: missing field '%s' (%s has no default for it)",
                   what, fields[k].name, structure);
      return false;
    }
  }
  return true;
}

template <size_t N>
bool intern_keys(Field (&fields)[N]) {
  for (Field& f : fields)
    if (!(f.key = PyUnicode_InternFromString(f.name))) return false;
  return true;
}

Field kCorrelateFields[] = {
    CT_FIELD(CtJob, itemsize),    CT_FIELD(CtJob, mode),        CT_FIELD(CtJob, out_half),
    CT_FIELD(CtJob, stream_out),  CT_FIELD(CtJob, x),           CT_FIELD(CtJob, xs),
    CT_FIELD(CtJob, in_dims),     CT_FIELD(CtJob, w),           CT_FIELD(CtJob, off),
    CT_FIELD(CtJob, ntaps),       CT_FIELD(CtJob, step),        CT_FIELD(CtJob, out),
    CT_FIELD(CtJob, os),          CT_FIELD(CtJob, box),         CT_FIELD(CtJob, wcount),
    CT_FIELD(CtJob, cin),         CT_FIELD(CtJob, cout),        CT_OPTIONAL(CtJob, cursor),
    CT_OPTIONAL(CtJob, sharers),  CT_OPTIONAL(CtJob, pair_out), CT_OPTIONAL(CtJob, bias),
    CT_OPTIONAL(CtJob, cs),       CT_OPTIONAL(CtJob, groups),   CT_OPTIONAL(CtJob, res),
    CT_OPTIONAL(CtJob, res_taps), CT_OPTIONAL(CtJob, res_off),  CT_OPTIONAL(CtJob, res_count),
    CT_OPTIONAL(CtJob, res_stride), CT_OPTIONAL(CtJob, chunks),   CT_OPTIONAL(CtJob, wout),
    CT_OPTIONAL(CtJob, oout),      CT_OPTIONAL(CtJob, group_w),  CT_OPTIONAL(CtJob, group_out),
};

// correlate's fields (see _native_kernel.correlate) into a job; false with an error set.
bool parse_correlate(PyObject* spec, CtJob& job) {
  job = CtJob{};
  job.sharers = 1;  // the defaults: one call computes the whole box, no pairs, no bias
  if (!fill("correlate", "CtJob", kCorrelateFields, spec, &job)) return false;
  if (job.itemsize != 4 && job.itemsize != 8) {
    PyErr_SetString(PyExc_ValueError, "correlate: itemsize must be 4 or 8");
    return false;
  }
  if (job.pair_out && (job.pair_out < 0 || job.mode != CT_MODE_CHANNELS || job.ntaps[0] != 4 ||
                   job.cin < CT_TAPS_INNER_BELOW)) {
    PyErr_SetString(PyExc_ValueError, "correlate: Winograd pairs need channels mode, four D "
                    "taps and at least CT_TAPS_INNER_BELOW input channels");
    return false;
  }
  if (job.mode < CT_MODE_CHANNELS || job.mode > CT_MODE_PLANAR ||
      (job.mode == CT_MODE_DOT && job.cout < 1) ||
      (job.mode != CT_MODE_DOT && job.wout) ||
      (job.oout && job.mode != CT_MODE_DOT && job.mode != CT_MODE_CHANNELS) ||
      (job.mode == CT_MODE_PLANAR && (job.cout < 1 || job.cout > CT_PLANAR_MAX_OUT))) {
    PyErr_SetString(PyExc_ValueError, "correlate: bad mode, no outputs, weight or output "
                    "offsets outside dot mode, output offsets outside dot and channels modes, or more than CT_PLANAR_MAX_OUT outputs in planar mode");
    return false;
  }
  if (job.mode == CT_MODE_PLANAR &&
      (job.cs < 1 || job.xs[3] != 1 || job.step[1] != 1 || job.step[2] != 1 ||
       job.groups < 1 || job.res < 1 || job.groups * job.cout * job.res > CT_PLANAR_MAX_ROW ||
       job.chunks < 0 || (job.chunks > 1 && job.groups % job.chunks) ||
       !job.res_taps || !job.res_off || !job.res_count)) {
    PyErr_SetString(PyExc_ValueError,
                    "correlate: planar mode needs a channel stride, contiguous pixels, "
                    "step 1 along H and W, and its residues' taps and counts, at most "
                    "CT_PLANAR_MAX_ROW values a column");
    return false;
  }
  if (job.out_half < CT_HALF_NONE || job.out_half > CT_HALF_BF16 ||
      (job.out_half && job.itemsize != 4)) {
    PyErr_SetString(PyExc_ValueError,
                    "correlate: bad output kind, or a half-precision output without float32 compute");
    return false;
  }
  if (job.out_half) job.stream_out = 0;  // rounded as stored, through the scalar path
  return true;
}

// Parses a job and runs it now on the current instruction set, without the GIL (the
// prepared form, run later by the pool, is `prepared_call` below).
template <typename Job>
PyObject* run_now(bool (*parse)(PyObject*, Job&), void (*const Isa::*run)(const Job&),
                  PyObject* spec) {
  Job job;
  if (!parse(spec, job)) return nullptr;
  const Isa* isa = current;
  if (!run_released([&](const std::atomic<int>*, bool) { (isa->*run)(job); })) return nullptr;
  Py_RETURN_NONE;
}

PyObject* py_correlate(PyObject*, PyObject* spec) {
  return run_now(parse_correlate, &Isa::correlate, spec);
}

Field kGradWeightFields[] = {
    CT_FIELD(GwJob, itemsize), CT_FIELD(GwJob, swapped),  CT_FIELD(GwJob, x),
    CT_FIELD(GwJob, xs),       CT_FIELD(GwJob, g),        CT_FIELD(GwJob, gs),
    CT_FIELD(GwJob, gdims),    CT_FIELD(GwJob, off),      CT_FIELD(GwJob, ntaps),
    CT_FIELD(GwJob, step),     CT_FIELD(GwJob, part),     CT_FIELD(GwJob, pa),
    CT_FIELD(GwJob, pt),       CT_FIELD(GwJob, unit0),    CT_FIELD(GwJob, unit1),
    CT_FIELD(GwJob, zero),     CT_FIELD(GwJob, box),      CT_FIELD(GwJob, wcount),
    CT_FIELD(GwJob, cin),      CT_FIELD(GwJob, cout),     CT_OPTIONAL(GwJob, gx),
    CT_OPTIONAL(GwJob, gxs),   CT_OPTIONAL(GwJob, w),     CT_OPTIONAL(GwJob, group_cin),
};

// grad_weight's fields (see _native_kernel.grad_weight) into a job; false with an error
// set.
bool parse_grad_weight(PyObject* spec, GwJob& job) {
  job = GwJob{};  // the default: no grad_input in the same pass (gx, gxs, w)
  if (!fill("grad_weight", "GwJob", kGradWeightFields, spec, &job)) return false;
  if (job.itemsize != 4 && job.itemsize != 8) {
    PyErr_SetString(PyExc_ValueError, "grad_weight: itemsize must be 4 or 8");
    return false;
  }
  // Along C_out, whole vectors; along C_in, any count, its sums at strides whose rows
  // hold whole vectors (the caller's padded buffer).
  const int64_t lanes = current->lanes(job.itemsize);
  if (job.swapped < CT_GW_ALONG_COUT || job.swapped > CT_GW_DEPTHWISE ||
      (job.swapped == CT_GW_ALONG_COUT && job.cout % lanes) ||
      (job.swapped == CT_GW_ALONG_CIN && job.cin % lanes &&
       (!job.pa || job.pt % lanes || job.pa % lanes))) {
    PyErr_SetString(PyExc_ValueError,
                    "grad_weight: bad kind, a C_out side that is not whole vectors, or a C_in "
                    "side that is not, without strides of whole vectors");
    return false;
  }
  if (job.group_cin &&
      !(job.swapped == CT_GW_ALONG_CIN && job.pa && job.group_cin > 0 &&
        job.cin % job.group_cin == 0 && job.cin / job.group_cin * job.cout <= lanes)) {
    PyErr_SetString(PyExc_ValueError,
                    "grad_weight: conv groups side by side need the swapped layout at "
                    "strides, C_in a multiple of group_cin, and every group's cotangent "
                    "channels in one vector");
    return false;
  }
  if (job.gx && !(job.swapped == CT_GW_ALONG_CIN && job.w && job.pa && job.unit0 == 0 &&
                  (job.group_cin ? job.cin <= current->max_vectors() * lanes
                                 : current->fuses_grad_input(job.itemsize, job.cin, job.cout)))) {
    PyErr_SetString(PyExc_ValueError,
                    "grad_weight: grad_input in the same pass needs the swapped few-sums "
                    "case, every unit, the weight and part at strides");
    return false;
  }
  return true;
}

PyObject* py_grad_weight(PyObject*, PyObject* spec) {
  return run_now(parse_grad_weight, &Isa::grad_weight, spec);
}

// The weight layout of CT_MODE_CHANNELS, gathered from wherever the weight lies:
// dst[chunk][tap][r][column] = src[table[tap][col] + r * row_stride], zero in columns
// past `cols` (up to whole vectors) and, with rows contiguous (the forward's), where the
// table says -1 (a phantom tap, _plan.merged_row). The table names each (tap, column)'s
// source element, so one loop serves the forward's phase taps, merged W residues and conv groups, and the
// transposed weight of grad_input; NumPy needed several passes and a transpose for it.
template <typename T>
void pack_columns(const T* src, const int64_t* table, int64_t taps, int64_t cols,
                  int64_t rows, int64_t row_stride, int64_t padded, int64_t chunk, T* dst) {
  if (row_stride != 1) {
    // Columns contiguous (grad_input's C_in), rows a whole C_out stride apart: 8 rows at
    // a time over every tap and chunk, so that the source is read as 8 sequential
    // streams. A chunk at a time read each row's few lines a power-of-two stride apart,
    // one latency-bound miss after another (W3: 1.8 ms for 8 MiB).
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const int64_t rn = std::min<int64_t>(8, rows - r0);
      T* chunk_dst = dst;
      for (int64_t c0 = 0; c0 < padded; c0 += chunk) {
        const int64_t width = std::min(chunk, padded - c0);
        const int64_t live = std::max<int64_t>(0, std::min(width, cols - c0));
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t* from = table + t * cols + c0;
          bool run = true;  // the columns one contiguous run of the source: copy rows whole
          for (int64_t c = 1; c < live && run; ++c) run = from[c] == from[0] + c;
          T* out = chunk_dst + (t * rows + r0) * width;
          for (int64_t r = 0; r < rn; ++r, out += width) {
            const T* row = src + (r0 + r) * row_stride;
            if (run && live) std::memcpy(out, row + from[0], live * sizeof(T));
            else
              for (int64_t c = 0; c < live; ++c) out[c] = row[from[c]];
            for (int64_t c = live; c < width; ++c) out[c] = T(0);
          }
        }
        chunk_dst += taps * rows * width;
      }
    }
    return;
  }
  const std::vector<T> zeros(rows);  // what phantom taps and a short last block read
  for (int64_t c0 = 0; c0 < padded; c0 += chunk) {
    const int64_t width = std::min(chunk, padded - c0);
    const int64_t live = std::max<int64_t>(0, std::min(width, cols - c0));
    // Rows contiguous (the forward's C_in), columns a C_out stride apart: 8 columns at a
    // time, every tap in turn, so that each column's taps (one after another in the
    // source) are read as 8 sequential streams. A row at a time would visit every column's
    // line per row, lines that, a power-of-two stride apart, share one cache set (W3's
    // 8 MiB weight took 2.6 ms so, against 0.3 ms of copying); all columns of one tap
    // before the next read a line per column of C_in/g <= 16, one stream a column (64 -> 236
    // g4 k7: 15% of the call).
    for (int64_t cb = 0; cb < live; cb += 8) {
      const int64_t cn = std::min<int64_t>(8, live - cb);
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t* from = table + t * cols + c0;
        T* tap_dst = dst + t * rows * width;
        // A last block of fewer than 8 columns reads zeros for the rest, which land on
        // the padding (whole vectors, cb + 8 <= width): element by element, its 6 of 38
        // columns took a third of the pack (384 -> 38 k4, 1 MB: 0.4 -> 0.3 ms).
        const T* col[8];
        for (int64_t c = 0; c < 8; ++c)
          col[c] = c < cn && from[cb + c] >= 0 ? src + from[cb + c] : zeros.data();
        int64_t r = 0;
#ifdef __SSE2__
        if constexpr (sizeof(T) == 4) {
          // Four columns by four rows a step, transposed in registers: the element loop
          // moved ~1.4 GB/s (a 19 MiB weight in 13 ms, its copy taking 2.8).
          if (cb + 8 <= width)
            for (; r + 4 <= rows; r += 4)
              for (int64_t h = 0; h < 8; h += 4) {
                __m128 a = _mm_loadu_ps(reinterpret_cast<const float*>(col[h] + r));
                __m128 b = _mm_loadu_ps(reinterpret_cast<const float*>(col[h + 1] + r));
                __m128 c = _mm_loadu_ps(reinterpret_cast<const float*>(col[h + 2] + r));
                __m128 d = _mm_loadu_ps(reinterpret_cast<const float*>(col[h + 3] + r));
                _MM_TRANSPOSE4_PS(a, b, c, d);
                float* o = reinterpret_cast<float*>(tap_dst + r * width + cb + h);
                _mm_storeu_ps(o, a);
                _mm_storeu_ps(o + width, b);
                _mm_storeu_ps(o + 2 * width, c);
                _mm_storeu_ps(o + 3 * width, d);
              }
        }
#endif
        for (; r < rows; ++r)
          for (int64_t c = 0; c < cn; ++c) tap_dst[r * width + cb + c] = col[c][r];
      }
    }
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = live; c < width; ++c) dst[(t * rows + r) * width + c] = T(0);
    dst += taps * rows * width;
  }
}

// pack's job: see pack_columns above (src, dst of `itemsize` floats).
struct PackJob {
  int itemsize;
  const void* src;
  const int64_t* table;
  int64_t taps, cols, rows, row_stride, padded, chunk;
  void* dst;
};

Field kPackFields[] = {
    CT_FIELD(PackJob, itemsize),   CT_FIELD(PackJob, src),        CT_FIELD(PackJob, table),
    CT_FIELD(PackJob, taps),       CT_FIELD(PackJob, cols),       CT_FIELD(PackJob, rows),
    CT_FIELD(PackJob, row_stride), CT_FIELD(PackJob, padded),     CT_FIELD(PackJob, chunk),
    CT_FIELD(PackJob, dst),
};

bool parse_pack(PyObject* spec, PackJob& a) {
  a = PackJob{};
  if (!fill("pack", "PackJob", kPackFields, spec, &a)) return false;
  if ((a.itemsize != 4 && a.itemsize != 8) || a.chunk < 1 || a.padded < a.cols) {
    PyErr_SetString(PyExc_ValueError, "pack: bad itemsize, chunk or padding");
    return false;
  }
  return true;
}

void run_pack(const PackJob& a) {
  if (a.itemsize == 4)
    pack_columns(static_cast<const float*>(a.src), a.table, a.taps, a.cols, a.rows,
                 a.row_stride, a.padded, a.chunk, static_cast<float*>(a.dst));
  else
    pack_columns(static_cast<const double*>(a.src), a.table, a.taps, a.cols, a.rows,
                 a.row_stride, a.padded, a.chunk, static_cast<double*>(a.dst));
}

PyObject* py_pack(PyObject*, PyObject* spec) {
  PackJob a;
  if (!parse_pack(spec, a)) return nullptr;
  Py_BEGIN_ALLOW_THREADS run_pack(a);
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// Output positions no tap reaches set to one value each (fill_unreached): the pixels
// (n, d, h, w) of a view, `count` of them along each axis `stride` bytes apart, each
// `pixel` bytes from `value` (the bias, in the output's dtype) or zeros where it is null.
// On the pool's threads: NumPy's strided fill ran a scalar loop on the calling thread
// while the pool's threads waited (48 -> 256 k1 s(1,4) 2-D: a quarter of the call).
struct FillJob {
  char* dst;
  int64_t count[4], stride[4], pixel;
  const char* value;
};

Field kFillFields[] = {
    CT_FIELD(FillJob, dst),   CT_FIELD(FillJob, count), CT_FIELD(FillJob, stride),
    CT_FIELD(FillJob, pixel), CT_FIELD(FillJob, value),
};

bool parse_fill(PyObject* spec, FillJob& a) {
  a = FillJob{};
  if (!fill("fill", "FillJob", kFillFields, spec, &a)) return false;
  if (a.pixel < 1 || a.count[0] < 0 || a.count[1] < 0 || a.count[2] < 0 || a.count[3] < 0) {
    PyErr_SetString(PyExc_ValueError, "fill: bad pixel size or counts");
    return false;
  }
  return true;
}

void run_fill(const FillJob& a) {
  const bool run = !a.value && a.stride[3] == a.pixel;  // a row's pixels one zeroed run
  for (int64_t n = 0; n < a.count[0]; ++n)
    for (int64_t d = 0; d < a.count[1]; ++d)
      for (int64_t h = 0; h < a.count[2]; ++h) {
        char* row = a.dst + n * a.stride[0] + d * a.stride[1] + h * a.stride[2];
        if (run) {
          std::memset(row, 0, a.count[3] * a.pixel);
          continue;
        }
        for (int64_t w = 0; w < a.count[3]; ++w) {
          char* px = row + w * a.stride[3];
          if (a.value) std::memcpy(px, a.value, a.pixel);
          else std::memset(px, 0, a.pixel);
        }
      }
}

// The planar copy of an input that CT_MODE_PLANAR reads (planar.hpp): plane (n, d) of x
// (N, D, H, W, C; channels contiguous, element strides xs) becomes C images of `height`
// rows of `pitch` elements, `image` elements apart (>= height * pitch), at
// dst + (n * D + d) * c * image, channel by channel, each holding the plane's H x W pixels
// from row `top` and column `left` on, and zeros around them (up to the next image).
// Planes [plane0, plane1) of the flat (n, d) order.
struct PlanarJob {
  int itemsize;
  const void* src;
  int64_t xs[4];
  int64_t d, h, w, c, top, left, height, pitch, image, plane0, plane1;
  void* dst;
};

Field kPlanarFields[] = {
    CT_FIELD(PlanarJob, itemsize), CT_FIELD(PlanarJob, src),    CT_FIELD(PlanarJob, xs),
    CT_FIELD(PlanarJob, d),        CT_FIELD(PlanarJob, h),      CT_FIELD(PlanarJob, w),
    CT_FIELD(PlanarJob, c),        CT_FIELD(PlanarJob, top),    CT_FIELD(PlanarJob, left),
    CT_FIELD(PlanarJob, height),   CT_FIELD(PlanarJob, pitch),  CT_FIELD(PlanarJob, image),
    CT_FIELD(PlanarJob, plane0),   CT_FIELD(PlanarJob, plane1), CT_FIELD(PlanarJob, dst),
};

bool parse_planar(PyObject* spec, PlanarJob& a) {
  a = PlanarJob{};
  if (!fill("to_planar", "PlanarJob", kPlanarFields, spec, &a)) return false;
  if ((a.itemsize != 4 && a.itemsize != 8) || a.left < 0 || a.top < 0 ||
      a.pitch < a.left + a.w || a.height < a.top + a.h || a.image < a.height * a.pitch ||
      a.plane0 < 0 ||
      a.plane1 < a.plane0) {
    PyErr_SetString(PyExc_ValueError, "to_planar: bad itemsize, padding or planes");
    return false;
  }
  return true;
}

#ifdef __SSE2__
// Four pixels ps apart by four values from px on, transposed in registers: value i's
// four pixels to t[i].
static inline void transpose_4x4(const float* px, int64_t ps, float* t0, float* t1, float* t2,
                                 float* t3) {
  __m128 p0 = _mm_loadu_ps(px), p1 = _mm_loadu_ps(px + ps);
  __m128 p2 = _mm_loadu_ps(px + 2 * ps), p3 = _mm_loadu_ps(px + 3 * ps);
  _MM_TRANSPOSE4_PS(p0, p1, p2, p3);
  _mm_storeu_ps(t0, p0);
  _mm_storeu_ps(t1, p1);
  _mm_storeu_ps(t2, p2);
  _mm_storeu_ps(t3, p3);
}
#endif

// Pixels [0, n) of a row whose pixel j holds its S values from in + j * ps on, made
// planar: value s of pixel j to outs[s][j] (planar_rows' long rows). For float32, four
// pixels at a time transposed in registers (four values at once, or a pixel's two or
// three): a scalar load and store a value ran copies that stay in cache 1.7-2x slower.
template <typename T>
void transpose_pixels(const T* in, int64_t ps, int64_t n, int64_t S, T* const* outs) {
  int64_t s0 = 0;  // values made planar so far (the rest, from s0, below)
#ifdef __SSE2__
  if constexpr (sizeof(T) == 4) {
    int64_t fours = n / 4 * 4;  // pixels made planar in registers
    const float* x = reinterpret_cast<const float*>(in);
    float* const* o = reinterpret_cast<float* const*>(outs);
    if (S == 2 && ps == 2) {  // [a0 b0 a1 b1] [a2 b2 a3 b3]
      for (int64_t j = 0; j < fours; j += 4) {
        const __m128 p = _mm_loadu_ps(x + 2 * j), q = _mm_loadu_ps(x + 2 * j + 4);
        _mm_storeu_ps(o[0] + j, _mm_shuffle_ps(p, q, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm_storeu_ps(o[1] + j, _mm_shuffle_ps(p, q, _MM_SHUFFLE(3, 1, 3, 1)));
      }
      s0 = 2;
    } else if (S == 3 && ps == 3) {  // [a0 b0 c0 a1] [b1 c1 a2 b2] [c2 a3 b3 c3]
      // 16 pixels a round, each value's 64 bytes stored together: one value after
      // another, as the copy value by value, runs at the memory's rate once the copy
      // outgrows the caches (16 bytes of each in turn: 1.5x slower there).
      for (int64_t j = 0; j < n / 16 * 16; j += 16) {
        __m128 xa[4], xb[4], xc[4];
        for (int k = 0; k < 4; ++k) {
          const float* px = x + 3 * (j + 4 * k);
          const __m128 p = _mm_loadu_ps(px), q = _mm_loadu_ps(px + 4), r = _mm_loadu_ps(px + 8);
          const __m128 a = _mm_shuffle_ps(p, p, _MM_SHUFFLE(3, 3, 3, 0));   // a0 a1 a1 a1
          const __m128 a2 = _mm_shuffle_ps(q, r, _MM_SHUFFLE(1, 1, 2, 2));  // a2 a2 a3 a3
          const __m128 b = _mm_shuffle_ps(p, q, _MM_SHUFFLE(0, 0, 1, 1));   // b0 b0 b1 b1
          const __m128 b2 = _mm_shuffle_ps(q, r, _MM_SHUFFLE(2, 2, 3, 3));  // b2 b2 b3 b3
          const __m128 c = _mm_shuffle_ps(p, q, _MM_SHUFFLE(1, 1, 2, 2));   // c0 c0 c1 c1
          const __m128 c2 = _mm_shuffle_ps(r, r, _MM_SHUFFLE(3, 3, 0, 0));  // c2 c2 c3 c3
          xa[k] = _mm_shuffle_ps(a, a2, _MM_SHUFFLE(2, 0, 1, 0));
          xb[k] = _mm_shuffle_ps(b, b2, _MM_SHUFFLE(2, 0, 2, 0));
          xc[k] = _mm_shuffle_ps(c, c2, _MM_SHUFFLE(2, 0, 2, 0));
        }
        for (int k = 0; k < 4; ++k) _mm_storeu_ps(o[0] + j + 4 * k, xa[k]);
        for (int k = 0; k < 4; ++k) _mm_storeu_ps(o[1] + j + 4 * k, xb[k]);
        for (int k = 0; k < 4; ++k) _mm_storeu_ps(o[2] + j + 4 * k, xc[k]);
      }
      fours = n / 16 * 16;
      s0 = 3;
    } else {
      // Four values at a time along the whole row: four output streams open at once,
      // the row (read again per four values) staying in L1. Every stream at once ran
      // 1.3-1.5x slower once the copy outgrew the caches.
      for (; s0 + 4 <= S; s0 += 4)
        for (int64_t j = 0; j < fours; j += 4)
          transpose_4x4(x + j * ps + s0, ps, o[s0] + j, o[s0 + 1] + j, o[s0 + 2] + j,
                        o[s0 + 3] + j);
    }
    for (int64_t s = 0; s < s0; ++s)  // the last pixels of the values done
      for (int64_t j = fours; j < n; ++j) outs[s][j] = in[j * ps + s];
  }
#endif
  for (int64_t s = s0; s < S; ++s)  // value by value, each one run of the copy
    for (int64_t j = 0; j < n; ++j) outs[s][j] = in[j * ps + s];
}

// Each input row's pixels, four at a time by four channels transposed in registers for
// float32 (each pixel's channels one run of the source, each channel's pixels one run of
// the copy): four pixels of every channel in turn. (transpose_pixels' order, a channel's
// pixels along the row before the next four channels, and its two- and three-value
// paths ran the forward's copies 1.08-1.30x slower on rows of 18-32 pixels.)
template <typename T>
void to_planar(const PlanarJob& a) {
  const T* src = static_cast<const T*>(a.src);
  const int64_t c = a.c, w = a.w, left = a.left, pitch = a.pitch, ps = a.xs[3];
  const int64_t image = a.image;
  for (int64_t plane = a.plane0; plane < a.plane1; ++plane) {
    const int64_t n = plane / a.d, d = plane % a.d;
    T* out = static_cast<T*>(a.dst) + plane * c * image;
    for (int64_t ch = 0; ch < c; ++ch) {  // the zeros around the pixels: each stretch
      T* o = out + ch * image;            // from the end of a row's pixels (or the
      int64_t from = 0;                   // image's start) to the next row's first
      for (int64_t hh = a.top; hh <= a.top + a.h; ++hh) {
        const int64_t to = hh < a.top + a.h ? hh * pitch + left : image;
        std::fill(o + from, o + to, T(0));
        from = hh * pitch + left + w;
      }
    }
    for (int64_t hh = 0; hh < a.h; ++hh) {
      const T* row = src + n * a.xs[0] + d * a.xs[1] + hh * a.xs[2];
      T* orow = out + (a.top + hh) * pitch + left;
      int64_t w0 = 0;
#ifdef __SSE2__
      if constexpr (sizeof(T) == 4) {
        for (; w0 + 4 <= w; w0 += 4) {
          const float* px = reinterpret_cast<const float*>(row + w0 * ps);
          float* o = reinterpret_cast<float*>(orow + w0);
          int64_t ch = 0;
          for (; ch + 4 <= c; ch += 4)
            transpose_4x4(px + ch, ps, o + ch * image, o + (ch + 1) * image,
                          o + (ch + 2) * image, o + (ch + 3) * image);
          for (; ch < c; ++ch)
            for (int64_t i = 0; i < 4; ++i) o[ch * image + i] = px[i * ps + ch];
        }
      }
#endif
      for (; w0 < w; ++w0)
        for (int64_t ch = 0; ch < c; ++ch) orow[ch * image + w0] = row[w0 * ps + ch];
    }
  }
}

void run_planar_copy(const PlanarJob& a) {
  if (a.itemsize == 4) to_planar<float>(a);
  else to_planar<double>(a);
}

Field kPairFields[] = {
    CT_FIELD(PairJob, itemsize), CT_FIELD(PairJob, x),        CT_FIELD(PairJob, xs),
    CT_FIELD(PairJob, in_d),     CT_FIELD(PairJob, base),     CT_FIELD(PairJob, h),
    CT_FIELD(PairJob, w),        CT_FIELD(PairJob, c),        CT_FIELD(PairJob, v),
    CT_FIELD(PairJob, pairs),    CT_FIELD(PairJob, n0),       CT_FIELD(PairJob, n1),
    CT_FIELD(PairJob, j0),       CT_FIELD(PairJob, j1),
};

// pair_transform's fields (see _native_kernel.pair_transform) into a job; false with an
// error set.
bool parse_pair(PyObject* spec, PairJob& job) {
  job = PairJob{};
  if (!fill("pair_transform", "PairJob", kPairFields, spec, &job)) return false;
  if ((job.itemsize != 4 && job.itemsize != 8) || job.j0 < 0 || job.j1 > job.pairs ||
      job.n0 < 0 || job.c < 1) {
    PyErr_SetString(PyExc_ValueError, "pair_transform: bad itemsize, pairs or channels");
    return false;
  }
  return true;
}

PyObject* py_pair_transform(PyObject*, PyObject* spec) {
  return run_now(parse_pair, &Isa::pair_transform, spec);
}

// --- Deferred calls and the pool --------------------------------------------------------
// A call is parsed and checked when Python prepares it (a capsule holding a Call), and
// run later by `run_tasks` on the pool, without the GIL. The arrays it addresses are kept
// alive by the Python caller until run_tasks returns.

struct Call {
  enum Kind { CORRELATE, GRAD_WEIGHT, PACK, PAIR, PLANAR, FILL } kind;
  CtJob ct;
  GwJob gw;
  PackJob pack;
  PairJob pair;
  PlanarJob planar;
  FillJob fill;
  const Isa* isa;
};

const char* const kCallName = "convtranspose._native.Call";
const char* const kOnceName = "convtranspose._native.Once";

void run_call(const Call& c) {
  switch (c.kind) {
    case Call::CORRELATE: c.isa->correlate(c.ct); break;
    case Call::GRAD_WEIGHT: c.isa->grad_weight(c.gw); break;
    case Call::PACK: run_pack(c.pack); break;
    case Call::PAIR: c.isa->pair_transform(c.pair); break;
    case Call::PLANAR: run_planar_copy(c.planar); break;
    case Call::FILL: run_fill(c.fill); break;
  }
}

// A call of `kind` whose fields `parse` reads into its `field`, as a capsule: parsed once
// here, when Python prepares it, and run as it is by the pool.
template <typename Job>
PyObject* prepared_call(Call::Kind kind, Job Call::*field, bool (*parse)(PyObject*, Job&),
                        PyObject* spec) {
  Call* c = new Call{kind, {}, {}, {}, {}, {}, {}, current};
  if (!parse(spec, c->*field)) {
    delete c;
    return nullptr;
  }
  PyObject* cap = PyCapsule_New(c, kCallName, [](PyObject* o) {
    delete static_cast<Call*>(PyCapsule_GetPointer(o, kCallName));
  });
  if (!cap) delete c;
  return cap;
}

PyObject* py_correlate_call(PyObject*, PyObject* spec) {
  return prepared_call(Call::CORRELATE, &Call::ct, parse_correlate, spec);
}

PyObject* py_grad_weight_call(PyObject*, PyObject* spec) {
  return prepared_call(Call::GRAD_WEIGHT, &Call::gw, parse_grad_weight, spec);
}

PyObject* py_pack_call(PyObject*, PyObject* spec) {
  return prepared_call(Call::PACK, &Call::pack, parse_pack, spec);
}

PyObject* py_planar_call(PyObject*, PyObject* spec) {
  return prepared_call(Call::PLANAR, &Call::planar, parse_planar, spec);
}

PyObject* py_pair_call(PyObject*, PyObject* spec) {
  return prepared_call(Call::PAIR, &Call::pair, parse_pair, spec);
}

PyObject* py_fill_call(PyObject*, PyObject* spec) {
  return prepared_call(Call::FILL, &Call::fill, parse_fill, spec);
}

// The calls of a sequence of Call capsules, copied (false with an error set).
bool calls_of(PyObject* seq, std::vector<Call>& out) {
  PyObject* fast = PySequence_Fast(seq, "run_tasks: a task's calls must be a sequence");
  if (!fast) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  for (Py_ssize_t i = 0; i < n; ++i) {
    void* p = PyCapsule_GetPointer(PySequence_Fast_GET_ITEM(fast, i), kCallName);
    if (!p) {
      Py_DECREF(fast);
      return false;
    }
    out.push_back(*static_cast<Call*>(p));
  }
  Py_DECREF(fast);
  return true;
}

// Calls that run once, before the first task that names them, and the calls themselves
// (what a recorded program copies: see `Program`).
struct OnceCalls {
  pool::Once once;
  std::vector<Call> calls;
};

// once(calls) -> a capsule: calls that run_tasks runs once, before the first task that
// names it (a weight's packing).
PyObject* py_once(PyObject*, PyObject* args) {
  PyObject* seq;
  if (!PyArg_ParseTuple(args, "O", &seq)) return nullptr;
  OnceCalls* once = new OnceCalls();
  if (!calls_of(seq, once->calls)) {
    delete once;
    return nullptr;
  }
  once->once.body = [once] {
    for (const Call& c : once->calls) run_call(c);
  };
  PyObject* cap = PyCapsule_New(once, kOnceName, [](PyObject* o) {
    delete static_cast<OnceCalls*>(PyCapsule_GetPointer(o, kOnceName));
  });
  if (!cap) delete once;
  return cap;
}

// One task as Python hands it over: a tuple (calls, shared, once or None, keep[, rows]).
struct TaskTuple {
  std::vector<Call> calls;
  bool shared = false;
  OnceCalls* once = nullptr;  // lives on in the caller's tuple
  int64_t rows = -1;          // pool::Task::rows
};

// The tasks of a sequence of such tuples (false with an error set; `who` names the caller).
bool tasks_of(PyObject* seq, const char* who, std::vector<TaskTuple>& out) {
  PyObject* fast = PySequence_Fast(seq, "tasks must be a sequence");
  if (!fast) return false;
  bool ok = true;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast) && ok; ++i) {
    PyObject* t = PySequence_Fast_GET_ITEM(fast, i);
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 3) {
      PyErr_Format(PyExc_TypeError, "%s: a task is (calls, shared, once, ...)", who);
      ok = false;
      break;
    }
    TaskTuple task;
    ok = calls_of(PyTuple_GET_ITEM(t, 0), task.calls);
    const int shared = ok ? PyObject_IsTrue(PyTuple_GET_ITEM(t, 1)) : 0;
    ok = ok && shared >= 0;
    task.shared = shared > 0;
    PyObject* o = PyTuple_GET_ITEM(t, 2);
    if (ok && o != Py_None) {
      task.once = static_cast<OnceCalls*>(PyCapsule_GetPointer(o, kOnceName));
      ok = task.once != nullptr;
    }
    if (ok && PyTuple_GET_SIZE(t) > 4) {
      task.rows = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 4));
      ok = !(task.rows == -1 && PyErr_Occurred());
    }
    out.push_back(std::move(task));
  }
  Py_DECREF(fast);
  return ok;
}

// A pool task running `calls` in order, until the pool stops.
pool::Task pool_task(std::vector<Call> calls, bool shared, pool::Once* once, int64_t rows) {
  auto held = std::make_shared<std::vector<Call>>(std::move(calls));
  return {[held] {
            for (const Call& c : *held) {
              if (pool::stopping()) return;
              run_call(c);
            }
          },
          shared, once, rows};
}

// run_tasks(tasks, threads): runs the tasks (see TaskTuple) on the caller and up to
// threads - 1 pool threads, the GIL released.
PyObject* py_run_tasks(PyObject*, PyObject* args) {
  PyObject* seq;
  int threads;
  if (!PyArg_ParseTuple(args, "Oi", &seq, &threads)) return nullptr;
  std::vector<TaskTuple> parsed;
  if (!tasks_of(seq, "run_tasks", parsed)) return nullptr;
  std::vector<pool::Task> tasks;
  tasks.reserve(parsed.size());
  for (TaskTuple& t : parsed)  // the Once capsules live on in `seq`
    tasks.push_back(pool_task(std::move(t.calls), t.shared,
                              t.once ? &t.once->once : nullptr, t.rows));
  const int helpers = std::max(0, std::min(threads, 256) - 1);
  const bool done = run_released([&](const std::atomic<int>* stop, bool nested) {
    pool::instance()->run(std::move(tasks), nested ? 0 : helpers, stop);
  });
  if (!done) return nullptr;
  Py_RETURN_NONE;
}

// --- Recorded programs ------------------------------------------------------------------
// A call of a layer with many phases prepares a task per phase in Python (~20 us each: 64
// at stride 4 in 3-D, more than the kernel's time on a small layer). A program records a
// call's tasks once; a later call of the same plan runs them again with the addresses of
// its own arrays: every address a call holds into one of the recorded arrays (input,
// output, packed weight, the weight it packs from, bias) moves with that array, its row
// cursors are fresh zeros, and its once-calls run once again. Addresses outside them
// (tap offsets, pack tables) stay: the Python caller keeps those arrays alive.

struct Program {
  struct Step {
    std::vector<Call> calls;
    bool shared;
    int64_t once;  // index into onces, or -1
    int64_t rows;
  };
  std::vector<Step> steps;
  std::vector<std::vector<Call>> onces;
  std::vector<int64_t*> cursors;  // the distinct row cursors, as recorded
};

const char* const kProgramName = "convtranspose._native.Program";

// Where a recorded array [from, from + size) lies in this call: at `to`.
struct Move {
  uintptr_t from, size, to;
};

// p moved with the array it points into; false where it points into none of them.
template <typename P>
bool moved(P& p, const std::vector<Move>& moves) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (!a) return true;
  for (const Move& m : moves)
    if (a - m.from < m.size) {
      p = reinterpret_cast<P>(a - m.from + m.to);
      return true;
    }
  return false;
}

// Every address of c that must move with the recorded arrays; false where one lies
// outside them all (the program does not match the arrays it is given).
bool move_call(Call& c, const std::vector<Move>& m) {
  switch (c.kind) {
    case Call::CORRELATE:
      return moved(c.ct.x, m) && moved(c.ct.w, m) && moved(c.ct.out, m) && moved(c.ct.bias, m);
    case Call::GRAD_WEIGHT:
      return moved(c.gw.x, m) && moved(c.gw.g, m) && moved(c.gw.part, m) &&
             moved(c.gw.gx, m) && moved(c.gw.w, m);
    case Call::PACK: return moved(c.pack.src, m) && moved(c.pack.dst, m);
    case Call::PAIR: return moved(c.pair.x, m) && moved(c.pair.v, m);
    case Call::PLANAR: return moved(c.planar.src, m) && moved(c.planar.dst, m);
    case Call::FILL: return moved(c.fill.dst, m) && moved(c.fill.value, m);
  }
  return false;
}

// The (recorded address, size in bytes, address now) triples of a sequence.
bool moves_of(PyObject* seq, std::vector<Move>& moves) {
  PyObject* fast = PySequence_Fast(seq, "moves must be a sequence");
  if (!fast) return false;
  bool ok = true;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast) && ok; ++i) {
    unsigned long long from, size, to;
    ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KKK", &from, &size, &to);
    moves.push_back({static_cast<uintptr_t>(from), static_cast<uintptr_t>(size),
                     static_cast<uintptr_t>(to)});
  }
  Py_DECREF(fast);
  return ok;
}

// program(tasks, arrays) -> a capsule recording tasks as run_tasks takes them, or None
// where a call addresses memory outside `arrays` (moves that leave them in place): such
// tasks cannot be run again elsewhere.
PyObject* py_program(PyObject*, PyObject* args) {
  PyObject *seq, *arrays;
  if (!PyArg_ParseTuple(args, "OO", &seq, &arrays)) return nullptr;
  std::vector<Move> in_place;
  if (!moves_of(arrays, in_place)) return nullptr;
  std::vector<TaskTuple> parsed;
  if (!tasks_of(seq, "program", parsed)) return nullptr;
  auto* program = new Program();
  std::vector<const OnceCalls*> seen;
  for (TaskTuple& t : parsed) {
    Program::Step step{std::move(t.calls), t.shared, -1, t.rows};
    if (t.once) {
      auto at = std::find(seen.begin(), seen.end(), t.once);
      if (at == seen.end()) {
        seen.push_back(t.once);
        program->onces.push_back(t.once->calls);
      }
      step.once = std::find(seen.begin(), seen.end(), t.once) - seen.begin();
    }
    for (const Call& c : step.calls)
      if (c.kind == Call::CORRELATE && c.ct.cursor &&
          std::find(program->cursors.begin(), program->cursors.end(), c.ct.cursor) ==
              program->cursors.end())
        program->cursors.push_back(c.ct.cursor);
    program->steps.push_back(std::move(step));
  }
  bool inside = true;
  for (Program::Step& step : program->steps)
    for (Call& c : step.calls) inside = inside && move_call(c, in_place);
  for (auto& calls : program->onces)
    for (Call& c : calls) inside = inside && move_call(c, in_place);
  if (!inside) {
    delete program;
    Py_RETURN_NONE;
  }
  PyObject* cap = PyCapsule_New(program, kProgramName, [](PyObject* o) {
    delete static_cast<Program*>(PyCapsule_GetPointer(o, kProgramName));
  });
  if (!cap) delete program;
  return cap;
}

// run_program(program, threads, moves): the recorded tasks on the pool as run_tasks runs
// them, each address moved by `moves`, a sequence of (recorded address, size in bytes,
// address now) of the arrays the calls read and write.
PyObject* py_run_program(PyObject*, PyObject* args) {
  PyObject *cap, *seq;
  int threads;
  if (!PyArg_ParseTuple(args, "OiO", &cap, &threads, &seq)) return nullptr;
  auto* program = static_cast<const Program*>(PyCapsule_GetPointer(cap, kProgramName));
  if (!program) return nullptr;
  std::vector<Move> moves;
  if (!moves_of(seq, moves)) return nullptr;
  bool ok = true;
  // Fresh cursors, onces and calls, every address moved.
  std::vector<int64_t> cursors(program->cursors.size(), 0);
  std::vector<std::unique_ptr<pool::Once>> onces;
  auto fresh = [&](std::vector<Call>& calls) {
    for (Call& c : calls) {
      if (!move_call(c, moves)) return false;
      if (c.kind == Call::CORRELATE && c.ct.cursor)
        c.ct.cursor = cursors.data() + (std::find(program->cursors.begin(),
                                                  program->cursors.end(), c.ct.cursor) -
                                        program->cursors.begin());
    }
    return true;
  };
  for (const auto& recorded : program->onces) {
    auto calls = std::make_shared<std::vector<Call>>(recorded);
    ok = ok && fresh(*calls);
    onces.push_back(std::make_unique<pool::Once>());
    onces.back()->body = [calls] {
      for (const Call& c : *calls) run_call(c);
    };
  }
  std::vector<pool::Task> tasks;
  tasks.reserve(program->steps.size());
  for (const Program::Step& step : program->steps) {
    std::vector<Call> calls = step.calls;
    ok = ok && fresh(calls);
    tasks.push_back(pool_task(std::move(calls), step.shared,
                              step.once >= 0 ? onces[step.once].get() : nullptr, step.rows));
  }
  if (!ok) {
    PyErr_SetString(PyExc_ValueError,
                    "run_program: a call addresses memory outside the arrays given");
    return nullptr;
  }
  const int helpers = std::max(0, std::min(threads, 256) - 1);
  const bool done = run_released([&](const std::atomic<int>* stop, bool nested) {
    pool::instance()->run(std::move(tasks), nested ? 0 : helpers, stop);
  });
  if (!done) return nullptr;
  Py_RETURN_NONE;
}

// interrupts() -> the count of SIGINTs so far, SIGINT's handler armed (see "Ctrl-C" above).
PyObject* py_interrupts(PyObject*, PyObject*) {
  arm();
  return PyLong_FromUnsignedLongLong(g_interrupts.load(std::memory_order_acquire));
}

// check_interrupt(mark) -> the new mark; raises where a call that started at `mark` is
// to stop (what a kernel call does between its rows, for Python loops between tiles).
PyObject* py_check_interrupt(PyObject*, PyObject* arg) {
  uint64_t seen = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  if (look(seen) < 0) return nullptr;
  return PyLong_FromUnsignedLongLong(seen);
}

// warm(threads, microseconds): the pool's threads for a batch of `threads` spin for that
// long, ready for it (call it before the Python work that prepares the batch).
PyObject* py_warm(PyObject*, PyObject* args) {
  int threads;
  long long us;
  if (!PyArg_ParseTuple(args, "iL", &threads, &us)) return nullptr;
  const int helpers = std::max(0, std::min(threads, 256) - 1);
  if (helpers > 0) pool::instance()->warm(helpers, std::max(0LL, std::min(us, 100000LL)) * 1000);
  Py_RETURN_NONE;
}

// The end of a binding that takes buffers: they are released, then None, or a ValueError
// with `message` (unless an error is already set).
PyObject* finish_buffers(bool ok, const char* message,
                         std::initializer_list<Py_buffer*> buffers) {
  for (Py_buffer* b : buffers) PyBuffer_Release(b);  // (one never filled has no obj)
  if (ok) Py_RETURN_NONE;
  if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, message);
  return nullptr;
}

// f(T()) with T the float type of `itemsize` bytes (4 or 8), the GIL released.
template <typename F>
void with_float_type(int itemsize, F&& f) {
  Py_BEGIN_ALLOW_THREADS
  if (itemsize == 4) f(float());
  else f(double());
  Py_END_ALLOW_THREADS
}

// Arrays by the buffer protocol (C-contiguous), not addresses: a small call's whole
// budget is ~20 us, and three `.ctypes.data` lookups cost 3 of them.
PyObject* py_gather_sum(PyObject*, PyObject* args) {
  int itemsize;
  Py_buffer src, table, out;
  Py_ssize_t terms, nout, cols;
  if (!PyArg_ParseTuple(args, "iy*y*nnnw*", &itemsize, &src, &table, &terms, &nout, &cols,
                        &out))
    return nullptr;
  const bool ok = (itemsize == 4 || itemsize == 8) && terms >= 1 && nout >= 0 && cols >= 1 &&
                  table.len >= terms * nout * 8 && out.len >= nout * cols * itemsize &&
                  src.len >= cols * itemsize;
  if (ok) {
    current->gather_sum(itemsize, src.buf, static_cast<const int64_t*>(table.buf), terms,
                        nout, cols, out.buf);
  }
  return finish_buffers(ok, "gather_sum: bad itemsize, or arrays too short",
                        {&src, &table, &out});
}

// A depthwise cotangent's rows split by W residue (_vjp_native._residues_along_w): rows
// [row0, row1) of src (w_cot pixels of c values each) into dst rows of `res` stretches of
// `stretch` pixels, residue r's pixels j * res + r from pixel `left` on, zeros around
// them. NumPy's strided assignment copied each pixel's few channels with a memmove call.
template <typename T>
void split_residues(const T* src, T* dst, int64_t row0, int64_t row1, int64_t w_cot,
                    int64_t c, int64_t res, int64_t left, int64_t stretch) {
  for (int64_t row = row0; row < row1; ++row) {
    const T* in = src + row * w_cot * c;
    T* out = dst + row * res * stretch * c;
    for (int64_t r = 0; r < res; ++r, out += stretch * c) {
      const int64_t count = r < w_cot ? (w_cot - r + res - 1) / res : 0;
      std::fill(out, out + left * c, T(0));
      if (res == 1)  // the row whole, padded (_execute.padded_along_w)
        std::memcpy(out + left * c, in, sizeof(T) * count * c);
      else
        for (int64_t j = 0; j < count; ++j)
          for (int64_t k = 0; k < c; ++k) out[(left + j) * c + k] = in[(j * res + r) * c + k];
      std::fill(out + (left + count) * c, out + stretch * c, T(0));
    }
  }
}

PyObject* py_split_residues(PyObject*, PyObject* args) {
  int itemsize;
  Py_buffer src, dst;
  Py_ssize_t row0, row1, w_cot, c, res, left, stretch;
  if (!PyArg_ParseTuple(args, "iy*w*nnnnnnn", &itemsize, &src, &dst, &row0, &row1, &w_cot, &c,
                        &res, &left, &stretch))
    return nullptr;
  const bool ok = (itemsize == 4 || itemsize == 8) && 0 <= row0 && row0 <= row1 && c >= 1 &&
                  res >= 1 && left >= 0 && stretch >= left + (w_cot + res - 1) / res &&
                  src.len >= row1 * w_cot * c * itemsize &&
                  dst.len >= row1 * res * stretch * c * itemsize;
  if (ok)
    with_float_type(itemsize, [&](auto t) {
      using T = decltype(t);
      split_residues(static_cast<const T*>(src.buf), static_cast<T*>(dst.buf), row0, row1,
                     w_cot, c, res, left, stretch);
    });
  return finish_buffers(ok, "split_residues: bad itemsize, geometry or sizes", {&src, &dst});
}

// Pixels [p0, p1) of src (c channels each) into dst with each channel repeated m times
// in a row (a channel multiplier's input, a fan-out's cotangent: _execute.repeat_channels).
// NumPy's m strided passes each swept the whole output: 12.5 ms for 369779 pixels of 4
// channels repeated 7 times.
template <int M, typename T>  // M: m where known when compiled (0: any)
void repeat_each(const T* src, T* dst, int64_t n, int64_t m) {
  if constexpr (M > 0) {
    for (int64_t k = 0; k < n; ++k)
      for (int j = 0; j < M; ++j) dst[k * M + j] = src[k];
  } else {
    for (int64_t k = 0; k < n; ++k, dst += m) std::fill(dst, dst + m, src[k]);
  }
}

template <typename T>
void repeat_channels(const T* src, T* dst, int64_t p0, int64_t p1, int64_t c, int64_t m) {
  const int64_t n = (p1 - p0) * c;  // the values of pixels [p0, p1), one after the other
  src += p0 * c;
  dst += p0 * c * m;
  switch (m) {
    case 2: return repeat_each<2>(src, dst, n, m);
    case 3: return repeat_each<3>(src, dst, n, m);
    case 4: return repeat_each<4>(src, dst, n, m);
    default: return repeat_each<0>(src, dst, n, m);
  }
}

// The inverse pass: pixels [p0, p1) of dst (c channels each) the sums of src's m
// repeats of each channel, added in order (a channel multiplier's grad_input:
// _execute.sum_repeats). NumPy's strided adds, one per repeat on one thread, took 1.9 ms
// of a 21 ms backward.
template <int M, typename T>  // M: m where known when compiled (0: any)
void sum_each(const T* src, T* dst, int64_t n, int64_t m) {
  if constexpr (M > 0) m = M;
  for (int64_t k = 0; k < n; ++k, src += m) {
    T sum = src[0] + src[1];
    for (int64_t j = 2; j < m; ++j) sum += src[j];
    dst[k] = sum;
  }
}

template <typename T>
void sum_repeats(const T* src, T* dst, int64_t p0, int64_t p1, int64_t c, int64_t m) {
  const int64_t n = (p1 - p0) * c;
  src += p0 * c * m;
  dst += p0 * c;
  switch (m) {
    case 2: return sum_each<2>(src, dst, n, m);
    case 3: return sum_each<3>(src, dst, n, m);
    case 4: return sum_each<4>(src, dst, n, m);
    default: return sum_each<0>(src, dst, n, m);
  }
}

// repeat_channels (SUM false) and sum_repeats: pixels [p0, p1) of c channels on the
// narrow side, each repeated m times on the wide side.
template <bool SUM>
PyObject* channel_repeats(PyObject* args, const char* error) {
  int itemsize;
  Py_buffer src, dst;
  Py_ssize_t p0, p1, c, m;
  if (!PyArg_ParseTuple(args, "iy*w*nnnn", &itemsize, &src, &dst, &p0, &p1, &c, &m))
    return nullptr;
  const Py_ssize_t narrow = p1 * c * itemsize, wide = narrow * m;
  const bool ok = (itemsize == 4 || itemsize == 8) && 0 <= p0 && p0 <= p1 && c >= 1 &&
                  m >= (SUM ? 2 : 1) && src.len >= (SUM ? wide : narrow) &&
                  dst.len >= (SUM ? narrow : wide);
  if (ok)
    with_float_type(itemsize, [&](auto t) {
      using T = decltype(t);
      const T* from = static_cast<const T*>(src.buf);
      T* to = static_cast<T*>(dst.buf);
      if constexpr (SUM) sum_repeats(from, to, p0, p1, c, m);
      else repeat_channels(from, to, p0, p1, c, m);
    });
  return finish_buffers(ok, error, {&src, &dst});
}

PyObject* py_repeat_channels(PyObject*, PyObject* args) {
  return channel_repeats<false>(args, "repeat_channels: bad itemsize, counts or sizes");
}

PyObject* py_sum_repeats(PyObject*, PyObject* args) {
  return channel_repeats<true>(args, "sum_repeats: bad itemsize, counts or sizes");
}

// Rows [row0, row1) of src (w pixels of c channels each) made planar for
// planar_grad_weight: dst row `row` holds each channel's `res` W residues, residue r of
// channel ch at ((row * c + ch) * res + r) * stretch, its pixel j * res + r at element
// left + j, zeros around. (res 1, left 0: the input's planar rows.)
template <typename T>
void planar_rows(const T* src, T* dst, int64_t row0, int64_t row1, int64_t w, int64_t c,
                 int64_t res, int64_t left, int64_t stretch) {
  // res pixels' channels, value s = r * c + ch, are one pixel of res * c values: the
  // `whole` such pixels that every residue has go through transpose_pixels.
  const int64_t S = res * c, whole = w / res;
  std::vector<T*> outs(S);
  for (int64_t row = row0; row < row1; ++row) {
    const T* in = src + row * w * c;
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t r = 0; r < res; ++r) {
        T* out = dst + ((row * c + ch) * res + r) * stretch;
        const int64_t count = r < w ? (w - r + res - 1) / res : 0;
        std::fill(out, out + left, T(0));
        std::fill(out + left + count, out + stretch, T(0));
        outs[r * c + ch] = out + left;
        for (int64_t j = whole; j < count; ++j) out[left + j] = in[(j * res + r) * c + ch];
      }
    transpose_pixels(in, S, whole, S, outs.data());
  }
}

PyObject* py_planar_rows(PyObject*, PyObject* args) {
  int itemsize;
  Py_buffer src, dst;
  Py_ssize_t row0, row1, w, c, res, left, stretch;
  if (!PyArg_ParseTuple(args, "iy*w*nnnnnnn", &itemsize, &src, &dst, &row0, &row1, &w, &c,
                        &res, &left, &stretch))
    return nullptr;
  const bool ok = (itemsize == 4 || itemsize == 8) && 0 <= row0 && row0 <= row1 && w >= 1 &&
                  c >= 1 && res >= 1 && left >= 0 && stretch >= left + (w + res - 1) / res &&
                  src.len >= row1 * w * c * itemsize &&
                  dst.len >= row1 * c * res * stretch * itemsize;
  if (ok)
    with_float_type(itemsize, [&](auto t) {
      using T = decltype(t);
      planar_rows(static_cast<const T*>(src.buf), static_cast<T*>(dst.buf), row0, row1, w, c,
                  res, left, stretch);
    });
  return finish_buffers(ok, "planar_rows: bad itemsize, geometry or sizes", {&src, &dst});
}

// The geometry both planar gradients take (PgwJob; _vjp_native._planar_geometry_array),
// int64: xrow, wv, grow, stretch, res, N, D, H, OD, OH, W, C (x's), taps D, H, W, stride
// D, H, c0, cin, o0, cout, row0, row1, then the D and H tap offsets and, per W tap, its
// residue and first element. Checks what both read: the cotangent rows and W taps.
bool parse_planar(const Py_buffer& geo, int itemsize, const Py_buffer& g, PgwJob& job) {
  const int64_t* v = static_cast<const int64_t*>(geo.buf);
  const int64_t count = geo.len / 8;
  if (!(itemsize == 4 || itemsize == 8) || count < 23) return false;
  job.itemsize = itemsize;
  job.xrow = v[0], job.wv = v[1], job.grow = v[2], job.stretch = v[3], job.res = v[4];
  for (int k = 0; k < 5; ++k) job.dims[k] = v[5 + k];
  job.gx_w = v[10], job.gx_c = v[11];
  for (int k = 0; k < 3; ++k) job.ntaps[k] = v[12 + k];
  job.step[0] = v[15], job.step[1] = v[16];
  job.c0 = v[17], job.cin = v[18], job.o0 = v[19], job.cout = v[20];
  job.row0 = v[21], job.row1 = v[22];
  const int64_t td = job.ntaps[0], th = job.ntaps[1], tw = job.ntaps[2];
  job.off[0] = v + 23, job.off[1] = v + 23 + td, job.wtap = v + 23 + td + th;
  const int64_t rows = job.dims[0] * job.dims[1] * job.dims[2];
  const int64_t grows = job.dims[0] * job.dims[3] * job.dims[4];
  bool ok = td >= 1 && th >= 1 && tw >= 1 && count == 23 + td + th + 2 * tw && job.wv > 0 &&
            job.wv % current->lanes(itemsize) == 0 && job.gx_w >= 1 && job.gx_w <= job.wv &&
            job.res >= 1 && job.cin >= 1 && job.cout >= 1 && job.c0 >= 0 &&
            job.c0 + job.cin <= job.gx_c && job.o0 >= 0 &&
            (job.o0 + job.cout) * job.res * job.stretch <= job.grow && 0 <= job.row0 &&
            job.row0 <= job.row1 && job.row1 <= rows && g.len >= grows * job.grow * itemsize;
  for (int64_t k = 0; ok && k < tw; ++k)
    ok = job.wtap[2 * k] >= 0 && job.wtap[2 * k] < job.res && job.wtap[2 * k + 1] >= 0 &&
         job.wtap[2 * k + 1] + job.wv <= job.stretch;
  job.g = g.buf;
  return ok;
}

// planar_grad_weight (grad_planar.hpp): x the planar input, sums the vector sums.
PyObject* py_planar_grad_weight(PyObject*, PyObject* args) {
  int itemsize;
  Py_buffer x, g, sums, geo;
  if (!PyArg_ParseTuple(args, "iy*y*w*y*", &itemsize, &x, &g, &sums, &geo)) return nullptr;
  PgwJob job{};
  bool ok = parse_planar(geo, itemsize, g, job);
  if (ok) {
    const int64_t lanes = current->lanes(itemsize);
    const int64_t rows = job.dims[0] * job.dims[1] * job.dims[2];
    ok = job.xrow == job.gx_c * job.wv && x.len >= rows * job.xrow * itemsize &&
         sums.len >= job.ntaps[0] * job.ntaps[1] * job.ntaps[2] * job.cout * job.cin * lanes *
                         itemsize &&
         reinterpret_cast<uintptr_t>(x.buf) % (lanes * itemsize) == 0 &&
         reinterpret_cast<uintptr_t>(sums.buf) % (lanes * itemsize) == 0;
    job.x = x.buf, job.sums = sums.buf;
  }
  if (ok) {
    Py_BEGIN_ALLOW_THREADS
    current->planar_grad_weight(job);
    Py_END_ALLOW_THREADS
  }
  return finish_buffers(ok, "planar_grad_weight: bad itemsize, geometry or sizes",
                        {&x, &g, &sums, &geo});
}

// planar_grad_input (grad_planar.hpp): w the group's weight [tap][co][ci], gx grad_input.
PyObject* py_planar_grad_input(PyObject*, PyObject* args) {
  int itemsize;
  Py_buffer g, w, gx, geo;
  if (!PyArg_ParseTuple(args, "iy*y*w*y*", &itemsize, &g, &w, &gx, &geo)) return nullptr;
  PgwJob job{};
  bool ok = parse_planar(geo, itemsize, g, job);
  if (ok) {
    const int64_t rows = job.dims[0] * job.dims[1] * job.dims[2];
    ok = w.len >= job.ntaps[0] * job.ntaps[1] * job.ntaps[2] * job.cout * job.cin * itemsize &&
         gx.len >= rows * job.gx_w * job.gx_c * itemsize;
    job.w = w.buf, job.gx = gx.buf;
  }
  if (ok) {
    Py_BEGIN_ALLOW_THREADS
    current->planar_grad_input(job);
    Py_END_ALLOW_THREADS
  }
  return finish_buffers(ok, "planar_grad_input: bad itemsize, geometry or sizes",
                        {&g, &w, &gx, &geo});
}

// The `cols` forward's gather (conversions.hpp's col2im) into one box of the output.
PyObject* py_col2im(PyObject*, PyObject* args) {
  int itemsize;
  Py_buffer cols, out, geo, box;
  PyObject* bias_obj;
  Py_ssize_t groups, cog;
  int runs;
  if (!PyArg_ParseTuple(args, "iy*w*Oy*nny*p", &itemsize, &cols, &out, &bias_obj, &geo,
                        &groups, &cog, &box, &runs))
    return nullptr;
  Py_buffer bias{};
  const bool has_bias = bias_obj != Py_None;
  bool ok = !has_bias || PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) == 0;
  const int64_t* g = static_cast<const int64_t*>(geo.buf);
  const int64_t* b = static_cast<const int64_t*>(box.buf);
  if (ok && geo.len == 19 * 8 && box.len == 8 * 8) {
    const int64_t in_px = g[0] * g[1] * g[2] * g[3], out_px = g[0] * g[4] * g[5] * g[6];
    const int64_t taps = g[7] * g[8] * g[9];
    ok = (itemsize == 4 || itemsize == 8) && groups >= 1 && cog >= 1 &&
         groups * taps * cog * 16 < (int64_t(1) << 31) &&  // a vector's gather offsets
         0 <= b[0] && b[0] <= b[1] && b[1] <= g[0] && 0 <= b[2] && b[2] <= b[3] &&
         b[3] <= g[4] && 0 <= b[4] && b[4] <= b[5] && b[5] <= g[5] && 0 <= b[6] &&
         b[6] <= b[7] && b[7] <= g[6] && g[10] > 0 && g[11] > 0 && g[12] > 0 &&
         (!runs || g[15] == 1) &&  // runs add a pixel's W taps as neighbours
         cols.len >= in_px * groups * taps * cog * itemsize &&
         out.len >= out_px * groups * cog * itemsize &&
         (!has_bias || bias.len >= groups * cog * itemsize);
  } else {
    ok = false;
  }
  if (ok) {
    Py_BEGIN_ALLOW_THREADS
    current->col2im(itemsize, cols.buf, out.buf, has_bias ? bias.buf : nullptr, g, groups, cog,
                    b, runs != 0);
    Py_END_ALLOW_THREADS
  }
  return finish_buffers(ok, "col2im: bad itemsize, geometry, box or sizes",
                        {&bias, &cols, &out, &geo, &box});
}

// The gradient's gathered cotangent block (_vjp_numpy._gather_block): for each input
// pixel of a tile, the cotangent values each of its taps meets, zeros where a tap lands
// outside the output. block: (groups, rows, ntap * cog), rows the tile's pixels in C order
// (n, d, h, w), whole along W. cot: (N, OD, OH, OW, groups * cog). geo: N, OD, OH, OW, ID,
// IH, IW, stride (3), groups, cog. shifts: (ntap, 3), the tap's output o = i * s + shift
// per axis. tile: n0, n1, d0, d1, h0, h1. NumPy's strided copy per tap moved a few
// channels per call: 128 -> 2 k6 s2's 216 taps took 8 of the gather path's 11 ms.
template <typename T>
void gather_cotangent(const T* cot, T* block, const int64_t* geo, const int64_t* shifts,
                      int64_t ntap, const int64_t* tile) {
  const int64_t OD = geo[1], OH = geo[2], OW = geo[3], IW = geo[6];
  const int64_t sd = geo[7], sh = geo[8], sw = geo[9], groups = geo[10], cog = geo[11];
  const int64_t C = groups * cog, K = ntap * cog;
  const int64_t rows = (tile[1] - tile[0]) * (tile[3] - tile[2]) * (tile[5] - tile[4]) * IW;
  std::vector<int64_t> wlo(ntap), whi(ntap);
  std::vector<const T*> src(ntap);
  for (int64_t t = 0; t < ntap; ++t) {  // the w whose ow = w * sw + shift lies in [0, OW)
    const int64_t shift = shifts[t * 3 + 2];
    wlo[t] = shift >= 0 ? 0 : (-shift + sw - 1) / sw;
    whi[t] = std::max(wlo[t], std::min(IW, OW - 1 - shift >= 0 ? (OW - 1 - shift) / sw + 1 : 0));
  }
  int64_t r = 0;
  for (int64_t n = tile[0]; n < tile[1]; ++n)
    for (int64_t d = tile[2]; d < tile[3]; ++d)
      for (int64_t h = tile[4]; h < tile[5]; ++h, r += IW) {
        for (int64_t t = 0; t < ntap; ++t) {
          const int64_t od = d * sd + shifts[t * 3], oh = h * sh + shifts[t * 3 + 1];
          src[t] = od >= 0 && od < OD && oh >= 0 && oh < OH
                       ? cot + ((n * OD + od) * OH + oh) * OW * C + shifts[t * 3 + 2] * C
                       : nullptr;
        }
        for (int64_t g = 0; g < groups; ++g) {
          T* dst = block + (g * rows + r) * K;
          for (int64_t w = 0; w < IW; ++w, dst += K)
            for (int64_t t = 0; t < ntap; ++t) {
              T* out = dst + t * cog;
              if (src[t] && w >= wlo[t] && w < whi[t]) {
                const T* in = src[t] + w * sw * C + g * cog;
                for (int64_t c = 0; c < cog; ++c) out[c] = in[c];
              } else {
                for (int64_t c = 0; c < cog; ++c) out[c] = T(0);
              }
            }
        }
      }
}

PyObject* py_gather_cotangent(PyObject*, PyObject* args) {
  int itemsize;
  Py_buffer cot, block, geo, shifts, tile;
  if (!PyArg_ParseTuple(args, "iy*w*y*y*y*", &itemsize, &cot, &block, &geo, &shifts, &tile))
    return nullptr;
  const int64_t* g = static_cast<const int64_t*>(geo.buf);
  const int64_t* tl = static_cast<const int64_t*>(tile.buf);
  const int64_t ntap = shifts.len / (3 * 8);
  bool ok = (itemsize == 4 || itemsize == 8) && geo.len == 12 * 8 && tile.len == 6 * 8 &&
            shifts.len == ntap * 3 * 8;
  if (ok) {
    const int64_t rows = (tl[1] - tl[0]) * (tl[3] - tl[2]) * (tl[5] - tl[4]) * g[6];
    ok = g[7] > 0 && g[8] > 0 && g[9] > 0 && g[10] >= 1 && g[11] >= 1 && 0 <= tl[0] &&
         tl[0] <= tl[1] && tl[1] <= g[0] && 0 <= tl[2] && tl[2] <= tl[3] && tl[3] <= g[4] &&
         0 <= tl[4] && tl[4] <= tl[5] && tl[5] <= g[5] &&
         cot.len >= g[0] * g[1] * g[2] * g[3] * g[10] * g[11] * itemsize &&
         block.len >= g[10] * rows * ntap * g[11] * itemsize;
  }
  if (ok)
    with_float_type(itemsize, [&](auto t) {
      using T = decltype(t);
      gather_cotangent(static_cast<const T*>(cot.buf), static_cast<T*>(block.buf), g,
                       static_cast<const int64_t*>(shifts.buf), ntap, tl);
    });
  return finish_buffers(ok, "gather_cotangent: bad itemsize, geometry or sizes",
                        {&cot, &block, &geo, &shifts, &tile});
}

// grad_weight's packed sums into one group's gw (C_out/g, taps, C_in/g), taps [tap0,
// tap1) (_vjp_native._unpack_grad_weight). The packed layout holds chunks of `chunk`
// columns, each [tap][row][column of the chunk]; rows are C_in/g and columns C_out/g, so
// each tap's block is transposed, on the instruction set in use (conversions.hpp). NumPy's
// transposing assignment read a line per value: 165 -> 128 k7's 29 MB grad_weight took
// 40 of its 65 ms.
PyObject* py_unpack_grad_weight(PyObject*, PyObject* args) {
  int itemsize;
  Py_buffer part, gw;
  Py_ssize_t taps, rows, cols, chunk, tap0, tap1;
  if (!PyArg_ParseTuple(args, "iy*w*nnnnnn", &itemsize, &part, &gw, &taps, &rows, &cols,
                        &chunk, &tap0, &tap1))
    return nullptr;
  const int64_t values = (int64_t)taps * rows * cols;
  const bool ok = (itemsize == 4 || itemsize == 8) && rows >= 1 && cols >= 1 && chunk >= 1 &&
                  0 <= tap0 && tap0 <= tap1 && tap1 <= taps &&
                  part.len >= values * itemsize && gw.len >= values * itemsize;
  if (ok) current->unpack_grad_weight(itemsize, part.buf, gw.buf, taps, rows, cols, chunk,
                                      tap0, tap1);
  return finish_buffers(ok, "unpack_grad_weight: bad itemsize, geometry or sizes",
                        {&part, &gw});
}

// Between float32 and float16/bfloat16 (CT_HALF_*), arrays by the buffer protocol:
// `convert(kind, src, dst, n)` on n source values of `src_item` bytes into `dst_item`.
template <typename F>
PyObject* convert_half(PyObject* args, const char* name, int64_t src_item, int64_t dst_item,
                       F&& convert) {
  int kind;
  Py_buffer src, dst;
  if (!PyArg_ParseTuple(args, "iy*w*", &kind, &src, &dst)) return nullptr;
  const int64_t n = src.len / src_item;
  const bool ok = (kind == CT_HALF_F16 || kind == CT_HALF_BF16) && dst.len >= n * dst_item;
  if (ok) {
    Py_BEGIN_ALLOW_THREADS convert(kind, src.buf, dst.buf, n);
    Py_END_ALLOW_THREADS
  }
  PyBuffer_Release(&src);
  PyBuffer_Release(&dst);
  if (!ok) {
    PyErr_Format(PyExc_ValueError, "%s: bad kind, or a destination too short", name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_round_half(PyObject*, PyObject* args) {
  const Isa* isa = current;
  return convert_half(args, "round_half", 4, 2, [isa](int kind, void* s, void* d, int64_t n) {
    isa->round_half(kind, static_cast<const float*>(s), d, n);
  });
}

PyObject* py_widen_half(PyObject*, PyObject* args) {
  const Isa* isa = current;
  return convert_half(args, "widen_half", 2, 4, [isa](int kind, void* s, void* d, int64_t n) {
    isa->widen_half(kind, s, static_cast<float*>(d), n);
  });
}

PyObject* py_layout(PyObject*, PyObject* args) {
  int itemsize;
  if (!PyArg_ParseTuple(args, "i", &itemsize)) return nullptr;
  return Py_BuildValue("ii", current->lanes(itemsize), current->max_vectors());
}

// Whether grad_weight can compute grad_input in the same pass (its swapped few-sums case).
PyObject* py_fuses_grad_input(PyObject*, PyObject* args) {
  int itemsize;
  Py_ssize_t cin, cout;
  if (!PyArg_ParseTuple(args, "inn", &itemsize, &cin, &cout)) return nullptr;
  return PyBool_FromLong(current->fuses_grad_input(itemsize, cin, cout));
}

// The address of an array's first element (any strides): `a.ctypes.data` builds a ctypes
// object each time (~1 us, and a backward call asks a dozen times).
PyObject* py_address(PyObject*, PyObject* a) {
  Py_buffer view;
  if (PyObject_GetBuffer(a, &view, PyBUF_STRIDES) != 0) return nullptr;
  void* first = view.buf;
  PyBuffer_Release(&view);
  return PyLong_FromVoidPtr(first);
}

PyObject* py_isa(PyObject*, PyObject*) { return PyUnicode_FromString(current->name); }

// The CPU's 512-bit multiply-add throughput over its 256-bit one, in FLOPs per second:
// about 2 where each unit takes a 512-bit operation whole (Intel's server cores), about 1
// where it runs as two 256-bit halves (AMD's Zen 4) or one port takes it. A clock-free
// ratio of two chains of independent multiply-adds timed in turn (the fastest of five
// tries of each), for the planner's machine model. None where this build or this CPU
// lacks AVX-512.
#if defined(CT_WITH_AVX512) && defined(__x86_64__) && defined(__GNUC__)
// 8 chains of `steps` multiply-adds (a * m + c, contracted), each in a register of its own.
#define CT_FMA_CHAINS(V, steps)                                                      \
  V m, c;                                                                            \
  for (int j = 0; j < (int)(sizeof(V) / 4); ++j) m[j] = 0.999999f, c[j] = 1e-7f;     \
  V a0 = m, a1 = m, a2 = m, a3 = m, a4 = m, a5 = m, a6 = m, a7 = m;                  \
  const auto t0 = std::chrono::steady_clock::now();                                  \
  for (int64_t i = 0; i < steps; ++i) {                                              \
    a0 = a0 * m + c, a1 = a1 * m + c, a2 = a2 * m + c, a3 = a3 * m + c;              \
    a4 = a4 * m + c, a5 = a5 * m + c, a6 = a6 * m + c, a7 = a7 * m + c;              \
    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), \
                     "+v"(a6), "+v"(a7));                                            \
  }                                                                                  \
  const auto t1 = std::chrono::steady_clock::now();                                  \
  volatile float sink = (a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7)[0];                  \
  (void)sink;                                                                        \
  return std::chrono::duration<double>(t1 - t0).count();
__attribute__((target("avx512f,fma"))) static double fma512_seconds(int64_t steps) {
  typedef float V __attribute__((vector_size(64)));
  CT_FMA_CHAINS(V, steps)
}
__attribute__((target("avx2,fma"))) static double fma256_seconds(int64_t steps) {
  typedef float V __attribute__((vector_size(32)));
  CT_FMA_CHAINS(V, steps)
}
#undef CT_FMA_CHAINS
#endif

PyObject* py_wide_fma_gain(PyObject*, PyObject*) {
#if defined(CT_WITH_AVX512) && defined(__x86_64__) && defined(__GNUC__)
  if (std::strcmp(kIsas[0].name, "avx512") == 0 && supported(kIsas[0])) {  // (best first)
    constexpr int64_t steps = 6000;  // 48000 multiply-adds: 10-30 us a try
    double t512 = 1e9, t256 = 1e9;
    for (int i = 0; i < 5; ++i) {
      t512 = std::min(t512, fma512_seconds(steps));
      t256 = std::min(t256, fma256_seconds(steps));
    }
    return PyFloat_FromDouble(2.0 * t256 / t512);
  }
#endif
  Py_RETURN_NONE;
}

PyObject* py_available(PyObject*, PyObject*) {
  PyObject* out = PyList_New(0);
  for (int i = 0; i < kIsaCount; ++i) {
    if (!supported(kIsas[i])) continue;
    PyObject* name = PyUnicode_FromString(kIsas[i].name);
    PyList_Append(out, name);
    Py_DECREF(name);
  }
  return out;
}

PyObject* py_set_isa(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  for (int i = 0; i < kIsaCount; ++i) {
    if (std::strcmp(kIsas[i].name, name) == 0 && supported(kIsas[i])) {
      current = &kIsas[i];
      Py_RETURN_NONE;
    }
  }
  PyErr_Format(PyExc_ValueError, "set_isa: %s is not available on this CPU", name);
  return nullptr;
}

// The C function table for other extensions (ct_capi.h), dispatching to `current`.
void capi_correlate(const CtJob* job) { current->correlate(*job); }
void capi_pack(int itemsize, const void* src, const int64_t* table, int64_t taps, int64_t cols,
               int64_t rows, int64_t row_stride, int64_t padded, int64_t chunk, void* dst) {
  run_pack({itemsize, src, table, taps, cols, rows, row_stride, padded, chunk, dst});
}
int capi_lanes(int itemsize) { return current->lanes(itemsize); }
int capi_max_vectors() { return current->max_vectors(); }
void capi_run_shared(void (*body)(void*), void* ctx, int threads) {
  std::vector<pool::Task> tasks;
  tasks.push_back({[body, ctx] { body(ctx); }, threads > 1, nullptr, -1});
  pool::instance()->run(std::move(tasks), std::max(0, std::min(threads, 256) - 1),
                        nullptr);  // MLX calls are not interrupted mid-evaluation
}
const CtCapi kCapi = {CT_CAPI_VERSION, capi_correlate, capi_pack, capi_lanes,
                      capi_max_vectors, capi_run_shared};

PyObject* py_c_api(PyObject*, PyObject*) {
  return PyCapsule_New(const_cast<CtCapi*>(&kCapi), CT_CAPI_NAME, nullptr);
}

PyMethodDef kMethods[] = {
    {"correlate", py_correlate, METH_O,
     "Run one correlation job (a dict of CtJob's fields; see correlate_api.h)."},
    {"grad_weight", py_grad_weight, METH_O,
     "Add one tile's grad_weight into a partial (a dict of GwJob's fields)."},
    {"pack", py_pack, METH_O,
     "Gather a weight into the CT_MODE_CHANNELS layout (a dict of PackJob's fields)."},
    {"correlate_call", py_correlate_call, METH_O,
     "correlate, prepared for run_tasks."},
    {"grad_weight_call", py_grad_weight_call, METH_O,
     "grad_weight, prepared for run_tasks."},
    {"pack_call", py_pack_call, METH_O,
     "pack, prepared for once/run_tasks."},
    {"pair_transform", py_pair_transform, METH_O,
     "Winograd F(2,3)'s input side along D (a dict of PairJob's fields)."},
    {"planar_call", py_planar_call, METH_O,
     "The planar copy of input rows for CT_MODE_PLANAR (PlanarJob's fields), for run_tasks."},
    {"fill_call", py_fill_call, METH_O,
     "Prepare a fill of an output view's pixels (a dict of FillJob's fields)."},
    {"pair_call", py_pair_call, METH_O,
     "pair_transform, prepared for run_tasks."},
    {"once", py_once, METH_VARARGS, "Calls run once, before the first task that needs them."},
    {"run_tasks", py_run_tasks, METH_VARARGS, "Run tasks of prepared calls on the pool."},
    {"program", py_program, METH_VARARGS, "Record tasks of prepared calls, to run again."},
    {"run_program", py_run_program, METH_VARARGS,
     "Run a recorded program's tasks with the addresses of other arrays."},
    {"warm", py_warm, METH_VARARGS, "Keep the pool's threads spinning, ready for a batch."},
    {"interrupts", py_interrupts, METH_NOARGS, "SIGINTs so far (the count armed)."},
    {"check_interrupt", py_check_interrupt, METH_O,
     "Raise where a call that started at this count of SIGINTs is to stop."},
    {"gather_sum", py_gather_sum, METH_VARARGS, "Sum rows gathered by a table (indexed)."},
    {"planar_rows", py_planar_rows, METH_VARARGS,
     "Rows made planar by channel and W residue, zero-padded (gradients)."},
    {"planar_grad_input", py_planar_grad_input, METH_VARARGS,
     "grad_input over the planar cotangent (gradients)."},
    {"planar_grad_weight", py_planar_grad_weight, METH_VARARGS,
     "grad_weight's vector sums over planar rows (gradients)."},
    {"col2im", py_col2im, METH_VARARGS,
     "The cols forward's gather of every output pixel's products."},
    {"gather_cotangent", py_gather_cotangent, METH_VARARGS,
     "The gradient's gathered cotangent block of a tile of input pixels (gradients)."},
    {"unpack_grad_weight", py_unpack_grad_weight, METH_VARARGS,
     "grad_weight's packed sums into one group's gw (gradients)."},
    {"repeat_channels", py_repeat_channels, METH_VARARGS,
     "Each channel of each pixel repeated m times in a row."},
    {"sum_repeats", py_sum_repeats, METH_VARARGS,
     "A channel multiplier's grad_input: each channel's m repeats summed in order."},
    {"split_residues", py_split_residues, METH_VARARGS,
     "A depthwise cotangent's rows split by W residue, zero-padded (gradients)."},
    {"widen_half", py_widen_half, METH_VARARGS, "float16/bfloat16 -> float32, exactly."},
    {"round_half", py_round_half, METH_VARARGS, "float32 -> float16/bfloat16, as stored."},
    {"layout", py_layout, METH_VARARGS, "(lanes, max vectors per chunk) of the packed weight."},
    {"fuses_grad_input", py_fuses_grad_input, METH_VARARGS,
     "Whether grad_weight (swapped) can compute grad_input in the same pass."},
    {"isa", py_isa, METH_NOARGS, "The instruction set in use."},
    {"wide_fma_gain", py_wide_fma_gain, METH_NOARGS,
     "512-bit over 256-bit multiply-add FLOP/s on this CPU, or None."},
    {"c_api", py_c_api, METH_NOARGS, "The kernel's C function table (ct_capi.h), a capsule."},
    {"address", py_address, METH_O, "The address of an array's first element."},
    {"available", py_available, METH_NOARGS, "Instruction sets this CPU can run, best first."},
    {"set_isa", py_set_isa, METH_VARARGS, "Use another available instruction set."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_native", nullptr, -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__native() {
  for (int i = 0; i < kIsaCount; ++i) {
    if (supported(kIsas[i])) {
      current = &kIsas[i];
      break;
    }
  }
  if (!current) {  // built without `generic`, on a CPU that lacks the sets it has: the
                   // package runs on its NumPy kernels (an ImportError is its signal)
    PyErr_SetString(PyExc_ImportError, "_native: built for instruction sets this CPU lacks");
    return nullptr;
  }
  if (!intern_keys(kCorrelateFields) || !intern_keys(kGradWeightFields) ||
      !intern_keys(kPackFields) || !intern_keys(kPairFields) || !intern_keys(kPlanarFields) ||
      !intern_keys(kFillFields))
    return nullptr;
  PyObject* module = PyModule_Create(&kModule);
  arm();
  if (module && (PyModule_AddIntConstant(module, "TAPS_INNER_BELOW", CT_TAPS_INNER_BELOW) < 0 ||
                 PyModule_AddIntConstant(module, "DOT_MAX_OUT", CT_DOT_MAX_OUT) < 0 ||
                 PyModule_AddIntConstant(module, "PLANAR_MAX_OUT", CT_PLANAR_MAX_OUT) < 0 ||
                 PyModule_AddIntConstant(module, "PLANAR_MAX_ROW", CT_PLANAR_MAX_ROW) < 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
