// Helpers shared by the tempnet CPU kernels: accumulation types, dtype conversion of a run of
// values, and horizontal reductions of at::vec::Vectorized registers.
//
// The vector width follows the CPU_CAPABILITY macros the build passes (see
// tempnet/backends/_cpp_build.py): AVX2 / AVX512 registers when defined, ATen's portable scalar
// fallback otherwise. exp / tanh of Vectorized<float|double> call SLEEF inside libtorch_cpu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace tempnet {

// float64 inputs accumulate in float64, every other floating type in float32.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_scalar_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// dst[0:n] = src[0:n] converted to the accumulation type.
template <typename scalar_t, typename acc_t>
inline void load_as(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, sizeof(acc_t) * n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// dst[0:n] = src[0:n] converted (rounded) to the storage type.
template <typename acc_t, typename scalar_t>
inline void store_as(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, sizeof(acc_t) * n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename acc_t>
inline acc_t horizontal_sum(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto& a, auto& b) { return a + b; }, v);
}

// NaN-propagating horizontal maximum.
template <typename acc_t>
inline acc_t horizontal_max(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto& a, auto& b) { return at::vec::maximum(a, b); }, v);
}

}  // namespace tempnet
