// The one sign hash behind every projection matrix, for C++ and CUDA.
//
// P[row, col] = (+1 if bit 31 of h(key, row, col) is 0 else -1) / sqrt(k), with
//     h(key, row, col) = mix32((mix32(key ^ row) + col) mod 2^32)
// Bit-identical to gard_kernels/sketch/hashing.py; tests compare the materialised matrices.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GARD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GARD_HOST_DEVICE inline
#endif

namespace gard_kernels {

// 32-bit finaliser; every step wraps modulo 2^32 (unsigned arithmetic).
GARD_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// The part of h that depends on the row only: kernels compute it once per projection row.
GARD_HOST_DEVICE uint32_t row_hash(uint32_t key, uint32_t row) { return mix32(key ^ row); }

// h(key, row, col) from row_hash(key, row).
GARD_HOST_DEVICE uint32_t cell_hash(uint32_t row_h, uint32_t col) { return mix32(row_h + col); }

// IEEE-754 bits of +1.0f or -1.0f for a hash value: its bit 31 is the float's sign bit.
// Branch-free, so loops over columns vectorise.
GARD_HOST_DEVICE uint32_t sign_float_bits(uint32_t h) { return 0x3F800000u | (h & 0x80000000u); }

// +1.0f or -1.0f for (key, row, col).
GARD_HOST_DEVICE float sign_value(uint32_t key, uint32_t row, uint32_t col) {
  return (cell_hash(row_hash(key, row), col) >> 31) ? -1.0f : 1.0f;
}

}  // namespace gard_kernels
