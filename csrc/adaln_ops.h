// The dit_fast_ext op entry points, written once for every device: `Kernels` supplies
//   static void fwd(Mode, FwdTensors&, double eps);
//   static void bwd(Mode, BwdTensors&);
// and these functions (whose signatures follow the schemas in ops.cpp) check, allocate and call them.
#pragma once

#include "adaln_common.h"

#include <tuple>

namespace dit_fast {

template <typename Kernels>
struct AdalnOps {
  using T = at::Tensor;

  static std::tuple<T, T, T> adaln_modulate_fwd(const T& x, const T& shift, const T& scale, double eps,
                                                std::optional<at::ScalarType> out_dtype) {
    auto t = prepare_fwd(Mode::kModulate, x, T(), T(), shift, scale, out_dtype);
    Kernels::fwd(Mode::kModulate, t, eps);
    return {t.h, t.mean, t.rstd};
  }

  static std::tuple<T, T, T> adaln_modulate_bwd(const T& dh, const T& x, const T& mean, const T& rstd,
                                                const T& scale) {
    auto t = prepare_bwd(Mode::kModulate, dh, std::nullopt, x, T(), T(), mean, rstd, scale);
    Kernels::bwd(Mode::kModulate, t);
    return {t.dx, t.dmod[kShift], t.dmod[kScale]};
  }

  static T gated_residual_fwd(const T& x, const T& y, const T& gate) {
    auto t = prepare_fwd(Mode::kGated, x, y, gate, T(), T(), std::nullopt);
    Kernels::fwd(Mode::kGated, t, 0.0);
    return t.x_out;
  }

  // dx is dout itself; only dy and dgate need a kernel.
  static std::tuple<T, T> gated_residual_bwd(const T& dout, const T& y, const T& gate) {
    auto t = prepare_bwd(Mode::kGated, dout, std::nullopt, T(), y, gate, T(), T(), T());
    Kernels::bwd(Mode::kGated, t);
    return {t.dy, t.dmod[kGate]};
  }

  static std::tuple<T, T, T, T> gated_residual_adaln_fwd(const T& x, const T& y, const T& gate, const T& shift,
                                                         const T& scale, double eps,
                                                         std::optional<at::ScalarType> out_dtype) {
    auto t = prepare_fwd(Mode::kFused, x, y, gate, shift, scale, out_dtype);
    Kernels::fwd(Mode::kFused, t, eps);
    return {t.x_out, t.h, t.mean, t.rstd};
  }

  static std::tuple<T, T, T, T, T> gated_residual_adaln_bwd(const T& dh, const std::optional<T>& dx_out,
                                                            const T& x_out, const T& y, const T& gate,
                                                            const T& mean, const T& rstd, const T& scale) {
    auto t = prepare_bwd(Mode::kFused, dh, dx_out, x_out, y, gate, mean, rstd, scale);
    Kernels::bwd(Mode::kFused, t);
    return {t.dx, t.dy, t.dmod[kGate], t.dmod[kShift], t.dmod[kScale]};
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
