// The dit_fast_ext op entry points, written once for every device: `Kernels` supplies
//   static void fwd(Mode, FwdTensors&, double eps);
//   static void bwd(Mode, BwdTensors&);
// and these functions (whose signatures follow the schemas in ops.cpp) check, allocate and call them.
#pragma once

#include "adaln_common.h"

#include <tuple>

namespace dit_fast {

// A gated op's optional bias (of the GEMM that made y): x + gate * (y + bias), y + bias taken in the
// compute dtype, unrounded, as the op defines it. These kernels take no bias: it is added here before them
// (one extra pass), and its gradient is the sum of dy over B and L. The Triton kernels fuse both, and the
// model hands the bias to a gated op only where the backend fuses it (Capability.fused_bias).
inline at::Tensor add_bias(const at::Tensor& y, const at::Tensor& gate, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return y;
  TORCH_CHECK(bias->dim() == 1 && y.dim() == 3 && bias->size(0) == y.size(2), "dit_fast_ext: bias must have shape [D] = [",
              y.dim() == 3 ? y.size(2) : -1, "], got ", bias->sizes());
  TORCH_CHECK(bias->device() == y.device(), "dit_fast_ext: bias must be on ", y.device(), ", got ", bias->device());
  const bool f64 = y.scalar_type() == at::kDouble || gate.scalar_type() == at::kDouble ||
                   bias->scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  return y.to(acc) + bias->to(acc);
}

// (dy in y's dtype, dbias in bias's dtype or an empty tensor) from the gradient of y + bias.
inline std::tuple<at::Tensor, at::Tensor> split_bias_grad(const at::Tensor& dy_eff, const at::Tensor& y,
                                                          const std::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return {dy_eff, at::empty({0}, y.options())};
  return {dy_eff.to(y.scalar_type()), dy_eff.sum(at::IntArrayRef{0, 1}).to(bias->scalar_type())};
}

template <typename Kernels>
struct AdalnOps {
  using T = at::Tensor;
  using OptT = std::optional<at::Tensor>;

  static T or_empty(const T& t, const T& like) { return t.defined() ? t : at::empty({0}, like.options()); }

  static std::tuple<T, T, T> adaln_modulate_fwd(const T& x, const OptT& shift, const T& scale, double eps,
                                                std::optional<at::ScalarType> out_dtype, bool rms,
                                                const OptT& weight) {
    auto t = prepare_fwd(Mode::kModulate, x, T(), T(), shift.value_or(T()), scale, out_dtype, rms, weight);
    Kernels::fwd(Mode::kModulate, t, eps);
    return {t.h, t.mean, t.rstd};
  }

  // dshift is computed whether or not the forward had a shift (the caller drops it); dweight is empty
  // without a gain.
  static std::tuple<T, T, T, T> adaln_modulate_bwd(const T& dh, const T& x, const T& mean, const T& rstd,
                                                   const T& scale, bool rms, const OptT& weight) {
    auto t = prepare_bwd(Mode::kModulate, dh, std::nullopt, x, T(), T(), mean, rstd, scale, rms, weight);
    Kernels::bwd(Mode::kModulate, t);
    return {t.dx, t.dmod[kShift], t.dmod[kScale], or_empty(t.dmod[kWeight], x)};
  }

  static T gated_residual_fwd(const T& x, const T& y, const T& gate, const OptT& bias) {
    auto t = prepare_fwd(Mode::kGated, x, add_bias(y, gate, bias), gate, T(), T(), std::nullopt);
    Kernels::fwd(Mode::kGated, t, 0.0);
    return t.x_out;
  }

  // dx is dout itself; only dy and dgate need a kernel.
  static std::tuple<T, T, T> gated_residual_bwd(const T& dout, const T& y, const T& gate, const OptT& bias) {
    auto t = prepare_bwd(Mode::kGated, dout, std::nullopt, T(), add_bias(y, gate, bias), gate, T(), T(), T());
    Kernels::bwd(Mode::kGated, t);
    auto [dy, dbias] = split_bias_grad(t.dy, y, bias);
    return {dy, t.dmod[kGate], dbias};
  }

  static std::tuple<T, T, T, T> gated_residual_adaln_fwd(const T& x, const T& y, const T& gate, const OptT& bias,
                                                         const OptT& shift, const T& scale, double eps,
                                                         std::optional<at::ScalarType> out_dtype, bool rms,
                                                         const OptT& weight) {
    auto t = prepare_fwd(Mode::kFused, x, add_bias(y, gate, bias), gate, shift.value_or(T()), scale, out_dtype,
                         rms, weight);
    Kernels::fwd(Mode::kFused, t, eps);
    return {t.x_out, t.h, t.mean, t.rstd};
  }

  static std::tuple<T, T, T, T, T, T, T> gated_residual_adaln_bwd(const T& dh, const OptT& dx_out, const T& x_out,
                                                                  const T& y, const T& gate, const OptT& bias,
                                                                  const T& mean, const T& rstd, const T& scale,
                                                                  bool rms, const OptT& weight) {
    auto t = prepare_bwd(Mode::kFused, dh, dx_out, x_out, add_bias(y, gate, bias), gate, mean, rstd, scale, rms,
                         weight);
    Kernels::bwd(Mode::kFused, t);
    auto [dy, dbias] = split_bias_grad(t.dy, y, bias);
    return {t.dx, dy, t.dmod[kGate], dbias, t.dmod[kShift], t.dmod[kScale], or_empty(t.dmod[kWeight], x_out)};
  }
};

#define DIT_FAST_REGISTER_ADALN_IMPLS(m, Kernels)                                              \
  do {                                                                                         \
    using Ops_ = ::dit_fast::AdalnOps<Kernels>;                                                \
    (m).impl("adaln_modulate_fwd", &Ops_::adaln_modulate_fwd);                                 \
    (m).impl("adaln_modulate_bwd", &Ops_::adaln_modulate_bwd);                                 \
    (m).impl("gated_residual_fwd", &Ops_::gated_residual_fwd);                                 \
    (m).impl("gated_residual_bwd", &Ops_::gated_residual_bwd);                                 \
    (m).impl("gated_residual_adaln_fwd", &Ops_::gated_residual_adaln_fwd);                     \
    (m).impl("gated_residual_adaln_bwd", &Ops_::gated_residual_adaln_bwd);                     \
  } while (0)

}  // namespace dit_fast
