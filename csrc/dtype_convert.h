// Bit-exact conversions of 16-bit floats to float, usable on host and device.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define HSVFAST_HD __host__ __device__ __forceinline__
#else
#define HSVFAST_HD inline
#endif

namespace hsvfast {

HSVFAST_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

HSVFAST_HD float bfloat16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// IEEE binary16 -> binary32, exact for normals, subnormals, inf and NaN.
HSVFAST_HD float float16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    if (mantissa == 0) return bits_to_float(sign);
    // Subnormal: value = mantissa * 2^-24, exact in float.
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

template <typename Storage>
HSVFAST_HD double load_as_double(const Storage* p);

template <>
HSVFAST_HD double load_as_double<float>(const float* p) { return double(*p); }
template <>
HSVFAST_HD double load_as_double<double>(const double* p) { return *p; }

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

template <>
HSVFAST_HD double load_as_double<Half>(const Half* p) { return double(float16_to_float(p->bits)); }
template <>
HSVFAST_HD double load_as_double<BFloat16>(const BFloat16* p) { return double(bfloat16_to_float(p->bits)); }

}  // namespace hsvfast
