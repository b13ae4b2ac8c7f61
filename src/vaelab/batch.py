"""What a model's training step receives: the batch, and where the step stands in the run.

`Batch` is the unit every loss is computed on (`forward`, `training_step`), so a model that needs
the labels (a conditional one) finds them there without any change to the trainer. `StepState`
tells the step where it is (for a schedule such as a KL warm-up) and how the trainer wants it
taken (the gradient-norm limit); the trainer fills it, the model only reads it.

A leaf module: it imports nothing from vaelab, so data, models and the trainer can all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """Images (B, 1, 28, 28) as floats in [0, 1], and their labels (B,) int64 where the dataset
    has them (None otherwise)."""

    x: torch.Tensor
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class StepState:
    """Where a training step stands, and how it is to be taken.

    `step` counts the optimizer steps completed before this one (0 for the run's first, so a
    resumed run continues the count); `epoch` is the epoch being trained, from 1, as in
    history.csv. The totals are the run's as configured now (`--epochs` may extend a run on
    resume). `clip_grad` is the trainer's gradient-norm limit (None: no clipping), here because
    the model takes the step: the VAE-GAN clips each network's gradients on its own. In
    data-parallel training it is None: the gradients are clipped once averaged across the
    processes, by the hook that averages them (distributed.GradientSync).
    """

    step: int = 0
    epoch: int = 1
    epochs: int = 1
    steps_per_epoch: int = 1
    clip_grad: float | None = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def progress(self) -> float:
        """The fraction of the run's steps completed before this one, in [0, 1)."""
        return self.step / self.total_steps

    def warmup_fraction(self, steps: int) -> float:
        """How far a linear warm-up of `steps` steps has come at this step: step / steps, capped
        at 1 (1 at once when steps is 0). Read from the step count alone, so a resumed run, whose
        count continues, takes the weights of the uninterrupted one."""
        return 1.0 if steps <= 0 else min(1.0, self.step / steps)
