"""Faster kernels for the same math, applied to a built model without touching its code.

fp32 linear layers on the CPU: PyTorch sends `nn.Linear` to MKL's sgemm, which on AMD CPUs takes
its AVX2 path; oneDNN (bundled with PyTorch, and what PyTorch already uses for convolutions and
bf16 matmuls) picks its kernels by instruction set and runs AVX-512 there — about twice the GFLOP/s
at batch-128 shapes on the AVX-512 AMD EPYC of benchmarks/RESULTS.md, and on par with MKL on Intel.
On a CPU without AVX-512 both libraries run AVX2 and oneDNN only adds its per-call overhead (on
an AVX2 EPYC: a 128x20 @ 20x400 layer's forward and backward 524 vs 218 us, the MLP VAE-GAN's
step 36-44 vs 28-30 ms). Nor is AVX-512 faster on AMD's Zen 4, which executes it on its 256-bit
units (`avx512_on_half_width_units`): on a Zen 4 EPYC oneDNN's multiplies alone were 5-10 %
faster, but every model's training step was as fast or faster through MKL (the MLP VAE-GAN's 19.6
against 23.0 ms, the conv VAE-GAN's 110.7 against 119.4 ms). So oneDNN is used where the CPU has
AVX-512 on full-width units (`onednn_faster`).
Same IEEE fp32 arithmetic; only the order of the additions inside a dot product differs, as it
does between any two BLAS libraries.
"""

from __future__ import annotations

import functools
import types
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None,
              activation: str = "none") -> torch.Tensor:
    """activation(a @ b_t.T + bias) with oneDNN: (M, K), (N, K) -> (M, N). `activation` is "none"
    or "relu" (applied in the multiply's epilogue). Strided views are fine; a strided `a` is copied
    row-major first, `b_t` is read as it lies."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, activation, [], "")


class OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b on 2-D fp32 CPU tensors, forward and backward through oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_mm(x, weight, bias)  # (B, in), (out, in) -> (B, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = onednn_mm(grad, weight.t())  # (B, out) @ (out, in) -> (B, in)
        if ctx.needs_input_grad[1]:
            dw = onednn_mm(grad.t(), x.t())  # (out, B) @ (B, in) -> (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad.sum(0)
        return dx, dw, db


def _fast_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu") or x.dim() < 2):
        return F.linear(x, self.weight, self.bias)  # autocast, other dtypes: PyTorch's own path
    lead = x.shape[:-1]
    y = OneDNNLinearFunction.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
    return y.view(*lead, y.shape[-1])  # (..., in) -> (N, in) -> (N, out) -> (..., out)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_vendor_family(cpuinfo: str) -> tuple[str, int | None]:
    """(vendor, family) of the first processor in the text of /proc/cpuinfo: ("AuthenticAMD", 25)
    for a Zen 3 or Zen 4 EPYC; ("", None) for what it does not say."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the end of the first processor's block
            continue
        fields.setdefault(key.strip(), value.strip())
    family = fields.get("cpu family", "")
    return fields.get("vendor_id", ""), int(family) if family.isdigit() else None


def avx512_on_half_width_units(vendor: str, family: int | None) -> bool:
    """Whether the CPU runs AVX-512 as two halves on 256-bit units, so that it does no more
    arithmetic per cycle than AVX2: AMD's family 25 (0x19), whose only AVX-512 CPUs are Zen 4."""
    return vendor == "AuthenticAMD" and family == 0x19


@functools.cache
def onednn_faster() -> bool:
    """Whether fp32 multiplies on this CPU are faster through oneDNN than through PyTorch's own
    path: where oneDNN can run AVX-512 on full-width units (see the module's note)."""
    if not (onednn_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: the instruction set alone decides
        return True
    return not avx512_on_half_width_units(*cpu_vendor_family(cpuinfo))


def matmul(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none") -> torch.Tensor:
    """activation(a @ b_t.T + bias), as `onednn_mm`, through whichever library is faster here
    (`onednn_faster`): (M, K), (N, K) -> (M, N)."""
    if onednn_faster():
        return onednn_mm(a, b_t, bias, activation)
    out = torch.mm(a, b_t.t()) if bias is None else torch.addmm(bias, a, b_t.t())
    return out.relu_() if activation == "relu" else out


def use_onednn_linear(model: nn.Module) -> list[nn.Linear]:
    """Route every `nn.Linear` of `model` through oneDNN on the CPU (fp32; other dtypes, autocast
    and CUDA keep PyTorch's path). Parameters and state_dict are untouched. Returns the layers
    changed, for `restore_linear`."""
    if not onednn_available():
        return []
    changed = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)]
    for module in changed:
        module.forward = types.MethodType(_fast_linear_forward, module)
    return changed


def forward_replaced(module: nn.Module) -> bool:
    """Whether `module`'s forward was replaced on the instance by anything but `use_onednn_linear`
    (which computes the same y = x W^T + b)."""
    forward = vars(module).get("forward")
    return forward is not None and getattr(forward, "__func__", None) is not _fast_linear_forward


def restore_linear(layers: list[nn.Linear]) -> None:
    for module in layers:
        vars(module).pop("forward", None)


@contextmanager
def onednn_linear(model: nn.Module, enabled: bool = True):
    """oneDNN linear layers inside the block only: a model handed back to the caller computes
    exactly as one rebuilt from its run folder (the two libraries differ in the last bit)."""
    layers = use_onednn_linear(model) if enabled else []
    try:
        yield layers
    finally:
        restore_linear(layers)
