"""The one batched-inference loop: a function over a large input, a chunk at a time, without
gradients, each chunk moved to the model's device and the results gathered on the CPU.

Figures, metrics, the recipes and the autoencoder's end-of-epoch pass all go through `batched`,
so chunking, device transfers, eval mode and the no-gradient mode are decided in one place.
Inference mode, not just no_grad: its tensors skip autograd's version counting, and a result used
outside it (the autoencoder's code statistics) is only read.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Result = torch.Tensor | tuple[torch.Tensor | None, ...]


@torch.inference_mode()
def batched(fn: Callable[..., Result], *inputs: torch.Tensor | int, batch_size: int = 1000,
            device: torch.device | str | None = None, to: torch.device | str | None = "cpu",
            model: nn.Module | None = None, progress=None) -> Result:
    """`fn` over chunks of `batch_size` rows of `inputs`, its results concatenated.

    inputs: tensors of equal length, chunked alike (fn gets one chunk of each, moved to `device`
        when given); or a single int n, for work without input data (sampling): fn then gets
        each chunk's row count.
    fn's result: a tensor, or a tuple of tensors, each concatenated over the chunks (an entry that
        is None for every chunk stays None: a VAE's log-variance, an autoencoder's none).
    to: where the results are gathered (None: where fn returned them).
    model: in eval mode during the pass (batch-norm running statistics, no dropout), its own
        mode restored afterwards.
    progress: anything with `update(n)` (a tqdm bar), told each chunk's row count.
    """
    if len(inputs) == 1 and isinstance(inputs[0], int):
        n, chunks = inputs[0], None
    else:
        n = len(inputs[0])
        if any(len(x) != n for x in inputs):
            raise ValueError(f"inputs of different lengths: {[len(x) for x in inputs]}")
        chunks = inputs
    was_training = model.training if model is not None else None
    if model is not None:
        model.eval()
    try:
        parts = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if chunks is None:
                args = (stop - start,)
            else:
                args = tuple(x[start:stop] if device is None else x[start:stop].to(device) for x in chunks)
            out = fn(*args)
            parts.append(_move(out, to))
            if progress is not None:
                progress.update(stop - start)
    finally:
        if model is not None:
            model.train(was_training)
    return _concatenate(parts)


def _move(out: Result, to) -> Result:
    if to is None:
        return out
    if isinstance(out, tuple):
        return tuple(None if t is None else t.to(to) for t in out)
    return out.to(to)


def _concatenate(parts: list[Result]) -> Result:
    if parts and isinstance(parts[0], tuple):
        columns = zip(*parts)
        return tuple(None if all(t is None for t in col) else torch.cat(col) for col in columns)
    return torch.cat(parts)
