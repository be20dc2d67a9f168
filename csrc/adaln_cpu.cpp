// CPU kernels of the dit_fast_ext adaLN ops (bodies in adaln_cpu_kernels.inc).
//
// Extensions build for the baseline x86-64 ISA (SSE2); the kernels are compiled a second time
// for AVX2+FMA and chosen at run time, the way ATen's own CPU kernels are.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "adaln_ops.h"

namespace dit_fast {
namespace cpu_baseline {
namespace {
#include "adaln_cpu_kernels.inc"
}  // namespace
}  // namespace cpu_baseline
}  // namespace dit_fast

#if defined(__x86_64__) && defined(__GNUC__)
#define DIT_FAST_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace dit_fast {
namespace cpu_avx2 {
namespace {
#include "adaln_cpu_kernels.inc"
}  // namespace
}  // namespace cpu_avx2
}  // namespace dit_fast
#pragma GCC pop_options
#endif

namespace dit_fast {
namespace {

bool use_avx2() {
#ifdef DIT_FAST_CPU_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

struct CpuKernels {
  static void fwd(Mode mode, FwdTensors& t, double eps) {
#ifdef DIT_FAST_CPU_AVX2
    if (use_avx2()) return cpu_avx2::Kernels::fwd(mode, t, eps);
#endif
    cpu_baseline::Kernels::fwd(mode, t, eps);
  }
  static void bwd(Mode mode, BwdTensors& t) {
#ifdef DIT_FAST_CPU_AVX2
    if (use_avx2()) return cpu_avx2::Kernels::bwd(mode, t);
#endif
    cpu_baseline::Kernels::bwd(mode, t);
  }
};

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY_IMPL(dit_fast_ext, CPU, m) { DIT_FAST_REGISTER_ADALN_IMPLS(m, dit_fast::CpuKernels); }
