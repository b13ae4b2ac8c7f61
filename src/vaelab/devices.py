"""Where and how a model computes: the device a name asks for, the autocast precision, and the
channels-last layout for convolutions. Used by the trainer and by every command that runs a model.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but no CUDA device is available")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def bf16_slow(device: torch.device) -> bool:
    """Whether bf16 autocast would be emulated on `device`: a CPU whose oneDNN has no bf16 kernels
    (they need AVX-512). There every bf16 multiply is converted and computed the slow way: on an
    AVX2 EPYC the MLP VAE's 10 epochs took 372 s in bf16 against 50 s in fp32
    (benchmarks/RESULTS.md)."""
    if device.type != "cpu":
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return check is not None and not check()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def wants_channels_last(model: torch.nn.Module) -> bool:
    """A model's `channels_last` attribute if it declares one, else: does it hold 2-D convolutions?
    oneDNN (CPU) and cuDNN (GPU) run NHWC convolutions without the layout reorders NCHW needs."""
    declared = getattr(model, "channels_last", None)
    if declared is not None:
        return bool(declared)
    return any(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in model.modules())


@contextmanager
def channels_last(model: torch.nn.Module, enabled: bool = True):
    """Channels-last weights inside the block only. A (B, 1, 28, 28) batch is already
    channels-last (one channel), so the layout then carries through every convolution. Restored
    afterwards: a model handed back computes exactly as one rebuilt from its run folder (the two
    layouts differ in the last bit)."""
    if not enabled:
        yield
        return
    model.to(memory_format=torch.channels_last)  # in place: optimizers keep their parameters
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)
