// float16 and bfloat16: results rounded from float32 as they are stored (store_out), and
// float16 widened back. Part of the kernel: correlate.hpp includes it inside the build's
// namespace (CT_NS).

// float32 -> float16 (IEEE binary16), round to nearest even: where the result is
// float16 the kernel rounds as it stores, instead of a float32 block rounded by NumPy.
static inline uint16_t f16_from_f32(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t mag = x & 0x7fffffffu;
  if (mag >= 0x7f800000u)  // inf, or nan (kept quiet)
    return sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u | ((mag >> 13) & 0x3ffu) : 0);
  if (mag >= 0x477ff000u) return sign | 0x7c00u;  // rounds past the largest half: inf
  if (mag < 0x38800000u) {  // a subnormal half (or zero): scale by 2^24 and round
    const float scaled = std::fabs(f) * 16777216.0f;  // exact: a power of two
    const float rounded = std::nearbyint(scaled);     // the default rounding: to even
    return sign | (uint16_t)rounded;
  }
  const uint32_t lsb = (mag >> 13) & 1u;
  return sign | (uint16_t)((mag - 0x38000000u + 0xfffu + lsb) >> 13);
}

template <typename T>
static inline void to_f16(char* dst, const T* src, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    int64_t i = 0;
#ifdef CT_F16_STORE
    for (; i + CT_VBYTES / 4 <= n; i += CT_VBYTES / 4) CT_F16_STORE(dst + 2 * i, src + i);
#endif
    for (; i < n; ++i) {
#ifdef CT_F16_SCALAR
      const uint16_t h = CT_F16_SCALAR(src[i]);  // one instruction (dot mode stores singly)
#else
      const uint16_t h = f16_from_f32(src[i]);
#endif
      std::memcpy(dst + 2 * i, &h, 2);
    }
  }
}

// float32 -> bfloat16, round to nearest even; every nan becomes the quiet nan of its
// sign, as ml_dtypes rounds (bit for bit: tests/test_native_forward.py checks it).
static inline uint16_t bf16_from_f32(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((x >> 16) & 0x8000u) | 0x7fc0u);
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

typedef uint32_t vu32 __attribute__((vector_size(CT_VBYTES)));
typedef uint16_t vu16 __attribute__((vector_size(CT_VBYTES / 2)));

template <typename T>
static inline void to_bf16(char* dst, const T* src, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    constexpr int L = CT_VBYTES / 4;
    int64_t i = 0;
    for (; i + L <= n; i += L) {  // bf16_from_f32 a vector at a time (GCC kept it scalar)
      vu32 x;
      std::memcpy(&x, src + i, CT_VBYTES);
      const vu32 nan = (vu32)((x & 0x7fffffffu) > 0x7f800000u);  // all ones where nan
      const vu32 even = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
      const vu32 quiet = ((x >> 16) & 0x8000u) | 0x7fc0u;
      const vu16 h = __builtin_convertvector((nan & quiet) | (~nan & even), vu16);
      std::memcpy(dst + 2 * i, &h, CT_VBYTES / 2);
    }
    for (; i < n; ++i) {
      const uint16_t h = bf16_from_f32(src[i]);
      std::memcpy(dst + 2 * i, &h, 2);
    }
  }
}

// Store n results at dst (a byte address): as T, or rounded to float16 or bfloat16.
template <typename T>
static inline void store_out(int half, char* dst, const T* src, int64_t n) {
  if (half == CT_HALF_F16) to_f16(dst, src, n);
  else if (half == CT_HALF_BF16) to_bf16(dst, src, n);
  else std::memcpy(dst, src, n * sizeof(T));
}

// float16 -> float32, exactly (every half is a float): the portable path's conversion.
static inline float f32_from_f16(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, nan
  } else if (exp) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else {  // zero or subnormal: mant * 2^-24, exact in float32
    const float f = (float)mant * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
