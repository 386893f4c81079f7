// The vectors of one instruction set's build: their types, the register blocks they allow,
// and the broadcasts, loads and sums every operation shares. Part of the kernel:
// correlate.hpp includes it inside the build's namespace (CT_NS).

typedef float vf __attribute__((vector_size(CT_VBYTES)));
typedef float vfu __attribute__((vector_size(CT_VBYTES), aligned(4)));
typedef double vd __attribute__((vector_size(CT_VBYTES)));
typedef double vdu __attribute__((vector_size(CT_VBYTES), aligned(8)));

template <typename T> struct Vec;
template <> struct Vec<float> { typedef vf v; typedef vfu u; };
template <> struct Vec<double> { typedef vd v; typedef vdu u; };

// Register blocking: `nv` vectors of output channels by `P` output pixels, with
// P * nv accumulators, nv weight vectors and one broadcast held in registers.
constexpr int MAXV = CT_NREGS == 32 ? 4 : 2;
template <int NV> struct Block {
  static constexpr int P = CT_NREGS == 32 ? (NV == 4 ? 6 : NV == 3 ? 8 : NV == 2 ? 12 : 24)
                                          : (NV == 2 ? 6 : 12);
};

// f(std::integral_constant<int, NV>) for a chunk of nv (1..MAXV) vectors: the one place
// that turns a chunk's width into the compile-time NV its kernels are built for.
template <typename F>
static inline void with_vectors(int64_t nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
#if CT_NREGS == 32
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
#endif
  }
}

// f(std::bool_constant<partial>): whether a row's last vector is partial, as a
// compile-time constant for the loops that load it.
template <typename F>
static inline void with_partial(bool partial, F&& f) {
  if (partial) f(std::true_type{});
  else f(std::false_type{});
}

// On a lambda that updates a register block through a reference: inlined whatever GCC's
// budget says, since an outlined call keeps the block in memory (a grad_weight build whose
// caller had grown outlined reduce_block's step: 48 -> 96 k3 s2 took 2.3x as long).
#define CT_ALWAYS_INLINE __attribute__((always_inline))

// On a function whose register block lives in its own body: a call of its own, so that
// GCC allocates its registers apart from a big caller's (dot mode's 1-3 outputs, inlined
// into the row loop that runs every chunk, ran at half the rate of its outlined 4).
#define CT_NOINLINE __attribute__((noinline))

// f(std::integral_constant<int, n>) for 1 <= n <= MAXN: a block of a run-time count built
// for each count (a row's last, partial block; a tile of fewer sums).
template <int MAXN, typename F>
static inline void with_count(int64_t n, F&& f) {
  if constexpr (MAXN > 1) {
    if (n < MAXN) return with_count<MAXN - 1>(n, f);
  }
  f(std::integral_constant<int, MAXN>{});
}

// f(first, size) over n items cut into blocks of near-equal size, at most MAX each, with
// `size` a compile-time count (`with_count`): a last block of one or two items would run
// short of independent chains.
template <int MAX, typename F>
static inline void in_even_blocks(int64_t n, F&& f) {
  const int64_t blocks = (n + MAX - 1) / MAX;
  for (int64_t b = 0, first = 0; b < blocks; ++b) {
    const int64_t len = n / blocks + (b < n % blocks);
    with_count<MAX>(len, [&](auto size) { f(first, size); });
    first += len;
  }
}

// A vector of copies of *p, read straight from memory into the register (GCC builds a
// generic `V{} + *p` as a scalar add of zero plus a register broadcast, two instructions
// on the FMA ports). Translation units with intrinsics define CT_BROADCAST_F/D.
template <typename V, typename T>
static inline V broadcast(const T* p) {
#ifdef CT_BROADCAST_F
  if constexpr (sizeof(T) == 4) return (V)CT_BROADCAST_F(reinterpret_cast<const float*>(p));
  else return (V)CT_BROADCAST_D(reinterpret_cast<const double*>(p));
#else
  constexpr int L = CT_VBYTES / sizeof(T);
  const T value = *p;
  V b;
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) b[i] = value;
  return b;
#endif
}

// Integer vectors as wide as T's: lane indices for `select_lanes`.
template <typename T> struct LaneIndex {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> e;
  typedef e v __attribute__((vector_size(CT_VBYTES)));
  typedef e u __attribute__((vector_size(CT_VBYTES), aligned(sizeof(e))));  // unaligned
};  // (also the shuffle masks of `halve_pair`)

// Lane i of the result: lane idx[i] of v (0 <= idx[i] < lanes). One permute where the
// build has one (AVX-512, AVX2's floats).
template <typename V, typename M>
static inline V select_lanes(V v, M idx) {
#if defined(__GNUC__) && !defined(__clang__)
  return __builtin_shuffle(v, idx);
#else
  V r;
  for (int i = 0; i < (int)(sizeof(V) / sizeof(v[0])); ++i) r[i] = v[idx[i]];
  return r;
#endif
}

// p rounded up to a cache line boundary (the buffer holds 64 spare bytes for it).
template <typename T>
static inline T* aligned_line(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// The P x NV accumulator tile, to and from `acc` (row stride cw): each pass of a block
// adds into what earlier passes left there.
template <typename T, int P, int NV, typename V>
static inline void load_tile(V (&r)[P][NV], const T* acc, int64_t cw) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) r[p][v] = *reinterpret_cast<const U*>(acc + p * cw + v * L);
}

// A P x NV accumulator tile set to zero.
template <int P, int NV, typename V>
static inline void zero_tile(V (&r)[P][NV]) {
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) r[p][v] = V{};
}

template <typename T, int P, int NV, typename V>
static inline void store_tile(const V (&r)[P][NV], T* acc, int64_t cw) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
#pragma GCC unroll 32
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(acc + p * cw + v * L) = r[p][v];
}

// Horizontal sum of a vector (translation units with intrinsics define CT_HSUM_F/D).
template <typename V, typename T>
static inline T hsum(V v) {
#ifdef CT_HSUM_F
  if constexpr (sizeof(T) == 4) return CT_HSUM_F(v);
  else return CT_HSUM_D(v);
#else
  constexpr int L = CT_VBYTES / sizeof(T);
  T s = 0;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
#endif
}

#if defined(__GNUC__) && !defined(__clang__)
// Two vectors' partial sums, halved: their lanes i with i % 2h < h, a's then b's, plus
// the lanes h further on. Where a and b hold 2h partials per source (sources in order),
// the result holds h per source, a's sources then b's.
template <int H, typename V>
static inline V halve_pair(V a, V b) {
  constexpr int L = sizeof(V) / sizeof(a[0]);
  typedef decltype(a[0] - a[0]) E;
  static_assert(sizeof(V) == CT_VBYTES, "a vector of the build");
  typename LaneIndex<E>::v lo, hi;
#pragma GCC unroll 16
  for (int j = 0; j < L / 2; ++j) {
    const int at = j / H * 2 * H + j % H;  // a's lanes in the first half, b's (+ L) after
    lo[j] = at;
    lo[j + L / 2] = at + L;
    hi[j] = at + H;
    hi[j + L / 2] = at + H + L;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

// The lane sums of N vectors (N = lanes, H = lanes / 2 at the top) into v[0], in order: a
// tree of halving shuffles, about three instructions per sum where reducing each vector
// alone took eight and a scalar store.
template <int N, int H, typename V>
static inline void halve_all(V (&v)[N]) {
  if constexpr (H >= 1) {
#pragma GCC unroll 16
    for (int i = 0; i < N / 2; ++i) v[i] = halve_pair<H>(v[2 * i], v[2 * i + 1]);
    halve_all<N / 2, H / 2>(reinterpret_cast<V(&)[N / 2]>(v));
  }
}
#endif

// out[i] = the sum of v[i]'s lanes, i < N (`out` holds N rounded up to whole vectors):
// lanes at a time through `halve_all` (a last tree's missing vectors zeros), a last few
// vectors (a quarter of the lanes or less) alone.
template <typename V, typename T, int N>
static inline void lane_sums(const V (&v)[N], T* out) {
  constexpr int L = CT_VBYTES / sizeof(T);
#if defined(__GNUC__) && !defined(__clang__)
  constexpr int TREES = N / L + (N % L > L / 4);
#pragma GCC unroll 4
  for (int c = 0; c < TREES * L; c += L) {
    V t[L];
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) t[i] = c + i < N ? v[c + i] : V{};
    halve_all<L, L / 2>(t);
    std::memcpy(out + c, &t[0], sizeof(V));
  }
#pragma GCC unroll 16
  for (int i = TREES * L; i < N; ++i) out[i] = hsum<V, T>(v[i]);
#else
  for (int i = 0; i < N; ++i) out[i] = hsum<V, T>(v[i]);
#endif
}

// The first n < lanes elements at p as a vector, zeros after them, reading none past them
// (translation units with masked loads define CT_LOAD_FIRST_F/D).
template <typename V, typename T>
static inline V load_first(int64_t n, const T* p) {
#ifdef CT_LOAD_FIRST_F
  if constexpr (sizeof(T) == 4) return (V)CT_LOAD_FIRST_F(n, reinterpret_cast<const float*>(p));
  else return (V)CT_LOAD_FIRST_D(n, reinterpret_cast<const double*>(p));
#else
  V v{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

// The first n (1..lanes) elements at p, zeros after them: a row's last vector where its
// length is not whole vectors (n == lanes: the whole vector), read without passing the
// row's end. Masked where the build has masked loads (as fast as a plain load with
// AVX-512); otherwise a plain load unless the vector is partial.
template <typename V, typename T>
static inline V load_lanes(int64_t n, const T* p) {
#if CT_VBYTES == 64 && defined(CT_LOAD_FIRST_F)
  return load_first<V>(n, p);
#else
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  return n == L ? (V)*reinterpret_cast<const U*>(p) : load_first<V>(n, p);
#endif
}

// Stores the first n (1..lanes) lanes of v at p, nothing past them.
template <typename V, typename T>
static inline void store_lanes(int64_t n, T* p, V v) {
  typedef typename Vec<T>::u U;
  constexpr int L = CT_VBYTES / sizeof(T);
  if (n == L) {
    *reinterpret_cast<U*>(p) = v;
    return;
  }
#ifdef CT_STORE_FIRST_F
  if constexpr (sizeof(T) == 4) CT_STORE_FIRST_F(n, reinterpret_cast<float*>(p), v);
  else CT_STORE_FIRST_D(n, reinterpret_cast<double*>(p), v);
#else
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// Lanes [lo, hi) of p[0], p[stride], p[2 * stride], ... (0 <= lo <= hi <= lanes), zeros in
// the others, reading no element outside them (translation units with gathers define
// CT_GATHER_RANGE_F/D: a masked gather).
template <typename V, typename T>
static inline V gather_range(int64_t lo, int64_t hi, const T* p, int64_t stride) {
#ifdef CT_GATHER_RANGE_F
  if constexpr (sizeof(T) == 4)
    return (V)CT_GATHER_RANGE_F(lo, hi, reinterpret_cast<const float*>(p), (int)stride);
  else return (V)CT_GATHER_RANGE_D(lo, hi, reinterpret_cast<const double*>(p), (int)stride);
#else
  V v{};
  for (int64_t i = lo; i < hi; ++i) v[i] = p[i * stride];
  return v;
#endif
}

// p[idx[0]], p[idx[1]], ... (idx: int32 offsets, one per lane; translation units with
// gathers define CT_GATHER_IDX_F/D).
template <typename V, typename T>
static inline V gather_at(const T* p, const int32_t* idx) {
#ifdef CT_GATHER_IDX_F
  if constexpr (sizeof(T) == 4) return (V)CT_GATHER_IDX_F(reinterpret_cast<const float*>(p), idx);
  else return (V)CT_GATHER_IDX_D(reinterpret_cast<const double*>(p), idx);
#else
  constexpr int L = CT_VBYTES / sizeof(T);
  V v;
  for (int i = 0; i < L; ++i) v[i] = p[idx[i]];
  return v;
#endif
}

// The vector at p, or zeros where `valid` is 0 (translation units with masked loads define
// CT_MASKZ_LOAD_F/D; a masked load does not fault, so p may lie past the row's end).
template <typename V, typename T>
static inline V load_or_zero(unsigned valid, const T* p) {  // valid: 0 or 1
#ifdef CT_MASKZ_LOAD_F
  if constexpr (sizeof(T) == 4) return (V)CT_MASKZ_LOAD_F(valid, reinterpret_cast<const float*>(p));
  else return (V)CT_MASKZ_LOAD_D(valid, reinterpret_cast<const double*>(p));
#else
  typedef typename Vec<T>::u U;
  return valid ? (V)*reinterpret_cast<const U*>(p) : V{};
#endif
}

#if CT_PART_HAS(3)
// What module.cpp asks of this build: elements per vector, vectors per chunk of columns.
int lanes(int itemsize) { return CT_VBYTES / itemsize; }
int max_vectors() { return MAXV; }
#endif
