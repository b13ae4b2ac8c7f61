"""Adam with its parameters and moment estimates packed into contiguous buffers.

PyTorch's fused Adam runs one kernel per parameter tensor; on a 2-core CPU each call costs about
15 us before any arithmetic, which for the ten tensors of an MLP VAE is a tenth of a training
step. `PackedAdam` keeps every small tensor (and its two moment estimates) as a view into one
buffer, so a hand-written training step can update the whole model with one kernel call per big
tensor plus one for all the small ones (`update`; the sums differ from one call per tensor in the
last bit). `step()` is fused `torch.optim.Adam.step`'s arithmetic bit for bit, with less Python
around it; every model trains with it. `state_dict()` has Adam's format, so checkpoints move
freely between the two, and step hooks run around `step()` as usual. `update` needs the packing
intact: after a `model.to(...)` that moves the parameters, `can_update()` is False and only
`step()` trains them.
"""

from __future__ import annotations

import torch

# Tensors below this many elements share one buffer; larger ones get their own kernel call,
# which lets a training step hand over their gradients without copying them into a buffer.
SMALL_TENSOR = 1 << 16


class PackedAdam(torch.optim.Adam):
    """torch.optim.Adam(params, lr, fused=True) whose small parameters live in one buffer."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999)):
        super().__init__(params, lr=lr, betas=betas, fused=True)
        self.params = [p for group in self.param_groups for p in group["params"]]
        self._pack()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces the moment tensors with new ones
        self._pack()

    def _pack(self) -> None:
        """Move the small parameters, their moments and the step counters into buffers, keeping
        their values (fresh moments are zero, as Adam would create them)."""
        first = self.params[0]
        self.small_index = [i for i, p in enumerate(self.params) if p.numel() < SMALL_TENSOR]
        self.big_index = [i for i, p in enumerate(self.params) if p.numel() >= SMALL_TENSOR]
        self.small = small = [self.params[i] for i in self.small_index]
        n = sum(p.numel() for p in small)
        flat_p, flat_m, flat_v = (torch.zeros(n, dtype=first.dtype, device=first.device) for _ in range(3))
        self.small_grads = torch.zeros_like(flat_p)
        # Adam keeps one step counter per tensor; views of one buffer let a single add advance them
        # all while state_dict() still sees a counter per tensor.
        self.steps = torch.zeros(len(self.params), dtype=torch.float32, device=first.device)
        self.slots = {}  # id(param) -> its gradient's place in small_grads
        offset = 0
        for i, p in enumerate(self.params):
            state = self.state[p]
            had_state = bool(state)
            if had_state:
                self.steps[i] = state["step"].to(self.steps)
            if p.numel() < SMALL_TENSOR:
                k = p.numel()
                views = [buf[offset : offset + k].view_as(p) for buf in (flat_p, flat_m, flat_v)]
                self.slots[id(p)] = self.small_grads[offset : offset + k].view_as(p)
                offset += k
                views[0].copy_(p.detach())
                p.data = views[0]
                if had_state:
                    views[1].copy_(state["exp_avg"])
                    views[2].copy_(state["exp_avg_sq"])
                exp_avg, exp_avg_sq = views[1:]
            elif had_state:
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            else:
                exp_avg = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg_sq = torch.zeros_like(p, memory_format=torch.preserve_format)
            # Adam's key order, so a checkpoint's bytes do not depend on which optimizer wrote it.
            self.state[p] = {"step": self.steps[i], "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        self.small_addresses = [p.data_ptr() for p in small]
        self.flat_params, self.flat_exp_avg, self.flat_exp_avg_sq = flat_p, flat_m, flat_v

    def can_update(self) -> bool:
        """Whether `update` is valid now: one plain Adam group, equal step counters, and the small
        parameters still the buffer's views (a `model.to(...)` that moved them cuts the link;
        `step()` keeps working then, as plain Adam does)."""
        group = self.param_groups[0]
        return (len(self.param_groups) == 1 and not group["amsgrad"] and not group["maximize"]
                and bool(self.small) and [p.data_ptr() for p in self.small] == self.small_addresses
                and bool((self.steps == self.steps[0]).all()))  # `update` advances them as one

    def step(self, closure=None):
        """`torch.optim.Adam.step` (fused), computed the same way: the parameters that have a
        gradient, one `torch._fused_adam_` call per group, bit for bit Adam's result. Without
        Adam's Python around it (about 0.1 ms a call) and without importing TorchDynamo, which
        Adam's `step` does on its first call (1.7 s). What only Adam's own `step` does (a closure,
        a gradient scaler's `grad_scale`/`found_inf`, sparse or mixed-type gradients, options this
        class never sets) goes to it."""
        if closure is not None or getattr(self, "grad_scale", None) is not None \
                or getattr(self, "found_inf", None) is not None:
            return super().step(closure)
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(group.get(k) for k in ("amsgrad", "maximize", "differentiable", "capturable",
                                          "decoupled_weight_decay")) \
                    or isinstance(group["lr"], torch.Tensor) \
                    or any(p.grad.layout != torch.strided or p.grad.dtype != p.dtype or p.dtype != params[0].dtype
                           or p.device != params[0].device or p not in self.state for p in params):
                return super().step(closure)
            work.append((group, params))
        with torch.no_grad():
            for group, params in work:
                states = [self.state[p] for p in params]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1)
                beta1, beta2 = group["betas"]
                torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                   [s["exp_avg_sq"] for s in states], [], steps, lr=group["lr"], beta1=beta1,
                                   beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                   amsgrad=False, maximize=False)
        return None

    def grad_slot(self, p: torch.Tensor) -> torch.Tensor | None:
        """Where `update` reads a small parameter's gradient from (None for a big one): a step that
        writes it there (out=...) saves a copy."""
        return self.slots.get(id(p))

    @torch.no_grad()
    def update(self, grads: list[torch.Tensor]) -> None:
        """One Adam step with `grads` given in parameter order (the params' .grad is not used);
        the arithmetic of `step()`, up to rounding. Only when `can_update()`."""
        group = self.param_groups[0]
        for i in self.small_index:
            slot = self.slots[id(self.params[i])]
            if grads[i] is not slot:
                slot.copy_(grads[i])
        self.steps.add_(1)
        beta1, beta2 = group["betas"]
        big = [self.params[i] for i in self.big_index]
        torch._fused_adam_(
            [self.flat_params, *big],
            [self.small_grads, *(grads[i].contiguous() for i in self.big_index)],
            [self.flat_exp_avg, *(self.state[p]["exp_avg"] for p in big)],
            [self.flat_exp_avg_sq, *(self.state[p]["exp_avg_sq"] for p in big)],
            [],
            [self.steps[0]] * (1 + len(big)),  # all counters are equal: every step updates every tensor
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            eps=group["eps"], amsgrad=False, maximize=False,
        )
