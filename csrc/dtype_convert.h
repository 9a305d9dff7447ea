// Bit-exact conversions of 16-bit floats to float, usable on host and device.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define HSVFAST_HD __host__ __device__ __forceinline__
#else
#define HSVFAST_HD inline
#endif

namespace hsvfast {

// The bits of one type read as another of the same size (std::bit_cast is C++20); memcpy compiles to a move,
// on the device too.
template <typename To, typename From>
HSVFAST_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

HSVFAST_HD float bits_to_float(uint32_t bits) { return bit_cast<float>(bits); }

HSVFAST_HD float bfloat16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, signed zeros, inf, NaN
// payloads). Branch-free, so loops over half rows vectorise: each case is computed and one is selected.
// Subnormals go through an integer -> float conversion, never through a float subnormal, so the result
// does not depend on flush-to-zero / denormals-are-zero modes. On a GPU, the hardware conversion (exact too).
HSVFAST_HD float float16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7fffu;                              // exponent and mantissa
  const uint32_t normal = (magnitude << 13) + (112u << 23);            // rebias 15 -> 127
  const uint32_t special = (magnitude << 13) | 0x7f800000u;            // exponent 31: inf or NaN (payload kept)
  const uint32_t subnormal = bit_cast<uint32_t>(float(magnitude) * 5.9604644775390625e-08f);  // mantissa * 2^-24
  const uint32_t is_subnormal = 0u - uint32_t(magnitude < 0x400u);  // all ones or all zeros: selects by masking,
  const uint32_t is_special = 0u - uint32_t(magnitude >= 0x7c00u);   // where a ?: chain became branches
  const uint32_t bits = (subnormal & is_subnormal) | (special & is_special) | (normal & ~(is_subnormal | is_special));
  return bits_to_float(sign | bits);
#endif
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
