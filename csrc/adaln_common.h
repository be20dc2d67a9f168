// Shared by the CPU and CUDA implementations of the dit_fast_ext adaLN ops: argument checks,
// output allocation and the fixed split of rows into chunks for the deterministic reductions
// over L (dshift, dscale, dgate).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace dit_fast {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Float64 math if any input is float64, float32 otherwise (the torch backend's rule).
inline at::ScalarType compute_dtype(std::initializer_list<at::ScalarType> dts) {
  for (auto d : dts) {
    if (d == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_floating_point(), "dit_fast_ext: ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "dit_fast_ext: ", name, " must be float32/float64/bfloat16/float16, got ", st);
}

inline void check_tokens(const at::Tensor& x, const char* name) {
  check_float(x, name);
  TORCH_CHECK(x.dim() == 3, "dit_fast_ext: ", name, " must have shape [B, L, D], got ", x.sizes());
  TORCH_CHECK(x.size(2) > 0, "dit_fast_ext: ", name, " must have D > 0, got ", x.sizes());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_float(t, name);
  TORCH_CHECK(t.sizes() == x.sizes(), "dit_fast_ext: ", name, " must have shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == x.device(), "dit_fast_ext: ", name, " must be on ", x.device(), ", got ",
              t.device());
}

inline void check_mod(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(2), "dit_fast_ext: ", name,
              " must have shape [B, D] = [", x.size(0), ", ", x.size(2), "], got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), "dit_fast_ext: ", name, " must be on ", x.device(), ", got ",
              t.device());
}

// mean / rstd: [B, L] in the compute dtype.
inline void check_stats(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), "dit_fast_ext: ", name,
              " must have shape [B, L] = [", x.size(0), ", ", x.size(1), "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "dit_fast_ext: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// Rows of one batch element are cut into chunks of `rows_per_chunk` rows; every chunk writes
// one partial sum per column and the partials are added in chunk order. The split depends
// only on the shape, so results are bitwise reproducible whatever the thread count or grid.
struct Chunking {
  int64_t rows_per_chunk;
  int64_t chunks_per_batch;
};

inline Chunking make_chunking(int64_t B, int64_t L, int64_t target_chunks, int64_t min_rows) {
  int64_t want = std::max<int64_t>(1, ceil_div(target_chunks, std::max<int64_t>(B, 1)));
  int64_t cpb = std::max<int64_t>(1, std::min<int64_t>(L, want));
  int64_t rpc = std::max<int64_t>(std::min<int64_t>(L, min_rows), ceil_div(L, cpb));
  rpc = std::max<int64_t>(rpc, 1);
  return {rpc, std::max<int64_t>(1, ceil_div(L, rpc))};
}

// The three ops share their kernels: kModulate = adaln_modulate, kGated = gated_residual,
// kFused = gated_residual_adaln.
enum class Mode { kModulate, kGated, kFused };

enum ModIndex { kShift = 0, kScale = 1, kGate = 2, kWeight = 3 };

inline bool has_norm(Mode m) { return m != Mode::kGated; }
inline bool has_gate(Mode m) { return m != Mode::kModulate; }

// The norm's modes (kModulate, kFused): LayerNorm or RMSNorm (`rms`: no centring, the saved mean is 0, the
// normalized row rounded to x's dtype before the gain, as LightningDiT's RMSNorm), a gain `weight` [D] or
// none, and a shift or none (scale-only adaLN).
inline void check_gain(const std::optional<at::Tensor>& weight, const at::Tensor& x) {
  if (!weight.has_value() || !weight->defined()) return;
  check_float(*weight, "weight");
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(2), "dit_fast_ext: weight must have shape [D] = [",
              x.size(2), "], got ", weight->sizes());
  TORCH_CHECK(weight->device() == x.device(), "dit_fast_ext: weight must be on ", x.device(), ", got ",
              weight->device());
}

inline at::Tensor defined_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// Inputs made contiguous and outputs allocated for one forward call. Unused slots are undefined.
struct FwdTensors {
  at::Tensor x, y, gate, shift, scale, weight;
  at::Tensor x_out, h, mean, rstd;
  at::ScalarType acc;
  bool rms = false;
};

inline FwdTensors prepare_fwd(Mode mode, const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                              const at::Tensor& shift, const at::Tensor& scale,
                              std::optional<at::ScalarType> out_dtype, bool rms = false,
                              const std::optional<at::Tensor>& weight = std::nullopt) {
  FwdTensors t;
  t.rms = rms;
  check_tokens(x, "x");
  t.x = x.contiguous();
  std::vector<at::ScalarType> dts{x.scalar_type()};
  if (has_gate(mode)) {
    check_like(y, "y", x);
    check_mod(gate, "gate", x);
    t.y = y.contiguous();
    t.gate = gate.contiguous();
    dts.push_back(y.scalar_type());
    dts.push_back(gate.scalar_type());
  }
  if (has_norm(mode)) {
    if (shift.defined()) {  // undefined: scale-only adaLN
      check_mod(shift, "shift", x);
      t.shift = shift.contiguous();
      dts.push_back(shift.scalar_type());
    }
    check_mod(scale, "scale", x);
    check_gain(weight, x);
    t.scale = scale.contiguous();
    t.weight = defined_or_empty(weight);
    dts.push_back(scale.scalar_type());
    if (t.weight.defined()) dts.push_back(t.weight.scalar_type());
  }
  t.acc = at::kFloat;
  for (auto d : dts) {
    if (d == at::kDouble) t.acc = at::kDouble;
  }
  if (has_gate(mode)) t.x_out = at::empty_like(t.x);
  if (has_norm(mode)) {
    auto h_dtype = out_dtype.value_or(x.scalar_type());
    TORCH_CHECK(at::isFloatingType(h_dtype), "dit_fast_ext: out_dtype must be a floating dtype, got ", h_dtype);
    t.h = at::empty(x.sizes(), t.x.options().dtype(h_dtype));
    t.mean = at::empty({x.size(0), x.size(1)}, t.x.options().dtype(t.acc));
    t.rstd = at::empty({x.size(0), x.size(1)}, t.x.options().dtype(t.acc));
  }
  return t;
}

// Inputs and outputs of one backward call. `dout` is dh (kModulate, kFused) or the gradient of
// x_out (kGated); `dx_out` is the gradient of x_out in kFused, maybe undefined. `xn` is the
// tensor that was normalized (x for kModulate, x_out for kFused). dmod[kShift/kScale/kGate]: [B, D]
// in the compute dtype, separate tensors (op outputs must not alias each other), undefined if unused;
// dmod[kWeight]: [D], the gain's gradient summed over B and L, with a gain only.
struct BwdTensors {
  at::Tensor dout, dx_out, xn, y, gate, mean, rstd, scale, weight;
  at::Tensor dx, dy;
  at::Tensor dmod[4];
  at::ScalarType acc;
  bool rms = false;
};

inline BwdTensors prepare_bwd(Mode mode, const at::Tensor& dout, const std::optional<at::Tensor>& dx_out,
                              const at::Tensor& xn, const at::Tensor& y, const at::Tensor& gate,
                              const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
                              bool rms = false, const std::optional<at::Tensor>& weight = std::nullopt) {
  BwdTensors t;
  t.rms = rms;
  const at::Tensor& ref = has_norm(mode) ? xn : y;
  check_tokens(ref, has_norm(mode) ? "x" : "y");
  check_like(dout, has_norm(mode) ? "dh" : "dout", ref);
  t.dout = dout.contiguous();
  t.acc = dout.scalar_type() == at::kDouble || ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (has_norm(mode)) {
    t.xn = xn.contiguous();
    check_stats(mean, "mean", ref);
    check_stats(rstd, "rstd", ref);
    check_mod(scale, "scale", ref);
    t.mean = mean.contiguous();
    t.rstd = rstd.contiguous();
    t.scale = scale.contiguous();
    check_gain(weight, ref);
    t.weight = defined_or_empty(weight);
    if (scale.scalar_type() == at::kDouble || mean.scalar_type() == at::kDouble) t.acc = at::kDouble;
    if (t.weight.defined() && t.weight.scalar_type() == at::kDouble) t.acc = at::kDouble;
    t.dx = at::empty_like(t.xn);
  }
  if (has_gate(mode)) {
    check_like(y, "y", ref);
    check_mod(gate, "gate", ref);
    t.y = y.contiguous();
    t.gate = gate.contiguous();
    if (y.scalar_type() == at::kDouble || gate.scalar_type() == at::kDouble) t.acc = at::kDouble;
    t.dy = at::empty_like(t.y);
  }
  if (mode == Mode::kFused && dx_out.has_value() && dx_out->defined()) {
    check_like(*dx_out, "dx_out", ref);
    t.dx_out = dx_out->contiguous();
    if (dx_out->scalar_type() == at::kDouble) t.acc = at::kDouble;
  }
  if (has_norm(mode)) {
    // Stats come from the forward in its compute dtype; keep the backward in the same one.
    t.mean = t.mean.to(t.acc);
    t.rstd = t.rstd.to(t.acc);
  }
  auto mod_opts = ref.options().dtype(t.acc);
  if (has_norm(mode)) {
    t.dmod[kShift] = at::empty({ref.size(0), ref.size(2)}, mod_opts);
    t.dmod[kScale] = at::empty({ref.size(0), ref.size(2)}, mod_opts);
    if (t.weight.defined()) t.dmod[kWeight] = at::empty({ref.size(2)}, mod_opts);
  }
  if (has_gate(mode)) t.dmod[kGate] = at::empty({ref.size(0), ref.size(2)}, mod_opts);
  return t;
}

}  // namespace dit_fast
