// dit_fast._C: op schemas of the dit_fast_ext namespace and the Python module itself.
// Kernels register per device in adaln_cpu.cpp and adaln_cuda.cu.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#define DIT_FAST_STR_(x) #x
#define DIT_FAST_STR(x) DIT_FAST_STR_(x)

TORCH_LIBRARY(dit_fast_ext, m) {
  // mean, rstd: [B, L] in the compute dtype (float32, float64 if any input is float64): the row mean
  // of x (resp. x_out), computed as pivot + mean(row - pivot) with the pivot the row's first element,
  // and 1 / sqrt(var + eps). The same definition as the Triton ops; the backward corrects for the
  // mean's rounding with mean(x - mean), so no pivot is re-read.
  // Norm modes (adaln_common.h): rms (RMSNorm; mean saved as 0), weight (the norm's gain [D]), shift None
  // (scale-only adaLN).
  m.def("adaln_modulate_fwd(Tensor x, Tensor? shift, Tensor scale, float eps, ScalarType? h_dtype, bool rms=False,"
        " Tensor? weight=None) -> (Tensor h, Tensor mean, Tensor rstd)");
  // dshift, dscale, dweight in the compute dtype; dweight [D] (summed over B and L), empty without a gain.
  m.def("adaln_modulate_bwd(Tensor dh, Tensor x, Tensor mean, Tensor rstd, Tensor scale, bool rms=False,"
        " Tensor? weight=None) -> (Tensor dx, Tensor dshift, Tensor dscale, Tensor dweight)");
  // bias: [D] or None, x_out = x + gate * (y + bias) (adaln_ops.h: add_bias); dbias is empty without one.
  m.def("gated_residual_fwd(Tensor x, Tensor y, Tensor gate, Tensor? bias) -> Tensor");
  // dx is dout itself.
  m.def("gated_residual_bwd(Tensor dout, Tensor y, Tensor gate, Tensor? bias) -> (Tensor dy, Tensor dgate,"
        " Tensor dbias)");
  m.def("gated_residual_adaln_fwd(Tensor x, Tensor y, Tensor gate, Tensor? bias, Tensor? shift, Tensor scale,"
        " float eps, ScalarType? h_dtype, bool rms=False, Tensor? weight=None)"
        " -> (Tensor x_out, Tensor h, Tensor mean, Tensor rstd)");
  m.def("gated_residual_adaln_bwd(Tensor dh, Tensor? dx_out, Tensor x_out, Tensor y, Tensor gate, Tensor? bias,"
        " Tensor mean, Tensor rstd, Tensor scale, bool rms=False, Tensor? weight=None) -> (Tensor dx, Tensor dy,"
        " Tensor dgate, Tensor dbias, Tensor dshift, Tensor dscale, Tensor dweight)");
}

#define DIT_FAST_TORCH_VERSION \
  DIT_FAST_STR(TORCH_VERSION_MAJOR) "." DIT_FAST_STR(TORCH_VERSION_MINOR) "." DIT_FAST_STR(TORCH_VERSION_PATCH)

// Readable from the file even when loading it fails on an undefined symbol of another torch.
extern "C" __attribute__((used)) const char dit_fast_torch_version_tag[] =
    "dit_fast_torch_version=" DIT_FAST_TORCH_VERSION ";";

// A plain C-API module: importing it loads the library above; `torch_version` and `with_cuda`
// let the Python side tell a stale build from a working one.
static struct PyModuleDef dit_fast_module = {
    PyModuleDef_HEAD_INIT, "_C", "dit_fast C++/CUDA kernels (torch ops in torch.ops.dit_fast_ext)", -1, nullptr,
};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&dit_fast_module);
  if (mod == nullptr) return nullptr;
  const char* version = DIT_FAST_TORCH_VERSION;
#ifdef DIT_FAST_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  Py_INCREF(with_cuda);
  if (PyModule_AddStringConstant(mod, "torch_version", version) < 0 ||
      PyModule_AddObject(mod, "with_cuda", with_cuda) < 0) {
    Py_DECREF(with_cuda);
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
