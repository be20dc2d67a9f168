// CUDA kernels of the dit_fast_ext adaLN ops.
//
// One thread block per row of D features; each thread owns 8 consecutive features, moved with
// 16-byte loads/stores (bf16/fp16: one, fp32: two) when D % 8 == 0 and every base pointer is
// 16-byte aligned, element by element otherwise. Up to 512 threads: D <= 4096 (larger D: the
// Python side uses the torch backend). Statistics and
// all math in fp32; block reductions add the per-warp partials in a fixed order.
//
// Forward: the grid is sized by the SM count and each block walks a contiguous range of rows,
// so the per-batch modulation vectors are reloaded only when the batch index changes.
// Backward: rows of one batch element are cut into chunks (shape-only split, adaln_common.h);
// a block accumulates dshift/dscale/dgate of its chunk in registers, writes one partial per
// chunk, and a second kernel adds the partials in chunk order: deterministic, no atomics.
//
// Norm modes (adaln_common.h), the math of adaln_cpu_kernels.inc. The norm kind is a template parameter
// (NormKind: LayerNorm, LayerNorm with a gain, RMSNorm with a gain), so the plain LayerNorm kernels keep their
// registers: a runtime gain flag cost them registers (and fp32 backward spills). An absent shift reads as 0
// through ModPtr's dtype code kModZero (no branch, no allocation); an RMSNorm without gain (not LightningDiT's)
// runs the gain kernels with a gain of ones.
// The gain folds into the per-column factor (1 + scale) * weight; the backward's partials stay sum(dh * xhat)
// per chunk, and the reduction turns them into dscale = weight * S and dweight = sum over b of
// (1 + scale) * S, in a fixed order.
//
// Dtypes: x (and x_out, dx) T; y (and dy) Y; h (and dh) H, each fp32/bf16/fp16, instantiated
// for Y, H in {T, fp32} plus any low-precision Y, H with fp32 x (autocast). The other
// combinations (bf16 with fp16) go through fp32 copies. shift/scale/gate/weight are read through a
// runtime dtype switch: they are tiny and loaded once per batch element (or chunk).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <type_traits>

#include "adaln_ops.h"

namespace dit_fast {
namespace {

constexpr int kVec = 8;          // features per thread
constexpr int kMaxThreads = 512;  // with 1024 the 64-register cap makes the fused kernels spill
constexpr int kMaxD = kVec * kMaxThreads;

using bf16 = c10::BFloat16;
using fp16 = c10::Half;

// kModZero: an absent vector (shift) that reads as 0. (A fifth code, reading 1, cost the plain kernels registers.)
enum ModDtype { kModF32 = 0, kModBF16 = 1, kModF16 = 2, kModZero = 3 };

// A [B, D] modulation vector (or a [D] gain) of a runtime dtype.
struct ModPtr {
  const void* p = nullptr;
  int dtype = kModF32;

  __device__ __forceinline__ float load(int64_t i) const {
    switch (dtype) {
      case kModBF16: return static_cast<float>(static_cast<const bf16*>(p)[i]);
      case kModF16: return static_cast<float>(static_cast<const fp16*>(p)[i]);
      case kModZero: return 0.f;
      default: return static_cast<const float*>(p)[i];
    }
  }

  __device__ __forceinline__ void load8(int64_t off, int nv, float (&out)[kVec]) const {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = i < nv ? load(off + i) : 0.f;
  }
};

template <typename S>
union Pack {
  static constexpr int kWords = kVec * sizeof(S) / 16;
  uint4 words[kWords];
  S v[kVec];
};

// 8 raw elements at p + off; lanes at or past nv read as 0. Kept raw so that a row can be
// fetched one iteration ahead and converted only when it is used.
template <typename S>
__device__ __forceinline__ void load_raw(const S* __restrict__ p, int64_t off, int nv, bool vec, Pack<S>& pk) {
  if (vec && nv == kVec) {
    const uint4* src = reinterpret_cast<const uint4*>(p + off);
#pragma unroll
    for (int w = 0; w < Pack<S>::kWords; ++w) pk.words[w] = src[w];
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) pk.v[i] = i < nv ? p[off + i] : static_cast<S>(0.f);
  }
}

template <typename S>
__device__ __forceinline__ void unpack(const Pack<S>& pk, float (&out)[kVec]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = static_cast<float>(pk.v[i]);
}

template <typename S>
__device__ __forceinline__ void load8(const S* __restrict__ p, int64_t off, int nv, bool vec, float (&out)[kVec]) {
  Pack<S> pk;
  load_raw(p, off, nv, vec, pk);
  unpack(pk, out);
}

template <typename S>
__device__ __forceinline__ void store8(S* __restrict__ p, int64_t off, int nv, bool vec, const float (&in)[kVec]) {
  if (vec && nv == kVec) {
    Pack<S> pk;
#pragma unroll
    for (int i = 0; i < kVec; ++i) pk.v[i] = static_cast<S>(in[i]);
    uint4* dst = reinterpret_cast<uint4*>(p + off);
#pragma unroll
    for (int w = 0; w < Pack<S>::kWords; ++w) dst[w] = pk.words[w];
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < nv) p[off + i] = static_cast<S>(in[i]);
    }
  }
}

template <typename S>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<S>(v));
}

// Sum of v[i] over the block, the same bits in every thread. blockDim.x is a multiple of 32.
// smem holds 32 * N floats.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* smem) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], m);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // the previous reduction's readers are done with smem
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[warp * N + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += smem[w * N + i];
    v[i] = s;
  }
}

// Which parts a mode's kernels run (adaln_common.h: Mode).
template <int MODE>
struct Parts {
  static constexpr bool kNorm = MODE != static_cast<int>(Mode::kGated);
  static constexpr bool kGate = MODE != static_cast<int>(Mode::kModulate);
};

// The columns c0 .. c0 + nv of a D-wide row this thread owns (nv = 0 past the row's end).
struct OwnCols {
  int c0, nv;
  __device__ __forceinline__ explicit OwnCols(int D) : c0(threadIdx.x * kVec), nv(max(0, min(kVec, D - c0))) {}
};

// The norm of a kernel instantiation.
enum NormKind { kLayerNorm = 0, kLayerNormGain = 1, kRmsNormGain = 2 };

template <int NORM>
struct Norm {
  static constexpr bool kRms = NORM == kRmsNormGain, kGain = NORM != kLayerNorm;
  // __launch_bounds__'s minimum blocks per SM: 0 (none) keeps the plain kernels as they were; 1 stops ptxas from
  // squeezing the gain kernels to 64 registers with spills (the bf16 RMSNorm forward did).
  static constexpr int kMinBlocks = kGain ? 1 : 0;
};

// (1 + scale) * weight at this thread's columns of one batch element (weight: the norm's gain): what
// multiplies the normalized row in the forward and dh in the backward.
template <int NORM>
__device__ __forceinline__ void norm_factor(const ModPtr& scale, const ModPtr& weight, int64_t moff,
                                            const OwnCols& cols, float (&out)[kVec]) {
  scale.load8(moff, cols.nv, out);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] += 1.f;
  if (Norm<NORM>::kGain) {
    float w[kVec];
    weight.load8(cols.c0, cols.nv, w);
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] *= w[i];
  }
}

// NaN where the squares overflowed (rsqrtf(inf) = 0 would give a row of exactly `shift`, hiding a
// diverging activation from non-finite guards); adaln_cpu_kernels.inc does the same.
__device__ __forceinline__ float nan_if_overflowed(float rs) { return rs > 0.f ? rs : __int_as_float(0x7fc00000); }

struct FwdParams {
  const void* x;
  const void* y;
  ModPtr gate, shift, scale, weight;  // absent shift: kModZero
  void* x_out;
  void* h;
  float* mean;
  float* rstd;
  int64_t rows, L, rows_per_block;
  int D;
  float eps;
  bool vec;
};

// The normalized, modulated row and its statistics.
template <typename H>
__device__ __forceinline__ void store_normalized(const FwdParams& p, int64_t r, int64_t off, int nv,
                                                 const float (&v)[kVec], float mean, float rstd) {
  store8(static_cast<H*>(p.h), off, nv, p.vec, v);
  if (threadIdx.x == 0) {
    p.mean[r] = mean;
    p.rstd[r] = rstd;
  }
}

template <typename T, typename Y, typename H, int MODE, int NORM>
__global__ void __launch_bounds__(kMaxThreads, Norm<NORM>::kMinBlocks) adaln_fwd_kernel(FwdParams p) {
  constexpr bool kHasNorm = Parts<MODE>::kNorm, kHasGate = Parts<MODE>::kGate, kRms = Norm<NORM>::kRms;
  constexpr bool kPivot = kHasNorm && !kRms;  // LayerNorm's statistics are taken about the row's first element
  __shared__ float smem[32];
  const int D = p.D;
  const OwnCols cols(D);
  const int c0 = cols.c0, nv = cols.nv;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t r_end = min(p.rows, r_begin + p.rows_per_block);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const Y* __restrict__ y = static_cast<const Y*>(p.y);
  T* __restrict__ x_out = static_cast<T*>(p.x_out);

  float g[kVec], sh[kVec], fac[kVec];
  int64_t cur_b = -1;
  // Row r + 1 is in flight while row r is reduced: x, y and their column-0 elements (the pivot).
  Pack<T> next_x;
  Pack<Y> next_y;
  T next_x0 = static_cast<T>(0.f);
  Y next_y0 = static_cast<Y>(0.f);
  auto fetch = [&](int64_t r) {
    load_raw(x, r * D + c0, nv, p.vec, next_x);
    if (kPivot) next_x0 = x[r * D];
    if (kHasGate) {
      load_raw(y, r * D + c0, nv, p.vec, next_y);
      if (kPivot) next_y0 = y[r * D];
    }
  };
  if (r_begin < r_end) fetch(r_begin);
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t b = r / p.L;
    if (b != cur_b) {
      cur_b = b;
      const int64_t moff = b * D + c0;
      if (kHasGate) p.gate.load8(moff, nv, g);
      if (kHasNorm) {
        p.shift.load8(moff, nv, sh);
        norm_factor<NORM>(p.scale, p.weight, moff, cols, fac);
      }
    }
    const int64_t off = r * D + c0;
    float v[kVec], yy[kVec];
    unpack(next_x, v);
    if (kHasGate) unpack(next_y, yy);
    // Row statistics are taken of the row minus its first element, so a large common offset costs
    // no accuracy; every thread computes that pivot itself, with the same explicit fma as the owner
    // of column 0. The saved mean is pivot + mu (ops.cpp: `mean`).
    float pivot = static_cast<float>(next_x0);
    const float y0 = static_cast<float>(next_y0);
    if (r + 1 < r_end) fetch(r + 1);
    if (kHasGate) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = round_to<T>(__fmaf_rn(g[i], yy[i], v[i]));  // x_out as stored
      store8(x_out, off, nv, p.vec, v);
      if (kPivot) pivot = round_to<T>(__fmaf_rn(p.gate.load(b * D), y0, pivot));
    }
    if (kHasNorm && kRms) {
      // RMSNorm: no centring (the saved mean is 0); the normalized row is rounded to x's dtype before
      // the gain, as LightningDiT's RMSNorm (type_as(x)) and the CPU kernels do.
      float q[1] = {0.f};
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float d = i < nv ? v[i] : 0.f;
        q[0] += d * d;
      }
      block_sum<1>(q, smem);
      const float rs = nan_if_overflowed(rsqrtf(q[0] / D + p.eps));
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = round_to<T>(v[i] * rs) * fac[i] + sh[i];
      store_normalized<H>(p, r, off, nv, v, 0.f, rs);
    } else if (kHasNorm) {
      float s[1] = {0.f};
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        v[i] = i < nv ? v[i] - pivot : 0.f;
        s[0] += v[i];
      }
      block_sum<1>(s, smem);
      const float mu = s[0] / D;
      float q[1] = {0.f};
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float d = i < nv ? v[i] - mu : 0.f;
        q[0] += d * d;
      }
      block_sum<1>(q, smem);
      const float rs = nan_if_overflowed(rsqrtf(q[0] / D + p.eps));
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = (v[i] - mu) * rs * fac[i] + sh[i];
      store_normalized<H>(p, r, off, nv, v, pivot + mu, rs);
    }
  }
}

struct BwdParams {
  const void* dout;  // dh (kModulate, kFused) or d x_out (kGated)
  const void* dx_out;  // kFused, may be null
  const void* xn;
  const void* y;
  ModPtr gate, scale, weight;
  const float* mean;
  const float* rstd;
  void* dx;
  void* dy;
  float* part;  // [nchunks, 3, D]
  int64_t L, rows_per_chunk, chunks_per_batch, nchunks;
  int D;
  bool vec;
};

// T: dtype of xn, dx_out, dx (kGated: of dout); Y: y, dy; H: dh.
// Partials per chunk: sum(dh) (kShift), sum(dh * xhat) (kScale: the gain is applied in the reduction),
// sum(dtotal * y) (kGate).
template <typename T, typename Y, typename H, int MODE, int NORM>
__global__ void __launch_bounds__(kMaxThreads, Norm<NORM>::kMinBlocks) adaln_bwd_kernel(BwdParams p) {
  constexpr bool kHasNorm = Parts<MODE>::kNorm, kHasGate = Parts<MODE>::kGate, kRms = Norm<NORM>::kRms;
  // The row reduction's sums: LayerNorm sum(g), sum(g * xc), sum(xc); RMSNorm sum(g * xc) only.
  constexpr int kSums = kRms ? 1 : 3, kDot = kRms ? 0 : 1;
  // kFused's dx_out is loaded for the current row, in flight during the row reduction, instead of a row ahead
  // where fp32 x meets another fp32 stream in a gain kernel: prefetched, those spilled (16-76 B); the plain
  // kernels and the autocast/bf16 ones keep the prefetch.
  constexpr bool kLateDxOut = Norm<NORM>::kGain && sizeof(T) == 4 && (sizeof(Y) == 4 || sizeof(H) == 4);
  __shared__ float smem[64];
  const int D = p.D;
  const OwnCols cols(D);
  const int c0 = cols.c0, nv = cols.nv;
  const T* __restrict__ xn = static_cast<const T*>(p.xn);
  const T* __restrict__ dx_out = static_cast<const T*>(p.dx_out);
  const Y* __restrict__ y = static_cast<const Y*>(p.y);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  Y* __restrict__ dy = static_cast<Y*>(p.dy);

  for (int64_t c = blockIdx.x; c < p.nchunks; c += gridDim.x) {
    const int64_t b = c / p.chunks_per_batch;
    const int64_t l0 = (c % p.chunks_per_batch) * p.rows_per_chunk;
    const int64_t l1 = min(p.L, l0 + p.rows_per_chunk);
    float a_shift[kVec] = {0.f}, a_scale[kVec] = {0.f}, a_gate[kVec] = {0.f};
    float g[kVec], fac[kVec];
    const int64_t moff = b * D + c0;
    if (kHasGate) p.gate.load8(moff, nv, g);
    if (kHasNorm) norm_factor<NORM>(p.scale, p.weight, moff, cols, fac);
    // Row l + 1 is in flight while row l is reduced.
    Pack<H> n_dh;
    Pack<T> n_xn, n_dout, n_dxo;
    Pack<Y> n_y;
    float n_mu = 0.f, n_rs = 0.f;
    auto fetch = [&](int64_t l) {
      const int64_t r = b * p.L + l, off = r * D + c0;
      if (kHasNorm) {
        load_raw(static_cast<const H*>(p.dout), off, nv, p.vec, n_dh);
        load_raw(xn, off, nv, p.vec, n_xn);
        n_mu = p.mean[r];
        n_rs = p.rstd[r];
        if (kHasGate && !kLateDxOut && dx_out != nullptr) load_raw(dx_out, off, nv, p.vec, n_dxo);
      } else {
        load_raw(static_cast<const T*>(p.dout), off, nv, p.vec, n_dout);
      }
      if (kHasGate) load_raw(y, off, nv, p.vec, n_y);
    };
    if (l0 < l1) fetch(l0);
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t r = b * p.L + l;
      const int64_t off = r * D + c0;
      float dtot[kVec], yy[kVec], dh[kVec], xh[kVec], dxo[kVec];
      if (kHasNorm) {
        unpack(n_dh, dh);
        unpack(n_xn, xh);
        if (kHasGate && !kLateDxOut && dx_out != nullptr) unpack(n_dxo, dxo);
      } else {
        unpack(n_dout, dtot);
      }
      if (kHasGate) unpack(n_y, yy);
      const float mu = n_mu, rs = n_rs;
      if (l + 1 < l1) fetch(l + 1);
      if (kHasNorm) {
        // xc = x - mean, and mean(xc) corrects the saved mean's rounding (up to half an ulp of
        // the mean, large next to the std at large offsets): xhat = (xc - mean(xc)) * rstd, and
        // mean(g * xhat) = rstd * (mean(g * xc) - mean(xc) * mean(g)). One reduction of three sums.
        // RMSNorm has no centring (its saved mean is 0) and no mean(g) term: one sum.
        float gg[kVec];
        float s[kSums] = {};
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          xh[i] = i < nv ? xh[i] - mu : 0.f;
          gg[i] = dh[i] * fac[i];
          s[kDot] += gg[i] * xh[i];
          if (!kRms) {
            s[0] += gg[i];
            s[kSums - 1] += xh[i];
          }
        }
        if (kHasGate && kLateDxOut && dx_out != nullptr) load8(dx_out, off, nv, p.vec, dxo);
        block_sum<kSums>(s, smem);
        const float xc_mean = kRms ? 0.f : s[kSums - 1] / D, c1 = kRms ? 0.f : s[0] / D;
        const float c2 = rs * (s[kDot] / D - xc_mean * c1);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          xh[i] = i < nv ? (xh[i] - xc_mean) * rs : 0.f;
          dtot[i] = rs * (gg[i] - c1 - xh[i] * c2);
          a_shift[i] += dh[i];
          a_scale[i] += dh[i] * xh[i];
        }
        if (kHasGate && dx_out != nullptr) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) dtot[i] += dxo[i];
        }
        store8(dx, off, nv, p.vec, dtot);
      }
      if (kHasGate) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          a_gate[i] += dtot[i] * yy[i];
          yy[i] = g[i] * dtot[i];
        }
        store8(dy, off, nv, p.vec, yy);
      }
    }
    float* part = p.part + c * 3 * D + c0;
    if (kHasNorm) {
      store8(part + kShift * D, 0, nv, p.vec, a_shift);
      store8(part + kScale * D, 0, nv, p.vec, a_scale);
    }
    if (kHasGate) store8(part + kGate * D, 0, nv, p.vec, a_gate);
  }
}

struct ReduceParams {
  const float* part;  // [B * chunks_per_batch, 3, D]
  float* out[3];      // dshift, dscale, dgate [B, D] (kShift, kScale, kGate), null if unused
  // With a gain tensor (weight.p non-null): dscale = weight * S, and dweight_rows [B, D] gets (1 + scale) * S,
  // batch b's term of dweight, where S is the kScale sum sum(dh * xhat).
  ModPtr scale, weight;
  float* dweight_rows;
  int64_t B, chunks_per_batch;
  int D;
};

// out_k[b, d] = sum over the chunks of batch b, in chunk order.
__global__ void reduce_partials_kernel(ReduceParams p) {
  const int D = p.D;
  const int64_t n = p.B * D;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / D, d = idx % D;
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if (p.out[k] == nullptr) continue;
      float s = 0.f;
      for (int64_t c = b * p.chunks_per_batch; c < (b + 1) * p.chunks_per_batch; ++c) {
        s += p.part[(c * 3 + k) * D + d];
      }
      if (k == kScale && p.weight.p != nullptr) {
        p.dweight_rows[idx] = (1.f + p.scale.load(idx)) * s;
        s *= p.weight.load(d);
      }
      p.out[k][idx] = s;
    }
  }
}

// out[d] = sum over rows r of in[r, d], in row order (dweight from its per-batch terms).
__global__ void column_sum_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t rows, int D) {
  for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < D; d += gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int64_t r = 0; r < rows; ++r) s += in[r * D + d];
    out[d] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename S>
struct Tag {
  using type = S;
};

template <typename F>
void dispatch_dtype(at::ScalarType st, const char* name, F&& f) {  // f(Tag<S>{}) for st's type S
  switch (st) {
    case at::kFloat: return f(Tag<float>{});
    case at::kBFloat16: return f(Tag<bf16>{});
    case at::kHalf: return f(Tag<fp16>{});
    default: TORCH_CHECK(false, "dit_fast_ext CUDA: ", name, " must be float32/bfloat16/float16, got ", st);
  }
}

// Whether (x dtype T, other dtype O) is instantiated.
template <typename T, typename O>
constexpr bool kPairCompiled = std::is_same<T, O>::value || std::is_same<O, float>::value || std::is_same<T, float>::value;

bool pair_compiled(at::ScalarType t, at::ScalarType o) { return t == o || o == at::kFloat || t == at::kFloat; }

// An undefined tensor reads as 0 (kModZero); its pointer stays null.
ModPtr mod_ptr(const at::Tensor& t) {
  ModPtr m;
  m.dtype = kModZero;
  if (!t.defined()) return m;
  m.p = t.data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat: m.dtype = kModF32; break;
    case at::kBFloat16: m.dtype = kModBF16; break;
    case at::kHalf: m.dtype = kModF16; break;
    default: TORCH_CHECK(false, "dit_fast_ext CUDA: modulation tensors must be float32/bfloat16/float16, got ",
                         t.scalar_type());
  }
  return m;
}

bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cached[device] = n > 0 ? n : 1;
  }
  return cached[device];
}

int threads_for(int D) {
  const int groups = (D + kVec - 1) / kVec;
  return std::max(32, (groups + 31) / 32 * 32);
}

void check_cuda_args(const at::Tensor& ref, at::ScalarType acc, std::initializer_list<at::Tensor> ts) {
  TORCH_CHECK(acc == at::kFloat, "dit_fast_ext CUDA kernels compute in float32: float64 inputs are not supported");
  const int64_t D = ref.size(2);
  TORCH_CHECK(D <= kMaxD, "dit_fast_ext CUDA kernels support D <= ", kMaxD, ", got D = ", D,
              " (use backend='triton' or 'torch')");
  for (const auto& t : ts) {
    if (t.defined()) {
      TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "dit_fast_ext CUDA: all tensors must be on ",
                  ref.device(), ", got one on ", t.device());
    }
  }
}

// The kernel instantiation for runtime dtypes (T, Y, H) of one mode: make(Tag<T>, Tag<Y>, Tag<H>) returns
// its address. Slots a mode does not use are pinned to T.
template <int MODE, typename Make>
auto pick_kernel(at::ScalarType t, at::ScalarType y, at::ScalarType h, Make make) {
  using Kernel = decltype(make(Tag<float>{}, Tag<float>{}, Tag<float>{}));
  Kernel kernel = nullptr;
  dispatch_dtype(t, "x", [&](auto tt) {
    using TT = typename std::decay_t<decltype(tt)>::type;
    dispatch_dtype(y, "y", [&](auto yt) {
      using YY = typename std::decay_t<decltype(yt)>::type;
      dispatch_dtype(h, "h", [&](auto ht) {
        using HH = typename std::decay_t<decltype(ht)>::type;
        constexpr bool kUsedY = Parts<MODE>::kGate, kUsedH = Parts<MODE>::kNorm;
        if constexpr ((kUsedY ? kPairCompiled<TT, YY> : std::is_same<YY, TT>::value) &&
                      (kUsedH ? kPairCompiled<TT, HH> : std::is_same<HH, TT>::value)) {
          kernel = make(tt, yt, ht);
        }
      });
    });
  });
  TORCH_CHECK(kernel != nullptr, "dit_fast_ext CUDA: no kernel for dtypes x=", t, ", y=", y, ", h=", h);
  return kernel;
}

template <typename TagT>
using TypeOf = typename std::decay_t<TagT>::type;

// Blocks of `kernel` resident on the whole GPU at once.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, int device) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return static_cast<int64_t>(sm_count(device)) * std::max(per_sm, 1);
}

// The gain the kernels of NORM read: the norm's, or ones for an RMSNorm without one.
template <int NORM>
at::Tensor kernel_gain(const at::Tensor& weight, const at::Tensor& ref) {
  if (weight.defined() || !Norm<NORM>::kGain) return weight;
  return at::ones({ref.size(2)}, ref.options().dtype(at::kFloat));
}

template <int MODE, int NORM>
void launch_fwd(FwdTensors& t, double eps) {
  const int64_t B = t.x.size(0), L = t.x.size(1);
  const int D = static_cast<int>(t.x.size(2));
  const int64_t rows = B * L;
  if (rows == 0) return;
  const bool norm = Parts<MODE>::kNorm, gated = Parts<MODE>::kGate;
  const at::ScalarType T = t.x.scalar_type();
  if (gated && !pair_compiled(T, t.y.scalar_type())) t.y = t.y.to(at::kFloat);  // exact: 16-bit -> fp32
  at::Tensor h_final;
  if (norm && !pair_compiled(T, t.h.scalar_type())) {
    h_final = t.h;
    t.h = at::empty(t.h.sizes(), t.h.options().dtype(at::kFloat));
  }
  const at::ScalarType Yt = gated ? t.y.scalar_type() : T;
  const at::ScalarType Ht = norm ? t.h.scalar_type() : T;

  FwdParams p;
  p.x = t.x.data_ptr();
  p.y = gated ? t.y.data_ptr() : nullptr;
  p.gate = mod_ptr(t.gate);
  p.shift = mod_ptr(t.shift);  // scale-only adaLN: reads 0
  p.scale = mod_ptr(t.scale);
  const at::Tensor gain = kernel_gain<NORM>(t.weight, t.x);
  p.weight = mod_ptr(gain);
  p.x_out = gated ? t.x_out.data_ptr() : nullptr;
  p.h = norm ? t.h.data_ptr() : nullptr;
  p.mean = norm ? t.mean.data_ptr<float>() : nullptr;
  p.rstd = norm ? t.rstd.data_ptr<float>() : nullptr;
  p.L = L;
  p.rows = rows;
  p.D = D;
  p.eps = static_cast<float>(eps);
  p.vec = D % kVec == 0 && aligned16(t.x) && aligned16(t.y) && aligned16(t.x_out) && aligned16(t.h);

  const int threads = threads_for(D);
  auto kernel = pick_kernel<MODE>(T, Yt, Ht, [](auto tt, auto yt, auto ht) {
    return &adaln_fwd_kernel<TypeOf<decltype(tt)>, TypeOf<decltype(yt)>, TypeOf<decltype(ht)>, MODE, NORM>;
  });
  const int64_t grid0 = std::min<int64_t>(rows, resident_blocks(kernel, threads, t.x.get_device()));
  p.rows_per_block = ceil_div(rows, grid0);
  const int64_t grid = ceil_div(rows, p.rows_per_block);
  kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (h_final.defined()) {
    h_final.copy_(t.h);
    t.h = h_final;
  }
}

// dshift, dscale, dgate from the chunk partials, and with a gain dweight (summed over B in batch order).
void launch_reduce(BwdTensors& t, const at::Tensor& part, int64_t B, int D, int64_t chunks_per_batch, int device,
                   cudaStream_t stream) {
  auto ptr = [](const at::Tensor& x) { return x.defined() ? x.data_ptr<float>() : nullptr; };
  ReduceParams p;
  p.part = part.data_ptr<float>();
  p.out[kShift] = ptr(t.dmod[kShift]);
  p.out[kScale] = ptr(t.dmod[kScale]);
  p.out[kGate] = ptr(t.dmod[kGate]);
  p.scale = mod_ptr(t.scale);
  p.weight = mod_ptr(t.weight);
  at::Tensor dweight_rows;
  if (t.weight.defined()) dweight_rows = at::empty({B, D}, part.options());
  p.dweight_rows = ptr(dweight_rows);
  p.B = B;
  p.chunks_per_batch = chunks_per_batch;
  p.D = D;
  const int rthreads = 256;
  const int64_t n = B * D;
  if (n > 0) {
    const int64_t rgrid = std::min<int64_t>(ceil_div(n, rthreads), static_cast<int64_t>(sm_count(device)) * 8);
    reduce_partials_kernel<<<rgrid, rthreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (t.weight.defined()) {  // B = 0 too: dweight is then 0
    column_sum_kernel<<<ceil_div(D, rthreads), rthreads, 0, stream>>>(p.dweight_rows, ptr(t.dmod[kWeight]), B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <int MODE, int NORM>
void launch_bwd(BwdTensors& t) {
  const bool norm = Parts<MODE>::kNorm, gated = Parts<MODE>::kGate;
  const at::Tensor& ref = norm ? t.xn : t.y;
  const int64_t B = ref.size(0), L = ref.size(1);
  const int D = static_cast<int>(ref.size(2));
  const at::ScalarType T = norm ? t.xn.scalar_type() : t.dout.scalar_type();
  if (t.dx_out.defined()) {
    TORCH_CHECK(t.dx_out.scalar_type() == T, "dit_fast_ext CUDA: dx_out must have x_out's dtype ", T, ", got ",
                t.dx_out.scalar_type());
  }
  if (gated && !pair_compiled(T, t.y.scalar_type())) {
    at::Tensor dy_final = t.dy;
    t.y = t.y.to(at::kFloat);
    t.dy = at::empty(t.y.sizes(), t.y.options());
    launch_bwd<MODE, NORM>(t);
    dy_final.copy_(t.dy);
    t.dy = dy_final;
    return;
  }
  if (norm && !pair_compiled(T, t.dout.scalar_type())) t.dout = t.dout.to(at::kFloat);
  const at::ScalarType Yt = gated ? t.y.scalar_type() : T;
  const at::ScalarType Ht = norm ? t.dout.scalar_type() : T;

  const int threads = threads_for(D);
  auto kernel = pick_kernel<MODE>(T, Yt, Ht, [](auto tt, auto yt, auto ht) {
    return &adaln_bwd_kernel<TypeOf<decltype(tt)>, TypeOf<decltype(yt)>, TypeOf<decltype(ht)>, MODE, NORM>;
  });
  // About two chunks per resident block: few partials to write, little tail. The split depends
  // on the shape and the GPU model only, so results are bitwise reproducible on a given GPU.
  const int64_t resident = resident_blocks(kernel, threads, ref.get_device());
  const Chunking ch = make_chunking(B, L, /*target_chunks=*/2 * resident, /*min_rows=*/8);
  const int64_t nchunks = B * ch.chunks_per_batch;
  at::Tensor part = at::empty({nchunks, 3, D}, ref.options().dtype(at::kFloat));

  BwdParams p;
  p.dout = t.dout.data_ptr();
  p.dx_out = t.dx_out.defined() ? t.dx_out.data_ptr() : nullptr;
  p.xn = norm ? t.xn.data_ptr() : nullptr;
  p.y = gated ? t.y.data_ptr() : nullptr;
  p.gate = mod_ptr(t.gate);
  p.scale = mod_ptr(t.scale);
  const at::Tensor gain = kernel_gain<NORM>(t.weight, ref);
  p.weight = mod_ptr(gain);
  p.mean = norm ? t.mean.data_ptr<float>() : nullptr;
  p.rstd = norm ? t.rstd.data_ptr<float>() : nullptr;
  p.dx = norm ? t.dx.data_ptr() : nullptr;
  p.dy = gated ? t.dy.data_ptr() : nullptr;
  p.part = part.data_ptr<float>();
  p.L = L;
  p.rows_per_chunk = ch.rows_per_chunk;
  p.chunks_per_batch = ch.chunks_per_batch;
  p.nchunks = nchunks;
  p.D = D;
  p.vec = D % kVec == 0 && aligned16(t.dout) && aligned16(t.dx_out) && aligned16(t.xn) && aligned16(t.y) &&
          aligned16(t.dx) && aligned16(t.dy) && aligned16(part);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (B * L > 0) {
    kernel<<<std::min<int64_t>(nchunks, resident), threads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    part.zero_();
  }
  launch_reduce(t, part, B, D, ch.chunks_per_batch, ref.get_device(), stream);
}

// f(std::integral_constant<int, NormKind>) for the call's norm.
template <typename F>
void with_norm_kind(bool rms, const at::Tensor& weight, F&& f) {
  if (rms) {
    f(std::integral_constant<int, kRmsNormGain>{});
  } else if (weight.defined()) {
    f(std::integral_constant<int, kLayerNormGain>{});
  } else {
    f(std::integral_constant<int, kLayerNorm>{});
  }
}

constexpr int kModulate = static_cast<int>(Mode::kModulate), kGated = static_cast<int>(Mode::kGated),
              kFused = static_cast<int>(Mode::kFused);

struct CudaKernels {
  static void fwd(Mode mode, FwdTensors& t, double eps) {
    check_cuda_args(t.x, t.acc, {t.x, t.y, t.gate, t.shift, t.scale, t.weight});
    c10::cuda::CUDAGuard guard(t.x.device());
    if (mode == Mode::kGated) return launch_fwd<kGated, kLayerNorm>(t, eps);
    with_norm_kind(t.rms, t.weight, [&](auto kind) {
      constexpr int kNorm = decltype(kind)::value;
      if (mode == Mode::kModulate) return launch_fwd<kModulate, kNorm>(t, eps);
      launch_fwd<kFused, kNorm>(t, eps);
    });
  }
  static void bwd(Mode mode, BwdTensors& t) {
    const at::Tensor& ref = has_norm(mode) ? t.xn : t.y;
    check_cuda_args(ref, t.acc, {t.dout, t.dx_out, t.xn, t.y, t.gate, t.mean, t.rstd, t.scale, t.weight});
    c10::cuda::CUDAGuard guard(ref.device());
    if (mode == Mode::kGated) return launch_bwd<kGated, kLayerNorm>(t);
    with_norm_kind(t.rms, t.weight, [&](auto kind) {
      constexpr int kNorm = decltype(kind)::value;
      if (mode == Mode::kModulate) return launch_bwd<kModulate, kNorm>(t);
      launch_bwd<kFused, kNorm>(t);
    });
  }
};

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY_IMPL(dit_fast_ext, CUDA, m) { DIT_FAST_REGISTER_ADALN_IMPLS(m, dit_fast::CudaKernels); }
