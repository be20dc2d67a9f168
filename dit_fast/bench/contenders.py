"""What the model benchmarks compare, built the same way for throughput, profile and parity.

A contender is one model implementation (the reference in eager mode, the reference under
torch.compile, dit_fast on one kernel backend, optionally compiled) with the same weights and the
same inputs as every other.

"reference" is the reference model as built: attention through F.scaled_dot_product_attention, which
is what the official DiT runs with a current timm (timm's Attention.fused_attn is on by default).
"reference-math" is the same model with every block's `attn.fused_attn = False`: the explicit
`(q * scale) @ k^T`, softmax, `@ v` path of the published code with an old timm. torch.compile does not
rewrite that form into SDPA, so it is a slower baseline; it is kept, named for what it is, and every
speedup headline is taken against "reference" and "reference+compile".

The family follows the shape (DiT, SiT, LightningDiT: dit_fast.reference's class of that name). For
LightningDiT, "reference+compile-blocks" is the published model as its authors run it: torch.compile of
every block, of the t and y embedders and of the final layer, each on its own (`module.compile()`), the
top-level forward eager.

Training with shared weights (share_weights=True): every contender is a view of ONE set of Parameters
(the reference's): reference variants are copies of its module tree holding the very same Parameter and
buffer objects, dit_fast is from_reference(ref, share_weights=True), compiled variants wrap those; one
optimizer updates them all. Memory is then one model + one optimizer state + one step's activations.

Precision policy, identical for all contenders and modes: weights
stay float32 and `dtype` is applied with torch.autocast (the official training recipe; for the
forward modes it keeps every contender on one numerical footing). dtype float32 disables autocast.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import probe
from .flops import DiTShape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CFG_SCALE = 4.0
NUM_CLASSES = 1000


def parse_dtype(name: str) -> torch.dtype:
    key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_reference(shape: DiTShape, device) -> nn.Module:
    """The reference model of the shape's family (dit_fast.reference.DiT, SiT or LightningDiT), published init."""
    from .. import reference

    cls = getattr(reference, shape.family)
    with torch.device(device):  # initialize on the device: DiT-XL/2's init on a host CPU takes seconds
        model = cls(**shape.constructor_kwargs(), num_classes=NUM_CLASSES)
    return model.to(device)


def available_backends(device_type: str) -> list[str]:
    """Concrete kernel families that run on this device type (the Triton interpreter is not a speed path)."""
    out = []
    for b in ("triton", "ext", "torch"):
        ok, _ = probe(b, device_type)
        if ok and not (b == "triton" and device_type == "cpu"):
            out.append(b)
    return out


@dataclass
class Contender:
    name: str
    kind: str  # "reference" | "dit_fast"
    backend: str | None = None
    compiled: bool = False
    attn: str = "auto"
    math_attention: bool = False  # reference only: every block's attn.fused_attn = False
    compile_blocks: bool = False  # reference only: compile each block, embedder and the final layer, not forward
    extra: dict = field(default_factory=dict)


def reference_contenders(compiled: bool, family: str = "DiT") -> list[Contender]:
    """The reference as built (SDPA) and reference-math, eager or under torch.compile; compiled LightningDiT
    also as its authors run it (reference+compile-blocks, first: the baseline its speedups are taken against)."""
    tail = "+compile" if compiled else ""
    out = []
    if compiled and family == "LightningDiT":
        out.append(Contender("reference+compile-blocks", "reference", compiled=True, compile_blocks=True))
    return out + [Contender(f"reference{tail}", "reference", compiled=compiled),
                  Contender(f"reference-math{tail}", "reference", compiled=compiled, math_attention=True)]


def contender_list(device_type: str, backends: list[str] | None, compile_ref: bool, compile_fast: bool,
                   attn: str, only: list[str] | None = None, family: str = "DiT") -> list[Contender]:
    """Eager contenders first, compiled ones last: a run cut short by a timeout (compiling is the slow
    part) still has every eager number. `only`: keep these names (in this order of kinds), all of
    which must be contenders of the run (ValueError naming the ones that are not)."""
    names = backends or available_backends(device_type)
    out = reference_contenders(compiled=False)
    out += [Contender(f"dit_fast[{b}]", "dit_fast", backend=b, attn=attn) for b in names]
    if compile_ref:
        out += reference_contenders(compiled=True, family=family)
    if compile_fast:
        out += [Contender(f"dit_fast[{b}]+compile", "dit_fast", backend=b, compiled=True, attn=attn) for b in names]
    if only:
        known = [c.name for c in out]
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"expected contender names of this run (one of {', '.join(known)}), "
                             f"got {', '.join(map(repr, unknown))}")
        out = [c for c in out if c.name in only]
    return out


def set_reference_attention(model: nn.Module, math: bool) -> nn.Module:
    """Every reference block's attention on the explicit math path (math=True) or on SDPA (False).

    Sets timm's attribute `fused_attn` on each block's Attention; on a model whose Attention does not
    read it, setting it changes nothing."""
    for block in model.blocks:
        block.attn.fused_attn = not math
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of model's module tree whose Parameters and buffers are the very objects of `model` (own
    modules, so own attributes and compile wrappers; the same weights, gradients and optimizer state)."""
    import copy

    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def compile_blocks(model: nn.Module) -> nn.Module:
    """LightningDiT's published way to run: torch.compile on each block, the t and y embedders and the final
    layer (in place, module.compile()); the top-level forward, patch embedding and unpatchify stay eager."""
    for module in (*model.blocks, model.t_embedder, model.y_embedder, model.final_layer):
        module.compile()
    return model


def instantiate(c: Contender, reference: nn.Module, share_weights: bool = False) -> nn.Module:
    """A model for contender c holding a copy of `reference`'s weights, or (share_weights) the very same
    Parameter objects (module docstring)."""
    import copy

    if c.kind == "reference":
        tree = shared_copy(reference) if share_weights else copy.deepcopy(reference)
        model = set_reference_attention(tree, math=c.math_attention)
    else:
        from ..models import from_reference

        model = from_reference(reference, share_weights=share_weights, backend=c.backend, attn_backend=c.attn)
    if c.compile_blocks:
        return compile_blocks(model)
    if c.compiled:
        # Compile forward only and install it on the instance: model(...) and forward_with_cfg
        # (which calls self.forward) then share one compiled graph per mode; the guidance
        # arithmetic of forward_with_cfg stays eager (a few elementwise ops on the output).
        model.forward = torch.compile(model.forward)
    return model


@dataclass
class Inputs:
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor


def make_inputs(shape: DiTShape, batch: int, device, generator_seed: int = 0) -> Inputs:
    """x, t, y (and the DDPM step's noise): t integer steps for DiT, continuous in [0, 1] for flow models."""
    g = torch.Generator(device="cpu").manual_seed(generator_seed)
    s, c = shape.input_size, shape.in_channels
    x = torch.randn(batch, c, s, s, generator=g)
    t = torch.rand(batch, generator=g) if shape.flow else torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    noise = torch.randn(batch, c, s, s, generator=g)
    return Inputs(x.to(device), t.to(device), y.to(device), noise.to(device))


def make_optimizer(params, device: torch.device, lr: float = 1e-4, family: str = "DiT") -> torch.optim.Optimizer:
    """AdamW as the recipes train: lr 1e-4, no weight decay; LightningDiT's beta2 0.95; fused on CUDA."""
    kwargs = {"fused": True} if device.type == "cuda" else {}
    betas = (0.9, 0.95) if family == "LightningDiT" else (0.9, 0.999)
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.0, betas=betas, **kwargs)


def make_step(model: nn.Module, mode: str, inputs: Inputs, device: torch.device, dtype: torch.dtype, lr: float = 1e-4,
              *, shape: DiTShape | None = None, optimizer: torch.optim.Optimizer | None = None):
    """A zero-argument callable running one benchmark step of `mode` on `model`.

    train: forward under autocast, backward, AdamW (make_optimizer; `optimizer` given: that one, shared by
    contenders with shared weights). The loss: DiT (shape None or a DiT shape) the recipe's noise-prediction
    MSE (the learned-sigma VLB term left out); SiT and LightningDiT the transport's
    (create_transport("Linear", "velocity"); LightningDiT with use_cosine_loss and use_lognorm, the cosine term
    added to the MSE, and gradient clipping at norm 1 as its recipe; t and x0 drawn per step from the global
    generators, as published). Each step keeps its loss tensor in `step.last_loss`.
    """
    x, t, y = inputs.x, inputs.t, inputs.y
    if mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad(), autocast_ctx(device, dtype):
                return model(x, t, y)

        return step
    if mode == "cfg":
        model.eval()

        def step():
            with torch.no_grad(), autocast_ctx(device, dtype):
                return model.forward_with_cfg(x, t, y, CFG_SCALE)

        return step
    if mode == "train":
        model.train()
        family = shape.family if shape is not None else "DiT"
        params = [p for p in model.parameters() if p.requires_grad]
        opt = optimizer if optimizer is not None else make_optimizer(params, device, lr, family)
        loss_of = _flow_loss(model, family, x, y) if family != "DiT" else _ddpm_loss(model, inputs)
        clip = family == "LightningDiT"

        def step():
            with autocast_ctx(device, dtype):
                loss = loss_of()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step.last_loss = loss.detach()
            return loss

        step.optimizer = opt
        step.last_loss = None
        return step
    raise ValueError(f"mode must be one of fwd, cfg, train, got {mode!r}")


def _ddpm_loss(model: nn.Module, inputs: Inputs):
    c = inputs.noise.shape[1]

    def loss():
        return F.mse_loss(model(inputs.x, inputs.t, inputs.y)[:, :c].float(), inputs.noise)

    return loss


def _flow_loss(model: nn.Module, family: str, x1: torch.Tensor, y: torch.Tensor):
    from ..transport import create_transport

    lightning = family == "LightningDiT"
    transport = create_transport("Linear", "velocity", use_cosine_loss=lightning, use_lognorm=lightning)

    def fp32_output(x_t, t, **kwargs):  # the model under autocast, the loss terms in float32
        return model(x_t, t, **kwargs).float()

    def loss():
        terms = transport.training_losses(fp32_output, x1, dict(y=y))
        mse = terms["loss"].mean()
        return mse + terms["cos_loss"].mean() if "cos_loss" in terms else mse

    return loss


def ran_label(backend: str, device_type: str, hidden: int) -> str:
    """dit_fast[<backend>] when every fused op runs on `backend` here; otherwise the families that do run,
    e.g. dit_fast[auto: triton; torch for patch_embed] (auto) or dit_fast[torch (asked triton)]."""
    from ..backends import OPS, resolve

    ran = {op: resolve(backend, op, device_type, False, hidden) for op in OPS}
    families = list(dict.fromkeys(ran.values()))
    if backend != "auto" and families == [backend]:
        return f"dit_fast[{backend}]"
    if backend != "auto" and backend not in families:
        return f"dit_fast[{'+'.join(families)} (asked {backend})]"
    main = backend if backend != "auto" else max(families, key=lambda f: sum(v == f for v in ran.values()))
    others = "; ".join(f"{f} for {','.join(op for op, v in ran.items() if v == f)}" for f in families if f != main)
    head = main if backend != "auto" else f"auto: {main}"
    return f"dit_fast[{head}{'; ' + others if others else ''}]"
