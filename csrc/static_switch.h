// Runtime choices -> compile-time template arguments, shared by the CPU and CUDA launchers (the role of
// flash-attention's static_switch.h, with generic lambdas in place of macros). Each switch calls f with an empty
// tag whose type carries the choice, so a launcher names every kernel variant once:
//
//   fdpo::bool_switch(has_mask, [&](auto mask) { launch<decltype(mask)::value>(args); });
//   fdpo::storage_switch(t.scalar_type(), "cuda", [&](auto tag) { launch<typename decltype(tag)::type>(args); });
//
// Every branch is instantiated, so what a switch adds is compile time and binary size, never a runtime cost.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace fdpo {

// f(std::true_type{}) or f(std::false_type{}).
template <typename F>
inline void bool_switch(bool b, F&& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// The layout of a call's target and mask as compile-time bools: f(mask, shared_target, shared_mask), each a
// std::true_type / std::false_type (shared_mask is false without a mask, so that variant is never built).
template <typename F>
inline void layout_switch(bool has_mask, bool target_shared, bool mask_shared, F&& f) {
  bool_switch(target_shared, [&](auto shared_t) {
    if (has_mask)
      bool_switch(mask_shared, [&](auto shared_m) { f(std::true_type{}, shared_t, shared_m); });
    else
      f(std::false_type{}, shared_t, std::false_type{});
  });
}

// f(std::type_identity<T>{}) for the C++ storage type T of a float16/bfloat16/float32 tensor (float64 too where
// the backend takes it); any other dtype is refused, naming the backend.
template <bool kAllowDouble = false, typename F>
inline void storage_switch(at::ScalarType dtype, const char* backend, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(std::type_identity<float>{});
    case at::kHalf:
      return f(std::type_identity<at::Half>{});
    case at::kBFloat16:
      return f(std::type_identity<at::BFloat16>{});
    case at::kDouble:
      if constexpr (kAllowDouble) return f(std::type_identity<double>{});
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "fdiv_kernels (", backend, "): unsupported dtype ", dtype);
  }
}

// Elements per thread and iteration of the mixed-dtype vector kernels: one 16-byte pack of a 16-bit tensor, two of
// an fp32 one. Their gate is D % kMixedVec == 0 with 16-byte aligned bases.
constexpr int kMixedVec = 8;

// The mixed-precision storage combinations that trainers pass, each with its own vectorized CUDA kernels: an fp32
// model_pred (Accelerate's AMP) beside a bf16 or fp16 target, a reference (ref; pass pred's dtype when there is
// none) in fp32 or in the target's dtype, a mask (pass target's dtype when there is none) in the target's dtype.
// Calls f(std::type_identity<TP>, std::type_identity<TR>, std::type_identity<TT>) and returns true for those;
// returns false, calling nothing, for any other combination (the generic kernel's).
template <typename F>
inline bool mixed_storage_switch(at::ScalarType pred, at::ScalarType ref, at::ScalarType target, at::ScalarType mask,
                                 F&& f) {
  if (pred != at::kFloat || (target != at::kBFloat16 && target != at::kHalf) || mask != target ||
      (ref != at::kFloat && ref != target))
    return false;
  const auto with_target = [&](auto tt) {
    using TT = typename decltype(tt)::type;
    if (ref == at::kFloat)
      f(std::type_identity<float>{}, std::type_identity<float>{}, tt);
    else
      f(std::type_identity<float>{}, std::type_identity<TT>{}, tt);
  };
  if (target == at::kBFloat16)
    with_target(std::type_identity<at::BFloat16>{});
  else
    with_target(std::type_identity<at::Half>{});
  return true;
}

}  // namespace fdpo
