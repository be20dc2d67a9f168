"""fc1 and GELU-tanh in one GEMM (cuBLASLt's GELU epilogue), for inference on CUDA, once checked.

`torch._addmm_activation(bias, x, weight.T, use_gelu=True)` adds the bias and applies GELU in the GEMM's
epilogue on CUDA (cuBLASLt), saving a read and a write of fc1's [B*L, 4D] output. Which GELU it computes
is the library's choice: on the CPU it is the erf form (not DiT's), and the cuBLASLt epilogue is
documented only as "GELU". So it is taken for a (device, dtype) only after `check` has run it once there
on an exactly representable problem and found
  - the tanh form: in float32 it is within 1e-5 of float64 GELU-tanh and farther from the erf form, and
  - the accuracy of the eager path: in the dtype used, its error against float64 GELU-tanh is at most
    twice that of F.gelu(F.linear(...), approximate="tanh") run in the same dtype (tests/tolerances.py's rule).
Otherwise fc1 stays F.linear + the Triton GELU pass, and the reason is warned once.

Used only where it cannot cost more than it saves: no autograd (the epilogue saves no pre-activation),
eager (not while compiling: the check syncs), a bias, and x, weight and bias already in the activation
dtype. Under autocast with float32 weights the F.linear path is kept, because an explicit cast of the
weight per call would cost more than the pass saved at sampling batch sizes, and autocast's own cast
has a cache. DIT_FAST_GELU_EPILOGUE=0 turns it off.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

_DEVICE_TYPES = ("cuda",)
_verdicts: dict[tuple[str, torch.dtype], tuple[bool, str]] = {}


def enabled() -> bool:
    return os.environ.get("DIT_FAST_GELU_EPILOGUE", "auto").strip().lower() not in ("0", "off", "false", "no")


def _exact_problem(device: torch.device):
    """x, weight, bias whose products and sums are exact in bf16/tf32/fp32: pre-activations on a 1/16 grid
    in about [-6, 6], where the tanh and erf forms differ by up to 5e-4."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (512, 16), generator=g).double()
    w = torch.randint(-4, 5, (256, 16), generator=g).double() / 16
    b = torch.randint(-16, 17, (256,), generator=g).double() / 16
    return x.to(device), w.to(device), b.to(device)


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max())


def check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(usable, why): whether _addmm_activation computes GELU-tanh on `device` in `dtype` (see above)."""
    x, w, b = _exact_problem(device)
    pre = F.linear(x, w, b)
    ref_tanh = F.gelu(pre, approximate="tanh")
    ref_erf = F.gelu(pre)
    try:
        out32 = torch._addmm_activation(b.float(), x.float(), w.float().t(), use_gelu=True)
        out = torch._addmm_activation(b.to(dtype), x.to(dtype), w.to(dtype).t(), use_gelu=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable", and says why
        return False, f"torch._addmm_activation failed: {type(e).__name__}: {e}"
    e_tanh, e_erf = _max_err(out32, ref_tanh), _max_err(out32, ref_erf)
    if not (e_tanh <= 1e-5 and e_tanh < e_erf):
        form = "the erf form" if e_erf < e_tanh else "neither GELU form"
        return False, f"its GELU is {form} (float32 max error {e_tanh:.2e} vs tanh, {e_erf:.2e} vs erf)"
    eager = F.gelu(F.linear(x.to(dtype), w.to(dtype), b.to(dtype)), approximate="tanh")
    bound = 2 * _max_err(eager, ref_tanh) + 1e-7
    e_dtype = _max_err(out, ref_tanh)
    if e_dtype > bound:
        return False, f"{dtype} max error {e_dtype:.2e} vs float64 GELU-tanh exceeds twice eager's ({bound:.2e})"
    return True, f"tanh form (float32 error {e_tanh:.1e}; {dtype} error {e_dtype:.1e} <= {bound:.1e})"


def verdict(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """check()'s answer, computed once per (device, dtype); a refusal is warned once."""
    key = (str(device), dtype)
    if key not in _verdicts:
        with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
            _verdicts[key] = check(device, dtype)
        if not _verdicts[key][0]:
            warnings.warn(f"dit_fast: fc1 runs without cuBLASLt's GELU epilogue on {device} ({dtype}): "
                          f"{_verdicts[key][1]}; it uses F.linear + the Triton GELU pass", stacklevel=3)
    return _verdicts[key]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def linear_gelu_tanh(x, weight, bias, act_dtype: torch.dtype):
    """GELU_tanh(x @ weight.T + bias) in one GEMM when that is allowed and checked (see above), else None."""
    if (
        x.device.type not in _DEVICE_TYPES
        or bias is None
        or not enabled()
        or torch.compiler.is_compiling()
        or not (x.dtype == weight.dtype == bias.dtype == act_dtype)
        or act_dtype not in (torch.float32, torch.bfloat16, torch.float16)
    ):
        return None
    if (str(x.device), act_dtype) not in _verdicts and _capturing(x.device):
        return None  # the check synchronizes: never inside a CUDA graph capture (warm-up runs decide)
    if not verdict(x.device, act_dtype)[0]:
        return None
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])
