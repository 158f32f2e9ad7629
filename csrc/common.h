// Helpers shared by the tempnet CPU kernels: accumulation types, dtype conversion of a run of
// values, and horizontal reductions of at::vec::Vectorized registers.
//
// The vector width follows the CPU_CAPABILITY macros the build passes (see
// tempnet/backends/_cpp_build.py): AVX2 / AVX512 registers when defined, ATen's portable scalar
// fallback otherwise. exp / tanh of Vectorized<float|double> call SLEEF inside libtorch_cpu; float32 tanh
// for the softcap has a cheaper rational form here (tanh_rational).
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

// tanh of float32 lanes for the softcap: x·P(x²)/Q(x²) with P, Q of degree 4, fitted (iterated weighted least
// squares in float64) for the minimax relative error on |x| ≤ 9, about 2e-8 in exact arithmetic and at most
// 6 ulp (3.4e-7 relative) evaluated in float32. Inputs are clamped to [−9, 9] first (|tanh| > 1 − 2⁻²⁵ beyond,
// i.e. ±1 in float32) and the result to [−1, 1]; both clamps pass a NaN lane through, ±inf gives ±1. About
// half the cost of an exp-based tanh and a seventh of SLEEF's tanhf.
inline at::vec::Vectorized<float> tanh_rational(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  using at::vec::fmadd;
  const Vec one(1.0f);
  const Vec xc = at::vec::clamp_min(at::vec::clamp_max(x, Vec(9.0f)), Vec(-9.0f));
  const Vec t = xc * xc;
  Vec p = fmadd(t, Vec(1.3354667594001057e-08f), Vec(2.060920451185666e-05f));
  p = fmadd(t, p, Vec(0.0034956010058522224f));
  p = fmadd(t, p, Vec(0.1338103860616684f));
  p = fmadd(t, p, one);
  Vec q = fmadd(t, Vec(7.77659465711622e-07f), Vec(0.00032856519101187587f));
  q = fmadd(t, q, Vec(0.02587703801691532f));
  q = fmadd(t, q, Vec(0.46714353561401367f));
  q = fmadd(t, q, one);
  return at::vec::clamp_min(at::vec::clamp_max(xc * p / q, one), Vec(-1.0f));
}

}  // namespace tempnet
