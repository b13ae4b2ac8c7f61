"""Data-parallel training across processes: the process group and the few collectives the
trainer needs. Nothing else here: which process writes what is the trainer's business.

Started by torchrun (`torchrun --nproc-per-node N -m vaelab train ...`, or `vaelab train --nproc N`),
every process reads its place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) and `init` joins the group: gloo on the CPU, NCCL on CUDA with the process on
GPU LOCAL_RANK. Without a group (a plain `vaelab train`, a library call, a test) every helper is
the identity or does nothing, so a single process computes exactly what it always did.

How the work is split (see train.py): every process draws the same batch order and binarization
from the same seed and takes its contiguous share of each global batch; a model's optimizers
average their gradients over the processes just before each step (`GradientSync`, an optimizer
step pre-hook, because the models call `torch.autograd.grad` and `optimizer.step()` themselves);
a model's decision from batch statistics reads `global_mean` so that every process decides alike.

A collective whose peer died (a SIGKILL of one process) raises `PeerLost`, one line, instead of
the backend's traceback; torchrun then ends the job.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError, PeerLost, VaelabError

T = TypeVar("T")


def launched() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is in a group of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes the run folder and prints progress (rank 0, or the only one)."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (when `launched`): NCCL with CUDA device LOCAL_RANK for a CUDA
    `device`, gloo otherwise. Returns the device this process trains on."""
    if not launched() or active():
        return device
    backend = "gloo"
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"process {os.environ.get('RANK')} wants CUDA device {local}, but this machine has "
                              f"{torch.cuda.device_count()}; start at most that many processes per machine")
        torch.cuda.set_device(local)  # "cuda" now means this process's GPU
        device, backend = torch.device("cuda", local), "nccl"
    dist.init_process_group(backend=backend)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RuntimeError as e:  # gloo/NCCL: "Connection closed by peer", a timeout...
        first = (str(e).splitlines() or [""])[0][:160]
        raise PeerLost(f"another process of the job stopped ({first}); its own message says why") from None


def _device() -> torch.device:
    """Where a collective's own tensors live: NCCL reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if active():
        _collective(dist.barrier)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes of `tensor` (in place; the tensor itself in a single process)."""
    if active():
        _collective(lambda: dist.all_reduce(tensor))
    return tensor


def global_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over processes of `tensor` (a new tensor; `tensor` itself in a single process),
    for a decision every process must take alike (the VAE-GAN's equilibrium rule)."""
    if not active():
        return tensor
    return all_sum(tensor.detach().clone()).div_(world_size())


def agree_stop(flag: str | None) -> str | None:
    """A stop request (a signal's name) that one process received becomes every process's: read
    at the loop's sync points, so all stop after the same step and save one consistent state."""
    if not active():
        return flag
    number = torch.tensor([0 if flag is None else int(signal.Signals[flag])], device=_device())
    _collective(lambda: dist.all_reduce(number, op=dist.ReduceOp.MAX))
    return signal.Signals(int(number)).name if number.item() else None


def all_gather(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable; the RNG states), in rank order; [obj] in a single process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective(lambda: dist.all_gather_object(out, obj))
    return out


def on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on the main process only; its result, or the VaelabError it raised, reaches
    every process, so a refusal (a folder in use, say) is raised alike everywhere. Other
    processes get None where `fn` returned something."""
    if not active():
        return fn()
    outcome: list[Any] = [None]
    if is_main():
        try:
            result = fn()
            outcome = [("ok", result if isinstance(result, (str, os.PathLike)) else None)]
        except VaelabError as e:
            outcome = [("error", (type(e), str(e)))]
            _collective(lambda: dist.broadcast_object_list(outcome, src=0))
            raise
        _collective(lambda: dist.broadcast_object_list(outcome, src=0))
        return result
    _collective(lambda: dist.broadcast_object_list(outcome, src=0))
    kind, value = outcome[0]
    if kind == "error":
        cls, message = value
        try:
            error = cls(message)
        except TypeError:  # an error type built from other arguments
            error = VaelabError(message)
        raise error
    return value


def broadcast_tensors(tensors) -> None:
    """Every process takes the main process's values of `tensors` (in place)."""
    if not active():
        return
    for t in tensors:
        buf = t.detach().contiguous()
        _collective(lambda: dist.broadcast(buf, src=0))
        if buf.data_ptr() != t.data_ptr():
            t.data.copy_(buf)


def broadcast_module(model: torch.nn.Module) -> None:
    """Weights and buffers from the main process (at the start, as DDP does)."""
    broadcast_tensors([*model.parameters(), *model.buffers()])


def broadcast_buffers(model: torch.nn.Module) -> None:
    """The main process's buffers (batch-norm statistics) everywhere, before evaluating and
    saving: every process then evaluates and saves the same model (DDP's broadcast_buffers)."""
    broadcast_tensors(list(model.buffers()))


def rank_seed(seed: int) -> int:
    """The seed of this process's own randomness (reparameterization noise...): `seed` itself on
    the main process, so that its draws are a single process's, and a seed derived from (seed,
    rank) on the others."""
    r = rank()
    return seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def shard(n: int, r: int | None = None, w: int | None = None) -> slice:
    """Process r's (default: this one's) contiguous share of n items (a global batch) among w
    processes: `torch.tensor_split`'s."""
    r, w = (rank() if r is None else r), (world_size() if w is None else w)
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def check_batches(n_images: int, batch_size: int) -> None:
    """Refuse a split that would leave a process without images in some batch."""
    w = world_size()
    if w == 1:
        return
    last = n_images % batch_size or batch_size
    if min(batch_size, n_images, last) < w:
        raise ConfigError(f"--batch-size {batch_size} over {n_images} images makes a batch of {min(batch_size, last)}, "
                          f"too few to split across {w} processes (each needs an image); choose a batch size "
                          f"whose last batch holds at least {w}")


class GradientSync:
    """Averages a model's gradients over the processes just before each of its optimizers steps
    (an optimizer step pre-hook, so it serves models that take their own steps). One flat buffer
    per optimizer and step. Each process's gradient is of the mean loss over its share of the
    global batch, so it is weighted by `share` (its images / the global batch's) and summed:
    the gradient of the global batch's mean loss, as one process computes it.

    `clip_grad`: the norm limit, applied here after the averaging (the trainer passes the models
    no limit then), to each optimizer's parameters, as the models clip each optimizer's."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], clip_grad: float | None):
        self.share = 1.0
        self.clip_grad = clip_grad
        self.handles = [opt.register_step_pre_hook(self._hook) for opt in optimizers.values()]

    def _hook(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(self.share)
        all_sum(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad, foreach=True)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
